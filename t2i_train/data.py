"""Opening the training data (imagefolder, Hub, parquet, stream), checking every sample before it is
trained on, and the pairs held out for the conditioning gain.

One path for every mode. The training split is loaded whole or streamed, and every sample is checked
before it is trained on (or read back from the record of an earlier check of the same files)."""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import typing

import numpy as np
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from datasets import Image as ImageFeature
from datasets import load_dataset
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from PIL import Image

from .files import write_json_atomically
from .images import open_stored_image, verified_upright_size
from .stopping import Refusal

logger = get_logger(__name__)

SAMPLE_CHECK_RULES = 5  # part of each sample-check record's key: raise it when inspect_sample's rules change
CONDITION_MADE_ON_THE_FLY = "made on the fly"  # a sample's condition with --conditioning_type canny
CONDITION_STRETCH_TOLERANCE = 0.01  # a condition stored at another size may be this much out of proportion
# The longest side over the shortest, of an image and of its condition. The transform resizes the short side to
# --resolution before it crops: at 1024 a 16:1 panorama passes through a 50 MB picture, a 4,000,000 × 1 sliver
# (an 11 KB PNG) would need 768 GB. Photographs and panoramas stay well inside 16:1 (about 4:1). A condition is
# resized to its image's size instead: beyond 16:1 one aligns only with an image at the limit, or is a pixel or
# two thin (a damaged file), and one rule for both pictures keeps the check simple.
MAX_ASPECT_RATIO = 16
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
SPLIT_FOLDERS = ("train", "test", "validation")  # a local folder's split folders that `datasets` names alike
# A split's name as `datasets` finds it in a file's path; a folder with one elsewhere is left to `datasets`.
SPLIT_WORD = re.compile(r"(^|[-._ /])(train|training|test|testing|eval|evaluation|valid|validation|dev)([-._ /0-9]|$)")
DEFAULT_VALIDATION_PAIRS = 16  # conditioning-gain pairs taken from a validation set unless told otherwise


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the data code, the loader and the transform read of the command line, built once from it
    (`from_args`) and passed instead of the whole namespace. A program other than the trainer
    (scripts/evaluate.py) builds one directly: every field has the trainer's default."""

    dataset_name: typing.Optional[str] = None
    train_data_dir: typing.Optional[str] = None
    dataset_config_name: typing.Optional[str] = None
    cache_dir: typing.Optional[str] = None
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    conditioning_type: str = "image"
    resolution: int = 1024
    detection_resolution: typing.Optional[int] = None
    random_crop: bool = False
    random_flip: bool = False
    aspect_ratio_buckets: bool = False
    train_batch_size: int = 4
    proportion_empty_prompts: float = 0.0
    max_train_samples: typing.Optional[int] = None
    skip_bad_samples: bool = False
    streaming: bool = False
    shuffle_buffer_size: int = 1000
    dataloader_num_workers: int = 1
    validation_pairs: typing.Optional[int] = None
    validation_data_dir: typing.Optional[str] = None
    validation_dataset_name: typing.Optional[str] = None
    latent_cache_dir: typing.Optional[str] = None
    latent_cache_crops: str = "exact"
    latent_cache_crop_positions: int = 8

    @classmethod
    def from_args(cls, args):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def validation_set_location(args):
    """(flag, location) of the separate validation set, or None."""
    if args.validation_dataset_name:
        return "--validation_dataset_name", args.validation_dataset_name
    if args.validation_data_dir:
        return "--validation_data_dir", args.validation_data_dir
    return None


def dataset_location(args):
    """(flag, location) of the training data."""
    if args.dataset_name:
        return "--dataset_name", args.dataset_name
    return "--train_data_dir", args.train_data_dir


def used_columns(args):
    """The dataset columns training reads: no conditioning column when conditions are made on the fly."""
    flags = ["image_column", "caption_column"]
    if args.conditioning_type == "image":
        flags.insert(1, "conditioning_image_column")
    return {flag: getattr(args, flag) for flag in flags}


