#!/usr/bin/env python
"""Make a training dataset with conditioning images from images and their captions.

The input is one of:

* ``--input_dir`` holding an imagefolder (a ``metadata.jsonl``/``.csv``/``.parquet`` naming each
  image's ``file_name`` and caption; other columns, e.g. old conditions, are ignored);
* ``--input_dir`` holding plain images (searched recursively), each with its caption in a
  same-named ``.txt`` file beside it (``cat.jpg`` + ``cat.txt``);
* ``--dataset_name``: anything ``datasets.load_dataset`` reads (a hub id, a parquet folder, ...).

The output is an imagefolder the trainer's ``--train_data_dir`` reads:
``--output_dir/train/metadata.jsonl`` with ``file_name``, ``conditioning_image_file_name`` and
``text`` (a list caption is kept as a list, which the trainer samples from), the images under
``train/images/`` and the conditions, as PNGs, under ``train/conditioning_images/``. Images are
copied byte for byte; only an image in a format an imagefolder does not read, or one turned by
its EXIF orientation, is re-encoded (losslessly, as PNG), so that the files on disk have exactly
the size and orientation the condition was made from.

``--condition`` chooses the condition:

* ``canny``: built in (OpenCV, the trainer's own ``canny_condition``), with fixed thresholds
  (``--low_threshold``, ``--high_threshold``) or, with ``--random_thresholds``, thresholds drawn
  per image from ``random.Random(--seed)`` as the trainer's on-the-fly canny does.
* ``depth`` (MiDaS DPT-Hybrid), ``lineart``, ``sketch`` (PiDiNet, thresholded) and ``openpose``
  (body): the ``controlnet_aux`` package's detectors, with their weights read from a local folder
  (``--detector_path``) holding the files of the hub repo ``lllyasviel/Annotators`` listed in
  ``DETECTORS``. Nothing is downloaded. A detector's output is resized back to the image's exact
  size, since the trainer refuses a condition of another size.

Everything a detector needs is checked first: a missing package, folder or weight file stops the
run with one error naming all of them, before any image is read.

``--output_dir`` is created, or replaced if an earlier run of this script made it (it leaves
``make_conditions.json`` there, recording the input, the condition and its settings).

Example:

    python scripts/make_conditions.py --input_dir my-photos --output_dir my-canny-data \\
        --condition canny --random_thresholds --seed 0
    python train_t2i_adapter_sdxl.py --train_data_dir my-canny-data ...
"""

import argparse
import collections
import glob
import importlib
import io
import json
import os
import random
import shutil
from dataclasses import dataclass, field

from PIL import ExifTags, Image

from make_shards import add_dataset_arguments, stored_image_bytes
from t2i_train.images import canny_condition, load_upright_rgb, random_canny_thresholds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONDITIONS = ("canny", "depth", "lineart", "sketch", "openpose")
# Image files an imagefolder reads as they are, by PIL format, with the extension they get.
EXTENSION_BY_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
# Files a plain --input_dir is searched for.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
MANIFEST_NAME = "make_conditions.json"
ANNOTATORS_REPO = "lllyasviel/Annotators"


@dataclass(frozen=True)
class Detector:
    """A ``controlnet_aux`` detector: its class, the weight files its ``from_pretrained`` loads from
    a local folder (passed explicitly, so the files checked are the files loaded) and the extra
    arguments of its call."""

    class_name: str
    weight_files: dict
    pretrained_kwargs: dict = field(default_factory=dict)
    call_kwargs: dict = field(default_factory=dict)


# File names and arguments as in controlnet_aux 0.0.10's from_pretrained defaults and the
# T2I-Adapter-SDXL model cards (sketch: PiDiNet with its edges thresholded; openpose: body only,
# though from_pretrained loads the hand and face models too).
DETECTORS = {
    "depth": Detector(
        "MidasDetector", {"filename": "dpt_hybrid-midas-501f0c75.pt"}, pretrained_kwargs={"model_type": "dpt_hybrid"}
    ),
    "lineart": Detector(
        "LineartDetector",
        {"filename": "sk_model.pth", "coarse_filename": "sk_model2.pth"},
        call_kwargs={"coarse": False},
    ),
    "sketch": Detector("PidiNetDetector", {"filename": "table5_pidinet.pth"}, call_kwargs={"apply_filter": True}),
    "openpose": Detector(
        "OpenposeDetector",
        {"filename": "body_pose_model.pth", "hand_filename": "hand_pose_model.pth", "face_filename": "facenet.pth"},
    ),
}


