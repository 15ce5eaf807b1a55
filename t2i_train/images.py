"""Image helpers shared by training, validation and the scripts: stored images opened as `datasets`
decodes them, canny edge maps, and the size and grid of images generated from a condition."""

import io
import math
import os

import cv2
import numpy as np
from PIL import Image, ImageOps

from .stopping import Refusal

EXIF_ORIENTATION = 0x0112  # the EXIF tag datasets applies when it decodes an image
CANNY_LOW_RANGE = (50, 150)  # random canny thresholds: low in this range,
CANNY_GAP_RANGE = (50, 150)  # high = low + a gap in this range


def check_image_file(flag, path):
    if not os.path.isfile(path):
        raise Refusal(f"`{flag}` {path!r} does not exist.")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise Refusal(f"`{flag}` {path!r} is not a readable image ({error}).") from None


def open_stored_image(value):
    """A PIL image from what an undecoded `datasets.Image` column stores (bytes or a path)."""
    if value is None:
        raise Refusal("no image")
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def upright_size(image):
    """(width, height) of a just-opened image as it is shown, and as `datasets` decodes it: after its
    EXIF orientation (a quarter turn swaps the sides). Read from the header alone.

    A PNG's EXIF is taken from the chunks before its pixel data, where the PNG spec puts it, because
    Pillow's `getexif()` would decode the whole PNG to look for one after.
    """
    width, height = image.size
    if image.format == "PNG":
        exif = Image.Exif()
        exif.load(image.info.get("exif"))
    else:
        exif = image.getexif()
    return (height, width) if exif.get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (width, height)


def verified_upright_size(image):
    """`upright_size`, then a check of the image's data (without decoding it to pixels)."""
    size = upright_size(image)
    image.verify()
    return size


def to_rgb(image):
    """An image in 8-bit RGB. 16-bit and 32-bit integer images (depth maps are often 16-bit PNGs) are
    scaled by their bit depth, and float images taken as [0, 1] (by their maximum when it is above
    1): Pillow's own convert clips them to 255, which turns most of them white."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return image.convert("RGB")
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = max(1.0, pixels.max())
    else:  # Pillow opens a 16-bit PNG as I;16 or, in older versions, as I
        scale = 2**16 - 1 if image.mode.startswith("I;16") or pixels.max() < 2**16 else 2**31 - 1
    return Image.fromarray(np.clip(np.round(pixels / scale * 255), 0, 255).astype(np.uint8)).convert("RGB")


def load_upright_rgb(value):
    """A stored image decoded as `datasets` decodes it (EXIF orientation applied), in 8-bit RGB."""
    return to_rgb(ImageOps.exif_transpose(open_stored_image(value)))


def canny_condition(image, low_threshold, high_threshold):
    """The canny condition of an image: OpenCV's edge map, white edges on black, as RGB."""
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def random_canny_thresholds(rng):
    """(low, high) drawn at random: the edge density varies from sample to sample, as in the
    original canny adapters' training, so the adapter does not learn one detector setting."""
    low = rng.randint(*CANNY_LOW_RANGE)
    return low, low + rng.randint(*CANNY_GAP_RANGE)


def pair_validation_inputs(prompts, images, prompt_flag="--validation_prompt", image_flag="--validation_image"):
    """(prompt, image) pairs: equal counts pair up; a single prompt or image is shared."""
    if not prompts or not images:
        raise Refusal(f"Pass at least one `{prompt_flag}` and one `{image_flag}`.")
    if len(prompts) == len(images):
        return list(zip(prompts, images))
    if len(images) == 1:
        return [(prompt, images[0]) for prompt in prompts]
    if len(prompts) == 1:
        return [(prompts[0], image) for image in images]
    raise Refusal(
        f"Got {len(prompts)} `{prompt_flag}`s and {len(images)} `{image_flag}`s: provide as many of each,"
        " or exactly one of either."
    )


def validation_size(width, height, resolution, multiple):
    """(width, height) for a validation image: about resolution² pixels, the image's own aspect
    ratio (upstream stretches it to a square), both sides multiples of the adapter's downscale."""
    scale = resolution / math.sqrt(width * height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def image_grid(images, rows, cols):
    width, height = images[0].size
    grid = Image.new("RGB", size=(cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, box=(i % cols * width, i // cols * height))
    return grid