def undecoded_images(dataset, args):
    """The dataset with its image columns left as stored (bytes or a path): decoded only where a
    sample is transformed, and small enough to hold a shuffle window of them."""
    if dataset.features is None:  # a stream whose features are unknown decodes nothing itself
        return dataset
    for flag, column in used_columns(args).items():
        if flag != "caption_column":
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def check_columns(column_names, args):
    for flag, column in used_columns(args).items():
        if column not in column_names:
            raise Refusal(f"`--{flag}` value {column!r} not found in dataset columns: {', '.join(column_names)}.")


def local_imagefolder_files(location):
    """{split: files} of a local imagefolder (images and a metadata.jsonl or .csv), listed once, where
    the layout leaves no doubt about the splits: split folders (train/, test/, validation/) at the
    top, or no split named anywhere (all of it is 'train'). None for anything else (a Hub id,
    parquet, shards, a folder that names its splits otherwise): `datasets` then resolves it itself.

    Given the files, `datasets` skips its own search, which globs some 45 split patterns, each over
    the whole folder: an imagefolder of 4,096 images opens in 1.7 s instead of 4.8 s with split
    folders, 1.3 s instead of 6.6 s without (scripts/benchmark_dataset_open.py), and the gap grows
    with the data. Hidden files and folders ('.', '__') are left out, as `datasets` leaves them out.
    """
    if not os.path.isdir(location):
        return None
    files = []
    for folder, subfolders, names in os.walk(location):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith((".", "__")))
        relative = os.path.relpath(folder, location)
        files += [os.path.normpath(os.path.join(relative, name)) for name in sorted(names)
                  if not name.startswith((".", "__"))]
    names = [os.path.basename(path) for path in files]
    image_suffixes = Image.registered_extensions()
    if not any(name in IMAGEFOLDER_METADATA for name in names) or not all(
        name in IMAGEFOLDER_METADATA or os.path.splitext(name)[1].lower() in image_suffixes for name in names
    ):
        return None
    split_of = {path: path.split(os.sep)[0] for path in files if os.sep in path}
    if len(split_of) == len(files) and set(split_of.values()) <= set(SPLIT_FOLDERS):
        if not any(SPLIT_WORD.search(path.split(os.sep, 1)[1].lower()) for path in files):
            return {split: [os.path.join(location, path) for path in files if split_of[path] == split]
                    for split in sorted(set(split_of.values()))}
    if not any(SPLIT_WORD.search(path.lower()) for path in files):
        return {"train": [os.path.join(location, path) for path in files]}
    return None


def open_dataset(location, args, **options):
    """`datasets.load_dataset` on the training data; a local imagefolder by its listed files. For local
    files datasets' progress bars are off: it "downloads" each file from disk to where it already is."""
    files = local_imagefolder_files(location)
    with datasets_progress_bars_off(os.path.exists(location)):
        if files is None:
            return load_dataset(location, args.dataset_config_name, cache_dir=args.cache_dir, **options)
        return load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir, **options)


def open_named_dataset(flag, location, args):
    """`open_dataset` of what `flag` names; a failure is a refusal that names the flag."""
    try:
        return open_dataset(location, args)
    except Exception as error:
        raise Refusal(f"`{flag}` {location!r} could not be loaded as a dataset (is it empty?): {error}") from error


def validation_set_args(args):
    return dataclasses.replace(args, dataset_config_name=None)  # the config name is the training set's


def prepare_datasets(args):
    """Open the training set and the validation set, if any, so that `datasets` prepares their tables (a
    local folder's, a download's) on this process; the others then open what it prepared. Run by the main
    process first: loading and the sample check follow on every process at once."""
    if args.streaming:
        return  # a stream prepares nothing
    open_named_dataset(*dataset_location(args), args)
    if validation_set_location(args) is not None:
        open_named_dataset(*validation_set_location(args), validation_set_args(args))


@contextlib.contextmanager
def datasets_progress_bars_off(off=True):
    """datasets' progress bars off for the block (unless the user chose with HF_DATASETS_DISABLE_PROGRESS_BARS)."""
    was_off = are_progress_bars_disabled()
    chosen = "HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ
    if off and not chosen:
        disable_progress_bars()
    try:
        yield
    finally:
        if off and not chosen and not was_off:
            enable_progress_bars()