class MissingDetectorError(RuntimeError):
    """What a detector needs is not there: the package, --detector_path or weight files."""


def detector_problems(condition, detector_path):
    """Everything missing for ``condition``'s detector, as sentences; empty when it can run."""
    if condition not in DETECTORS:
        return []
    detector = DETECTORS[condition]
    files = list(detector.weight_files.values())
    problems = []
    try:
        importlib.import_module("controlnet_aux")
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "controlnet_aux":
            problems.append("the controlnet_aux package is not installed (`pip install controlnet_aux`)")
        else:  # installed, but one of its own imports fails (e.g. a dependency or an incompatible timm)
            problems.append(
                f"the controlnet_aux package is installed but cannot be imported ({type(error).__name__}: {error})"
            )
    if detector_path is None:
        problems.append(
            f"--detector_path was not given: it must be a local folder holding {', '.join(files)}"
            f" (from the hub repo {ANNOTATORS_REPO}; this script downloads nothing)"
        )
    elif not os.path.isdir(detector_path):
        problems.append(f"--detector_path {detector_path!r} is not a folder; it must hold {', '.join(files)}")
    else:
        missing = [name for name in files if not os.path.isfile(os.path.join(detector_path, name))]
        if missing:
            problems.append(
                f"weight file(s) not found in --detector_path {detector_path!r}: {', '.join(missing)}"
                f" (from the hub repo {ANNOTATORS_REPO})"
            )
    return problems


def check_detector(condition, detector_path):
    """Raise one MissingDetectorError listing all that ``condition``'s detector lacks."""
    problems = detector_problems(condition, detector_path)
    if problems:
        raise MissingDetectorError(
            f"--condition {condition} needs controlnet_aux's {DETECTORS[condition].class_name}, but: "
            + "; ".join(problems)
            + "."
        )


def load_detector(condition, detector_path, device=None):
    """The ``controlnet_aux`` detector for ``condition``, with weights from ``detector_path``."""
    check_detector(condition, detector_path)
    detector = DETECTORS[condition]
    detector_class = getattr(importlib.import_module("controlnet_aux"), detector.class_name)
    model = detector_class.from_pretrained(detector_path, **detector.weight_files, **detector.pretrained_kwargs)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device) if hasattr(model, "to") else model


def detector_condition(detector, condition, image, detect_resolution):
    """Run a detector on an RGB image and return its map as an RGB image of the image's size.

    The detector works at ``detect_resolution`` (shorter side, rounded to a multiple of 64) and
    its output is resized back with bilinear interpolation, once.
    """
    output = detector(
        image,
        detect_resolution=detect_resolution,
        image_resolution=detect_resolution,
        output_type="pil",
        **DETECTORS[condition].call_kwargs,
    )
    if not isinstance(output, Image.Image):
        output = Image.fromarray(output)
    output = output.convert("RGB")
    if output.size != image.size:
        output = output.resize(image.size, Image.BILINEAR)
    return output


def stored_file(data):
    """(bytes, extension) of the image file to write: the source bytes when an imagefolder reads
    their format and no EXIF orientation turns them, else a lossless PNG of the decoded image."""
    with Image.open(io.BytesIO(data)) as image:
        extension = EXTENSION_BY_FORMAT.get(image.format)
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if extension is not None and orientation == 1:
        return data, extension
    buffer = io.BytesIO()
    load_upright_rgb({"bytes": data}).save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def find_metadata(input_dir):
    """The imagefolder metadata files under ``input_dir`` (empty for a plain folder of images)."""
    found = []
    for name in METADATA_NAMES:
        found += glob.glob(os.path.join(glob.escape(input_dir), "**", name), recursive=True)
    return sorted(found)


def plain_folder_samples(input_dir):
    """``(image_path, caption)`` for every image under ``input_dir`` with a same-named ``.txt``.

    All captions are checked before anything is processed: images without one stop the run.
    """
    images = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(input_dir)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise ValueError(f"--input_dir {input_dir!r} holds no images and no imagefolder metadata.")
    missing = [path for path in images if not os.path.isfile(os.path.splitext(path)[0] + ".txt")]
    if missing:
        listing = ", ".join(repr(path) for path in missing[:5])
        listing += f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{len(missing)} image(s) have no caption file (same name, .txt) beside them: {listing}.")
    samples = []
    for path in images:
        with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as f:
            samples.append((path, f.read().strip()))
    return samples


