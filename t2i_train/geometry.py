"""Where an image lands in its training crop (resized to cover the target, cropped, maybe flipped), and
what the latent cache encodes of it: the centre crop, a few exact crops, or one region that crops on the
latent grid are cut from, each beside its flip.

The transform places the image and its condition alike by a `Placement`; the cache uses the same
placements, so that a cached sample's latents are those of the pixels its condition is cut from."""

import typing

from PIL import Image
from torchvision import transforms

LATENT_GRID = 8  # pixels per latent of SDXL's VAE: crops from cached latents start on this grid


def cover_size(height, width, target_height, target_width):
    """The size a (height, width) image is resized to so that it just covers the target; for a
    square target this is torchvision's Resize(shorter side) arithmetic, as upstream uses."""
    if target_height / height >= target_width / width:
        return target_height, int(target_height * width / height)
    return int(target_width * height / width), target_width


class Placement(typing.NamedTuple):
    """Where an image lands in its training crop: resized to (height, width), cropped at (top, left)
    to the target size, maybe flipped."""

    height: int
    width: int
    top: int
    left: int
    target_height: int
    target_width: int
    flip: bool = False

    def apply(self, picture):
        box = (self.left, self.top, self.left + self.target_width, self.top + self.target_height)
        picture = picture.resize((self.width, self.height), Image.BILINEAR).crop(box)
        return picture.transpose(Image.FLIP_LEFT_RIGHT) if self.flip else picture

    def crop_top_left(self):
        """The crop's corner as the UNet is told it: as seen in the (maybe flipped) image."""
        return self.top, self.width - self.left - self.target_width if self.flip else self.left


def spaced_corner(placement, index, count):
    """The corner of the index-th of `count` crops spread evenly over the room a placement leaves (the
    first at the top left, the last at the bottom right; one crop at the centre)."""
    def spread(room):
        return room // 2 if count == 1 else round(index * room / (count - 1))

    return (spread(placement.height - placement.target_height), spread(placement.width - placement.target_width))


def draw_placement(height, width, target_size, rng=None, random_crop=False, random_flip=False, grid=1,
                   crop_positions=None):
    """The placement of a (height, width) image in a target-size crop: resized to just cover it,
    then cropped at the centre (torchvision's CenterCrop arithmetic, as upstream) or at random: at a
    corner on a `grid` of pixels (the latent grid, for crops cut from cached latents), or at one of
    `crop_positions` evenly spread corners (the latent cache's exact crops)."""
    target_height, target_width = target_size
    resized_height, resized_width = cover_size(height, width, target_height, target_width)
    if random_crop and crop_positions:
        top, left = spaced_corner(Placement(resized_height, resized_width, 0, 0, target_height, target_width),
                                  rng.randrange(crop_positions), crop_positions)
    elif random_crop:
        top = rng.randint(0, (resized_height - target_height) // grid) * grid
        left = rng.randint(0, (resized_width - target_width) // grid) * grid
    else:
        top = int(round((resized_height - target_height) / 2.0))
        left = int(round((resized_width - target_width) / 2.0))
    flip = random_flip and rng.random() < 0.5
    return Placement(resized_height, resized_width, top, left, target_height, target_width, flip)


def centre_crop(picture, resolution):
    """The resolution² centre crop that training takes of a picture without random placement."""
    return draw_placement(picture.height, picture.width, (resolution, resolution)).apply(picture)


def to_training_pixels(image):
    """A target image as the VAE takes it: a tensor in [-1, 1]."""
    return transforms.functional.normalize(transforms.functional.to_tensor(image), [0.5], [0.5])


def cached_placements(height, width, target_size, cache_crops, crop_positions, grid=LATENT_GRID):
    """What the latent cache encodes of a (height, width) image, unflipped. Without random crops
    (`cache_crops` None): the centre crop at its target size, as training takes it. "exact": the
    `crop_positions` crops that training with the cache chooses from. "latent_grid": the whole image
    resized to cover the target, cut at its top left to the latent grid, so that every crop on the
    grid is a slice of its latents."""
    placement = draw_placement(height, width, target_size)
    if cache_crops is None:
        return [placement]
    if cache_crops == "latent_grid":
        return [placement._replace(top=0, left=0, target_height=placement.height // grid * grid,
                                   target_width=placement.width // grid * grid)]
    corners = dict.fromkeys(spaced_corner(placement, index, crop_positions) for index in range(crop_positions))
    return [placement._replace(top=top, left=left) for top, left in corners]


def cached_entry_prefix(placement, cache_crops):
    """The names of a placement's latents in its image's cache entry: `<prefix>mean`, `<prefix>std`."""
    crop = f"crop{placement.top}x{placement.left}_" if cache_crops == "exact" else ""
    return ("flipped_" if placement.flip else "") + crop


def cached_region_placements(height, width, target_size, cache_crops, crop_positions, random_flip):
    """The placements of everything the latent cache encodes of a (height, width) image, flips included."""
    flips = (False, True) if random_flip else (False,)
    return [placement._replace(flip=flip) for flip in flips
            for placement in cached_placements(height, width, target_size, cache_crops, crop_positions)]


def cached_region_sizes(height, width, target_size, cache_crops, crop_positions, random_flip):
    """The (height, width) of each region the latent cache encodes of such an image: its disk estimate."""
    return [(placement.target_height, placement.target_width) for placement in
            cached_region_placements(height, width, target_size, cache_crops, crop_positions, random_flip)]


def cached_regions(image, target_size, cache_crops, crop_positions, random_flip):
    """{entry prefix: VAE input} of everything the latent cache encodes of an image, flips included."""
    placements = cached_region_placements(image.height, image.width, target_size, cache_crops, crop_positions,
                                          random_flip)
    return {cached_entry_prefix(placement, cache_crops): to_training_pixels(placement.apply(image))
            for placement in placements}


def cached_crop(cached, placement, cache_crops, grid=LATENT_GRID):
    """(mean, std) of a sample's latents from its image's cache entry; with "latent_grid" crops, sliced at
    the placement's crop (a flipped region where the crop lands after the flip)."""
    prefix = cached_entry_prefix(placement, cache_crops)
    mean, std = cached[prefix + "mean"], cached[prefix + "std"]
    if cache_crops != "latent_grid":
        return mean, std
    region_width = mean.shape[-1] * grid
    left = region_width - placement.left - placement.target_width if placement.flip else placement.left
    rows = slice(placement.top // grid, (placement.top + placement.target_height) // grid)
    columns = slice(left // grid, (left + placement.target_width) // grid)
    return mean[:, rows, columns], std[:, rows, columns]