def condition_stretch(image_size, condition_size):
    """How much resizing a condition to its image's size stretches one axis against the other: the
    larger aspect ratio over the smaller, minus 1 (0 when the sizes are proportional)."""
    (width, height), (condition_width, condition_height) = image_size, condition_size
    ratio = width * condition_height / (height * condition_width)
    return max(ratio, 1 / ratio) - 1


def condition_fits(image_size, condition_size):
    """Whether a condition stored at another size than its image can be aligned with it: their
    sizes must be proportional up to 1 % plus one pixel of the condition's rounding. Depth maps at
    half size and edge maps at full size both fit; a square condition for a 3:2 image does not."""
    tolerance = CONDITION_STRETCH_TOLERANCE + 1 / min(condition_size)
    return condition_stretch(image_size, condition_size) <= tolerance


def inspect_sample(image, conditioning_image, caption):
    """(problem, (height, width)) of a stored sample: why it cannot be trained on (None when it
    can) and the image's size. Reads image headers and checks their data without decoding the
    pixels. `conditioning_image` is CONDITION_MADE_ON_THE_FLY with --conditioning_type canny."""
    sizes = []
    stored = [("image", image)]
    if conditioning_image is not CONDITION_MADE_ON_THE_FLY:
        stored.append(("conditioning image", conditioning_image))
    for name, value in stored:
        if value is None:
            return f"missing {name}", None
        try:
            with open_stored_image(value) as opened:
                sizes.append(verified_upright_size(opened))
        except Exception as error:
            return f"unreadable {name} ({error})", None
    for (name, _), (width, height) in zip(stored, sizes):
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            why = " (the transform resizes the short side to the resolution before it crops)" if name == "image" else ""
            return (f"{name} is {width}x{height}: its long side is more than {MAX_ASPECT_RATIO} times its short side,"
                    f" the limit{why}"), None
    (width, height), *condition_size = sizes
    if condition_size and not condition_fits((width, height), condition_size[0]):
        other_width, other_height = condition_size[0]
        return (
            f"conditioning image is {other_width}x{other_height} but the image is {width}x{height}: their aspect"
            f" ratios differ by {condition_stretch((width, height), condition_size[0]):.0%}, so the condition cannot"
            " be aligned with the image"
        ), None
    if caption is None or not isinstance(caption, (str, list)) or (isinstance(caption, list) and not caption):
        return f"missing caption ({caption!r})", None
    return None, (height, width)


def stored_sample(sample, args):
    """(image, conditioning image, caption) of an undecoded sample; None for what it lacks."""
    if args.conditioning_type == "image":
        condition = sample.get(args.conditioning_image_column)
    else:
        condition = CONDITION_MADE_ON_THE_FLY
    return sample.get(args.image_column), condition, sample.get(args.caption_column)


SAMPLE_CHECK_THREADS = 16  # per process: a check mostly reads files, which threads overlap
SAMPLE_CHECK_BLOCK = 1024  # rows read from the table at once, then inspected by the threads


def check_column_types(dataset, args):
    columns = used_columns(args)
    for flag, column in columns.items():
        if flag != "caption_column" and not isinstance(dataset.features[column], ImageFeature):
            raise Refusal(
                f"`--{flag}` column {column!r} holds {dataset.features[column]}, not images."
                " (An imagefolder's metadata.jsonl must name it with the '_file_name' suffix.)"
            )
    caption_feature = dataset.features[args.caption_column]
    caption_type = getattr(caption_feature, "dtype", None) or getattr(getattr(caption_feature, "feature", None), "dtype", None)
    if caption_type not in ("string", "large_string"):
        raise Refusal(f"`--caption_column` column {args.caption_column!r} holds {caption_feature}, not text.")


def caption_tokens(captions, tokenizer):
    """The tokens of each row's longest caption (a row may hold a list), as the text encoders' tokenizer
    counts them (quietly: the warning of one too long is ours to give); None for a row without text (the check
    refuses it)."""
    texts = [[text for text in (caption if isinstance(caption, list) else [caption]) if isinstance(text, str)]
             for caption in captions]
    counts = iter(map(len, tokenizer([text for row in texts for text in row], verbose=False).input_ids) if any(texts) else ())
    return [max((next(counts) for _ in row), default=None) for row in texts]


