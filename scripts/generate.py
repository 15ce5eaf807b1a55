#!/usr/bin/env python
"""Generate images with a trained T2I-Adapter on a Stable Diffusion XL base model.

This is a working version of the inference snippet in the README of diffusers'
T2I-Adapter SDXL training example. That snippet imports a scheduler class
that does not exist (``EulerAncestralDiscreteSchedulerTest``; it meant
``EulerAncestralDiscreteScheduler``) and uses a ``pipe`` it never defines.

Each ``--prompt`` is paired with a condition ``--image`` the same way the
trainer pairs its validation flags: equal counts pair up in order, and a
single prompt (or image) is used with every image (or prompt). For each pair
the script writes ``--num_images_per_prompt`` samples, named
``<index>_<prompt slug>.png``, and one ``grid.png`` with a row per pair: the
condition, then its samples.

Every pair starts from a fresh generator seeded with ``--seed``, so a pair
gives the same images whether it is generated alone or with others.

Example:

    python scripts/generate.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --adapter t2iadapter-model \\
        --image fill-data/validation/condition_0.png \\
        --prompt "red circle with blue background"
"""

import argparse
import os
import re

from PIL import Image

from t2i_train.images import pair_validation_inputs

# The trainer (one folder up) holds the pairing rule shared with validation.


SCHEDULERS = ("euler_ancestral", "default")
DTYPES = ("float32", "float16", "bfloat16")


def pair_prompts_and_images(prompts, images):
    """Pair prompts with condition images by the trainer's validation rule: equal counts pair in
    order; one prompt goes with every image, and one image with every prompt."""
    return pair_validation_inputs(list(prompts or []), list(images or []), "--prompt", "--image")


