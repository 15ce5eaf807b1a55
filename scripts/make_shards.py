#!/usr/bin/env python
"""Write an image dataset as WebDataset ``.tar`` shards, for streaming training.

The input is an imagefolder (``--train_data_dir``, e.g. the ``imagefolder/`` that
``make_fill_dataset.py`` writes) or anything ``datasets.load_dataset`` reads (``--dataset_name``:
a hub id, a parquet folder, ...). The output is ``--output_dir/shard-00000.tar``,
``shard-00001.tar``, ... with ``--samples_per_shard`` samples each. Every sample is three files
sharing a key (the source row, ``%08d``):

* ``<key>.png`` (or ``.jpg`` / ``.webp``): the target image. Its bytes are copied unchanged when
  their format is the shards' image format, which ``--image_format auto`` takes from the first
  sample; a sample in another format is re-encoded (counted in the summary), because
  ``datasets`` takes a shard's columns from its first samples and every sample must have the same
  ones. An image turned by an EXIF orientation is re-encoded upright too, so that every reader
  sees the size the condition is checked against.
* ``<key>.cond.png``: the conditioning image (PNG bytes copied; other formats re-encoded as PNG,
  losslessly). Left out with ``--no_conditions``, for training with on-the-fly canny conditions.
* ``<key>.txt``: the caption, UTF-8. A caption stored as a list of strings keeps only its first
  string (a ``.txt`` field holds one prompt; the trainer would use the whole text as one prompt).

``datasets`` groups a tar's files into samples by the part of the name before the first dot, so
keys hold no dots, and the columns it gives are ``png`` (or ``jpg``/``webp``), ``cond.png`` and
``txt`` (plus ``__key__`` and ``__url__``); the image columns decode as PIL images. Train on them
with:

    --dataset_name <output_dir> --streaming --image_column png \\
        --conditioning_image_column cond.png --caption_column txt

Each sample is checked before it is written, as the trainer checks its data: readable images, the
condition the image's size, a caption. A bad sample stops the run (and removes the shards it
wrote), or is left out with ``--skip_bad_samples``. Tar members get fixed metadata, so the same
input gives byte-identical shards.

Example:

    python scripts/make_shards.py --train_data_dir fill-data/imagefolder --output_dir fill-shards \\
        --samples_per_shard 1000
"""

import argparse
import collections
import glob
import io
import os
import tarfile

from PIL import ExifTags, Image, ImageOps

from t2i_train.images import verified_upright_size

# The image formats whose bytes a shard keeps as they are, and the extension (column) each gets.
EXTENSION_BY_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
FORMAT_BY_EXTENSION = {extension: pil_format for pil_format, extension in EXTENSION_BY_FORMAT.items()}
CONDITION_FIELD = "cond.png"
CAPTION_FIELD = "txt"
SHARD_NAME = "shard-{:05d}.tar"
# Modes each format saves as they are; others are converted to RGB (RGBA where alpha can be kept).
SAVABLE_MODES = {
    "PNG": ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
}


def stored_image_bytes(value):
    """The file bytes of an undecoded ``datasets.Image`` value (a dict with ``bytes`` or ``path``)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    raise ValueError(f"no image stored ({value!r})")


def inspect_image(data):
    """(format, displayed size) of encoded image bytes; raises if they are not a readable image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.format, verified_upright_size(image)


