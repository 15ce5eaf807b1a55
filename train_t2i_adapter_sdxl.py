#!/usr/bin/env python
"""Train a T2I-Adapter on a frozen Stable Diffusion XL.

A faithful port of diffusers' `examples/t2i_adapter/train_t2i_adapter_sdxl.py`: the same flags,
defaults and maths, with the upstream defects fixed (see README.md, "Differences from upstream").
Run it with `accelerate launch train_t2i_adapter_sdxl.py --help`.

The file reads top to bottom in the order of a run: arguments, input checks, data, text
embeddings, models, loss, checkpoints, validation, Hub, and finally `main`, which ties them
together. Every step is a module-level function so that tests can import it.
"""

import argparse
import contextlib
import copy
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from huggingface_hub import create_repo, upload_folder
from PIL import Image, ImageOps
from torchvision import transforms
from tqdm.auto import tqdm

logger = get_logger(__name__)

SDXL_DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
EXIF_ORIENTATION = 0x0112  # the EXIF tag datasets applies when it decodes an image
SAMPLE_CHECK_RULES = 1  # part of each sample-check record's key: raise it when inspect_sample's rules change
ADAPTER_SUBFOLDER = "t2iadapter"  # where a checkpoint keeps the adapter in diffusers format
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
MODEL_CARD_TAGS = (
    "stable-diffusion-xl",
    "stable-diffusion-xl-diffusers",
    "text-to-image",
    "diffusers",
    "t2iadapter",
    "diffusers-training",
)


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


def build_parser():
    """The command line: every upstream flag with its upstream name, type and default."""
    parser = argparse.ArgumentParser(
        description="Train a T2I-Adapter on a frozen Stable Diffusion XL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Models
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help=f"Hub id or local folder of the SDXL base model in diffusers format (e.g. {SDXL_DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or folder of a different VAE (e.g. madebyollin/sdxl-vae-fp16-fix); it is then run in the"
        " mixed-precision dtype.",
    )
    parser.add_argument(
        "--adapter_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or folder of an adapter to start from. Without it a new adapter is derived from the UNet's"
        " and VAE's configs (for SDXL: channels (320, 640, 1280, 1280), downscale 16, full_adapter_xl).",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'.")
    parser.add_argument(
        "--tokenizer_name",
        type=str,
        default=None,
        help="Hub id or folder of the tokenizers, if not the base model's. A folder with 'tokenizer' and"
        " 'tokenizer_2' subfolders gives both; otherwise the one tokenizer found there serves both encoders.",
    )
    parser.add_argument(
        "--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored."
    )
    # Output and logging
    parser.add_argument(
        "--output_dir",
        type=str,
        default="t2iadapter-model",
        help="Where the adapter, checkpoints, logs and model card are written.",
    )
    parser.add_argument(
        "--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir."
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help="Tracker(s) for losses and validation images: 'tensorboard', 'wandb', 'all' or 'none'.",
    )
    parser.add_argument(
        "--tracker_project_name",
        type=str,
        default="sd_xl_train_t2iadapter",
        help="Project name given to the trackers.",
    )
    # Resolution and SDXL micro-conditioning
    parser.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="Training images are resized (shorter side) and centre-cropped to this square size.",
    )
    parser.add_argument(
        "--detection_resolution",
        type=int,
        default=None,
        help="Resolution at which conditioning images are prepared before being brought to --resolution"
        " (a detector's working size). Default: --resolution.",
    )
    parser.add_argument(
        "--micro_conditioning",
        action="store_true",
        help="Give the UNet each image's real size and the real crop's top-left corner (SDXL's micro-conditioning)"
        " instead of upstream's fixed (resolution, resolution) and --crops_coords_top_left_h/w.",
    )
    parser.add_argument(
        "--crops_coords_top_left_h", type=int, default=0, help="Crop top coordinate given to the SDXL UNet."
    )
    parser.add_argument(
        "--crops_coords_top_left_w", type=int, default=0, help="Crop left coordinate given to the SDXL UNet."
    )
    parser.add_argument(
        "--random_crop",
        action="store_true",
        help="Crop each image (and its condition, identically) at a random place instead of the centre.",
    )
    parser.add_argument(
        "--random_flip",
        action="store_true",
        help="Flip each image and its condition together horizontally with probability 0.5.",
    )
    parser.add_argument(
        "--aspect_ratio_buckets",
        action="store_true",
        help="Train each image near its own aspect ratio: SDXL's buckets of about resolution² pixels, each batch"
        " from one bucket. Implies --micro_conditioning.",
    )
    # Training horizon
    parser.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    parser.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, unless --max_train_steps is set.")
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total optimisation steps; overrides --num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches accumulated per optimisation step."
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute UNet activations in the backward pass: less memory, slower steps.",
    )
    # Checkpoints
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint (output_dir/checkpoint-N) every N optimisation steps.",
    )
    parser.add_argument(
        "--checkpoints_total_limit", type=int, default=3, help="Keep at most this many checkpoints."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint folder name (or path), or 'latest' for the newest in --output_dir.",
    )
    # Optimiser
    parser.add_argument("--learning_rate", type=float, default=5e-6, help="Learning rate after warm-up.")
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Multiply the learning rate by accumulation steps × batch size × number of processes.",
    )
    parser.add_argument(
        "--lr_scheduler", type=str, default="constant", help=f"Learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}."
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up optimisation steps.")
    parser.add_argument(
        "--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts schedule."
    )
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient norm clipping.")
    parser.add_argument(
        "--set_grads_to_none", action="store_true", help="Set gradients to None instead of zero after each step."
    )
    # Speed (additions to upstream)
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode each training image with the VAE once, keep its latent distribution (float16) on disk, and"
        " sample from it at every step instead of running the VAE. Reused across runs.",
    )
    parser.add_argument(
        "--latent_cache_dir",
        type=str,
        default=None,
        help="Where --cache_latents stores latents; default: <--cache_dir or ~/.cache/t2i-adapter-sdxl>/latents.",
    )
    parser.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the UNet and the adapter (the first steps are slower while kernels compile).",
    )
    # Robustness (additions to upstream)
    parser.add_argument(
        "--skip_nonfinite_steps",
        type=int,
        default=0,
        help="Skip up to N optimisation steps whose loss is NaN/inf (their update is dropped) before stopping."
        " 0: stop at the first one.",
    )
    parser.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="Drop samples with an unreadable image, a missing caption or mismatched image sizes (counted in"
        " a warning) instead of stopping before training.",
    )
    # Precision and kernels
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: accelerate's config or launch flag.",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers' attention in the UNet (PyTorch's SDPA is used otherwise).",
    )
    # Data
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub id of a dataset, or a local folder that `datasets.load_dataset` understands (e.g. parquet).",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config, if any.")
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A local imagefolder with metadata.jsonl (the conditioning key must be"
        " 'conditioning_image_file_name').",
    )
    parser.add_argument("--image_column", type=str, default="image", help="Column of the target images.")
    parser.add_argument(
        "--conditioning_image_column",
        type=str,
        default="conditioning_image",
        help="Column of the conditioning images.",
    )
    parser.add_argument(
        "--caption_column", type=str, default="text", help="Column of the captions (a string or a list of strings)."
    )
    parser.add_argument(
        "--max_train_samples", type=int, default=None, help="Train on the first N samples after shuffling."
    )
    parser.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0,
        help="Probability that a caption is replaced by the empty prompt, drawn anew at every step.",
    )
    parser.add_argument(
        "--dataloader_num_workers", type=int, default=1, help="DataLoader worker processes (0: main process)."
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="Stream --dataset_name or --train_data_dir (e.g. a folder of WebDataset .tar shards) instead of"
        " loading it whole; needs --max_train_steps.",
    )
    parser.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="With --streaming: samples are shuffled (and grouped into buckets) in windows of this many.",
    )
    parser.add_argument(
        "--conditioning_type",
        type=str,
        default="image",
        choices=["image", "canny"],
        help="'image': read conditions from --conditioning_image_column. 'canny': make a canny edge map of each"
        " training image on the fly, with random thresholds (no stored conditions needed).",
    )
    # Validation
    parser.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        nargs="+",
        help="Prompts for validation: as many as --validation_image, or one for all images.",
    )
    parser.add_argument(
        "--validation_image",
        type=str,
        default=None,
        nargs="+",
        help="Conditioning images for validation: as many as --validation_prompt, or one for all prompts.",
    )
    parser.add_argument(
        "--num_validation_images", type=int, default=4, help="Images generated per (prompt, image) pair."
    )
    parser.add_argument(
        "--validation_steps", type=int, default=100, help="Run validation every N optimisation steps."
    )
    # Hub
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the adapter and model card to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (never logged or saved).")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository; default: the name of --output_dir."
    )
    return parser