def inspect_rows(dataset, args, rows, threads=SAMPLE_CHECK_THREADS, tokenizer=None):
    """[(row, problem, size, caption tokens)] of `rows` (ascending), `inspect_sample` of each on `threads`
    threads, and with `tokenizer` the tokens of its longest caption (else None)."""
    stored = undecoded_images(dataset.select_columns(list(used_columns(args).values())), args)
    inspected = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(rows), SAMPLE_CHECK_BLOCK):
            block = rows[start : start + SAMPLE_CHECK_BLOCK]
            samples = stored.select(block) if len(block) < len(stored) else stored
            found = pool.map(lambda sample: inspect_sample(*stored_sample(sample, args)), samples)
            tokens = caption_tokens(samples[args.caption_column], tokenizer) if tokenizer else [None] * len(block)
            inspected += [(row, *result, count) for row, result, count in zip(block, found, tokens)]
    return inspected


def long_captions(inspected, max_tokens):
    """(rows whose longest caption is over `max_tokens`, the first of them, its tokens), or None when
    none is, or when the captions were not counted."""
    over = [(row, count) for row, _, _, count in inspected if count is not None and count > max_tokens]
    return (len(over), *over[0]) if over else None


def warn_of_long_captions(dataset, args, found, max_tokens):
    """One warning for the captions the text encoders cut at `max_tokens`, with a count and an example."""
    if found is None:
        return
    count, row, tokens = found
    caption = dataset.select_columns([args.caption_column])[row][args.caption_column]
    caption = caption if isinstance(caption, str) else max(caption, key=len)
    logger.warning(
        f"{count} of {len(dataset)} samples have a caption longer than the text encoders' {max_tokens} tokens; each"
        f" is cut there, as upstream does. For example row {row} ({tokens} tokens): {caption[:200]!r}."
    )


def scan_samples(dataset, args, process_index=0, num_processes=1, gather=None, tokenizer=None):
    """(bad, sizes, long): (row, problem) for every sample that cannot be trained on, every good row's
    image (height, width), and with `tokenizer` the captions it would cut (`long_captions`). With several
    processes each inspects every `num_processes`-th row and `gather` (accelerate's gather_object) hands
    every process all of them."""
    check_column_types(dataset, args)
    inspected = inspect_rows(dataset, args, list(range(process_index, len(dataset), num_processes)),
                             tokenizer=tokenizer)
    if num_processes > 1:
        inspected = sorted(gather(inspected))
    bad = [(row, problem) for row, problem, *_ in inspected if problem is not None]
    long = long_captions(inspected, tokenizer.model_max_length) if tokenizer else None
    return bad, [size for _, problem, size, _ in inspected if problem is None], long


def image_file_sizes(dataset, args):
    """(path, size) of every image file the dataset refers to by path in the columns training reads
    (an imagefolder's images), read from the table without touching any stored image bytes."""
    sizes = []
    for column in used_columns(args).values():
        if not isinstance(dataset.features[column], ImageFeature):  # captions; text where images belong (refused)
            continue
        for chunk in dataset.data.column(column).chunks:
            by_path = chunk.field("bytes").is_null().to_pylist()
            for path, referenced in zip(chunk.field("path").to_pylist(), by_path):
                if referenced and path:
                    sizes.append((path, os.path.getsize(path) if os.path.exists(path) else None))
    return sizes


def sample_check_record_path(dataset, args):
    """Where the sample check of this dataset is recorded: beside `datasets`' own cache of it, under
    its fingerprint (which changes when a file's modification time changes, or a file is added or
    removed), the sizes of the image files it refers to (a file rewritten with its old modification
    time, by `cp -p` or `rsync -a`, mostly changes size), the columns checked and the rules they were
    checked by. None for a dataset held only in memory."""
    if not dataset.cache_files:
        return None
    identity = [dataset._fingerprint, image_file_sizes(dataset, args), used_columns(args), SAMPLE_CHECK_RULES]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), f"t2i_sample_check-{key}.json")