def encode_as(data, pil_format):
    """Image bytes in ``pil_format`` ("PNG", "JPEG" or "WEBP"): the same bytes when they already
    are and no EXIF orientation turns them.

    An image with an EXIF orientation is stored upright: readers disagree on applying the tag
    (``datasets`` does, a plain ``PIL.Image.open`` does not), and once it is applied to the pixels
    and gone, every reader sees the same picture and size.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.format == pil_format and image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return data
        image = ImageOps.exif_transpose(image)
        if image.mode not in SAVABLE_MODES[pil_format]:
            keeps_alpha = "A" in image.getbands() and "RGBA" in SAVABLE_MODES[pil_format]
            image = image.convert("RGBA" if keeps_alpha else "RGB")
        buffer = io.BytesIO()
        # Quality 95 keeps re-encoded JPEG/WebP close to the source; PNG is lossless anyway.
        image.save(buffer, format=pil_format, **({"quality": 95} if pil_format != "PNG" else {}))
        return buffer.getvalue()


def caption_text(caption):
    """The caption a ``.txt`` field stores: the string itself, or a list's first string.

    Returns None for a missing caption (None, an empty list, not text).
    """
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and caption and isinstance(caption[0], str):
        return caption[0]
    return None


def sample_fields(row, image_column, conditioning_image_column, caption_column, pil_format, counts):
    """The files of one shard sample, ``{field: bytes}``, from one undecoded dataset row.

    Raises ValueError saying what is wrong with a sample that cannot be trained on. ``counts``
    (a Counter) records re-encoded images and list captions.
    """
    try:
        image = stored_image_bytes(row[image_column])
        image_size = inspect_image(image)[1]
        stored_image = encode_as(image, pil_format)
    except Exception as error:
        raise ValueError(f"unreadable image ({error})") from error
    fields = {EXTENSION_BY_FORMAT[pil_format]: stored_image}
    if stored_image is not image:
        counts["re-encoded images"] += 1

    if conditioning_image_column is not None:
        try:
            condition = stored_image_bytes(row[conditioning_image_column])
            condition_size = inspect_image(condition)[1]
            stored_condition = encode_as(condition, "PNG")
        except Exception as error:
            raise ValueError(f"unreadable conditioning image ({error})") from error
        if condition_size != image_size:
            raise ValueError(
                f"conditioning image is {condition_size[0]}x{condition_size[1]}"
                f" but the image is {image_size[0]}x{image_size[1]}"
            )
        fields[CONDITION_FIELD] = stored_condition
        if stored_condition is not condition:
            counts["re-encoded conditions"] += 1

    caption = caption_text(row[caption_column])
    if caption is None:
        raise ValueError(f"missing caption ({row[caption_column]!r})")
    if not isinstance(row[caption_column], str):
        counts["list captions (first kept)"] += 1
    fields[CAPTION_FIELD] = caption.encode("utf-8")
    return fields


def dataset_samples(
    dataset, image_column, conditioning_image_column, caption_column, image_format="auto",
    skip_bad_samples=False, counts=None,
):
    """Yield ``(key, fields)`` shard samples from a ``datasets`` dataset, in its order.

    The image columns must be ``datasets.Image`` features; they are read undecoded so that bytes
    are copied, not re-encoded. ``image_format`` is "auto" (the first sample's format when a shard
    can keep it, else PNG) or one of ``png``, ``jpg``, ``webp``. ``conditioning_image_column`` None
    writes no conditions. ``counts`` (a Counter) collects what the summary reports.
    """
    from datasets import Image as ImageFeature

    counts = collections.Counter() if counts is None else counts
    image_columns = [image_column] + ([conditioning_image_column] if conditioning_image_column else [])
    stored = dataset.select_columns(image_columns + [caption_column])
    for column in image_columns:
        stored = stored.cast_column(column, ImageFeature(decode=False))

    pil_format = None if image_format == "auto" else FORMAT_BY_EXTENSION[image_format]
    for row_index, row in enumerate(stored):
        if pil_format is None:
            try:
                pil_format = inspect_image(stored_image_bytes(row[image_column]))[0]
            except Exception:
                pil_format = "PNG"  # the first image is bad; the check below reports it
            pil_format = pil_format if pil_format in EXTENSION_BY_FORMAT else "PNG"
        try:
            fields = sample_fields(row, image_column, conditioning_image_column, caption_column, pil_format, counts)
        except ValueError as error:
            if not skip_bad_samples:
                raise ValueError(
                    f"Bad sample at row {row_index}: {error}. Fix it, or pass --skip_bad_samples."
                ) from error
            counts["skipped bad samples"] += 1
            continue
        # The source row is the key: unique, dot-free, and it points back to the input.
        yield f"{row_index:08d}", fields


def add_file(tar, name, data):
    """Add one member with fixed metadata, so identical input gives identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples, output_dir, samples_per_shard=1000):
    """Write ``(key, {field: bytes})`` samples into ``output_dir/shard-%05d.tar`` files.

    Every sample must have the same fields (``datasets`` takes the columns from the first
    samples) and keys must hold no dot or slash (the key is a file name's part before its first
    dot). Each shard is written under a temporary name and renamed when complete; if anything
    fails, the shards written so far are removed, so a failed run leaves no partial dataset.

    Returns the shard paths, in order.
    """
    if samples_per_shard < 1:
        raise ValueError(f"--samples_per_shard must be at least 1, got {samples_per_shard}")
    os.makedirs(output_dir, exist_ok=True)
    shard_paths, tar, partial_path, in_shard, fields_seen = [], None, None, 0, None
    try:
        for key, fields in samples:
            if not key or "." in key or "/" in key:
                raise ValueError(f"Sample key {key!r} must be non-empty and hold no '.' or '/'.")
            if fields_seen is None:
                fields_seen = sorted(fields)
            elif sorted(fields) != fields_seen:
                raise ValueError(
                    f"Sample {key!r} has fields {sorted(fields)} but the first sample has {fields_seen};"
                    " every sample of a WebDataset must have the same fields."
                )
            if tar is None:
                path = os.path.join(output_dir, SHARD_NAME.format(len(shard_paths)))
                partial_path = path + ".partial"
                tar = tarfile.open(partial_path, "w", format=tarfile.USTAR_FORMAT)
                shard_paths.append(path)
            # One sample's files are consecutive: the loader starts a new sample when the key changes.
            for field, data in fields.items():
                add_file(tar, f"{key}.{field}", data)
            in_shard += 1
            if in_shard == samples_per_shard:
                tar.close()
                os.replace(partial_path, shard_paths[-1])
                tar, in_shard = None, 0
        if tar is not None:
            tar.close()
            os.replace(partial_path, shard_paths[-1])
            tar = None
    except BaseException:
        if tar is not None:
            tar.close()
            os.remove(partial_path)
        for path in shard_paths:
            if os.path.exists(path):
                os.remove(path)
        raise
    return shard_paths


