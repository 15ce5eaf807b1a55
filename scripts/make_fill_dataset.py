#!/usr/bin/env python
"""Make a small "fill" dataset for training and checking a T2I-Adapter.

Every sample is a circle: the condition is its white outline on black, the
target is the same circle filled with one named colour on a background of
another, and the caption names both ("red circle with blue background").
This mirrors the "fill50k" set ControlNet was first demonstrated on: it is
easy to tell at a glance whether a model follows both the condition (where
the circle is) and the prompt (which colours), and it needs no download.

The same samples are written three ways under ``--output_dir``:

* ``imagefolder/`` -- PNGs plus ``train/metadata.jsonl``, loadable with
  ``datasets.load_dataset("<output_dir>/imagefolder")``; this is what the
  trainer's ``--train_data_dir`` takes.
* ``parquet/`` -- one parquet shard with the images embedded, loadable with
  ``datasets.load_dataset("<output_dir>/parquet")``; this is what the
  trainer's ``--dataset_name`` takes.
* ``validation/`` -- held-out conditions and targets (not in the training
  set) plus ``validation.json``, for ``--validation_image`` /
  ``--validation_prompt``.

``circles.jsonl`` records the geometry and colours of every training sample,
and ``fill_dataset.json`` records how the folder was made. The output is
deterministic: the same flags give byte-identical files.

Example:

    python scripts/make_fill_dataset.py --output_dir fill-data --num_samples 256 --resolution 64
"""

import argparse
import io
import json
import os
import shlex
import shutil

import numpy as np
from PIL import Image, ImageDraw