def recorded_scan_samples(dataset, args, accelerator=None, tokenizer=None):
    """`scan_samples`, read back from the record of an earlier run on the same files when there is one.
    A check opens every image; at 50 k pairs of megabyte PNGs that is minutes on every restart. With
    `accelerator` every process calls this at once and they share the check, unless every one of them
    finds the record (a cache folder may be local to each node); each node's first process writes it. With
    the text encoders' `tokenizer`, the captions it would cut are counted too, and warned of once."""
    processes = accelerator.num_processes if accelerator is not None else 1
    record_path = sample_check_record_path(dataset, args)
    record = None
    if record_path is not None and os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    # A record without the caption count (one written for a program that has no tokenizer) is checked again.
    recorded = record is not None and (tokenizer is None or record["captions_counted"])
    if processes > 1:  # all read, or all check: the check gathers
        recorded = all(gather_object([recorded]))
    if recorded:
        logger.info(f"Read the sample check of {len(dataset)} samples from {record_path}.", main_process_only=False)
        bad, sizes, long = [tuple(entry) for entry in record["bad"]], [tuple(size) for size in record["sizes"]], record["long"]
    else:
        share = (accelerator.process_index, processes, gather_object) if processes > 1 else (0, 1, None)
        bad, sizes, long = scan_samples(dataset, args, *share, tokenizer=tokenizer)
        logger.info(f"Checked all {len(dataset)} samples on {processes} process(es): {len(bad)} bad.")
        if record_path is not None and (accelerator is None or accelerator.is_local_main_process):
            try:  # each node's first process: a shared folder's record is replaced whole by each
                write_json_atomically(record_path, {"bad": bad, "sizes": sizes, "long": long,
                                                    "captions_counted": tokenizer is not None})
            except OSError as error:  # a read-only shared cache: check again next time
                logger.warning(f"Could not record the sample check in {record_path}: {error}")
    if tokenizer is not None:
        warn_of_long_captions(dataset, args, long, tokenizer.model_max_length)
    return bad, sizes


def refuse_or_skip(problem, skip, fix="Fix it", error=None):
    """The one policy for bad samples, before training or during it: without --skip_bad_samples (`skip`)
    stop with `problem` and how to `fix` it; with it, warn with the same words and go on."""
    if not skip:
        raise Refusal(f"{problem}. {fix}, or pass --skip_bad_samples.") from error
    logger.warning(f"{problem}. Skipped.", main_process_only=False)