def prepare_output_dir(output_dir, overwrite):
    """Refuse to mix with shards of an earlier run (stale shards would be read too), or with
    ``--overwrite`` remove them. Other files in the folder are left alone."""
    existing = sorted(glob.glob(os.path.join(output_dir, "shard-*.tar")))
    if existing and not overwrite:
        raise FileExistsError(
            f"--output_dir {output_dir!r} already holds {len(existing)} shard(s); pass --overwrite to replace them."
        )
    for path in existing:
        os.remove(path)


def load_source(train_data_dir=None, dataset_name=None, dataset_config_name=None, split="train", cache_dir=None):
    """The input split, loaded the way the trainer loads ``--train_data_dir``/``--dataset_name``."""
    from datasets import load_dataset

    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Give exactly one of --train_data_dir and --dataset_name.")
    location = dataset_name if dataset_name is not None else train_data_dir
    dataset = load_dataset(location, dataset_config_name, cache_dir=cache_dir)
    if split not in dataset:
        raise ValueError(f"{location!r} has no {split!r} split; it has: {', '.join(dataset)}.")
    return dataset[split]


def check_columns(dataset, image_column, conditioning_image_column, caption_column):
    """Stop with a clear message if a named column is absent or an image column holds no images."""
    from datasets import Image as ImageFeature

    columns = ", ".join(dataset.column_names)
    for flag, column in (
        ("--image_column", image_column),
        ("--conditioning_image_column", conditioning_image_column),
        ("--caption_column", caption_column),
    ):
        if column is None:
            continue
        if column not in dataset.column_names:
            hint = " Pass --no_conditions to write shards without conditions." if flag.startswith("--cond") else ""
            raise ValueError(f"{flag} {column!r} is not a column of the dataset (columns: {columns}).{hint}")
        if flag != "--caption_column" and not isinstance(dataset.features[column], ImageFeature):
            raise ValueError(f"{flag} {column!r} holds {dataset.features[column]}, not images.")