def parse_args(input_args=None):
    """Parse the command line (or `input_args`) and run every check that needs no file."""
    args = build_parser().parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Checks on the flags alone; each error names the flag and its value."""
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Specify either `--dataset_name` or `--train_data_dir`.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError(
            f"Specify only one of `--dataset_name` ({args.dataset_name!r}) or `--train_data_dir` ({args.train_data_dir!r})."
        )
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise ValueError(f"`--proportion_empty_prompts` must be in [0, 1], got {args.proportion_empty_prompts}.")
    if args.validation_prompt is not None and args.validation_image is None:
        raise ValueError("`--validation_image` must be set if `--validation_prompt` is set.")
    if args.validation_prompt is None and args.validation_image is not None:
        raise ValueError("`--validation_prompt` must be set if `--validation_image` is set.")
    if args.validation_prompt is not None:
        pair_validation_inputs(args.validation_prompt, args.validation_image)
    if args.resolution % 8 != 0:
        raise ValueError(
            f"`--resolution` must be divisible by 8 so that VAE latents and adapter features line up, got {args.resolution}."
        )
    if args.detection_resolution is not None and args.detection_resolution <= 0:
        raise ValueError(f"`--detection_resolution` must be positive, got {args.detection_resolution}.")
    for flag in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
        "num_validation_images",
    ):
        if getattr(args, flag) < 1:
            raise ValueError(f"`--{flag}` must be at least 1, got {getattr(args, flag)}.")
    for flag in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"`--{flag}` must be at least 1, got {getattr(args, flag)}.")
    if args.skip_nonfinite_steps < 0:
        raise ValueError(f"`--skip_nonfinite_steps` must be at least 0, got {args.skip_nonfinite_steps}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"`--dataloader_num_workers` must be at least 0, got {args.dataloader_num_workers}.")
    if args.shuffle_buffer_size < 1:
        raise ValueError(f"`--shuffle_buffer_size` must be at least 1, got {args.shuffle_buffer_size}.")
    if args.streaming and args.max_train_steps is None:
        raise ValueError("`--streaming` needs `--max_train_steps`: a stream's length is not known in advance.")
    if args.streaming and args.max_train_samples is not None:
        raise ValueError("`--max_train_samples` cannot be used with `--streaming`; bound the run with `--max_train_steps`.")
    if args.cache_latents:
        varying = [f"--{flag}" for flag in ("streaming", "random_crop", "random_flip", "aspect_ratio_buckets")
                   if getattr(args, flag)]
        varying += ["--conditioning_type canny"] if args.conditioning_type == "canny" else []
        if varying:
            raise ValueError(
                f"`--cache_latents` stores one centre crop per image and cannot be combined with {', '.join(varying)}."
            )
    if args.aspect_ratio_buckets:
        args.micro_conditioning = True  # a bucket's crop is only meaningful to the UNet with the real sizes
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"`--lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}, got {args.lr_scheduler!r}.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ValueError(
            f"`--report_to {args.report_to}` with `--hub_token` would expose the token to the tracker."
            " Log in with `huggingface-cli login` instead and drop `--hub_token`."
        )


# ------------------------------------------------------------------------------------------
# Input checks: files and model configs, before anything expensive is loaded
# ------------------------------------------------------------------------------------------


def check_model_location(flag, value):
    """A local path must exist; anything else must at least look like a Hub repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value is None or os.path.isdir(value):
        return
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"`{flag}` {value!r} is neither an existing folder nor a Hub repository id.") from None


def check_image_file(flag, path):
    if not os.path.isfile(path):
        raise ValueError(f"`{flag}` {path!r} does not exist.")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise ValueError(f"`{flag}` {path!r} is not a readable image ({error}).") from None


def load_model_config(model_class, location, subfolder, args):
    """Read only a model's config.json (no weights)."""
    return model_class.load_config(location, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)


def safetensors_dtypes(folder):
    """The dtypes of the weights `from_pretrained` loads from a local diffusers model folder (not
    variants such as diffusion_pytorch_model.fp16.safetensors), read from safetensors headers only."""
    from safetensors import safe_open

    dtypes = set()
    weight_files = [*Path(folder).glob("diffusion_pytorch_model.safetensors"),
                    *Path(folder).glob("diffusion_pytorch_model-*-of-*.safetensors")]
    for path in weight_files:
        with safe_open(str(path), framework="pt") as weights:
            dtypes.update(str(weights.get_slice(key).get_dtype()) for key in weights.keys())
    return dtypes


def check_inputs(args):
    """Every check that reads files or configs but loads no weights, run before any model or data loads.

    Returns the adapter config that training will use, so the same derivation is not repeated.
    """
    from diffusers import AutoencoderKL, T2IAdapter, UNet2DConditionModel

    for flag in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "adapter_model_name_or_path"):
        check_model_location(f"--{flag}", getattr(args, flag))
    check_model_location("--tokenizer_name", args.tokenizer_name)
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"`--train_data_dir` {args.train_data_dir!r} is not an existing folder.")
    for path in args.validation_image or []:
        check_image_file("--validation_image", path)
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise ValueError("`--enable_xformers_memory_efficient_attention` needs xformers: `pip install xformers`.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes`.") from None

    unet_config = load_model_config(UNet2DConditionModel, args.pretrained_model_name_or_path, "unet", args)
    if args.pretrained_vae_model_name_or_path is None:
        vae_config = load_model_config(AutoencoderKL, args.pretrained_model_name_or_path, "vae", args)
    else:
        vae_config = load_model_config(AutoencoderKL, args.pretrained_vae_model_name_or_path, None, args)
    if args.adapter_model_name_or_path is None:
        adapter_config = derive_adapter_config(unet_config, vae_config)
    else:
        adapter_config = dict(load_model_config(T2IAdapter, args.adapter_model_name_or_path, None, args))
        if os.path.isdir(args.adapter_model_name_or_path):
            dtypes = safetensors_dtypes(args.adapter_model_name_or_path) - {"F32"}
            if dtypes:
                raise ValueError(
                    f"`--adapter_model_name_or_path` {args.adapter_model_name_or_path!r} holds {sorted(dtypes)} weights;"
                    " the trained adapter must be float32 (mixed precision keeps a float32 master copy)."
                )
    check_adapter_fits(adapter_config, unet_config, vae_config, args.resolution)
    return adapter_config


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


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
    from datasets import Image as ImageFeature

    if dataset.features is None:  # a stream whose features are unknown decodes nothing itself
        return dataset
    for flag, column in used_columns(args).items():
        if flag != "caption_column":
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def check_columns(column_names, args):
    for flag, column in used_columns(args).items():
        if column not in column_names:
            raise ValueError(f"`--{flag}` value {column!r} not found in dataset columns: {', '.join(column_names)}.")


@contextlib.contextmanager
def each_local_folder_listed_once():
    """While `datasets` resolves a local dataset's files, list each folder once and reuse the listing.

    To find the splits it globs about 45 patterns, each walking the whole folder: 184,000 file stats
    (2.5 s) for an imagefolder of 4,096 files, growing with the data. The folder does not change
    meanwhile, and `datasets` runs the same code on the listing.
    """
    from fsspec.implementations.local import LocalFileSystem

    list_folder = LocalFileSystem.ls
    listings = {}

    def list_folder_once(self, path, detail=False, **kwargs):
        key = (self._strip_protocol(path), detail)
        if key not in listings:
            listings[key] = list_folder(self, path, detail=detail, **kwargs)
        return list(listings[key])

    LocalFileSystem.ls = list_folder_once
    try:
        yield
    finally:
        LocalFileSystem.ls = list_folder