# Plainly named colours that stay distinguishable at low resolution, so a
# caption always describes an image unambiguously.
COLORS = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 25),
    "green": (30, 170, 50),
    "cyan": (0, 210, 210),
    "blue": (30, 70, 230),
    "purple": (120, 40, 170),
    "magenta": (240, 50, 230),
    "pink": (255, 170, 200),
    "brown": (140, 80, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

# Written into the output folder so that a rerun knows it may replace it.
MANIFEST_NAME = "fill_dataset.json"


def outline_width(resolution):
    """Width of the condition's outline: thick enough to survive resizing."""
    return max(1, resolution // 32)


def make_fill_sample(rng, resolution):
    """Draw one random sample.

    Args:
        rng: a ``numpy.random.Generator``; all randomness comes from it.
        resolution: side of the square images, in pixels.

    Returns:
        ``(target, condition, caption, circle)``: two RGB PIL images of size
        ``resolution``, the caption, and a dict with ``center_x``,
        ``center_y``, ``radius`` (pixels) and the ``fill`` and ``background``
        colour names.
    """
    names = list(COLORS)
    fill_index, background_index = rng.choice(len(names), size=2, replace=False)
    fill, background = names[fill_index], names[background_index]

    # Keep the whole circle inside the image so the outline is never clipped.
    radius = int(rng.integers(max(2, resolution // 8), max(3, int(resolution * 0.35)) + 1))
    center_x = int(rng.integers(radius, resolution - radius))
    center_y = int(rng.integers(radius, resolution - radius))
    box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)

    condition = Image.new("RGB", (resolution, resolution), (0, 0, 0))
    ImageDraw.Draw(condition).ellipse(box, outline=(255, 255, 255), width=outline_width(resolution))

    target = Image.new("RGB", (resolution, resolution), COLORS[background])
    ImageDraw.Draw(target).ellipse(box, fill=COLORS[fill])

    caption = f"{fill} circle with {background} background"
    circle = {
        "center_x": center_x,
        "center_y": center_y,
        "radius": radius,
        "fill": fill,
        "background": background,
    }
    return target, condition, caption, circle


def png_bytes(image):
    """Encode a PIL image as PNG once, so files and parquet hold the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def circle_key(circle):
    return tuple(sorted(circle.items()))


def make_samples(seed, num_samples, resolution, num_validation):
    """Draw the training and held-out samples.

    Each set has its own random stream, so changing ``--num_samples`` keeps
    the validation set the same and vice versa. A held-out draw identical to
    a training sample is redrawn, so validation really is unseen.
    """
    train_rng = np.random.default_rng([seed, 0])
    validation_rng = np.random.default_rng([seed, 1])

    train = [make_fill_sample(train_rng, resolution) for _ in range(num_samples)]
    seen = {circle_key(circle) for *_, circle in train}
    validation = []
    while len(validation) < num_validation:
        sample = make_fill_sample(validation_rng, resolution)
        if circle_key(sample[3]) not in seen:
            seen.add(circle_key(sample[3]))
            validation.append(sample)
    return train, validation


def prepare_output_dir(output_dir):
    """Create ``output_dir``, or empty it if an earlier run of this script made it.

    A non-empty folder this script did not make is left alone: refusing is
    safer than deleting someone's files.
    """
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not os.path.isfile(os.path.join(output_dir, MANIFEST_NAME)):
            raise FileExistsError(
                f"--output_dir {output_dir!r} is not empty and was not made by this script; "
                "pick another folder or empty it first."
            )
        for name in ("imagefolder", "parquet", "validation", "circles.jsonl", MANIFEST_NAME):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(output_dir, exist_ok=True)


def write_imagefolder(train_dir, encoded):
    """Write PNGs and a ``metadata.jsonl`` that ``datasets``' imagefolder loader reads.

    ``file_name`` becomes the ``image`` column; any other ``*_file_name`` key
    becomes an Image column named by its prefix, here ``conditioning_image``.
    """
    os.makedirs(os.path.join(train_dir, "images"))
    os.makedirs(os.path.join(train_dir, "conditioning_images"))
    with open(os.path.join(train_dir, "metadata.jsonl"), "w") as metadata:
        for index, (target_png, condition_png, caption) in enumerate(encoded):
            image_name = f"images/{index:05d}.png"
            condition_name = f"conditioning_images/{index:05d}.png"
            write_bytes(os.path.join(train_dir, image_name), target_png)
            write_bytes(os.path.join(train_dir, condition_name), condition_png)
            row = {"file_name": image_name, "conditioning_image_file_name": condition_name, "text": caption}
            metadata.write(json.dumps(row) + "\n")


def write_parquet(parquet_file, encoded):
    """Write one parquet shard whose image columns are ``datasets.Image`` features with embedded bytes."""
    # Imported here so that only this step, not importing the module, needs `datasets`.
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "conditioning_image": ImageFeature(), "text": Value("string")})
    dataset = Dataset.from_dict(
        {
            "image": [{"bytes": target, "path": f"{i:05d}.png"} for i, (target, _, _) in enumerate(encoded)],
            "conditioning_image": [
                {"bytes": condition, "path": f"condition_{i:05d}.png"} for i, (_, condition, _) in enumerate(encoded)
            ],
            "text": [caption for _, _, caption in encoded],
        },
        features=features,
    )
    os.makedirs(os.path.dirname(parquet_file))
    # `to_parquet` also stores the features in the file, so loading gives PIL images back.
    dataset.to_parquet(parquet_file)


def write_validation(validation_dir, samples):
    """Write held-out conditions and targets, and ``validation.json`` describing them.

    Paths inside ``validation.json`` are relative to its own folder, so the
    file stays valid if the dataset is moved (and is identical across runs).
    """
    os.makedirs(validation_dir)
    entries = []
    for index, (target, condition, caption, circle) in enumerate(samples):
        condition_name, target_name = f"condition_{index}.png", f"target_{index}.png"
        condition.save(os.path.join(validation_dir, condition_name))
        target.save(os.path.join(validation_dir, target_name))
        entries.append({"image": condition_name, "prompt": caption, "target": target_name, "circle": circle})
    with open(os.path.join(validation_dir, "validation.json"), "w") as f:
        json.dump(entries, f, indent=2)
    return entries


def build_fill_dataset(output_dir, num_samples=256, resolution=64, seed=0, num_validation=4):
    """Build the whole dataset folder and return the paths it wrote.

    Returns a dict with ``imagefolder``, ``parquet`` (folders for
    ``load_dataset``), ``parquet_file``, ``circles``, ``manifest``,
    ``validation_dir``, ``validation_json`` and the lists
    ``validation_images``, ``validation_targets`` and ``validation_prompts``.
    """
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
    if num_validation < 0:
        raise ValueError(f"--num_validation must not be negative, got {num_validation}")
    if resolution < 8:
        raise ValueError(f"--resolution must be at least 8 pixels, got {resolution}")

    train, validation = make_samples(seed, num_samples, resolution, num_validation)
    prepare_output_dir(output_dir)

    encoded = [(png_bytes(target), png_bytes(condition), caption) for target, condition, caption, _ in train]
    imagefolder_dir = os.path.join(output_dir, "imagefolder")
    write_imagefolder(os.path.join(imagefolder_dir, "train"), encoded)

    parquet_dir = os.path.join(output_dir, "parquet")
    # This file name follows the Hub's layout, so `load_dataset` maps it to the "train" split.
    parquet_file = os.path.join(parquet_dir, "data", "train-00000-of-00001.parquet")
    write_parquet(parquet_file, encoded)

    circles_file = os.path.join(output_dir, "circles.jsonl")
    with open(circles_file, "w") as f:
        for index, (*_, caption, circle) in enumerate(train):
            f.write(json.dumps({"file_name": f"images/{index:05d}.png", "text": caption, **circle}) + "\n")

    validation_dir = os.path.join(output_dir, "validation")
    entries = write_validation(validation_dir, validation)

    manifest_file = os.path.join(output_dir, MANIFEST_NAME)
    manifest = {
        "num_samples": num_samples,
        "num_validation": num_validation,
        "resolution": resolution,
        "seed": seed,
        "outline_width": outline_width(resolution),
        "colors": COLORS,
    }
    with open(manifest_file, "w") as f:
        json.dump(manifest, f, indent=2)

    return {
        "imagefolder": imagefolder_dir,
        "parquet": parquet_dir,
        "parquet_file": parquet_file,
        "circles": circles_file,
        "manifest": manifest_file,
        "validation_dir": validation_dir,
        "validation_json": os.path.join(validation_dir, "validation.json"),
        "validation_images": [os.path.join(validation_dir, entry["image"]) for entry in entries],
        "validation_targets": [os.path.join(validation_dir, entry["target"]) for entry in entries],
        "validation_prompts": [entry["prompt"] for entry in entries],
    }


def validation_arguments(paths):
    """The trainer's ``--validation_image``/``--validation_prompt`` flags for the held-out set, shell-quoted."""
    if not paths["validation_images"]:
        return ""
    images = " ".join(shlex.quote(path) for path in paths["validation_images"])
    prompts = " ".join(shlex.quote(prompt) for prompt in paths["validation_prompts"])
    return f"--validation_image {images} --validation_prompt {prompts}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Make a synthetic fill50k-style dataset (circle outline -> coloured filled circle).",
    )
    parser.add_argument("--output_dir", default="fill-data", help="Folder to write the dataset to.")
    parser.add_argument("--num_samples", type=int, default=256, help="Number of training samples.")
    parser.add_argument("--resolution", type=int, default=64, help="Side of the square images, in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed gives identical files.")
    parser.add_argument(
        "--num_validation", type=int, default=4, help="Number of held-out validation samples (not in training)."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    paths = build_fill_dataset(args.output_dir, args.num_samples, args.resolution, args.seed, args.num_validation)
    print(f"Wrote {args.num_samples} training samples at {args.resolution}x{args.resolution}:")
    print(f"  imagefolder (--train_data_dir): {paths['imagefolder']}")
    print(f"  parquet     (--dataset_name):   {paths['parquet']}")
    print(f"  geometry:                       {paths['circles']}")
    print(f"  validation ({args.num_validation} held out): {paths['validation_json']}")
    arguments = validation_arguments(paths)
    if arguments:
        print("Validation flags for the trainer:")
        print(arguments)


if __name__ == "__main__":
    main()