def find_adapter_dir(adapter):
    """Return the folder holding the adapter's ``config.json``.

    Besides a folder written by ``T2IAdapter.save_pretrained``, this accepts a
    training checkpoint folder (``checkpoint-N``), which keeps the adapter in
    a ``t2iadapter`` subfolder.
    """
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"--adapter {str(adapter)!r} is not a folder.")
    for candidate in (adapter, os.path.join(adapter, "t2iadapter")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(
        f"--adapter {str(adapter)!r} has no config.json (nor t2iadapter/config.json); "
        "expected a folder written by T2IAdapter.save_pretrained."
    )


def check_image_files(paths):
    """Fail early, naming the flag, if a condition image is missing."""
    for path in paths:
        if isinstance(path, Image.Image):
            continue  # already an image, e.g. when called from Python
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image {str(path)!r} does not exist.")


def output_size(width, height, multiple, resolution=None):
    """Size to generate at for a condition image of ``width`` x ``height``.

    Without ``resolution`` this is the image's own size; with it, the image
    is scaled so that its shorter side is ``resolution``. Either way the
    aspect ratio is kept and both sides are rounded down to a multiple of
    the adapter's downscale factor, which its pixel-unshuffle requires.

    Not the trainer's validation size (t2i_train.images.validation_size, about resolution² pixels): a
    user generates at the condition's own size, or at a chosen shorter side, and never gets more
    pixels than asked for; validation compares steps of one run, so it keeps the training area. The
    grid differs for the same reason: conditions here may differ in size, validation's are one size.
    """
    if resolution is not None:
        scale = resolution / min(width, height)
        width, height = round(width * scale), round(height * scale)
    rounded = width // multiple * multiple, height // multiple * multiple
    if 0 in rounded:
        raise ValueError(
            f"A {width}x{height} condition is too small for this adapter: "
            f"each side must be at least {multiple} pixels (see --resolution)."
        )
    return rounded


def slugify(text, max_length=48):
    """A file-name-safe version of a prompt: lower case, words joined by dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"


def make_grid(rows_of_images, background=(0, 0, 0)):
    """Lay images out in a grid, one list of images per row.

    Every cell is as large as the largest image; smaller images are centred
    in their cell rather than stretched, and short rows are padded.
    """
    rows = [list(row) for row in rows_of_images]
    images = [image for row in rows for image in row]
    if not images:
        raise ValueError("make_grid needs at least one image.")
    cell_width = max(image.width for image in images)
    cell_height = max(image.height for image in images)
    columns = max(len(row) for row in rows)

    grid = Image.new("RGB", (columns * cell_width, len(rows) * cell_height), background)
    for row_index, row in enumerate(rows):
        for column_index, image in enumerate(row):
            x = column_index * cell_width + (cell_width - image.width) // 2
            y = row_index * cell_height + (cell_height - image.height) // 2
            grid.paste(image.convert("RGB"), (x, y))
    return grid


def pick_device(device=None):
    """The requested device, or the best available one: cuda, then mps, then cpu."""
    import torch

    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype, device):
    """The requested dtype, or float16 on CUDA (SDXL's usual inference precision) and float32 elsewhere."""
    import torch

    if dtype is None:
        dtype = "float16" if device.startswith("cuda") else "float32"
    return getattr(torch, dtype)


def dtype_keyword():
    """`from_pretrained`'s name for the dtype: `dtype` from diffusers 0.40, which deprecates `torch_dtype`
    (and warns about it); older releases know only `torch_dtype` (their models fail on `dtype`)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.40.0") else "torch_dtype"


def load_pipeline(pretrained_model_name_or_path, adapter_dir, device="cpu", dtype=None, scheduler="euler_ancestral"):
    """Load the SDXL base model with the adapter attached, on ``device``."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLAdapterPipeline, T2IAdapter

    dtype_argument = {dtype_keyword(): dtype}
    adapter = T2IAdapter.from_pretrained(adapter_dir, **dtype_argument)
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(
        pretrained_model_name_or_path, adapter=adapter, **dtype_argument
    )
    if scheduler == "euler_ancestral":
        # What the upstream README meant: reuse the model's noise schedule with ancestral sampling.
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "default":
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    return pipe.to(device)


def load_condition(image, in_channels):
    """Open a condition image in the mode the adapter expects (one channel for sketch-style adapters)."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return image.convert("L" if in_channels == 1 else "RGB")


def generate(
    pipe,
    pairs,
    negative_prompt=None,
    num_inference_steps=30,
    guidance_scale=5.0,
    adapter_conditioning_scale=1.0,
    adapter_conditioning_factor=1.0,
    num_images_per_prompt=1,
    seed=0,
    resolution=None,
):
    """Run the pipeline once per ``(prompt, image)`` pair.

    ``image`` may be a path or a PIL image. Returns one dict per pair with
    the ``prompt``, the ``condition`` as the adapter saw it (resized to the
    output size) and the generated ``images``.
    """
    import torch

    multiple = pipe.adapter.downscale_factor
    results = []
    for prompt, image in pairs:
        condition = load_condition(image, pipe.adapter.config.in_channels)
        width, height = output_size(condition.width, condition.height, multiple, resolution)
        # Seeded on the CPU so the same seed gives the same noise on any device.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipe(
            prompt=prompt,
            image=condition,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            adapter_conditioning_scale=adapter_conditioning_scale,
            adapter_conditioning_factor=adapter_conditioning_factor,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
        ).images
        # The pipeline resizes the condition the same way before the adapter sees it.
        condition = condition.resize((width, height), Image.LANCZOS)
        results.append({"prompt": prompt, "condition": condition, "images": images})
    return results


def save_results(results, output_dir):
    """Write every sample and ``grid.png``; return ``(sample_paths, grid_path)``."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for result in results:
        for image in result["images"]:
            path = os.path.join(output_dir, f"{len(paths):03d}_{slugify(result['prompt'])}.png")
            image.save(path)
            paths.append(path)
    grid_path = os.path.join(output_dir, "grid.png")
    make_grid([[result["condition"], *result["images"]] for result in results]).save(grid_path)
    return paths, grid_path


def parse_args(argv=None):
    """Parse and check the flags; the result also carries ``pairs`` and ``adapter_dir``."""
    parser = argparse.ArgumentParser(description="Generate images with a T2I-Adapter on an SDXL base model.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL base model: a Hub id or a local folder in diffusers format.",
    )
    parser.add_argument(
        "--adapter",
        required=True,
        help="Folder with the adapter's config.json and weights (as T2IAdapter.save_pretrained writes), "
        "or a training checkpoint folder containing t2iadapter/.",
    )
    parser.add_argument("--prompt", nargs="+", required=True, help="One or more prompts.")
    parser.add_argument(
        "--image",
        nargs="+",
        required=True,
        help="One or more condition images. Pairs with --prompt in order; a single value of either is used "
        "with every value of the other.",
    )
    parser.add_argument("--negative_prompt", default=None, help="Negative prompt used for every image.")
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument(
        "--adapter_conditioning_scale", type=float, default=1.0, help="Weight of the adapter's features."
    )
    parser.add_argument(
        "--adapter_conditioning_factor",
        type=float,
        default=1.0,
        help="Fraction of the denoising steps, from the start, that use the adapter.",
    )
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="Seed for the initial noise of every pair.")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Scale each condition so its shorter side is this many pixels (aspect ratio kept). "
        "Default: the condition's own size. Sides are rounded down to a multiple of the adapter's "
        "downscale factor.",
    )
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="euler_ancestral",
        help="euler_ancestral (as in the upstream README) or the model folder's own scheduler.",
    )
    parser.add_argument("--device", default=None, help="Device to run on. Default: cuda, then mps, then cpu.")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="Default: float16 on cuda, float32 elsewhere."
    )
    parser.add_argument("--output_dir", default="generated", help="Folder to write the images and grid.png to.")
    args = parser.parse_args(argv)

    for flag in ("num_inference_steps", "num_images_per_prompt", "resolution"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}")

    # Check everything that can be checked before spending time loading models.
    try:
        args.pairs = pair_prompts_and_images(args.prompt, args.image)
        check_image_files(args.image)
        args.adapter_dir = find_adapter_dir(args.adapter)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.adapter_dir, device, dtype, args.scheduler)

    results = generate(
        pipe,
        args.pairs,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        adapter_conditioning_scale=args.adapter_conditioning_scale,
        adapter_conditioning_factor=args.adapter_conditioning_factor,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        resolution=args.resolution,
    )
    paths, grid_path = save_results(results, args.output_dir)
    for path in paths:
        print(path)
    print(grid_path)


if __name__ == "__main__":
    main()