def load_train_dataset(args):
    """Load the training split, check its columns and samples, shuffle with the seed and truncate.

    With --aspect_ratio_buckets each row also gets its image's (height, width) in SIZE_COLUMN,
    read from the headers during the sample check.
    """
    from datasets import load_dataset

    flag, location = dataset_location(args)
    try:
        with each_local_folder_listed_once():
            dataset = load_dataset(location, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as error:
        raise ValueError(f"`{flag}` {location!r} could not be loaded as a dataset (is it empty?): {error}") from error
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split; it has: {', '.join(dataset)}.")
    train = dataset["train"]
    check_columns(train.column_names, args)
    if len(train) == 0:
        raise ValueError("The training dataset is empty.")
    train = drop_or_refuse_bad_samples(train, args)
    train = train.shuffle(seed=args.seed)
    if args.max_train_samples is not None:
        if args.max_train_samples > len(train):
            raise ValueError(
                f"`--max_train_samples` {args.max_train_samples} is larger than the dataset ({len(train)} samples)."
            )
        train = train.select(range(args.max_train_samples))
    return train


def load_streaming_dataset(args):
    """The training split as a `datasets` IterableDataset (--streaming): nothing is downloaded or
    read ahead. Image columns stay undecoded (bytes) until a sample is transformed, so a shuffle
    window holds compressed images only."""
    from datasets import load_dataset

    flag, location = dataset_location(args)
    try:
        with each_local_folder_listed_once():
            stream = load_dataset(
                location, args.dataset_config_name, cache_dir=args.cache_dir, split="train", streaming=True
            )
    except Exception as error:
        raise ValueError(f"`{flag}` {location!r} could not be streamed as a dataset: {error}") from error
    column_names = stream.column_names or list(next(iter(stream.take(1)), {}))
    if not column_names:
        raise ValueError(f"`{flag}` {location!r} holds no training samples.")
    check_columns(column_names, args)
    stream = stream.select_columns(list(used_columns(args).values()) + (["__key__"] if "__key__" in column_names else []))
    return undecoded_images(stream, args)


def open_stored_image(value):
    """A PIL image from what an undecoded `datasets.Image` column stores (bytes or a path)."""
    if value is None:
        raise ValueError("no image")
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def verified_upright_size(image):
    """(width, height) of a just-opened image as it is shown, and as `datasets` decodes it: after its
    EXIF orientation (a quarter turn swaps the sides); then a check of its data.

    The size is read from the header alone, before `verify()` leaves the image unusable. A PNG's EXIF
    is taken from the chunks before its pixel data, where the PNG spec puts it, because Pillow's
    `getexif()` would decode the whole PNG to look for one after.
    """
    width, height = image.size
    if image.format == "PNG":
        exif = Image.Exif()
        exif.load(image.info.get("exif"))
    else:
        exif = image.getexif()
    image.verify()
    return (height, width) if exif.get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (width, height)


def load_upright_rgb(value):
    """A stored image decoded as `datasets` decodes it (EXIF orientation applied), in RGB."""
    return ImageOps.exif_transpose(open_stored_image(value)).convert("RGB")


def inspect_sample(image, conditioning_image, caption):
    """(problem, (height, width)) of a stored sample: why it cannot be trained on (None when it
    can) and the image's size. Reads image headers and checks their data without decoding the
    pixels. `conditioning_image` is None when conditions are made on the fly."""
    sizes = []
    stored = [("image", image)] + ([("conditioning image", conditioning_image)] if conditioning_image is not None else [])
    for name, value in stored:
        try:
            with open_stored_image(value) as opened:
                sizes.append(verified_upright_size(opened))
        except Exception as error:
            return f"unreadable {name} ({error})", None
    (width, height), *condition_size = sizes
    if condition_size and condition_size[0] != (width, height):
        other_width, other_height = condition_size[0]
        return f"conditioning image is {other_width}x{other_height} but the image is {width}x{height}", None
    if caption is None or not isinstance(caption, (str, list)) or (isinstance(caption, list) and not caption):
        return f"missing caption ({caption!r})", None
    return None, (height, width)


def stored_sample(sample, args):
    """(image, conditioning image or None, caption) of an undecoded sample."""
    condition = sample[args.conditioning_image_column] if args.conditioning_type == "image" else None
    return sample[args.image_column], condition, sample[args.caption_column]


def scan_samples(dataset, args):
    """(bad, sizes): (row, problem) for every sample that cannot be trained on, and every good
    row's image (height, width)."""
    from datasets import Image as ImageFeature

    columns = used_columns(args)
    for flag, column in columns.items():
        if flag != "caption_column" and not isinstance(dataset.features[column], ImageFeature):
            raise ValueError(
                f"`--{flag}` column {column!r} holds {dataset.features[column]}, not images."
                " (An imagefolder's metadata.jsonl must name it with the '_file_name' suffix.)"
            )
    stored = undecoded_images(dataset.select_columns(list(columns.values())), args)
    bad, sizes = [], []
    for row, sample in enumerate(stored):
        problem, size = inspect_sample(*stored_sample(sample, args))
        if problem is None:
            sizes.append(size)
        else:
            bad.append((row, problem))
    return bad, sizes


def sample_check_record_path(dataset, args):
    """Where the sample check of this dataset is recorded: beside `datasets`' own cache of it, under
    its fingerprint (which changes when a file is changed, added or removed), the columns checked and
    the rules they were checked by. None for a dataset held only in memory."""
    if not dataset.cache_files:
        return None
    identity = [dataset._fingerprint, used_columns(args), SAMPLE_CHECK_RULES]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), f"t2i_sample_check-{key}.json")


def recorded_scan_samples(dataset, args):
    """`scan_samples`, read back from the record of an earlier run on the same files when there is one.
    A check opens every image; at 50 k pairs of megabyte PNGs that is minutes on every restart."""
    record_path = sample_check_record_path(dataset, args)
    if record_path is not None and os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        logger.info(f"Read the sample check of {len(dataset)} samples from {record_path}.", main_process_only=False)
        return [tuple(entry) for entry in record["bad"]], [tuple(size) for size in record["sizes"]]
    bad, sizes = scan_samples(dataset, args)
    logger.info(f"Checked all {len(dataset)} samples: {len(bad)} bad.", main_process_only=False)
    if record_path is not None:
        tmp_path = f"{record_path}.{os.getpid()}.tmp"
        try:
            with open(tmp_path, "w") as f:
                json.dump({"bad": bad, "sizes": sizes}, f)
            os.replace(tmp_path, record_path)  # ranks writing at once each replace it whole
        except OSError as error:  # a read-only shared cache: check again next time
            logger.warning(f"Could not record the sample check in {record_path}: {error}")
    return bad, sizes