def drop_or_refuse_bad_samples(dataset, args, check_samples, kind="training"):
    """(dataset, sizes): check every sample before training (or read an earlier run's check of the
    same files), then stop with the rows at fault, or drop them with --skip_bad_samples."""
    bad, sizes = check_samples(dataset, args)
    if bad:
        listing = "; ".join(f"row {row}: {problem}" for row, problem in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        columns = "columns " + ", ".join(map(repr, used_columns(args).values()))
        refuse_or_skip(f"{len(bad)} bad {kind} sample(s) of {len(dataset)} in {columns}: {listing}{more}",
                       args.skip_bad_samples, fix="Fix them")
        bad_rows = {row for row, _ in bad}
        dataset = dataset.select([row for row in range(len(dataset)) if row not in bad_rows])
        if len(dataset) == 0:
            raise Refusal(f"Every {kind} sample is bad; none is left.")
    return dataset, sizes


class TrainingData(typing.NamedTuple):
    dataset: typing.Any  # the training split, loaded whole or (--streaming) a stream
    sizes: typing.Optional[list]  # each row's image (height, width); None for a stream
    control_pairs: typing.Any = None  # the rows validation measures the conditioning gain on, or None
    streamed: bool = False  # a stream (--streaming): no sizes, no length, read in windows


def hold_out_pairs(dataset, sizes, count, seed):
    """(training rows, their sizes, held-out rows): `count` rows drawn from `seed` are left out of training."""
    if count >= len(dataset):
        raise Refusal(
            f"`--validation_pairs` {count} would hold out the whole training set ({len(dataset)} samples)."
        )
    held_out = set(np.random.default_rng([seed, 1]).permutation(len(dataset))[:count].tolist())
    kept = [row for row in range(len(dataset)) if row not in held_out]
    return dataset.select(kept), [sizes[row] for row in kept], dataset.select(sorted(held_out))


def load_train_dataset(args, seed, check_samples):
    """TrainingData: the checked training split, each row's image (height, width), and the rows held
    out for the conditioning gain (--validation_pairs without a validation set).

    Bad samples stop the run or are dropped (--skip_bad_samples); --max_train_samples keeps the
    first N rows of a shuffle drawn from `seed`, as upstream does.
    """
    dataset = open_named_dataset(*dataset_location(args), args)
    if "train" not in dataset:
        raise Refusal(f"The dataset has no 'train' split; it has: {', '.join(dataset)}.")
    train = dataset["train"]
    check_columns(train.column_names, args)
    if len(train) == 0:
        raise Refusal("The training dataset is empty.")
    train, sizes = drop_or_refuse_bad_samples(train, args, check_samples)
    held_out = None
    if args.validation_pairs and validation_set_location(args) is None:
        train, sizes, held_out = hold_out_pairs(train, sizes, args.validation_pairs, seed)
    if args.max_train_samples is not None:
        if args.max_train_samples > len(train):
            raise Refusal(
                f"`--max_train_samples` {args.max_train_samples} is larger than the dataset ({len(train)} samples)."
            )
        rows = np.random.default_rng(seed).permutation(len(train))[: args.max_train_samples].tolist()
        train, sizes = train.select(rows), [sizes[row] for row in rows]
    return TrainingData(train, sizes, held_out)


def load_validation_set(args, check_samples):
    """The first --validation_pairs rows (default up to DEFAULT_VALIDATION_PAIRS) of the validation
    set, checked like training samples."""
    flag, location = validation_set_location(args)
    splits = open_named_dataset(flag, location, validation_set_args(args))
    split = next((name for name in ("validation", "train") if name in splits), next(iter(splits)))
    pairs = splits[split]
    check_columns(pairs.column_names, args)
    count = args.validation_pairs or min(len(pairs), DEFAULT_VALIDATION_PAIRS)
    if not 2 <= count <= len(pairs):
        raise Refusal(f"`{flag}` {location!r} has {len(pairs)} sample(s) in '{split}'; {max(count, 2)} are needed.")
    pairs, _ = drop_or_refuse_bad_samples(pairs.select(range(count)), args, check_samples, kind="validation")
    logger.info(f"The conditioning gain is measured on {len(pairs)} pairs of {location} ('{split}').")
    return pairs


def load_streaming_dataset(args):
    """The training split as a `datasets` IterableDataset (--streaming): nothing is downloaded or
    read ahead. Image columns stay undecoded (bytes) until a sample is transformed, so a shuffle
    window holds compressed images only."""
    flag, location = dataset_location(args)
    try:
        stream = open_dataset(location, args, split="train", streaming=True)
    except Exception as error:
        raise Refusal(f"`{flag}` {location!r} could not be streamed as a dataset: {error}") from error
    column_names = stream.column_names or list(next(iter(stream.take(1)), {}))
    if not column_names:
        raise Refusal(f"`{flag}` {location!r} holds no training samples.")
    check_columns(column_names, args)
    stream = stream.select_columns(list(used_columns(args).values()) + (["__key__"] if "__key__" in column_names else []))
    return undecoded_images(stream, args)


def load_training_data(args, seed, check_samples):
    """TrainingData: the dataset loaded whole, or a stream with --streaming, and the pairs of the
    conditioning gain, from the validation set or held out of the training data. `check_samples` is the
    sample check (`recorded_scan_samples`, or the caller's), passed down to every place that checks."""
    if args.streaming:
        data = TrainingData(load_streaming_dataset(args), None, streamed=True)
    else:
        data = load_train_dataset(args, seed, check_samples)
    if validation_set_location(args) is not None:
        data = data._replace(control_pairs=load_validation_set(args, check_samples))
    elif data.control_pairs is not None:
        logger.info(f"The conditioning gain is measured on {len(data.control_pairs)} pairs held out of training.")
    return data