def dataset_samples(dataset, image_column, caption_column):
    """Yield ``(name, image bytes, caption)`` from a ``datasets`` dataset, reading images undecoded."""
    from datasets import Image as ImageFeature

    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            columns = ", ".join(dataset.column_names)
            raise ValueError(f"{flag} {column!r} is not a column of the dataset (columns: {columns}).")
    if not isinstance(dataset.features[image_column], ImageFeature):
        raise ValueError(f"--image_column {image_column!r} holds {dataset.features[image_column]}, not images.")
    stored = dataset.select_columns([image_column, caption_column])
    stored = stored.cast_column(image_column, ImageFeature(decode=False))
    for row_index, row in enumerate(stored):
        caption = row[caption_column]
        # The trainer takes a string or a non-empty list of strings (and samples from a list).
        is_caption_list = isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption)
        if not (isinstance(caption, str) or is_caption_list):
            raise ValueError(f"Row {row_index} has no usable caption in {caption_column!r}: {caption!r}.")
        try:
            data = stored_image_bytes(row[image_column])
        except (OSError, ValueError) as error:
            raise ValueError(f"Row {row_index} has no readable image in {image_column!r}: {error}") from error
        yield f"row {row_index}", data, caption


def input_samples(input_dir=None, dataset_name=None, dataset_config_name=None, split="train",
                  image_column="image", caption_column="text", cache_dir=None):
    """``(source description, samples)``: the samples are ``(name, image bytes, caption)``, lazily;
    the name (a path or a row) is what an error about the sample shows."""
    if (input_dir is None) == (dataset_name is None):
        raise ValueError("Give exactly one of --input_dir and --dataset_name.")
    if input_dir is not None and not os.path.isdir(input_dir):
        raise ValueError(f"--input_dir {input_dir!r} is not a folder.")
    if input_dir is not None and not find_metadata(input_dir):
        pairs = plain_folder_samples(input_dir)

        def read_files():
            for path, caption in pairs:
                with open(path, "rb") as f:
                    yield path, f.read(), caption

        return f"{len(pairs)} images with .txt captions in {input_dir}", read_files()

    from datasets import load_dataset

    location = input_dir if input_dir is not None else dataset_name
    dataset = load_dataset(location, dataset_config_name, cache_dir=cache_dir)
    if split not in dataset:
        raise ValueError(f"{location!r} has no {split!r} split; it has: {', '.join(dataset)}.")
    dataset = dataset[split]
    return f"{len(dataset)} rows of {location} ({split})", dataset_samples(dataset, image_column, caption_column)


def prepare_output_dir(output_dir, input_dir=None):
    """Create ``output_dir``, or empty it if an earlier run of this script made it.

    A non-empty folder this script did not make is left alone, and so is one inside the input,
    whose images would otherwise be read back as input by a later run.
    """
    if input_dir is not None:
        inside = os.path.commonpath([os.path.realpath(output_dir), os.path.realpath(input_dir)])
        if inside == os.path.realpath(input_dir):
            raise ValueError(f"--output_dir {output_dir!r} must not be inside --input_dir {input_dir!r}.")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not os.path.isfile(os.path.join(output_dir, MANIFEST_NAME)):
            raise FileExistsError(
                f"--output_dir {output_dir!r} is not empty and was not made by this script; "
                "pick another folder or empty it first."
            )
        shutil.rmtree(os.path.join(output_dir, "train"), ignore_errors=True)
        os.remove(os.path.join(output_dir, MANIFEST_NAME))
    os.makedirs(output_dir, exist_ok=True)


def write_manifest(output_dir, summary):
    """Record how the folder was made (and that this script made it) in ``make_conditions.json``."""
    with open(os.path.join(output_dir, MANIFEST_NAME), "w") as f:
        json.dump(summary, f, indent=2)