def drop_or_refuse_bad_samples(dataset, args):
    """Check every sample before training (or read an earlier run's check of the same files): stop
    with the rows at fault, or drop them with --skip_bad_samples."""
    bad, sizes = recorded_scan_samples(dataset, args)
    if bad:
        listing = "; ".join(f"row {row}: {problem}" for row, problem in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        columns = "columns " + ", ".join(map(repr, used_columns(args).values()))
        if not args.skip_bad_samples:
            raise ValueError(
                f"{len(bad)} bad training sample(s) in {columns}: {listing}{more}. Fix them, or pass --skip_bad_samples."
            )
        logger.warning(f"Skipping {len(bad)} of {len(dataset)} training samples: {listing}{more}.")
        bad_rows = {row for row, _ in bad}
        dataset = dataset.select([row for row in range(len(dataset)) if row not in bad_rows])
        if len(dataset) == 0:
            raise ValueError("Every training sample is bad; nothing is left to train on.")
    if args.aspect_ratio_buckets:
        dataset = dataset.add_column(SIZE_COLUMN, [list(size) for size in sizes])
    return dataset


def image_transform(resolution):
    """Target images: shorter side to `resolution`, centre crop, values in [-1, 1]."""
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def conditioning_image_transform(resolution, detection_resolution=None):
    """Conditioning images: like the targets but kept in [0, 1].

    With a detection resolution the condition is first brought to the detector's working size,
    then to the training resolution, as it would be if a detector had made it at that size.
    """
    steps = []
    if detection_resolution is not None and detection_resolution != resolution:
        steps += [
            transforms.Resize(detection_resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(detection_resolution),
        ]
    steps += [
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
    ]
    return transforms.Compose(steps)


CANNY_LOW_RANGE = (50, 150)  # random canny thresholds: low in this range,
CANNY_GAP_RANGE = (50, 150)  # high = low + a gap in this range


def canny_condition(image, low_threshold, high_threshold):
    """The canny condition of an image: OpenCV's edge map, white edges on black, as RGB."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def random_canny_thresholds(rng):
    """(low, high) drawn at random: the edge density varies from sample to sample, as in the
    original canny adapters' training, so the adapter does not learn one detector setting."""
    low = rng.randint(*CANNY_LOW_RANGE)
    return low, low + rng.randint(*CANNY_GAP_RANGE)


def center_crop_top_left(height, width, resolution):
    """Where the centre crop starts once the shorter side is resized to `resolution` (the same
    arithmetic as torchvision's Resize and CenterCrop)."""
    if height <= width:
        resized_height, resized_width = resolution, int(resolution * width / height)
    else:
        resized_height, resized_width = int(resolution * height / width), resolution
    return int(round((resized_height - resolution) / 2.0)), int(round((resized_width - resolution) / 2.0))


def preprocess_train(
    examples, image_column, conditioning_image_column, caption_column, resolution, detection_resolution,
    latent_cache_dir=None, micro_conditioning=False,
):
    """The dataset transform: tensors for both images (or the target's cached latent
    distribution), captions left as they are, and with micro-conditioning each sample's original
    size and crop corner (the condition has the image's size: the data check makes sure)."""
    to_condition = conditioning_image_transform(resolution, detection_resolution)
    conditions = [image.convert("RGB") for image in examples[conditioning_image_column]]
    batch = {
        "conditioning_pixel_values": [to_condition(image) for image in conditions],
        "captions": list(examples[caption_column]),
    }
    if micro_conditioning:
        batch["original_sizes"] = [torch.tensor([image.height, image.width]) for image in conditions]
        batch["crop_top_lefts"] = [
            torch.tensor(center_crop_top_left(image.height, image.width, resolution)) for image in conditions
        ]
    if latent_cache_dir is None:
        to_target = image_transform(resolution)
        batch["pixel_values"] = [to_target(image.convert("RGB")) for image in examples[image_column]]
    else:
        cached = [load_cached_latents(latent_cache_dir, key) for key in examples[LATENT_KEY_COLUMN]]
        batch["latent_mean"] = [latents["mean"] for latents in cached]
        batch["latent_std"] = [latents["std"] for latents in cached]
    return batch


def collate_fn(examples):
    """Stack the tensors of a batch; keep the captions as a list."""
    return {
        key: [e[key] for e in examples] if key == "captions" else torch.stack([e[key] for e in examples]).float()
        for key in examples[0]
    }


def make_train_dataloader(dataset, args, latent_cache_dir=None):
    """DataLoader over the transformed dataset (with cached latents when a cache folder is given;
    the dataset then carries a latent key column).

    It gets its own generator so that creating an iterator never draws from the global torch RNG:
    otherwise a resumed run (which creates its iterator at a different moment) would draw
    different noise from the uninterrupted run.
    """
    columns = [args.conditioning_image_column, args.caption_column]
    columns.append(args.image_column if latent_cache_dir is None else LATENT_KEY_COLUMN)
    dataset = dataset.with_transform(
        partial(
            preprocess_train,
            image_column=args.image_column,
            conditioning_image_column=args.conditioning_image_column,
            caption_column=args.caption_column,
            resolution=args.resolution,
            detection_resolution=args.detection_resolution,
            latent_cache_dir=latent_cache_dir,
            micro_conditioning=args.micro_conditioning,
        ),
        columns=columns,  # only these are decoded: no target image when its latents are cached
    )
    return torch.utils.data.DataLoader(
        dataset, shuffle=True, collate_fn=collate_fn, batch_size=args.train_batch_size, **loader_options(args)
    )


def loader_options(args):
    """DataLoader settings both loaders share: workers, pinned memory on CUDA, and a generator of
    their own, so that creating an iterator never draws from the global torch RNG."""
    return {
        "num_workers": args.dataloader_num_workers,
        "persistent_workers": args.dataloader_num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
        "generator": torch.Generator().manual_seed(args.seed if args.seed is not None else 0),
    }


# ------------------------------------------------------------------------------------------
# Planned batches: streaming, aspect-ratio buckets, random crops and flips, on-the-fly canny
# ------------------------------------------------------------------------------------------
# Upstream's loader (above) shuffles rows and centre-crops squares. These features need more:
# every batch from one bucket, and per-sample randomness (crop, flip, canny thresholds) that a
# resumed run reproduces exactly. So batches are planned ahead, each sample with its own seed,
# and the plan's position is part of every checkpoint (torchdata's StatefulDataLoader carries it
# through the DataLoader workers).

SIZE_COLUMN = "image_size"  # (height, width) of each row's image, for bucketing


def uses_planned_batches(args):
    return (
        args.streaming
        or args.aspect_ratio_buckets
        or args.random_crop
        or args.random_flip
        or args.conditioning_type != "image"
    )


def aspect_ratio_buckets(resolution, multiple, max_aspect_ratio=4.0):
    """SDXL's bucket list scaled to `resolution`: for each short side, the longest long side that
    keeps the area within resolution² (so no bucket costs more memory than the square), in both
    orientations; sides are multiples of the step (64 at 1024², as SDXL's own list; at least the
    adapter's downscale `multiple`), aspect ratios from 1:4 to 4:1."""
    step = max(multiple, resolution // 16 // multiple * multiple)
    buckets = set()
    for short in range(step, resolution + 1, step):
        long = resolution * resolution // short // step * step
        if long / short <= max_aspect_ratio:
            buckets.update({(short, long), (long, short)})
    return sorted(buckets)


def nearest_bucket(height, width, buckets):
    """The bucket whose aspect ratio is closest to the image's (compared in log space)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - ratio))


def plan_batches(targets, batch_size, rng):
    """Batches of positions into `targets` (each position's target size), in `rng`'s random order,
    each batch of one target size; a bucket's last batch may be smaller."""
    by_target = {}
    for position in rng.permutation(len(targets)).tolist():
        by_target.setdefault(tuple(targets[position]), []).append(position)
    batches = [
        positions[start : start + batch_size]
        for positions in by_target.values()
        for start in range(0, len(positions), batch_size)
    ]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def cover_size(height, width, target_height, target_width):
    """The size a (height, width) image is resized to so that it just covers the target; for a
    square target this is torchvision's Resize(shorter side) arithmetic, as upstream uses."""
    if target_height / height >= target_width / width:
        return target_height, int(target_height * width / height)
    return int(target_width * height / width), target_width


class PairTransform:
    """Turns one stored sample into training tensors at a target size, with the sample's own RNG:
    image and condition are resized, cropped and flipped identically (pixel for pixel), and with
    --conditioning_type canny the condition is the edge map of the final crop."""

    def __init__(self, args):
        self.image_column = args.image_column
        self.conditioning_image_column = args.conditioning_image_column
        self.caption_column = args.caption_column
        self.conditioning_type = args.conditioning_type
        self.detection_resolution = args.detection_resolution
        self.random_crop = args.random_crop
        self.random_flip = args.random_flip

    def __call__(self, sample, target_size, seed):
        rng = random.Random(seed)
        image = load_upright_rgb(sample[self.image_column])
        condition = None
        if self.conditioning_type == "image":
            condition = load_upright_rgb(sample[self.conditioning_image_column])
            if self.detection_resolution is not None:
                # As if a detector had made the condition at its working size (shorter side).
                working = cover_size(image.height, image.width, self.detection_resolution, self.detection_resolution)
                condition = condition.resize(working[::-1], Image.BILINEAR).resize(image.size, Image.BILINEAR)
        target_height, target_width = target_size
        resized_height, resized_width = cover_size(image.height, image.width, target_height, target_width)
        if self.random_crop:
            top, left = rng.randint(0, resized_height - target_height), rng.randint(0, resized_width - target_width)
        else:
            top = int(round((resized_height - target_height) / 2.0))
            left = int(round((resized_width - target_width) / 2.0))
        flip = self.random_flip and rng.random() < 0.5
        box = (left, top, left + target_width, top + target_height)
        original_size = (image.height, image.width)

        def place(picture):
            picture = picture.resize((resized_width, resized_height), Image.BILINEAR).crop(box)
            return picture.transpose(Image.FLIP_LEFT_RIGHT) if flip else picture

        image = place(image)
        if condition is None:
            condition = canny_condition(image, *random_canny_thresholds(rng))
        else:
            condition = place(condition)
        if flip:  # the crop's corner as seen in the flipped image
            left = resized_width - left - target_width
        return {
            "pixel_values": transforms.functional.normalize(transforms.functional.to_tensor(image), [0.5], [0.5]),
            "conditioning_pixel_values": transforms.functional.to_tensor(condition),
            "captions": sample[self.caption_column],
            "original_sizes": torch.tensor(original_size),
            "crop_top_lefts": torch.tensor((top, left)),
        }


class PlannedBatchSampler:
    """Endless batches of (row, target size, seed) over a map-style dataset: each epoch a new
    permutation from (seed, epoch), batches grouped by bucket, every process its share. Its state
    (epoch, batches done) is saved with each checkpoint."""

    def __init__(self, targets, batch_size, seed, rank=0, world_size=1):
        self.targets, self.batch_size, self.seed = targets, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.done = 0, 0

    def epoch_plan(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        batches = plan_batches(self.targets, self.batch_size, rng)
        sample_seeds = rng.integers(2**63, size=len(self.targets)).tolist()
        # Equal shares: every process must take the same number of steps.
        batches = batches[: len(batches) // self.world_size * self.world_size][self.rank :: self.world_size]
        return [[(row, tuple(self.targets[row]), sample_seeds[row]) for row in batch] for batch in batches]

    def batches_per_epoch(self):
        return len(self.epoch_plan(0))

    def __iter__(self):
        while True:
            plan = self.epoch_plan(self.epoch)
            while self.done < len(plan):
                self.done += 1
                yield plan[self.done - 1]
            self.epoch, self.done = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state):
        self.epoch, self.done = state["epoch"], state["done"]


class PlannedPairs(torch.utils.data.Dataset):
    """A map-style dataset indexed by the sampler's (row, target size, seed)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __getitem__(self, key):
        row, target_size, seed = key
        return self.transform(self.dataset[row], target_size, seed)


class StreamingBatches(torch.utils.data.IterableDataset):
    """Endless batches from a `datasets` IterableDataset (--streaming).

    Each epoch reads the shards in a new order (from the seed and epoch), each process its own
    shards (datasets' split_dataset_by_node) and each DataLoader worker its own part of those.
    Samples are taken in windows of --shuffle_buffer_size, checked, shuffled and grouped by
    bucket. The state is the stream's position at the start of the current window plus the
    batches already given from it: a resumed run re-reads that one window and continues exactly
    (datasets' own shuffle buffer is not saved in its state_dict, so it is not used).
    """

    def __init__(self, stream, transform, args, rank=0, world_size=1, buckets=None):
        self.stream, self.transform, self.rank, self.world_size = stream, transform, rank, world_size
        self.args, self.buckets = args, buckets
        self.state = {"epoch": 0, "window": 0, "stream": None, "done": 0}

    def epoch_stream(self, epoch):
        from datasets import concatenate_datasets
        from datasets.distributed import split_dataset_by_node

        num_shards = self.stream.num_shards
        order = np.random.default_rng([self.args.seed or 0, epoch]).permutation(num_shards).tolist()
        stream = concatenate_datasets([self.stream.shard(num_shards, index) for index in order])
        return split_dataset_by_node(stream, self.rank, self.world_size)

    def window_batches(self, window, rng):
        """Check the window's samples, then plan its batches: (sample, target size, seed) lists."""
        good, targets = [], []
        for sample in window:
            problem, size = inspect_sample(*stored_sample(sample, self.args))
            if problem is not None:
                name = sample.get("__key__", "?")
                if not self.args.skip_bad_samples:
                    raise ValueError(f"Bad training sample {name!r}: {problem}. Fix it, or pass --skip_bad_samples.")
                logger.warning(f"Skipping training sample {name!r}: {problem}.")
                continue
            good.append(sample)
            resolution = self.args.resolution
            targets.append(nearest_bucket(*size, self.buckets) if self.buckets else (resolution, resolution))
        seeds = rng.integers(2**63, size=len(good)).tolist()
        return [
            [(good[i], targets[i], seeds[i]) for i in batch]
            for batch in plan_batches(targets, self.args.train_batch_size, rng)
        ]

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        state = dict(self.state)
        while True:
            stream = self.epoch_stream(state["epoch"])
            if state["stream"] is not None:
                stream.load_state_dict(state["stream"])
            samples = iter(stream)
            while True:
                window = list(itertools.islice(samples, self.args.shuffle_buffer_size))
                if not window:
                    break
                rng = np.random.default_rng([self.args.seed or 0, state["epoch"], self.rank, worker_id, state["window"]])
                for done, batch in enumerate(self.window_batches(window, rng), start=1):
                    if done > state["done"]:  # the others were given before the checkpoint resumed from
                        self.state = {**state, "done": done}
                        yield collate_fn([self.transform(sample, target, seed) for sample, target, seed in batch])
                state = {**state, "window": state["window"] + 1, "stream": stream.state_dict(), "done": 0}
            state = {"epoch": state["epoch"] + 1, "window": 0, "stream": None, "done": 0}

    def state_dict(self):
        return copy.deepcopy(self.state)

    def load_state_dict(self, state):
        self.state = copy.deepcopy(state)


def make_planned_dataloader(dataset, args, rank, world_size, multiple):
    """A StatefulDataLoader over planned batches, for a map-style dataset or a stream.

    Every process builds its own (it is not passed to accelerate.prepare); its state is saved in
    each checkpoint. Returns (dataloader, batches per epoch on this process, or None for a stream).
    """
    from datasets import IterableDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    buckets = aspect_ratio_buckets(args.resolution, multiple) if args.aspect_ratio_buckets else None
    transform = PairTransform(args)
    if isinstance(dataset, IterableDataset):  # it yields whole batches
        batches = StreamingBatches(dataset, transform, args, rank, world_size, buckets)
        return StatefulDataLoader(batches, batch_size=None, **loader_options(args)), None
    if buckets:
        targets = [nearest_bucket(*size, buckets) for size in dataset[SIZE_COLUMN]]
    else:
        targets = [(args.resolution, args.resolution)] * len(dataset)
    sampler = PlannedBatchSampler(targets, args.train_batch_size, args.seed or 0, rank, world_size)
    batches_per_epoch = sampler.batches_per_epoch()
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples make no batch for each of the {world_size} processes.")
    pairs = PlannedPairs(undecoded_images(dataset, args), transform)
    dataloader = StatefulDataLoader(pairs, batch_sampler=sampler, collate_fn=collate_fn, **loader_options(args))
    return dataloader, batches_per_epoch


# ------------------------------------------------------------------------------------------
# Latent cache (--cache_latents)
# ------------------------------------------------------------------------------------------

LATENT_KEY_COLUMN = "latent_cache_key"
LATENT_CACHE_VERSION = "1"  # bump when the target transform changes


def default_latent_cache_dir(args):
    if args.latent_cache_dir is not None:
        return args.latent_cache_dir
    base = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "t2i-adapter-sdxl")
    return os.path.join(base, "latents")


def vae_fingerprint(vae):
    """A digest of the VAE's config and weights: cached latents are only valid for this VAE."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def stored_image_bytes(value):
    if value.get("bytes") is not None:
        return value["bytes"]
    with open(value["path"], "rb") as f:
        return f.read()


def latent_cache_keys(dataset, image_column, vae_id, resolution):
    """One key per row: the image's stored bytes, the VAE and the resolution."""
    from datasets import Image as ImageFeature

    stored = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    keys = []
    for sample in stored:
        digest = hashlib.sha256(stored_image_bytes(sample[image_column]))
        digest.update(f"|{vae_id}|{resolution}|{LATENT_CACHE_VERSION}".encode())
        keys.append(digest.hexdigest())
    return keys


def latent_cache_path(cache_dir, key):
    return os.path.join(cache_dir, key[:2], f"{key}.safetensors")


def load_cached_latents(cache_dir, key):
    from safetensors.torch import load_file

    return load_file(latent_cache_path(cache_dir, key))


@torch.no_grad()
def fill_latent_cache(dataset, keys, vae, args, accelerator, cache_dir):
    """Encode every image whose latent distribution is not cached yet (each process its share),
    stored as float16 mean and std. Returns how many this process encoded."""
    from safetensors.torch import save_file

    missing = [
        row
        for row, key in enumerate(keys)
        if row % accelerator.num_processes == accelerator.process_index
        and not os.path.exists(latent_cache_path(cache_dir, key))
    ]
    images = dataset.select_columns([args.image_column])
    to_target = image_transform(args.resolution)
    progress = tqdm(total=len(missing), desc="Caching latents", disable=not accelerator.is_local_main_process)
    for start in range(0, len(missing), 8):
        rows = missing[start : start + 8]
        pixels = torch.stack([to_target(images[row][args.image_column].convert("RGB")) for row in rows])
        distribution = vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist
        for row, mean, std in zip(rows, distribution.mean, distribution.std):
            path = latent_cache_path(cache_dir, keys[row])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp_path = f"{path}.{os.getpid()}.tmp"
            save_file({"mean": mean.half().cpu().contiguous(), "std": std.half().cpu().contiguous()}, tmp_path)
            os.replace(tmp_path, path)  # readers never see a partial file
        progress.update(len(rows))
    progress.close()
    accelerator.wait_for_everyone()
    return len(missing)


def sample_cached_latents(mean, std, scaling_factor):
    """What `vae.encode(x).latent_dist.sample() * scaling_factor` gives, from the cached distribution."""
    mean, std = mean.float().contiguous(), std.float()
    return (mean + std * torch.randn_like(mean)) * scaling_factor


# ------------------------------------------------------------------------------------------
# Text embeddings (SDXL: two CLIP encoders, penultimate hidden states, pooled embedding)
# ------------------------------------------------------------------------------------------


def select_captions(raw_captions, proportion_empty_prompts, is_train=True):
    """One caption per sample: a random one of a list in training (the first otherwise), and the
    empty prompt with probability `proportion_empty_prompts`. Drawn at every step from Python's
    RNG, which checkpoints save and restore."""
    captions = []
    for caption in raw_captions:
        if random.random() < proportion_empty_prompts:
            captions.append("")
        elif isinstance(caption, str):
            captions.append(caption)
        elif isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0:
            captions.append(random.choice(caption) if is_train else caption[0])
        else:
            raise ValueError(f"A caption must be a string or a non-empty list of strings, got {caption!r}.")
    return captions


@torch.no_grad()
def encode_prompt(captions, text_encoders, tokenizers):
    """Prompt embeddings (penultimate hidden states of both encoders, concatenated) and the
    pooled embedding of the second (projected) encoder."""
    hidden_states = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        input_ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
        pooled = output[0]
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), pooled.reshape(len(captions), -1)


def compute_time_ids(original_size, crops_coords_top_left, target_size, batch_size, device=None, dtype=None):
    """SDXL's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    time_ids = torch.tensor([list(original_size) + list(crops_coords_top_left) + list(target_size)], dtype=dtype)
    return time_ids.repeat(batch_size, 1).to(device)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def weight_dtype_for(mixed_precision):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def vae_scale_factor(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def derive_adapter_config(unet_config, vae_config):
    """A full_adapter_xl sized for this UNet: one feature map per down block plus one for the mid
    block, at the UNet's channels; pixels are unshuffled by twice the VAE's downscale (for SDXL:
    channels (320, 640, 1280, 1280), downscale 16, as upstream hard-codes)."""
    block_out_channels = list(unet_config["block_out_channels"])
    return {
        "in_channels": 3,
        "channels": block_out_channels + [block_out_channels[-1]],
        "num_res_blocks": 2,
        "downscale_factor": 2 * vae_scale_factor(vae_config),
        "adapter_type": "full_adapter_xl",
    }


def adapter_feature_shapes(adapter_config, resolution):
    """(channels, height) of each feature map the adapter makes from a resolution² image."""
    channels = list(adapter_config["channels"])
    side = resolution // adapter_config["downscale_factor"]
    if adapter_config["adapter_type"] == "full_adapter_xl":
        # Only the third block halves the resolution.
        return [(c, side if i < 2 else side // 2) for i, c in enumerate(channels)]
    return [(c, side // 2**i) for i, c in enumerate(channels)]  # full_adapter, light_adapter


def unet_residual_shapes(unet_config, latent_side):
    """(channels, height) of each place where the UNet adds an adapter feature map, in order.

    A cross-attention down block adds it before its downsampler; a plain down block after it;
    the mid block takes one more at the lowest resolution.
    """
    shapes = []
    block_types = unet_config["down_block_types"]
    side = latent_side
    for i, (block_type, channels) in enumerate(zip(block_types, unet_config["block_out_channels"])):
        has_downsampler = i < len(block_types) - 1
        if "CrossAttn" in block_type or not has_downsampler:
            shapes.append((channels, side))
        else:
            shapes.append((channels, side // 2))
        if has_downsampler:
            side //= 2
    shapes.append((unet_config["block_out_channels"][-1], side))  # mid block
    return shapes


def adapter_total_downscale(adapter_config):
    """How many pixels of the condition make one pixel of the adapter's smallest feature map's
    predecessor: image sides must be multiples of it."""
    downscale = adapter_config["downscale_factor"]
    return 2 * downscale if adapter_config["adapter_type"] == "full_adapter_xl" else downscale


def check_adapter_fits(adapter_config, unet_config, vae_config, resolution):
    """The adapter's feature maps must match, one by one, where the UNet adds them."""
    downscale = adapter_total_downscale(adapter_config)
    if resolution % downscale != 0:
        raise ValueError(
            f"`--resolution` {resolution} must be divisible by the adapter's total downscale factor {downscale}."
        )
    adapter_shapes = adapter_feature_shapes(adapter_config, resolution)
    unet_shapes = unet_residual_shapes(unet_config, resolution // vae_scale_factor(vae_config))
    # The mid-block map is optional: an adapter may stop after the down blocks.
    if adapter_shapes not in (unet_shapes, unet_shapes[:-1]):
        raise ValueError(
            "The adapter does not fit the UNet: at --resolution "
            f"{resolution} the adapter makes feature maps (channels, size) {adapter_shapes} but the UNet takes"
            f" {unet_shapes} (adapter channels {list(adapter_config['channels'])}, downscale"
            f" {adapter_config['downscale_factor']}, type {adapter_config['adapter_type']}; UNet block_out_channels"
            f" {list(unet_config['block_out_channels'])})."
        )


def text_encoder_class(location, subfolder, args):
    """The transformers class named in a text encoder's config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(
        location, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir
    )
    name = config.architectures[0]
    if name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise ValueError(f"Text encoder class {name} in {location}/{subfolder} is not supported.")
    return getattr(transformers, name)


def load_tokenizers(args):
    """The two CLIP tokenizers: from --tokenizer_name when given, else from the base model."""
    from transformers import AutoTokenizer

    def load(location, subfolder):
        return AutoTokenizer.from_pretrained(
            location, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir, use_fast=False
        )

    if args.tokenizer_name is None:
        return [load(args.pretrained_model_name_or_path, "tokenizer"), load(args.pretrained_model_name_or_path, "tokenizer_2")]
    if os.path.isdir(os.path.join(args.tokenizer_name, "tokenizer")):
        return [load(args.tokenizer_name, "tokenizer"), load(args.tokenizer_name, "tokenizer_2")]
    tokenizer = load(args.tokenizer_name, "")
    return [tokenizer, tokenizer]


def load_models(args, adapter_config):
    """Scheduler, tokenizers, text encoders, VAE, UNet and the adapter, all frozen but the adapter."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, T2IAdapter, UNet2DConditionModel

    base = args.pretrained_model_name_or_path
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    noise_scheduler = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **hub)
    tokenizers = load_tokenizers(args)
    text_encoders = [
        text_encoder_class(base, subfolder, args).from_pretrained(base, subfolder=subfolder, variant=args.variant, **hub)
        for subfolder in ("text_encoder", "text_encoder_2")
    ]
    if args.pretrained_vae_model_name_or_path is None:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", variant=args.variant, **hub)
    else:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **hub)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=args.variant, **hub)

    if args.adapter_model_name_or_path:
        logger.info(f"Loading adapter weights from {args.adapter_model_name_or_path}.")
        adapter = T2IAdapter.from_pretrained(args.adapter_model_name_or_path, cache_dir=args.cache_dir)
    else:
        logger.info(f"Initialising a new adapter: {adapter_config}.")
        adapter = T2IAdapter(**adapter_config)
    if adapter.dtype != torch.float32:
        raise ValueError(f"The adapter was loaded as {adapter.dtype}; the trained adapter must be float32.")

    # Only the adapter trains. Upstream leaves the UNet trainable, which costs a full backward
    # through its weights and ~10 GB of unused gradients at SDXL size.
    for model in (*text_encoders, vae, unet):
        model.requires_grad_(False)
    adapter.train()
    return noise_scheduler, tokenizers, text_encoders, vae, unet, adapter


# ------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------


def sample_timesteps(batch_size, num_train_timesteps, device=None, generator=None):
    """Cubic sampling (T2I-Adapter paper §3.4): t = (1 - u³)·T favours early, noisy timesteps."""
    u = torch.rand((batch_size,), device=device, generator=generator)
    timesteps = ((1 - u**3) * num_train_timesteps).long()
    return timesteps.clamp(0, num_train_timesteps - 1)


def sigma_table(noise_scheduler):
    """σ for every training timestep, indexable by the timestep itself.

    Built once from the scheduler's own (timestep, σ) pairs, so a batch's σ is one gather
    instead of upstream's per-sample search with a host sync each.
    """
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    schedule_timesteps = noise_scheduler.timesteps.round().long()
    sigmas = noise_scheduler.sigmas[: len(schedule_timesteps)].float()
    table = torch.full((num_train_timesteps,), float("nan"))
    table[schedule_timesteps] = sigmas
    if torch.isnan(table).any():
        raise ValueError("The noise scheduler does not cover every training timestep.")
    return table


def predict_clean_latents(model_pred, noisy_latents, sigmas, prediction_type):
    """x₀ estimated from the UNet's output, for the Euler (σ) parameterisation."""
    if prediction_type == "epsilon":
        return noisy_latents - sigmas * model_pred
    if prediction_type == "v_prediction":
        # Upstream uses the epsilon formula here and a velocity target: wrong (defect 16).
        return noisy_latents / (sigmas**2 + 1) - sigmas / (sigmas**2 + 1) ** 0.5 * model_pred
    if prediction_type == "sample":
        return model_pred
    raise ValueError(f"Unknown prediction type {prediction_type!r}.")


def weighted_denoising_loss(denoised, target, sigmas):
    """mean over the batch of the per-sample mean of σ⁻²·(x̂₀ − x₀)², in float32."""
    weighting = sigmas.float() ** -2.0
    per_sample = (weighting * (denoised.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    return per_sample.mean()


def adapter_training_loss(
    unet, adapter, latents, conditioning_pixel_values, prompt_embeds, added_cond_kwargs, sigmas_by_timestep,
    prediction_type, weight_dtype, noise=None, timesteps=None,
):
    """One training step's loss on clean latents (float32).

    Noise is added in float32 (upstream noises in the mixed-precision dtype); the UNet sees
    noisy / sqrt(σ² + 1) and the adapter's features as intra-block residuals.
    """
    # Contiguous: the VAE may return channels-last latents, and randn_like follows the layout, so
    # the noise drawn would depend on how the latents were made (fresh or cached).
    latents = latents.float().contiguous()
    if noise is None:
        noise = torch.randn_like(latents)
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], len(sigmas_by_timestep), device=latents.device)
    sigmas = sigmas_by_timestep.to(latents.device)[timesteps].reshape(-1, 1, 1, 1)
    noisy_latents = latents + sigmas * noise  # EulerDiscreteScheduler.add_noise
    unet_input = (noisy_latents / (sigmas**2 + 1) ** 0.5).to(weight_dtype)

    # A fresh list each call: the UNet pops the residuals it consumes.
    residuals = [feature.to(weight_dtype) for feature in adapter(conditioning_pixel_values)]
    model_pred = unet(
        unet_input,
        timesteps,
        encoder_hidden_states=prompt_embeds.to(weight_dtype),
        added_cond_kwargs={key: value.to(weight_dtype) for key, value in added_cond_kwargs.items()},
        down_intrablock_additional_residuals=residuals,
        return_dict=False,
    )[0]
    denoised = predict_clean_latents(model_pred.float(), noisy_latents, sigmas, prediction_type)
    return weighted_denoising_loss(denoised, latents, sigmas)


@torch.no_grad()
def encode_latents(vae, pixel_values, chunk_size=8):
    """Sample VAE latents (scaled), at most `chunk_size` images at a time to bound memory."""
    pixel_values = pixel_values.to(vae.device, dtype=vae.dtype)
    latents = [vae.encode(chunk).latent_dist.sample() for chunk in pixel_values.split(chunk_size)]
    return torch.cat(latents) * vae.config.scaling_factor


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first. Checkpoints still being written carry
    a '.tmp' suffix and are never listed."""
    if not os.path.isdir(output_dir):
        return []
    matches = (CHECKPOINT_PATTERN.match(name) for name in os.listdir(output_dir))
    steps = sorted(int(m.group(1)) for m in matches if m and os.path.isdir(os.path.join(output_dir, m.group(0))))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def checkpoint_step(path):
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"{path!r} is not a checkpoint folder (checkpoint-<step>).")
    return int(match.group(1))


def prune_checkpoints(output_dir, total_limit):
    """Delete the oldest complete checkpoints so that at most `total_limit` remain."""
    checkpoints = list_checkpoints(output_dir)
    if total_limit is None or len(checkpoints) <= total_limit:
        return []
    removed = checkpoints[: len(checkpoints) - total_limit]
    logger.info(f"Removing checkpoints beyond the limit of {total_limit}: {', '.join(map(os.path.basename, removed))}")
    for path in removed:
        shutil.rmtree(path)
    return removed


def data_state_path(checkpoint, process_index):
    return os.path.join(checkpoint, f"data_state_{process_index}.pt")


def save_checkpoint(accelerator, output_dir, step, total_limit, data_state=None):
    """Save the full training state as output_dir/checkpoint-<step>.

    Every process takes part (DeepSpeed needs each rank's shard), and each saves its planned
    batches' position (`data_state`) when there is one. The state is written under a temporary
    name and renamed once complete, and only then are old checkpoints pruned: a crash while saving
    leaves the previous checkpoints intact and never a half-written one as 'latest'.
    """
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    tmp_path = final_path + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp_path):
        shutil.rmtree(tmp_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp_path)
    if data_state is not None:
        torch.save(data_state, data_state_path(tmp_path, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final_path):  # the same step saved again after a resume
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
        prune_checkpoints(output_dir, total_limit)
        logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()
    return final_path


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, or None (with a message) when there is none."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if os.path.isdir(resume_from_checkpoint):
        path = resume_from_checkpoint
    else:
        path = os.path.join(output_dir, os.path.basename(os.path.normpath(resume_from_checkpoint)))
    if not os.path.isdir(path):
        return None
    checkpoint_step(path)
    return path


def save_adapter_hook(models, weights, output_dir, accelerator):
    """accelerate save hook: keep the adapter in diffusers format inside the checkpoint."""
    for model in models:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, ADAPTER_SUBFOLDER))
        if weights:
            weights.pop()  # saved above; accelerate need not write it again


def load_adapter_hook(models, input_dir):
    """accelerate load hook: read the adapter back from its diffusers-format folder."""
    from diffusers import T2IAdapter

    while models:
        model = models.pop()
        saved = T2IAdapter.from_pretrained(os.path.join(input_dir, ADAPTER_SUBFOLDER))
        model.load_state_dict(saved.state_dict())


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def pair_validation_inputs(prompts, images, prompt_flag="--validation_prompt", image_flag="--validation_image"):
    """(prompt, image) pairs: equal counts pair up; a single prompt or image is shared."""
    if not prompts or not images:
        raise ValueError(f"Pass at least one `{prompt_flag}` and one `{image_flag}`.")
    if len(prompts) == len(images):
        return list(zip(prompts, images))
    if len(images) == 1:
        return [(prompt, images[0]) for prompt in prompts]
    if len(prompts) == 1:
        return [(prompts[0], image) for image in images]
    raise ValueError(
        f"Got {len(prompts)} `{prompt_flag}`s and {len(images)} `{image_flag}`s: provide as many of each,"
        " or exactly one of either."
    )


def image_grid(images, rows, cols):
    width, height = images[0].size
    grid = Image.new("RGB", size=(cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, box=(i % cols * width, i // cols * height))
    return grid


def log_validation_images(image_logs, trackers, step):
    """Send each (condition, samples) set to every tracker."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            for log in image_logs:
                stack = np.stack([np.asarray(image) for image in [log["validation_image"], *log["images"]]])
                tracker.writer.add_images(log["validation_prompt"], stack, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            formatted = []
            for log in image_logs:
                formatted.append(wandb.Image(log["validation_image"], caption="adapter conditioning"))
                formatted += [wandb.Image(image, caption=log["validation_prompt"]) for image in log["images"]]
            tracker.log({"validation": formatted}, step=step)
        else:
            logger.warning(f"Image logging is not implemented for {tracker.name}.")


def validation_dtype(device, weight_dtype):
    """The dtype validation runs in. CUDA autocast covers the mixed dtypes of a reduced-precision
    pipeline; CPU and MPS autocast do not cover group norm, so there validation runs in float32."""
    return weight_dtype if device.type == "cuda" else torch.float32


def validation_size(width, height, resolution, multiple):
    """(width, height) for a validation image: about resolution² pixels, the image's own aspect
    ratio (upstream stretches it to a square), both sides multiples of the adapter's downscale."""
    scale = resolution / math.sqrt(width * height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def cast_to(model, dtype):
    """Cast a model only when its dtype differs (a no-op cast still makes diffusers warn)."""
    return model if model.dtype == dtype else model.to(dtype)


def run_validation(components, adapter, args, accelerator, weight_dtype, step):
    """Generate `num_validation_images` per (prompt, image) pair with the adapter as it is now,
    log them to every tracker and return them (for the model card).

    The pipeline is built from the components already in memory (upstream re-reads the base
    model from disk each time), autocast follows the actual device (upstream assumes CUDA), and
    the global RNGs are left untouched so that validation never changes training.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLAdapterPipeline

    logger.info(f"Running validation at step {step}.")
    device = accelerator.device
    dtype = validation_dtype(device, weight_dtype)
    frozen = [components["unet"], *components["text_encoders"]]
    for model in frozen:
        cast_to(model, dtype)
    vae_device = components["vae"].device  # off the GPU between validations with --cache_latents
    components["vae"].to(device)
    pipeline = StableDiffusionXLAdapterPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoders"][0],
        text_encoder_2=components["text_encoders"][1],
        tokenizer=components["tokenizers"][0],
        tokenizer_2=components["tokenizers"][1],
        unet=components["unet"],
        # A copy in the UNet's dtype: float32 features would promote the UNet's activations.
        adapter=cast_to(copy.deepcopy(accelerator.unwrap_model(adapter)), dtype),
        scheduler=EulerDiscreteScheduler.from_config(components["noise_scheduler"].config),
    )
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        pipeline.enable_xformers_memory_efficient_attention()
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    multiple = pipeline.adapter.total_downscale_factor
    image_logs = []
    python_rng_state = random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
        for prompt, image_path in pair_validation_inputs(args.validation_prompt, args.validation_image):
            condition = Image.open(image_path).convert("RGB")
            width, height = validation_size(condition.width, condition.height, args.resolution, multiple)
            condition = condition.resize((width, height), Image.BILINEAR)
            images = [
                pipeline(
                    prompt=prompt,
                    image=condition,
                    height=height,
                    width=width,
                    num_inference_steps=20,
                    generator=generator,
                ).images[0]
                for _ in range(args.num_validation_images)
            ]
            image_logs.append({"validation_image": condition, "images": images, "validation_prompt": prompt})
    random.setstate(python_rng_state)
    for model in frozen:
        cast_to(model, weight_dtype)
    components["vae"].to(vae_device)
    log_validation_images(image_logs, accelerator.trackers, step)
    return image_logs


# ------------------------------------------------------------------------------------------
# Model card and Hub
# ------------------------------------------------------------------------------------------


def save_model_card(repo_id, image_logs, base_model, repo_folder):
    """README.md with the Hub metadata and, per validation prompt, a grid: condition then samples."""
    image_text = ""
    if image_logs:
        image_text = "You can find some example images below.\n\n"
        for i, log in enumerate(image_logs):
            log["validation_image"].save(os.path.join(repo_folder, f"image_control_{i}.png"))
            images = [log["validation_image"], *log["images"]]
            image_grid(images, 1, len(images)).save(os.path.join(repo_folder, f"images_{i}.png"))
            image_text += f"prompt: {log['validation_prompt']}\n\n![images_{i}](./images_{i}.png)\n\n"
    tags = "\n".join(f"- {tag}" for tag in MODEL_CARD_TAGS)
    card = f"""---
license: creativeml-openrail-m
base_model: {base_model}
tags:
{tags}
inference: true
---

# t2iadapter-{repo_id}

These are T2I-Adapter weights trained on {base_model} with a new type of conditioning.

{image_text}"""
    with open(os.path.join(repo_folder, "README.md"), "w") as f:
        f.write(card)


def hub_upload_arguments(repo_id, output_dir, hub_token):
    """What is sent to `huggingface_hub.upload_folder` at the end of training."""
    return {
        "repo_id": repo_id,
        "folder_path": output_dir,
        "commit_message": "End of training",
        "ignore_patterns": ["step_*", "epoch_*"],
        "token": hub_token,
    }


def tracker_config(args):
    """The run's settings for the trackers: never the Hub token (upstream logs it), and lists as
    strings (tensorboard's hparams take scalars and strings only)."""
    config = {key: value for key, value in vars(args).items() if key != "hub_token"}
    return {key: " | ".join(value) if isinstance(value, list) else value for key, value in config.items()}


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def build_optimizer(params, args, device):
    """AdamW (bitsandbytes' 8-bit variant with --use_8bit_adam); PyTorch's fused kernel on CUDA."""
    extra = {}
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
        extra = {"fused": True} if device.type == "cuda" else {}
    return optimizer_class(
        params,
        **extra,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def build_lr_scheduler(optimizer, args, max_train_steps, num_processes):
    """The LR schedule, counted in scheduler calls. accelerate's prepared scheduler is called once
    per process for each optimisation step, so warm-up and length are scaled by the number of
    processes (upstream does not, and its schedule runs N times too fast on N processes)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def batch_loss(batch, components, adapter, sigmas_by_timestep, args, weight_dtype, device):
    """Latents, text embeddings and micro-conditioning for one batch, then the adapter's loss."""
    vae = components["vae"]
    if "latent_mean" in batch:
        latents = sample_cached_latents(batch["latent_mean"], batch["latent_std"], vae.config.scaling_factor)
    else:
        latents = encode_latents(vae, batch["pixel_values"])
    captions = select_captions(batch["captions"], args.proportion_empty_prompts)
    prompt_embeds, pooled_embeds = encode_prompt(captions, components["text_encoders"], components["tokenizers"])
    resolution = (args.resolution, args.resolution)
    if args.micro_conditioning:
        # The batch's own size: a bucket's, or the square resolution.
        target_sizes = torch.tensor([batch["conditioning_pixel_values"].shape[-2:]], device=device)
        real_sizes = [batch["original_sizes"].to(device), batch["crop_top_lefts"].to(device)]
        time_ids = torch.cat([*real_sizes, target_sizes.expand(len(captions), 2)], dim=1).float()
    else:
        crop = (args.crops_coords_top_left_h, args.crops_coords_top_left_w)
        time_ids = compute_time_ids(resolution, crop, resolution, len(captions), device=device)
    return adapter_training_loss(
        components["unet"],
        adapter,
        latents,
        batch["conditioning_pixel_values"].to(device),
        prompt_embeds,
        {"text_embeds": pooled_embeds, "time_ids": time_ids},
        sigmas_by_timestep,
        components["noise_scheduler"].config.prediction_type,
        weight_dtype,
    )


def epoch_batches(train_dataloader, accelerator, global_step, num_update_steps_per_epoch, args):
    """Upstream's loader, epoch after epoch from the one `global_step` is in. A resumed epoch
    replays its shuffle order (which depends only on seed and epoch) and skips the batches
    already trained on."""
    first_epoch = global_step // num_update_steps_per_epoch
    batches_to_skip = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
    for epoch in itertools.count(first_epoch):
        train_dataloader.set_epoch(epoch)
        if epoch == first_epoch and batches_to_skip:
            yield from accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        else:
            yield from train_dataloader


def load_data_state(checkpoint, process_index):
    """This process's position in the planned batches, saved with the checkpoint."""
    path = data_state_path(checkpoint, process_index)
    if not os.path.exists(path):
        raise ValueError(
            f"{checkpoint} holds no data position for process {process_index}: it was saved by a run with"
            " upstream's loader or with fewer processes. Resume with the data options and process count it was"
            " saved with."
        )
    return torch.load(path, weights_only=False)


def check_step_loss(step_loss, step, skipped_steps, args):
    """True when the step may update the adapter. A NaN/inf loss stops the run, naming the step,
    unless --skip_nonfinite_steps allows skipping it (the update is dropped, the step counted)."""
    if math.isfinite(step_loss):
        return True
    if skipped_steps < args.skip_nonfinite_steps:
        logger.warning(
            f"Non-finite loss ({step_loss}) at step {step}: update skipped"
            f" ({skipped_steps + 1} of at most {args.skip_nonfinite_steps})."
        )
        return False
    checkpoints = list_checkpoints(args.output_dir)
    last_good = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved yet"
    raise FloatingPointError(
        f"Non-finite loss ({step_loss}) at step {step}; stopping before the update ({last_good})."
        " Lower --learning_rate, try --mixed_precision bf16 instead of fp16, or allow a few skipped steps"
        " with --skip_nonfinite_steps."
    )


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a request to stop at the end of the current optimisation step,
    after a checkpoint, instead of dying in the middle of one (preemptible GPUs, Ctrl-C)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def handle(self, signum, frame):
        self.received = signum
        logger.warning(f"Received {signal.Signals(signum).name}: stopping after the current step.")

    def requested(self, accelerator):
        """Whether any process received a signal (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0

    def stop(self, accelerator, step, output_dir):
        self.restore()
        name = signal.Signals(self.received).name if self.received else "a signal on another process"
        message = (
            f"Stopped by {name} at step {step}; saved {os.path.join(output_dir, f'checkpoint-{step}')}."
            " Resume with --resume_from_checkpoint latest."
        )
        logger.warning(message)
        accelerator.end_training()
        raise SystemExit(128 + (self.received or signal.SIGTERM))

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def main(args):
    adapter_config = check_inputs(args)

    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # The shuffle order of each epoch depends only on (seed, epoch), so resume can replay it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    if args.seed is not None:
        # Each process draws its own noise; DDP keeps the adapter weights in step.
        set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Data first: a missing column fails before any model is loaded.
    with accelerator.main_process_first():
        train_dataset = load_streaming_dataset(args) if args.streaming else load_train_dataset(args)

    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_repo(
            repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token, private=True
        ).repo_id

    noise_scheduler, tokenizers, text_encoders, vae, unet, adapter = load_models(args, adapter_config)
    accelerator.register_save_state_pre_hook(partial(save_adapter_hook, accelerator=accelerator))
    accelerator.register_load_state_pre_hook(load_adapter_hook)

    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.torch_compile:
        # In place, so state-dict keys and the save/load hooks are unchanged.
        unet.compile()
        adapter.compile()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes

    optimizer = build_optimizer(adapter.parameters(), args, accelerator.device)

    # Frozen models run in the mixed-precision dtype; SDXL's own VAE stays float32 because it
    # overflows in fp16 (a replacement VAE, e.g. the fp16-fix one, follows the weight dtype).
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path is not None else torch.float32
    vae.to(accelerator.device, dtype=vae_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    for text_encoder in text_encoders:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    sigmas_by_timestep = sigma_table(noise_scheduler).to(accelerator.device)

    latent_cache_dir = None
    if args.cache_latents:
        latent_cache_dir = default_latent_cache_dir(args)
        keys = latent_cache_keys(train_dataset, args.image_column, vae_fingerprint(vae), args.resolution)
        encoded = fill_latent_cache(train_dataset, keys, vae, args, accelerator, latent_cache_dir)
        logger.info(f"Latent cache {latent_cache_dir}: {len(keys)} images, {encoded} newly encoded on this process.")
        train_dataset = train_dataset.add_column(LATENT_KEY_COLUMN, keys)
        if accelerator.device.type != "cpu":
            vae.to("cpu")  # only validation decodes now: free its GPU memory in between
    # Planned batches are built per process and not prepared: accelerate neither shards nor
    # skips them; their own state does (see make_planned_dataloader).
    planned = uses_planned_batches(args)
    if planned:
        train_dataloader, batches_per_epoch = make_planned_dataloader(
            train_dataset, args, accelerator.process_index, accelerator.num_processes,
            adapter_total_downscale(adapter_config),
        )
    else:
        train_dataloader = make_train_dataloader(train_dataset, args, latent_cache_dir)
        batches_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes)
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    lr_scheduler = build_lr_scheduler(optimizer, args, max_train_steps, accelerator.num_processes)

    if planned:
        if accelerator.state.deepspeed_plugin is not None:
            # DeepSpeed takes its per-GPU batch from a prepared dataloader, and this one is not prepared.
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        adapter, optimizer, lr_scheduler = accelerator.prepare(adapter, optimizer, lr_scheduler)
    else:
        adapter, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            adapter, optimizer, train_dataloader, lr_scheduler
        )
        batches_per_epoch = len(train_dataloader)
    num_update_steps_per_epoch = None  # a stream's is unknown
    if batches_per_epoch is not None:
        num_update_steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    if args.streaming:
        logger.info(f"  Streamed in windows of {args.shuffle_buffer_size} samples")
    else:
        logger.info(f"  Num examples = {len(train_dataset)}")
        logger.info(f"  Num batches each epoch = {batches_per_epoch}")
        logger.info(f"  Num epochs = {math.ceil(max_train_steps / num_update_steps_per_epoch)}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (parallel, distributed, accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimisation steps = {max_train_steps}")

    global_step = 0
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        accelerator.print(f"Checkpoint {args.resume_from_checkpoint!r} does not exist. Starting a new training run.")
    if resume_path is not None:
        accelerator.print(f"Resuming from checkpoint {resume_path}")
        accelerator.load_state(resume_path)
        global_step = checkpoint_step(resume_path)
        if planned:
            train_dataloader.load_state_dict(load_data_state(resume_path, accelerator.process_index))
    if planned:
        batches = train_dataloader
    else:
        batches = epoch_batches(train_dataloader, accelerator, global_step, num_update_steps_per_epoch, args)

    components = {
        "vae": vae,
        "unet": unet,
        "text_encoders": text_encoders,
        "tokenizers": tokenizers,
        "noise_scheduler": noise_scheduler,
    }
    progress_bar = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    image_logs = None
    validated_step = None
    skipped_steps = 0
    loss_sum, micro_steps = torch.zeros((), device=accelerator.device), 0
    preemption = PreemptionHandler()
    for batch in batches:
        with accelerator.accumulate(adapter):
            loss = batch_loss(batch, components, adapter, sigmas_by_timestep, args, weight_dtype, accelerator.device)
            accelerator.backward(loss)
            loss_sum, micro_steps = loss_sum + loss.detach(), micro_steps + 1
            update = True
            if accelerator.sync_gradients:
                # The step's loss (mean over micro-batches and processes), checked before the update.
                step_loss = accelerator.reduce(loss_sum / micro_steps, reduction="mean").item()
                loss_sum, micro_steps = torch.zeros_like(loss_sum), 0
                update = check_step_loss(step_loss, global_step + 1, skipped_steps, args)
                skipped_steps += not update
                if update:
                    accelerator.clip_grad_norm_(adapter.parameters(), args.max_grad_norm)
            if update:
                optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        progress_bar.update(1)
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
        progress_bar.set_postfix(**logs)
        accelerator.log(logs, step=global_step)

        data_state = train_dataloader.state_dict() if planned else None
        saved = global_step % args.checkpointing_steps == 0
        if saved:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, data_state)
        if args.validation_prompt is not None and global_step % args.validation_steps == 0:
            if accelerator.is_main_process:
                image_logs = run_validation(components, adapter, args, accelerator, weight_dtype, global_step)
            validated_step = global_step
        if preemption.requested(accelerator):
            if not saved:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, data_state)
            preemption.stop(accelerator, global_step, args.output_dir)
        if global_step >= max_train_steps:
            break
    preemption.restore()
    if skipped_steps:
        logger.warning(f"Skipped {skipped_steps} optimisation step(s) with a non-finite loss.")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.validation_prompt is not None and validated_step != global_step:
            image_logs = run_validation(components, adapter, args, accelerator, weight_dtype, global_step)
        accelerator.unwrap_model(adapter).save_pretrained(args.output_dir)
        save_model_card(repo_id or Path(args.output_dir).name, image_logs, args.pretrained_model_name_or_path, args.output_dir)
        logger.info(f"Saved the adapter to {args.output_dir}")
        if args.push_to_hub:
            upload_folder(**hub_upload_arguments(repo_id, args.output_dir, args.hub_token))
    accelerator.end_training()
    return global_step


if __name__ == "__main__":
    main(parse_args())