def make_shards(
    output_dir, train_data_dir=None, dataset_name=None, dataset_config_name=None, split="train",
    image_column="image", conditioning_image_column="conditioning_image", caption_column="text",
    no_conditions=False, samples_per_shard=1000, image_format="auto", skip_bad_samples=False,
    overwrite=False, cache_dir=None,
):
    """Load the input, write its shards and return ``(shard_paths, counts)``; ``counts`` holds
    "samples" and whatever was re-encoded, skipped or shortened."""
    dataset = load_source(train_data_dir, dataset_name, dataset_config_name, split, cache_dir)
    condition_column = None if no_conditions else conditioning_image_column
    check_columns(dataset, image_column, condition_column, caption_column)
    prepare_output_dir(output_dir, overwrite)

    counts = collections.Counter()
    samples = dataset_samples(
        dataset, image_column, condition_column, caption_column, image_format, skip_bad_samples, counts
    )

    def counted(samples):
        for sample in samples:
            counts["samples"] += 1
            yield sample

    shard_paths = write_shards(counted(samples), output_dir, samples_per_shard)
    if not shard_paths:
        raise ValueError("No sample was written: the dataset is empty or every sample is bad.")
    return shard_paths, counts


def image_field(shard_path):
    """The image field (column) of a shard: its first sample's field that is not the condition or caption."""
    with tarfile.open(shard_path) as tar:
        for name in tar.getnames():
            field = name.split(".", 1)[1]
            if field not in (CONDITION_FIELD, CAPTION_FIELD):
                return field
    return None


def add_dataset_arguments(parser, source):
    """The flags that name a `datasets` input: --dataset_name (in the mutually exclusive `source`
    group), its config, split and cache folder. Shared with make_conditions.py."""
    source.add_argument(
        "--dataset_name", default=None, help="Anything `datasets.load_dataset` reads: a hub id, a parquet folder, ..."
    )
    parser.add_argument(
        "--dataset_config_name", default=None, help="Configuration of --dataset_name, if it has several."
    )
    parser.add_argument("--split", default="train", help="Split of the input to read.")
    parser.add_argument("--cache_dir", default=None, help="Where `datasets` caches the loaded input.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Write an image dataset (imagefolder or any `datasets` dataset) as WebDataset .tar shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--train_data_dir", default=None, help="Imagefolder with metadata.jsonl (e.g. make_fill_dataset.py's)."
    )
    add_dataset_arguments(parser, source)
    parser.add_argument("--image_column", default="image", help="Input column of the target images.")
    parser.add_argument(
        "--conditioning_image_column", default="conditioning_image", help="Input column of the conditioning images."
    )
    parser.add_argument(
        "--no_conditions",
        action="store_true",
        help="Write no conditioning images (for training with conditions made on the fly, e.g. canny).",
    )
    parser.add_argument(
        "--caption_column", default="text", help="Input column of the captions (a list keeps its first string)."
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write shard-00000.tar, ... to.")
    parser.add_argument(
        "--samples_per_shard", type=int, default=1000, help="Samples in each shard (the last may hold fewer)."
    )
    parser.add_argument(
        "--image_format",
        choices=["auto", "png", "jpg", "webp"],
        default="auto",
        help="Format (and column name) of the target images; 'auto' keeps the first sample's format"
        " (PNG if it is another). Images in another format are re-encoded.",
    )
    parser.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="Leave out samples with an unreadable image, a missing caption or a condition of another size,"
        " instead of stopping.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace shard-*.tar files already in --output_dir.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shard_paths, counts = make_shards(
        args.output_dir,
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        split=args.split,
        image_column=args.image_column,
        conditioning_image_column=args.conditioning_image_column,
        caption_column=args.caption_column,
        no_conditions=args.no_conditions,
        samples_per_shard=args.samples_per_shard,
        image_format=args.image_format,
        skip_bad_samples=args.skip_bad_samples,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
    )
    notes = "".join(f", {count} {what}" for what, count in sorted(counts.items()) if what != "samples")
    plural = "s" if len(shard_paths) != 1 else ""
    print(f"Wrote {counts['samples']} samples in {len(shard_paths)} shard{plural} to {args.output_dir}{notes}.")
    condition_flag = "" if args.no_conditions else f" --conditioning_image_column {CONDITION_FIELD}"
    print(
        f"Train with: --dataset_name {args.output_dir} --streaming --image_column {image_field(shard_paths[0])}"
        f"{condition_flag} --caption_column {CAPTION_FIELD}"
    )
    return shard_paths


if __name__ == "__main__":
    main()