def make_conditions(
    output_dir, condition="canny", input_dir=None, dataset_name=None, dataset_config_name=None, split="train",
    image_column="image", caption_column="text", low_threshold=100, high_threshold=200, random_thresholds=False,
    seed=0, detector_path=None, detect_resolution=512, device=None, cache_dir=None,
):
    """Write the conditioned imagefolder and return its summary (a dict, also saved as the manifest)."""
    if condition not in CONDITIONS:
        raise ValueError(f"--condition must be one of {', '.join(CONDITIONS)}, got {condition!r}.")
    # Before anything is read: a missing detector is reported at once, not after loading the input.
    check_detector(condition, detector_path)
    source, samples = input_samples(
        input_dir, dataset_name, dataset_config_name, split, image_column, caption_column, cache_dir
    )
    prepare_output_dir(output_dir, input_dir)
    summary = {"source": source, "condition": condition, "seed": seed, "complete": False}
    if condition == "canny":
        summary.update(random_thresholds=random_thresholds)
        if not random_thresholds:
            summary.update(low_threshold=low_threshold, high_threshold=high_threshold)
    else:
        summary.update(
            detector=DETECTORS[condition].class_name,
            detector_path=os.path.abspath(detector_path),
            detect_resolution=detect_resolution,
        )
    # Written first, so that a run stopped halfway leaves a folder the next run may replace.
    write_manifest(output_dir, summary)

    detector = None if condition == "canny" else load_detector(condition, detector_path, device)
    rng = random.Random(seed)
    train_dir = os.path.join(output_dir, "train")
    os.makedirs(os.path.join(train_dir, "images"))
    os.makedirs(os.path.join(train_dir, "conditioning_images"))
    counts = collections.Counter()
    with open(os.path.join(train_dir, "metadata.jsonl"), "w") as metadata:
        for index, (name, data, caption) in enumerate(samples):
            try:
                image = load_upright_rgb({"bytes": data})
            except Exception as error:
                raise ValueError(f"Cannot read the image of {name}: {error}") from error
            if condition == "canny":
                low, high = random_canny_thresholds(rng) if random_thresholds else (low_threshold, high_threshold)
                condition_image = canny_condition(image, low, high)
            else:
                condition_image = detector_condition(detector, condition, image, detect_resolution)

            image_bytes, extension = stored_file(data)
            counts["re-encoded as PNG"] += image_bytes is not data
            image_name = f"images/{index:05d}.{extension}"
            condition_name = f"conditioning_images/{index:05d}.png"
            with open(os.path.join(train_dir, image_name), "wb") as f:
                f.write(image_bytes)
            condition_image.save(os.path.join(train_dir, condition_name))
            row = {"file_name": image_name, "conditioning_image_file_name": condition_name, "text": caption}
            metadata.write(json.dumps(row) + "\n")
            counts["samples"] += 1
    if counts["samples"] == 0:
        raise ValueError(f"The input ({source}) holds no samples.")

    summary.update(complete=True, num_samples=counts["samples"], num_re_encoded=counts["re-encoded as PNG"])
    write_manifest(output_dir, summary)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Make an imagefolder with conditioning images (canny, depth, lineart, sketch, openpose)"
        " from images and captions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input_dir",
        default=None,
        help="An imagefolder (with metadata.jsonl naming file_name and the caption), or a folder of images"
        " each with a same-named .txt caption.",
    )
    add_dataset_arguments(parser, source)
    parser.add_argument("--image_column", default="image", help="Column of the images (imagefolder or dataset input).")
    parser.add_argument(
        "--caption_column", default="text", help="Column of the captions (imagefolder or dataset input)."
    )
    parser.add_argument(
        "--output_dir", required=True, help="Folder to write the imagefolder to (train/metadata.jsonl)."
    )
    parser.add_argument("--condition", choices=CONDITIONS, default="canny", help="Which condition to make.")
    parser.add_argument("--low_threshold", type=int, default=100, help="Canny's low threshold.")
    parser.add_argument("--high_threshold", type=int, default=200, help="Canny's high threshold.")
    parser.add_argument(
        "--random_thresholds",
        action="store_true",
        help="Canny: draw the thresholds per image, as the trainer's on-the-fly canny does, instead of fixed ones.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of --random_thresholds' draws.")
    parser.add_argument(
        "--detector_path",
        default=None,
        help=f"depth/lineart/sketch/openpose: local folder with the detector's weights (files of {ANNOTATORS_REPO}).",
    )
    parser.add_argument(
        "--detect_resolution", type=int, default=512, help="Shorter side the detectors work at (not canny)."
    )
    parser.add_argument(
        "--device", default=None, help="Device for the detectors; by default cuda if available, else cpu."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    summary = make_conditions(
        args.output_dir,
        condition=args.condition,
        input_dir=args.input_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        split=args.split,
        image_column=args.image_column,
        caption_column=args.caption_column,
        low_threshold=args.low_threshold,
        high_threshold=args.high_threshold,
        random_thresholds=args.random_thresholds,
        seed=args.seed,
        detector_path=args.detector_path,
        detect_resolution=args.detect_resolution,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    print(
        f"Wrote {summary['num_samples']} samples with {args.condition} conditions to"
        f" {os.path.join(args.output_dir, 'train')} ({summary['num_re_encoded']} images re-encoded as PNG)"
        f" from {summary['source']}."
    )
    print(f"Train with: --train_data_dir {args.output_dir}")
    return summary


if __name__ == "__main__":
    main()
