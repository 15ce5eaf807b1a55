#!/usr/bin/env python
"""How far the trainer's cheaper latents are from the exact ones: crops cut from cached latents, flipped
latents, and the VAE run in bf16.

With `--cache_latents --random_crop --latent_cache_crops latent_grid`, the cache encodes each image once,
resized to cover its target size (`cached_placements`), and each step cuts its crop from those latents on
the 8-pixel latent grid (`cached_crop`); the default, `exact`, encodes a few crops of each image instead.
The VAE's encoder sees past a crop's edges, so a crop cut from the whole image's latents is not the
encoding of the crop alone. This prints, for random crops of the given images, the difference of the
latent means (max and mean, absolute and relative to the mean magnitude of the latents), over the whole
crop and over its interior (a border of `--border` latents left out). It also prints how far the latents
of a flipped image are from the flipped latents of the image (the reason the cache encodes the flip
apart), and how far the latents of the VAE in bf16 (`--vae_precision bf16`) are from float32's, on each
image's centre crop.

Example (the demo's tiny SDXL, random weights, so its figures say little about SDXL's own VAE):
  python scripts/measure_latents.py --pretrained_model_name_or_path tiny-sdxl \
      --train_data_dir fill-data/imagefolder --image_size 64 160 --target_size 64 64
"""

import argparse
import copy
import glob
import os
import random

import torch
from PIL import Image

from t2i_train import geometry  # the trainer's crops and the cache's regions are what is measured


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="An SDXL folder or hub id (its vae/).")
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None, help="A VAE of its own instead.")
    parser.add_argument("--train_data_dir", required=True, help="A folder whose images (searched recursively) are used.")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--crops_per_image", type=int, default=8)
    parser.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                        help="Resize each image to this first (to give random crops room on square images).")
    parser.add_argument("--target_size", type=int, nargs=2, default=(1024, 1024), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--border", type=int, default=2, help="Latents at each edge left out of the interior figures.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_vae(options):
    from diffusers import AutoencoderKL

    if options.pretrained_vae_model_name_or_path is not None:
        return AutoencoderKL.from_pretrained(options.pretrained_vae_model_name_or_path)
    return AutoencoderKL.from_pretrained(options.pretrained_model_name_or_path, subfolder="vae")


@torch.no_grad()
def latent_mean(vae, picture):
    pixels = geometry.to_training_pixels(picture)[None].to(vae.dtype)
    return vae.encode(pixels).latent_dist.mean[0].float()


def differences(measured, reference, border=0):
    """(max, mean) absolute difference, and both over the mean magnitude of `reference`."""
    if border:
        measured, reference = measured[:, border:-border, border:-border], reference[:, border:-border, border:-border]
    difference = (measured - reference).abs()
    scale = reference.abs().mean().item()
    return difference.max().item(), difference.mean().item(), difference.max().item() / scale, difference.mean().item() / scale


def measure(vae, pictures, target_size, crops_per_image, border, seed):
    """{what: [(max, mean, max relative, mean relative)] per sample}."""
    rng = random.Random(seed)
    rows = {"crop cut from the cached latents": [], f"  its interior (border {border})": [],
            "flip of the latents, against the flip's latents": [], "VAE in bf16, against float32": []}
    vae_in_bf16 = copy.deepcopy(vae).to(torch.bfloat16)
    for picture in pictures:
        region, = geometry.cached_placements(picture.height, picture.width, target_size, "latent_grid", None)
        region_mean = latent_mean(vae, region.apply(picture))
        cached = {"mean": region_mean, "std": region_mean}  # only the means are compared
        for _ in range(crops_per_image):
            placement = geometry.draw_placement(picture.height, picture.width, target_size, rng, random_crop=True,
                                             grid=geometry.LATENT_GRID)
            cut, _ = geometry.cached_crop(cached, placement, "latent_grid")
            encoded = latent_mean(vae, placement.apply(picture))
            rows["crop cut from the cached latents"].append(differences(cut, encoded))
            rows[f"  its interior (border {border})"].append(differences(cut, encoded, border))
        centre = geometry.draw_placement(picture.height, picture.width, target_size).apply(picture)
        rows["flip of the latents, against the flip's latents"].append(differences(
            latent_mean(vae, centre).flip(-1), latent_mean(vae, centre.transpose(Image.FLIP_LEFT_RIGHT))))
        rows["VAE in bf16, against float32"].append(differences(latent_mean(vae_in_bf16, centre), latent_mean(vae, centre)))
    return rows


def main(options):
    files = sorted(path for pattern in ("*.png", "*.jpg", "*.jpeg", "*.webp")
                   for path in glob.glob(os.path.join(options.train_data_dir, "**", pattern), recursive=True))
    files = [path for path in files  # targets only: an imagefolder keeps its conditions apart
             if "conditioning" not in os.path.relpath(path, options.train_data_dir)][: options.num_images]
    if not files:
        raise SystemExit(f"error: no images under {options.train_data_dir}")
    pictures = []
    for path in files:
        picture = Image.open(path).convert("RGB")
        if options.image_size:
            picture = picture.resize(tuple(reversed(options.image_size)), Image.BILINEAR)
        pictures.append(picture)
    vae = load_vae(options).eval()
    rows = measure(vae, pictures, tuple(options.target_size), options.crops_per_image, options.border, options.seed)
    print(f"{len(pictures)} images of {pictures[0].height}×{pictures[0].width} (first), target {options.target_size[0]}"
          f"×{options.target_size[1]}, {options.crops_per_image} random crops each; latent means, float32 unless named")
    print("| compared | samples | max abs | mean abs | max / mean magnitude | mean / mean magnitude |")
    print("|---|---:|---:|---:|---:|---:|")
    for what, values in rows.items():
        largest = max(value[0] for value in values)
        mean = sum(value[1] for value in values) / len(values)
        largest_relative = max(value[2] for value in values)
        mean_relative = sum(value[3] for value in values) / len(values)
        print(f"| {what} | {len(values)} | {largest:.4f} | {mean:.4f} | {100 * largest_relative:.1f} % |"
              f" {100 * mean_relative:.2f} % |")
    return rows


if __name__ == "__main__":
    main(parse_args())
