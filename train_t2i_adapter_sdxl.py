#!/usr/bin/env python
"""Train a T2I-Adapter on a frozen Stable Diffusion XL.

A faithful port of diffusers' `examples/t2i_adapter/train_t2i_adapter_sdxl.py`: the same flags,
defaults and maths, with the upstream defects fixed (see README.md, "Differences from upstream").
Run it with `accelerate launch train_t2i_adapter_sdxl.py --help`.

The file reads top to bottom in the order of a run: arguments, input checks, data (loading and
checks, the transform, the latent cache, the loader), text embeddings, models, loss, checkpoints,
validation, Hub, and finally training, whose `main` ties them together. No name is used above its
definition. Every step is a module-level function so that tests can import it.
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
import socket
import threading
import uuid
import zipfile
import typing
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from huggingface_hub import create_repo, upload_folder
from PIL import Image, ImageOps
from torchvision import transforms
from tqdm.auto import tqdm

logger = get_logger(__name__)

SDXL_DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
EXIF_ORIENTATION = 0x0112  # the EXIF tag datasets applies when it decodes an image
SAMPLE_CHECK_RULES = 2  # part of each sample-check record's key: raise it when inspect_sample's rules change
ADAPTER_SUBFOLDER = "t2iadapter"  # where a checkpoint keeps the adapter in diffusers format
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CONDITION_MADE_ON_THE_FLY = "made on the fly"  # a sample's condition with --conditioning_type canny
LOCK_FILE = ".t2i-adapter-training.lock"  # in --output_dir while a run holds it: who holds it
FINISHED_FILE = "training_finished.json"  # in --output_dir once the final adapter is saved: its step
DATA_STATE_FILE = "data_state_{}.json"  # each process's loader position and the run's seed, in a checkpoint
# What a resume on process {} reads from a checkpoint, in every mode (accelerate's names and ours), and
# what it reads when it is there (DeepSpeed keeps the optimizer in its own files).
CHECKPOINT_FILES = (
    "random_states_{}.pkl", DATA_STATE_FILE,
    os.path.join(ADAPTER_SUBFOLDER, "config.json"), os.path.join(ADAPTER_SUBFOLDER, "diffusion_pytorch_model.safetensors"),
)
CHECKPOINT_FILES_IF_THERE = ("optimizer.bin", "scheduler.bin")
CONDITION_STRETCH_TOLERANCE = 0.01  # a condition stored at another size may be this much out of proportion
CANNY_LOW_RANGE = (50, 150)  # random canny thresholds: low in this range,
CANNY_GAP_RANGE = (50, 150)  # high = low + a gap in this range
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
SPLIT_FOLDERS = ("train", "test", "validation")  # a local folder's split folders that `datasets` names alike
# A split's name as `datasets` finds it in a file's path; a folder with one elsewhere is left to `datasets`.
SPLIT_WORD = re.compile(r"(^|[-._ /])(train|training|test|testing|eval|evaluation|valid|validation|dev)([-._ /0-9]|$)")
LATENT_CACHE_VERSION = "1"  # part of each cached latent's key: bump when the centre crop's pixels change
CONFIG_KEYS = {  # what the input checks read of each model's config
    "UNet2DConditionModel": ("block_out_channels", "down_block_types"),
    "AutoencoderKL": ("block_out_channels",),
    "T2IAdapter": ("channels", "downscale_factor", "adapter_type"),
}
RESUME_SETTINGS = (  # flags whose change breaks an exact resume (with the learning rate, processes and data)
    "train_batch_size", "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
    "lr_power", "resolution", "detection_resolution", "micro_conditioning", "random_crop", "random_flip",
    "aspect_ratio_buckets", "conditioning_type", "max_train_samples", "proportion_empty_prompts", "streaming",
    "shuffle_buffer_size", "image_column", "conditioning_image_column", "caption_column", "cache_latents",
    "validation_pairs",  # without a validation set, the pairs held out of training
)
DEFAULT_VALIDATION_PAIRS = 16  # conditioning-gain pairs taken from a validation set unless told otherwise
CONTROL_METRICS = ("canny", "ssim", "none")
CONTROL_CANNY_THRESHOLDS = (100, 200)  # canny of generated images for --control_metric canny (OpenCV's usual)
CONTROL_SCORE_SEED = 0  # the conditioning gain's latents, noise and timesteps: the same in every run
CONTROL_METRIC_KEYS = {"canny": "control_f1", "ssim": "control_ssim"}  # tracker names, after "validation/"
MAX_RESOLUTION = 8192  # a --resolution above it is a typo: SDXL trains at 1024
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
    group = parser.add_argument_group("Models")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help=f"Hub id or local folder of the SDXL base model in diffusers format (e.g. {SDXL_DEFAULT_MODEL}).",
    )
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or folder of a different VAE (e.g. madebyollin/sdxl-vae-fp16-fix); it is then run in the"
        " mixed-precision dtype.",
    )
    group.add_argument(
        "--adapter_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or folder of an adapter to start from (one stored in float16 is loaded and trained in float32)."
        " Without it a new adapter is derived from the UNet's and VAE's configs (for SDXL: channels"
        " (320, 640, 1280, 1280), downscale 16, full_adapter_xl).",
    )
    group.add_argument("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the model.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'.")
    group.add_argument(
        "--tokenizer_name",
        type=str,
        default=None,
        help="Hub id or folder of the tokenizers, if not the base model's. A folder with 'tokenizer' and"
        " 'tokenizer_2' subfolders gives both; otherwise the one tokenizer found there serves both encoders.",
    )
    group.add_argument(
        "--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored."
    )
    group = parser.add_argument_group("Output and logging")
    group.add_argument(
        "--output_dir",
        type=str,
        default="t2iadapter-model",
        help="Where the adapter, checkpoints, logs and model card are written.",
    )
    group.add_argument(
        "--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir."
    )
    group.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    group.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help="Tracker(s) for losses and validation images: 'tensorboard', 'wandb', 'all' or 'none'.",
    )
    group.add_argument(
        "--tracker_project_name",
        type=str,
        default="sd_xl_train_t2iadapter",
        help="Project name given to the trackers.",
    )
    group = parser.add_argument_group("Resolution and SDXL micro-conditioning")
    group.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="Training images are resized (shorter side) and centre-cropped to this square size.",
    )
    group.add_argument(
        "--detection_resolution",
        type=int,
        default=None,
        help="Resolution at which conditioning images are prepared before being brought to --resolution"
        " (a detector's working size). Default: --resolution.",
    )
    group.add_argument(
        "--micro_conditioning",
        action="store_true",
        help="Give the UNet each image's real size and the real crop's top-left corner (SDXL's micro-conditioning)"
        " instead of upstream's fixed (resolution, resolution) and --crops_coords_top_left_h/w.",
    )
    group.add_argument(
        "--crops_coords_top_left_h", type=int, default=0, help="Crop top coordinate given to the SDXL UNet."
    )
    group.add_argument(
        "--crops_coords_top_left_w", type=int, default=0, help="Crop left coordinate given to the SDXL UNet."
    )
    group.add_argument(
        "--random_crop",
        action="store_true",
        help="Crop each image (and its condition, identically) at a random place instead of the centre.",
    )
    group.add_argument(
        "--random_flip",
        action="store_true",
        help="Flip each image and its condition together horizontally with probability 0.5.",
    )
    group.add_argument(
        "--aspect_ratio_buckets",
        action="store_true",
        help="Train each image near its own aspect ratio: SDXL's buckets of about resolution² pixels, each batch"
        " from one bucket. Implies --micro_conditioning.",
    )
    group = parser.add_argument_group("Training horizon")
    group.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, unless --max_train_steps is set.")
    group.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total optimisation steps; overrides --num_train_epochs.",
    )
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches accumulated per optimisation step."
    )
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute UNet activations in the backward pass: less memory, slower steps.",
    )
    group = parser.add_argument_group("Checkpoints")
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint (output_dir/checkpoint-N) every N optimisation steps.",
    )
    group.add_argument(
        "--checkpoints_total_limit", type=int, default=3, help="Keep at most this many checkpoints."
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint folder name (or path), or 'latest' for the newest in --output_dir.",
    )
    group = parser.add_argument_group("Optimiser")
    group.add_argument("--learning_rate", type=float, default=5e-6, help="Learning rate after warm-up.")
    group.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Multiply the learning rate by accumulation steps × batch size × number of processes.",
    )
    group.add_argument(
        "--lr_scheduler", type=str, default="constant", help=f"Learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}."
    )
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up optimisation steps.")
    group.add_argument(
        "--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts schedule."
    )
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW.")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    group.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient norm clipping.")
    group.add_argument(
        "--set_grads_to_none", action="store_true", help="Set gradients to None instead of zero after each step."
    )
    group = parser.add_argument_group("Speed (additions to upstream)")
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode each training image with the VAE once, keep its latent distribution (float16) on disk, and"
        " sample from it at every step instead of running the VAE. Reused across runs.",
    )
    group.add_argument(
        "--latent_cache_dir",
        type=str,
        default=None,
        help="Where --cache_latents stores latents; default: <--cache_dir or ~/.cache/t2i-adapter-sdxl>/latents.",
    )
    group.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the UNet and the adapter (the first steps are slower while kernels compile).",
    )
    group = parser.add_argument_group("Robustness (additions to upstream)")
    group.add_argument(
        "--skip_memory_check",
        action="store_true",
        help="On CUDA, train even when the planned peak memory of a step (scripts/plan_memory.py) exceeds the"
        " GPU's free memory; by default the run stops before loading models and names the flags that would fit.",
    )
    group.add_argument(
        "--skip_nonfinite_steps",
        type=int,
        default=0,
        help="Skip up to N optimisation steps whose loss is NaN/inf (their update is dropped) before stopping."
        " 0: stop at the first one.",
    )
    group.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="Drop samples with an unreadable image, a missing caption or a condition that cannot be aligned with"
        " its image (counted in a warning) instead of stopping before training.",
    )
    group = parser.add_argument_group("Precision and kernels")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: accelerate's config or launch flag.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers' attention in the UNet (PyTorch's SDPA is used otherwise).",
    )
    group = parser.add_argument_group("Data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub id of a dataset, or a local folder that `datasets.load_dataset` understands (e.g. parquet).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config, if any.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A local imagefolder with metadata.jsonl (the conditioning key must be"
        " 'conditioning_image_file_name').",
    )
    group.add_argument("--image_column", type=str, default="image", help="Column of the target images.")
    group.add_argument(
        "--conditioning_image_column",
        type=str,
        default="conditioning_image",
        help="Column of the conditioning images.",
    )
    group.add_argument(
        "--caption_column", type=str, default="text", help="Column of the captions (a string or a list of strings)."
    )
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Train on the first N samples after shuffling."
    )
    group.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0,
        help="Probability that a caption is replaced by the empty prompt, drawn anew at every step.",
    )
    group.add_argument(
        "--dataloader_num_workers", type=int, default=1, help="DataLoader worker processes (0: main process)."
    )
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Stream --dataset_name or --train_data_dir (e.g. a folder of WebDataset .tar shards) instead of"
        " loading it whole; needs --max_train_steps.",
    )
    group.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="With --streaming: samples are shuffled (and grouped into buckets) in windows of this many.",
    )
    group.add_argument(
        "--conditioning_type",
        type=str,
        default="image",
        choices=["image", "canny"],
        help="'image': read conditions from --conditioning_image_column. 'canny': make a canny edge map of each"
        " training image on the fly, with random thresholds (no stored conditions needed).",
    )
    group = parser.add_argument_group("Validation")
    group.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        nargs="+",
        help="Prompts for validation: as many as --validation_image, or one for all images.",
    )
    group.add_argument(
        "--validation_image",
        type=str,
        default=None,
        nargs="+",
        help="Conditioning images for validation: as many as --validation_prompt, or one for all prompts.",
    )
    group.add_argument(
        "--num_validation_images", type=int, default=4, help="Images generated per (prompt, image) pair."
    )
    group.add_argument(
        "--validation_steps", type=int, default=100, help="Run validation every N optimisation steps."
    )
    group.add_argument(
        "--validation_pairs",
        type=int,
        default=None,
        help="Pairs on which each validation measures the conditioning gain (see README): taken from"
        " --validation_data_dir/--validation_dataset_name when given (default: up to"
        f" {DEFAULT_VALIDATION_PAIRS}), otherwise held out of the training data (a fixed subset drawn from the"
        " seed; none by default, so training sees every sample, as upstream's does).",
    )
    group.add_argument(
        "--validation_data_dir",
        type=str,
        default=None,
        help="A local dataset with the training data's columns whose pairs the conditioning gain is"
        " measured on (its 'validation' split if it has one, else 'train').",
    )
    group.add_argument(
        "--validation_dataset_name", type=str, default=None, help="As --validation_data_dir, from the Hub."
    )
    group.add_argument(
        "--control_metric",
        type=str,
        default=None,
        choices=CONTROL_METRICS,
        help="How far the generated validation images follow their conditions: 'canny' (F1 of the"
        " image's canny edges against the condition's), 'ssim' (structural similarity of image and condition, in"
        " grey) or 'none'. Default: 'canny' with --conditioning_type canny, else 'none'.",
    )
    group = parser.add_argument_group("Hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the adapter and model card to the Hub.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (never logged or saved).")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository; default: the name of --output_dir."
    )
    return parser


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


def validation_set_location(args):
    """(flag, location) of the separate validation set, or None."""
    if args.validation_dataset_name:
        return "--validation_dataset_name", args.validation_dataset_name
    if args.validation_data_dir:
        return "--validation_data_dir", args.validation_data_dir
    return None


def control_metric(args):
    """The --control_metric in effect: by default canny edges for canny adapters, nothing otherwise."""
    if args.control_metric is not None:
        return args.control_metric
    return "canny" if args.conditioning_type == "canny" else "none"


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
    if not 0 < args.resolution <= MAX_RESOLUTION:
        raise ValueError(f"`--resolution` must be in 1..{MAX_RESOLUTION}, got {args.resolution}.")
    if not args.learning_rate > 0:
        raise ValueError(f"`--learning_rate` must be above 0, got {args.learning_rate}.")
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
        "num_train_epochs",
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
    if args.validation_data_dir is not None and args.validation_dataset_name is not None:
        raise ValueError("Specify only one of `--validation_data_dir` or `--validation_dataset_name`.")
    if args.validation_pairs is not None and args.validation_pairs < 2:
        raise ValueError(
            f"`--validation_pairs` must be at least 2 (the gain compares each pair's condition with another pair's),"
            f" got {args.validation_pairs}."
        )
    if args.streaming and args.validation_pairs and validation_set_location(args) is None:
        raise ValueError(
            "`--validation_pairs` holds pairs out of a dataset loaded whole; with `--streaming`, give the pairs as"
            " `--validation_data_dir` or `--validation_dataset_name`."
        )
    if args.control_metric not in (None, "none") and args.validation_prompt is None:
        raise ValueError(
            f"`--control_metric {args.control_metric}` scores the generated validation images: give"
            " `--validation_prompt` and `--validation_image` too."
        )
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"`--lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}, got {args.lr_scheduler!r}.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ValueError(
            f"`--report_to {args.report_to}` with `--hub_token` would expose the token to the tracker."
            " Log in with `huggingface-cli login` instead and drop `--hub_token`."
        )


def parse_args(input_args=None):
    """Parse the command line (or `input_args`) and run every check that needs no file."""
    args = build_parser().parse_args(input_args)
    check_args(args)
    return args


def uses_micro_conditioning(args):
    """Whether the UNet gets each sample's real size and crop. Buckets imply it: a bucket's crop is
    only meaningful to the UNet with the real sizes."""
    return args.micro_conditioning or args.aspect_ratio_buckets


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


def load_model_config(model_class, location, subfolder, args, flag):
    """Read only a model's config.json (no weights), and make sure it is a `model_class`'s config with
    the keys training reads (CONFIG_KEYS): a UNet given as the adapter, or an adapter as the base, is
    named as such."""
    where = f"{location}/{subfolder}" if subfolder else location
    try:
        config = dict(
            model_class.load_config(location, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)
        )
    except Exception as error:
        raise ValueError(f"`{flag}` {location!r}: no {model_class.__name__} config found in {where} ({error}).") from None
    found = config.get("_class_name", model_class.__name__)
    missing = [key for key in CONFIG_KEYS[model_class.__name__] if key not in config]
    if found != model_class.__name__ or missing:
        lacking = f" (it has no {', '.join(missing)})" if missing else ""
        raise ValueError(f"`{flag}` {location!r}: {where} holds a {found} config, not a {model_class.__name__}'s{lacking}.")
    return config


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


def vae_scale_factor(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def adapter_feature_shapes(adapter_config, resolution):
    """(channels, height) of each feature map the adapter makes from a resolution² image."""
    channels = list(adapter_config["channels"])
    side = resolution // adapter_config["downscale_factor"]
    if adapter_config["adapter_type"] == "full_adapter_xl":
        # Only the third block halves the resolution.
        return [(c, side if i < 2 else side // 2) for i, c in enumerate(channels)]
    if adapter_config["adapter_type"] == "light_adapter":
        channels.append(channels[-1])  # its last block makes one more map, at the last channels
    return [(c, side // 2**i) for i, c in enumerate(channels)]  # every block after the first halves it


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
    """How many condition pixels make one pixel of the adapter's smallest feature map (diffusers'
    `total_downscale_factor`): image sides must be multiples of it."""
    downscale, num_maps = adapter_config["downscale_factor"], len(adapter_config["channels"])
    halvings = {"full_adapter_xl": 1, "full_adapter": num_maps - 1, "light_adapter": num_maps}
    return downscale * 2 ** halvings[adapter_config["adapter_type"]]


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


def derive_adapter_config(unet_config, vae_config):
    """A new adapter whose feature maps are, one by one, where this UNet adds them.

    Where that is depends on the UNet's down blocks (see unet_residual_shapes), and the adapter types
    differ in how their maps shrink: full_adapter_xl makes two maps of one size and then halves once
    (SDXL's three blocks), full_adapter halves at every map (SD 1.5's four blocks). So each type is
    tried, with the optional mid-block map first, at the UNet's channels, the pixels unshuffled so
    that the first map is as large as the UNet's first residual; the first that check_adapter_fits
    accepts is it. For SDXL that is upstream's hard-coded adapter: full_adapter_xl, channels
    (320, 640, 1280, 1280), downscale 16.
    """
    latent_side = 2 ** (len(unet_config["down_block_types"]) + 1)  # halves exactly at every block
    resolution = latent_side * vae_scale_factor(vae_config)
    unet_shapes = unet_residual_shapes(unet_config, latent_side)
    for shapes in (unet_shapes, unet_shapes[:-1]):  # with the mid-block map, else without
        for adapter_type in ("full_adapter_xl", "full_adapter"):
            config = {
                "in_channels": 3,
                "channels": [channels for channels, _ in shapes],
                "num_res_blocks": 2,
                "downscale_factor": resolution // unet_shapes[0][1],
                "adapter_type": adapter_type,
            }
            try:
                check_adapter_fits(config, unet_config, vae_config, resolution)
            except ValueError:
                continue
            return config
    raise ValueError(
        "No T2I-Adapter (full_adapter_xl or full_adapter) fits this UNet: its down_block_types"
        f" {list(unet_config['down_block_types'])} with block_out_channels {list(unet_config['block_out_channels'])}"
        f" take feature maps (channels, size) {unet_shapes} from {latent_side}² latents. Pass an adapter built for"
        " it (`--adapter_model_name_or_path`)."
    )


def check_inputs(args):
    """Every check that reads files or configs but loads no weights, run before any model or data loads.

    Returns the adapter config that training will use, so the same derivation is not repeated.
    """
    from diffusers import AutoencoderKL, T2IAdapter, UNet2DConditionModel

    for flag in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "adapter_model_name_or_path"):
        check_model_location(f"--{flag}", getattr(args, flag))
    check_model_location("--tokenizer_name", args.tokenizer_name)
    for flag in ("train_data_dir", "validation_data_dir"):
        if getattr(args, flag) is not None and not os.path.isdir(getattr(args, flag)):
            raise ValueError(f"`--{flag}` {getattr(args, flag)!r} is not an existing folder.")
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

    base, base_flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
    unet_config = load_model_config(UNet2DConditionModel, base, "unet", args, base_flag)
    if args.pretrained_vae_model_name_or_path is None:
        vae_config = load_model_config(AutoencoderKL, base, "vae", args, base_flag)
    else:
        vae_config = load_model_config(
            AutoencoderKL, args.pretrained_vae_model_name_or_path, None, args, "--pretrained_vae_model_name_or_path"
        )
    if args.adapter_model_name_or_path is None:
        adapter_config = derive_adapter_config(unet_config, vae_config)
    else:
        adapter_config = load_model_config(
            T2IAdapter, args.adapter_model_name_or_path, None, args, "--adapter_model_name_or_path"
        )
    check_adapter_fits(adapter_config, unet_config, vae_config, args.resolution)
    return adapter_config


# ------------------------------------------------------------------------------------------
# Data: loading, and checking every sample
# ------------------------------------------------------------------------------------------
# One path for every mode. The training split is loaded whole or streamed, and every sample is
# checked before it is trained on. Batches are planned ahead from the run's seed, each sample with
# a seed of its own for its crop, flip and canny thresholds, so that one transform serves plain
# centre crops (pixel-equal to upstream's), buckets, random crops and flips and on-the-fly canny.
# The loader's position is saved in every checkpoint (torchdata's StatefulDataLoader carries it
# through the DataLoader workers): a resumed run continues exactly where it stopped.


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
    """`datasets.load_dataset` on the training data; a local imagefolder by its listed files."""
    from datasets import load_dataset

    files = local_imagefolder_files(location)
    if files is None:
        return load_dataset(location, args.dataset_config_name, cache_dir=args.cache_dir, **options)
    return load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir, **options)


def open_stored_image(value):
    """A PIL image from what an undecoded `datasets.Image` column stores (bytes or a path)."""
    if value is None:
        raise ValueError("no image")
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
    caption_feature = dataset.features[args.caption_column]
    caption_type = getattr(caption_feature, "dtype", None) or getattr(getattr(caption_feature, "feature", None), "dtype", None)
    if caption_type not in ("string", "large_string"):
        raise ValueError(f"`--caption_column` column {args.caption_column!r} holds {caption_feature}, not text.")
    stored = undecoded_images(dataset.select_columns(list(columns.values())), args)
    bad, sizes = [], []
    for row, sample in enumerate(stored):
        problem, size = inspect_sample(*stored_sample(sample, args))
        if problem is None:
            sizes.append(size)
        else:
            bad.append((row, problem))
    return bad, sizes


def image_file_sizes(dataset, args):
    """(path, size) of every image file the dataset refers to by path in the columns training reads
    (an imagefolder's images), read from the table without touching any stored image bytes."""
    from datasets import Image as ImageFeature

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


def drop_or_refuse_bad_samples(dataset, args, check_samples=recorded_scan_samples, kind="training"):
    """(dataset, sizes): check every sample before training (or read an earlier run's check of the
    same files), then stop with the rows at fault, or drop them with --skip_bad_samples."""
    bad, sizes = check_samples(dataset, args)
    if bad:
        listing = "; ".join(f"row {row}: {problem}" for row, problem in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        columns = "columns " + ", ".join(map(repr, used_columns(args).values()))
        if not args.skip_bad_samples:
            raise ValueError(
                f"{len(bad)} bad {kind} sample(s) in {columns}: {listing}{more}. Fix them, or pass --skip_bad_samples."
            )
        logger.warning(f"Skipping {len(bad)} of {len(dataset)} {kind} samples: {listing}{more}.")
        bad_rows = {row for row, _ in bad}
        dataset = dataset.select([row for row in range(len(dataset)) if row not in bad_rows])
        if len(dataset) == 0:
            raise ValueError(f"Every {kind} sample is bad; none is left.")
    return dataset, sizes


class TrainingData(typing.NamedTuple):
    dataset: typing.Any  # the training split, loaded whole or (--streaming) a stream
    sizes: typing.Optional[list]  # each row's image (height, width); None for a stream
    control_pairs: typing.Any = None  # the rows validation measures the conditioning gain on, or None


def hold_out_pairs(dataset, sizes, count, seed):
    """(training rows, their sizes, held-out rows): `count` rows drawn from `seed` are left out of training."""
    if count >= len(dataset):
        raise ValueError(
            f"`--validation_pairs` {count} would hold out the whole training set ({len(dataset)} samples)."
        )
    held_out = set(np.random.default_rng([seed, 1]).permutation(len(dataset))[:count].tolist())
    kept = [row for row in range(len(dataset)) if row not in held_out]
    return dataset.select(kept), [sizes[row] for row in kept], dataset.select(sorted(held_out))


def load_train_dataset(args, seed, check_samples=recorded_scan_samples):
    """TrainingData: the checked training split, each row's image (height, width), and the rows held
    out for the conditioning gain (--validation_pairs without a validation set).

    Bad samples stop the run or are dropped (--skip_bad_samples); --max_train_samples keeps the
    first N rows of a shuffle drawn from `seed`, as upstream does.
    """
    flag, location = dataset_location(args)
    try:
        dataset = open_dataset(location, args)
    except Exception as error:
        raise ValueError(f"`{flag}` {location!r} could not be loaded as a dataset (is it empty?): {error}") from error
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split; it has: {', '.join(dataset)}.")
    train = dataset["train"]
    check_columns(train.column_names, args)
    if len(train) == 0:
        raise ValueError("The training dataset is empty.")
    train, sizes = drop_or_refuse_bad_samples(train, args, check_samples)
    held_out = None
    if args.validation_pairs and validation_set_location(args) is None:
        train, sizes, held_out = hold_out_pairs(train, sizes, args.validation_pairs, seed)
    if args.max_train_samples is not None:
        if args.max_train_samples > len(train):
            raise ValueError(
                f"`--max_train_samples` {args.max_train_samples} is larger than the dataset ({len(train)} samples)."
            )
        rows = np.random.default_rng(seed).permutation(len(train))[: args.max_train_samples].tolist()
        train, sizes = train.select(rows), [sizes[row] for row in rows]
    return TrainingData(train, sizes, held_out)


def load_validation_set(args, check_samples=recorded_scan_samples):
    """The first --validation_pairs rows (default up to DEFAULT_VALIDATION_PAIRS) of the validation
    set, checked like training samples."""
    flag, location = validation_set_location(args)
    try:
        splits = open_dataset(location, argparse.Namespace(**{**vars(args), "dataset_config_name": None}))
    except Exception as error:
        raise ValueError(f"`{flag}` {location!r} could not be loaded as a dataset: {error}") from error
    split = next((name for name in ("validation", "train") if name in splits), next(iter(splits)))
    pairs = splits[split]
    check_columns(pairs.column_names, args)
    count = args.validation_pairs or min(len(pairs), DEFAULT_VALIDATION_PAIRS)
    if not 2 <= count <= len(pairs):
        raise ValueError(f"`{flag}` {location!r} has {len(pairs)} sample(s) in '{split}'; {max(count, 2)} are needed.")
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
        raise ValueError(f"`{flag}` {location!r} could not be streamed as a dataset: {error}") from error
    column_names = stream.column_names or list(next(iter(stream.take(1)), {}))
    if not column_names:
        raise ValueError(f"`{flag}` {location!r} holds no training samples.")
    check_columns(column_names, args)
    stream = stream.select_columns(list(used_columns(args).values()) + (["__key__"] if "__key__" in column_names else []))
    return undecoded_images(stream, args)


def load_training_data(args, seed, check_samples=recorded_scan_samples):
    """TrainingData: the dataset loaded whole, or a stream with --streaming, and the pairs of the
    conditioning gain, from the validation set or held out of the training data."""
    if args.streaming:
        data = TrainingData(load_streaming_dataset(args), None)
    else:
        data = load_train_dataset(args, seed, check_samples)
    if validation_set_location(args) is not None:
        data = data._replace(control_pairs=load_validation_set(args, check_samples))
    elif data.control_pairs is not None:
        logger.info(f"The conditioning gain is measured on {len(data.control_pairs)} pairs held out of training.")
    return data


# ------------------------------------------------------------------------------------------
# The transform: one for every mode, image and condition placed alike
# ------------------------------------------------------------------------------------------


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


def draw_placement(height, width, target_size, rng=None, random_crop=False, random_flip=False):
    """The placement of a (height, width) image in a target-size crop: resized to just cover it,
    then cropped at the centre (torchvision's CenterCrop arithmetic, as upstream) or at random."""
    target_height, target_width = target_size
    resized_height, resized_width = cover_size(height, width, target_height, target_width)
    if random_crop:
        top, left = rng.randint(0, resized_height - target_height), rng.randint(0, resized_width - target_width)
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


def condition_at_image_size(condition, image_size, detection_resolution=None):
    """The condition brought to its image's (width, height), so that one placement fits both:
    conditions are often stored at another size (depth maps at half size). With a detection
    resolution it first passes through the detector's working size (shorter side), as if a
    detector had made it there."""
    if detection_resolution is not None:
        width, height = image_size
        working_height, working_width = cover_size(height, width, detection_resolution, detection_resolution)
        condition = condition.resize((working_width, working_height), Image.BILINEAR)
    return condition if condition.size == tuple(image_size) else condition.resize(image_size, Image.BILINEAR)


class PairTransform:
    """The one transform: a stored sample to training tensors at a target size, with the sample's
    own RNG. Image and condition are placed identically (pixel for pixel); with --conditioning_type
    canny the condition is the edge map of the final crop; with cached latents the image is not
    decoded, only its size read."""

    def __init__(self, args, augment=True):
        self.image_column = args.image_column
        self.conditioning_image_column = args.conditioning_image_column
        self.caption_column = args.caption_column
        self.conditioning_type = args.conditioning_type
        self.detection_resolution = args.detection_resolution
        self.random_crop = args.random_crop and augment  # off for validation pairs: always the centre crop
        self.random_flip = args.random_flip and augment

    def __call__(self, sample, target_size, seed, cached_latents=None):
        rng = random.Random(seed)
        if cached_latents is None:
            image = load_upright_rgb(sample[self.image_column])
            width, height = image.size
        else:
            with open_stored_image(sample[self.image_column]) as opened:
                width, height = upright_size(opened)
        placement = draw_placement(height, width, target_size, rng, self.random_crop, self.random_flip)
        pair = {
            "captions": sample[self.caption_column],
            "original_sizes": torch.tensor((height, width)),
            "crop_top_lefts": torch.tensor(placement.crop_top_left()),
        }
        if cached_latents is None:
            image = placement.apply(image)
            pair["pixel_values"] = to_training_pixels(image)
        else:
            pair["latent_mean"], pair["latent_std"] = cached_latents["mean"], cached_latents["std"]
        if self.conditioning_type == "canny":
            condition = canny_condition(image, *random_canny_thresholds(rng))
        else:
            condition = load_upright_rgb(sample[self.conditioning_image_column])
            condition = placement.apply(condition_at_image_size(condition, (width, height), self.detection_resolution))
        pair["conditioning_pixel_values"] = transforms.functional.to_tensor(condition)
        return pair


def collate_fn(examples):
    """Stack the tensors of a batch; keep the captions as a list. Samples skipped mid-training (None)
    are left out; a batch needs one left, since every process must take each step."""
    examples = [example for example in examples if example is not None]
    if not examples:
        raise ValueError("Every sample of a batch failed mid-training (see the warnings above).")
    return {
        key: [e[key] for e in examples] if key == "captions" else torch.stack([e[key] for e in examples]).float()
        for key in examples[0]
    }


# ------------------------------------------------------------------------------------------
# Latent cache (--cache_latents): each image's VAE latent distribution, encoded once
# ------------------------------------------------------------------------------------------


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


def load_cached_latents(path):
    from safetensors.torch import load_file

    return load_file(path)


@torch.no_grad()
def fill_latent_cache(dataset, keys, vae, args, accelerator, cache_dir):
    """Encode every image whose latent distribution is not cached yet (each process its share), at
    the centre crop the transform makes, stored as float16 mean and std. Returns how many this
    process encoded."""
    from safetensors.torch import save_file

    missing = [
        row
        for row, key in enumerate(keys)
        if row % accelerator.num_processes == accelerator.process_index
        and not os.path.exists(latent_cache_path(cache_dir, key))
    ]
    images = undecoded_images(dataset.select_columns([args.image_column]), args)
    progress = tqdm(total=len(missing), desc="Caching latents", disable=not accelerator.is_local_main_process)
    for start in range(0, len(missing), 8):
        rows = missing[start : start + 8]
        pixels = torch.stack([
            to_training_pixels(centre_crop(load_upright_rgb(images[row][args.image_column]), args.resolution))
            for row in rows
        ])
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


def cache_latents(dataset, vae, args, accelerator):
    """Fill the latent cache for `dataset` and return each row's latent file."""
    cache_dir = default_latent_cache_dir(args)
    keys = latent_cache_keys(dataset, args.image_column, vae_fingerprint(vae), args.resolution)
    encoded = fill_latent_cache(dataset, keys, vae, args, accelerator, cache_dir)
    logger.info(f"Latent cache {cache_dir}: {len(keys)} images, {encoded} newly encoded on this process.")
    return [latent_cache_path(cache_dir, key) for key in keys]


def sample_cached_latents(mean, std, scaling_factor):
    """What `vae.encode(x).latent_dist.sample() * scaling_factor` gives, from the cached distribution."""
    mean, std = mean.float().contiguous(), std.float()
    return (mean + std * torch.randn_like(mean)) * scaling_factor


# ------------------------------------------------------------------------------------------
# The loader: planned batches for every mode, one resume mechanism
# ------------------------------------------------------------------------------------------


class PlannedBatchSampler:
    """Endless batches of (row, target size, seed) over a map-style dataset: each epoch a new
    permutation from (seed, epoch), batches grouped by target size, every process its share. Its
    state (epoch, batches done) is saved with each checkpoint."""

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
    """A map-style dataset indexed by the sampler's (row, target size, seed); with the latent cache,
    each row's cached latent distribution is read from `latent_files[row]`.

    Every sample passed the sample check, but a file can change after it (and its record). A sample
    that then fails stops the run naming the file and the record to delete, or with
    `skip_bad_samples` is left out of its batch (None, which `collate_fn` drops) with a warning."""

    def __init__(self, dataset, transform, latent_files=None, skip_bad_samples=False):
        self.dataset, self.transform, self.latent_files = dataset, transform, latent_files
        self.skip_bad_samples = skip_bad_samples

    def __getitem__(self, key):
        row, target_size, seed = key
        sample = self.dataset[row]
        try:
            cached = None if self.latent_files is None else load_cached_latents(self.latent_files[row])
            return self.transform(sample, target_size, seed, cached)
        except Exception as error:
            files = [value["path"] for value in sample.values() if isinstance(value, dict) and value.get("path")]
            records = os.path.dirname(self.dataset.cache_files[0]["filename"]) if self.dataset.cache_files else None
            message = (
                f"Training sample at row {row} ({', '.join(files) or 'stored in the dataset'}) failed mid-training:"
                f" {type(error).__name__}: {error}. It passed the sample check, so a file changed since: fix it"
                + (f" and delete the check's record (t2i_sample_check-*.json in {records})," if records else ",")
                + " then start again; or pass --skip_bad_samples."
            )
            if not self.skip_bad_samples:
                raise ValueError(message) from error
            logger.warning(message.replace("; or pass --skip_bad_samples.", ". Skipped."), main_process_only=False)
            return None


class StreamingBatches(torch.utils.data.IterableDataset):
    """Endless batches from a `datasets` IterableDataset (--streaming).

    Each epoch reads the shards in a new order (from the seed and epoch), each process its own
    shards (datasets' split_dataset_by_node) and each DataLoader worker its own part of those.
    Samples are taken in windows of --shuffle_buffer_size, checked, shuffled and grouped by
    bucket. The state is the stream's position at the start of the current window plus the
    batches already given from it: a resumed run re-reads that one window and continues exactly
    (datasets' own shuffle buffer is not saved in its state_dict, so it is not used).
    """

    def __init__(self, stream, transform, args, seed, rank=0, world_size=1, buckets=None):
        self.stream, self.transform, self.args, self.seed = stream, transform, args, seed
        self.rank, self.world_size, self.buckets = rank, world_size, buckets
        self.state = {"epoch": 0, "window": 0, "stream": None, "done": 0}

    def epoch_stream(self, epoch):
        from datasets import concatenate_datasets
        from datasets.distributed import split_dataset_by_node

        num_shards = self.stream.num_shards
        order = np.random.default_rng([self.seed, epoch]).permutation(num_shards).tolist()
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
                    if state["window"] == 0 and state["stream"] is None:  # a whole epoch gave this reader nothing
                        self.nothing_to_read(worker)
                        return
                    break
                rng = np.random.default_rng([self.seed, state["epoch"], self.rank, worker_id, state["window"]])
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

    def nothing_to_read(self, worker):
        """A DataLoader worker with no share of the stream (more workers than this process's shards)
        stops, as `datasets` stops it, and the other workers go on; a process with nothing to read
        is an error. Looping to the next epoch instead would spin for ever and hang the loader."""
        if worker is not None and worker.num_workers > 1:
            logger.warning(f"DataLoader worker {worker.id} of process {self.rank} has no shard of the stream to read;"
                           " it stops (use fewer --dataloader_num_workers, or more shards).", main_process_only=False)
            return
        raise ValueError(f"Process {self.rank} of {self.world_size} has no sample of the stream to read: the stream"
                         " has fewer samples than processes.")


def leave_stop_signals_to_the_main_process(worker_id):
    """DataLoader workers ignore SIGTERM and SIGINT. A cluster's preemption (scancel, pod eviction) and
    Ctrl-C signal the whole process group; a worker that died of it would end the run before the main
    process saves its checkpoint. The main process stops the workers when it exits."""
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)


def loader_options(args, seed):
    """DataLoader settings: workers that leave stop signals to the main process, pinned memory on CUDA,
    and a generator of its own, so that creating an iterator never draws from the global torch RNG (a
    resumed run, which creates its iterator at another moment, would otherwise draw other noise than
    the uninterrupted run)."""
    return {
        "num_workers": args.dataloader_num_workers,
        "persistent_workers": args.dataloader_num_workers > 0,
        "worker_init_fn": leave_stop_signals_to_the_main_process,
        "pin_memory": torch.cuda.is_available(),
        "generator": torch.Generator().manual_seed(seed),
    }


def make_train_dataloader(train_data, args, seed, rank, world_size, multiple, latent_files=None):
    """The training loader, for a map-style dataset or a stream: a StatefulDataLoader over planned
    batches. Every process builds its own share (it is not passed to accelerate.prepare), and its
    state goes into each checkpoint.

    `train_data` is what `load_training_data` returns; `multiple` is the adapter's total downscale
    (bucket sides are multiples of it). Returns (loader, batches per epoch on this process, or None
    for a stream).
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset, sizes = train_data.dataset, train_data.sizes
    buckets = aspect_ratio_buckets(args.resolution, multiple) if args.aspect_ratio_buckets else None
    transform = PairTransform(args)
    if sizes is None:  # a stream; it yields whole batches
        batches = StreamingBatches(dataset, transform, args, seed, rank, world_size, buckets)
        return StatefulDataLoader(batches, batch_size=None, **loader_options(args, seed)), None
    if buckets:
        targets = [nearest_bucket(*size, buckets) for size in sizes]
    else:
        targets = [(args.resolution, args.resolution)] * len(sizes)
    sampler = PlannedBatchSampler(targets, args.train_batch_size, seed, rank, world_size)
    batches_per_epoch = sampler.batches_per_epoch()
    if batches_per_epoch == 0:
        raise ValueError(f"{len(sizes)} samples make no batch for each of the {world_size} processes.")
    pairs = PlannedPairs(undecoded_images(dataset, args), transform, latent_files, args.skip_bad_samples)
    loader = StatefulDataLoader(pairs, batch_sampler=sampler, collate_fn=collate_fn, **loader_options(args, seed))
    return loader, batches_per_epoch


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


def batch_time_ids(batch, args, device=None):
    """A batch's micro-conditioning: each sample's real size and crop (--micro_conditioning, buckets),
    or upstream's fixed resolution and --crops_coords_top_left for all."""
    count = len(batch["captions"])
    if uses_micro_conditioning(args):
        # The batch's own size: a bucket's, or the square resolution.
        target_sizes = torch.tensor([batch["conditioning_pixel_values"].shape[-2:]], device=device)
        real_sizes = [batch["original_sizes"].to(device), batch["crop_top_lefts"].to(device)]
        return torch.cat([*real_sizes, target_sizes.expand(count, 2)], dim=1).float()
    resolution = (args.resolution, args.resolution)
    crop = (args.crops_coords_top_left_h, args.crops_coords_top_left_w)
    return compute_time_ids(resolution, crop, resolution, count, device=device)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def weight_dtype_for(mixed_precision):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


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
    """The components by name: scheduler, tokenizers, text encoders, VAE, UNet and the adapter, all
    frozen but the adapter."""
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
        location = args.adapter_model_name_or_path
        logger.info(f"Loading adapter weights from {location}.")
        # Adapters are often shared in float16. The trained copy is float32 (mixed precision keeps
        # a float32 master copy), as in upstream, whose from_pretrained loads float32 too.
        stored = safetensors_dtypes(location) - {"F32"} if os.path.isdir(location) else set()
        if stored:
            logger.info(f"The adapter in {location} is stored in {'/'.join(sorted(stored))}; it trains in float32.")
        adapter = T2IAdapter.from_pretrained(location, torch_dtype=torch.float32, cache_dir=args.cache_dir)
    else:
        logger.info(f"Initialising a new adapter: {adapter_config}.")
        adapter = T2IAdapter(**adapter_config)

    # Only the adapter trains. Upstream leaves the UNet trainable, which costs a full backward
    # through its weights and ~10 GB of unused gradients at SDXL size.
    for model in (*text_encoders, vae, unet):
        model.requires_grad_(False)
    adapter.train()
    return {
        "noise_scheduler": noise_scheduler,
        "tokenizers": tokenizers,
        "text_encoders": text_encoders,
        "vae": vae,
        "unet": unet,
        "adapter": adapter,
    }


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
def encode_latents(vae, pixel_values, chunk_size=8, generator=None):
    """Sample VAE latents (scaled), at most `chunk_size` images at a time to bound memory; from the
    global RNG unless a `generator` is given."""
    pixel_values = pixel_values.to(vae.device, dtype=vae.dtype)
    latents = [vae.encode(chunk).latent_dist.sample(generator) for chunk in pixel_values.split(chunk_size)]
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


def data_state_path(checkpoint, process_index):
    return os.path.join(checkpoint, DATA_STATE_FILE.format(process_index))


def checkpoint_run(checkpoint):
    """The id of the run that wrote `checkpoint` (None when it does not say)."""
    try:
        with open(data_state_path(checkpoint, 0)) as f:
            return json.load(f).get("run")
    except (OSError, ValueError):
        return None


def prune_checkpoints(output_dir, total_limit, run):
    """Delete the oldest checkpoints of `run` (an id that its resumed launches share) so that at most
    `total_limit` of them remain. A checkpoint that another run wrote stays."""
    checkpoints = list_checkpoints(output_dir)
    own = [path for path in checkpoints if checkpoint_run(path) == run]
    if total_limit is None or len(own) <= total_limit:
        return []
    removed = own[: len(own) - total_limit]  # never the newest: the limit is at least 1
    logger.info(f"Removing checkpoints beyond the limit of {total_limit}: {', '.join(map(os.path.basename, removed))}")
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(accelerator, output_dir, step, total_limit, data_state):
    """Save the full training state as output_dir/checkpoint-<step>.

    Every process takes part (DeepSpeed needs each rank's shard), and each saves its `data_state`
    (the run's seed and its loader's position) as JSON. The state is written under a temporary
    name and renamed once complete, and only then are old checkpoints pruned: a crash while saving
    leaves the previous checkpoints intact and never a half-written one as 'latest'.
    """
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    tmp_path = final_path + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp_path):
        shutil.rmtree(tmp_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp_path)
    with open(data_state_path(tmp_path, accelerator.process_index), "w") as f:
        json.dump(data_state, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final_path):  # the same step saved again after a resume
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
        prune_checkpoints(output_dir, total_limit, data_state["run"])
        logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()
    return final_path


def load_data_state(checkpoint, process_index):
    """This process's data state saved with the checkpoint: the run's seed and the loader's position.
    Plain JSON, so reading it never runs code; `checkpoint_problems` has made sure it is there."""
    with open(data_state_path(checkpoint, process_index)) as f:
        return json.load(f)


def checkpoint_problems(checkpoint, process_index, read=False):
    """What is wrong with the files a resume on this process reads from `checkpoint`: each missing or
    empty one, and with `read` each whose format is broken, read without running any code (JSON,
    safetensors headers, torch's zip directory; the small random states loaded as tensors only). Empty
    when the checkpoint is complete."""
    from accelerate.utils import load
    from safetensors import safe_open

    problems = []
    names = [name.format(process_index) for name in CHECKPOINT_FILES]
    names += [name for name in CHECKPOINT_FILES_IF_THERE if os.path.exists(os.path.join(checkpoint, name))]
    for name in names:
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            problems.append(f"{name} is {'empty' if os.path.isfile(path) else 'missing'}")
        elif read and name.endswith(".json"):
            try:
                with open(path) as f:
                    json.load(f)
            except ValueError as error:
                problems.append(f"{name} is not readable JSON ({error})")
        elif read and name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):  # reads and checks the header only
                    pass
            except Exception as error:
                problems.append(f"{name} is not readable safetensors ({str(error)[:200]})")
        elif read and name.endswith((".bin", ".pkl")) and not zipfile.is_zipfile(path):
            # torch.save writes a zip; its directory, at the end, is lost when a file is truncated.
            # Nothing is unpickled here (accelerate loads these with weights_only).
            problems.append(f"{name} is unreadable (not a complete torch file)")
        elif read and name.startswith("random_states"):
            try:  # small; accelerate would skip unreadable random states with an INFO line, losing exactness
                load(path, map_location="cpu")  # weights_only: tensors and plain data, never code
            except Exception as error:
                problems.append(f"{name} is unreadable ({type(error).__name__}: {str(error)[:200]})")
    return problems


def finished_step(output_dir):
    """The step at which a run in `output_dir` finished (its final adapter saved), or None."""
    path = os.path.join(output_dir, FINISHED_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["step"]


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, or None for a new run: without the flag, or with 'latest'
    before any checkpoint exists (as upstream, so that one command serves the first launch and every
    requeue). A new run refuses a folder that holds checkpoints, and a named checkpoint must exist."""
    checkpoints = list_checkpoints(output_dir)
    names = ", ".join(os.path.basename(path) for path in checkpoints)
    if resume_from_checkpoint is None:
        earlier = f"checkpoints of an earlier run ({names})" if checkpoints else "a finished run"
        if checkpoints or finished_step(output_dir) is not None:
            raise ValueError(
                f"`--output_dir` {output_dir!r} already holds {earlier}. Resume it with `--resume_from_checkpoint"
                " latest`, or start the new run in another `--output_dir`."
            )
        return None
    if resume_from_checkpoint == "latest":
        for path in reversed(checkpoints):  # the newest complete one
            problems = checkpoint_problems(path, process_index=0)
            if not problems:
                return path
            logger.warning(f"Skipping {path}, which is incomplete: {'; '.join(problems)}.")
        return None
    if os.path.isdir(resume_from_checkpoint):
        path = resume_from_checkpoint
    else:
        path = os.path.join(output_dir, os.path.basename(os.path.normpath(resume_from_checkpoint)))
    if not os.path.isdir(path):
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r}: there is no such checkpoint ({path})."
            f" Checkpoints in {output_dir}: {names or 'none'}. Pass one of them or 'latest'."
        )
    checkpoint_step(path)
    return path


def lock_output_dir(output_dir):
    """An exclusive lock on `output_dir` for the whole run, so that two runs never write (and prune)
    one folder: `flock` on the folder itself, which the system releases however the process ends, so
    a crashed run leaves no stale lock. While it is held, LOCK_FILE in the folder names the holder.
    Returns the locked folder's descriptor, for `unlock_output_dir`."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    folder = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(folder)
        try:
            with open(os.path.join(output_dir, LOCK_FILE)) as f:
                holder = f.read().strip()
        except OSError:
            holder = "its holder did not say who it is"
        raise ValueError(
            f"`--output_dir` {output_dir!r} is in use by another training run ({holder}). Wait for it to end,"
            " or use another `--output_dir`."
        ) from None
    with open(os.path.join(output_dir, LOCK_FILE), "w") as f:
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    return folder


def unlock_output_dir(folder, output_dir):
    """Release `lock_output_dir`'s lock, leaving the folder as the run's own files left it."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, LOCK_FILE))
    os.close(folder)


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


# The conditioning gain: how much the adapter's true condition lowers the training loss against
# another pair's condition, on pairs never trained on, with noise and timesteps that are the same at
# every validation (so that the curve moves only with the adapter). Forward passes only.


class ControlPairs(typing.NamedTuple):
    """The validation pairs as the loss takes them, computed once."""

    latents: torch.Tensor
    conditions: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    time_ids: torch.Tensor


def control_pair_batch(rows, args):
    """Rows of a dataset as one batch of the trainer's tensors: centre crops at --resolution, never
    augmented; each pair's canny thresholds (--conditioning_type canny) drawn from its index."""
    rows = undecoded_images(rows, args)
    transform = PairTransform(args, augment=False)
    return collate_fn([transform(rows[index], (args.resolution, args.resolution), index) for index in range(len(rows))])


@torch.no_grad()
def prepare_control_pairs(batch, components, args, device, seed=CONTROL_SCORE_SEED):
    """ControlPairs on `device`: latents (a posterior sample drawn from `seed`), conditions, the first
    caption's embeddings and the micro-conditioning. The global RNGs are left as they were."""
    vae = components["vae"]
    python_rng_state = random.getstate()  # select_captions draws even with no empty prompts
    captions = select_captions(batch["captions"], 0.0, is_train=False)
    random.setstate(python_rng_state)
    latents = encode_latents(vae, batch["pixel_values"], generator=torch.Generator(vae.device).manual_seed(seed))
    prompt_embeds, pooled_embeds = encode_prompt(captions, components["text_encoders"], components["tokenizers"])
    return ControlPairs(
        latents.float().to(device), batch["conditioning_pixel_values"].to(device), prompt_embeds.to(device),
        pooled_embeds.to(device), batch_time_ids(batch, args, device),
    )


def control_pairs_for(train_data, components, args, accelerator):
    """The validation pairs, prepared on the main process (which alone validates); None without them.
    Called while the VAE is still on the device (--cache_latents moves it off afterwards)."""
    if train_data.control_pairs is None or not accelerator.is_main_process:
        return None
    batch = control_pair_batch(train_data.control_pairs, args)
    return prepare_control_pairs(batch, components, args, accelerator.device)


@torch.no_grad()
def conditioning_gain(unet, adapter, pairs, sigmas_by_timestep, prediction_type, weight_dtype, batch_size, seed=CONTROL_SCORE_SEED, draws=1):
    """1 − loss(true conditions) / loss(conditions rolled by one pair), with the trainer's loss.

    Each pair is noised `draws` times in each quarter of the timesteps (noise and timesteps drawn
    from `seed`), so the overall gain is the gain under uniform timesteps. Returns {"overall",
    "ranges": {"low-high": gain}, "loss_true", "loss_shuffled"} (losses: means over all draws).
    """
    device = pairs.latents.device
    generator = torch.Generator(device).manual_seed(seed)
    bounds = [len(sigmas_by_timestep) * quarter // 4 for quarter in range(5)]
    conditions = {"true": pairs.conditions, "shuffled": pairs.conditions.roll(1, dims=0)}
    totals = {}
    for low, high in zip(bounds, bounds[1:]):
        total = {"true": 0.0, "shuffled": 0.0}
        for _ in range(draws):
            # Drawn for all pairs at once, so that the batch size (memory) never changes the score.
            all_timesteps = torch.randint(low, high, (len(pairs.latents),), generator=generator, device=device)
            all_noise = torch.randn(pairs.latents.shape, generator=generator, device=device)
            for start in range(0, len(pairs.latents), batch_size):
                chunk = slice(start, start + batch_size)
                latents = pairs.latents[chunk]
                added_cond_kwargs = {"text_embeds": pairs.pooled_embeds[chunk], "time_ids": pairs.time_ids[chunk]}
                for kind, condition in conditions.items():
                    loss = adapter_training_loss(
                        unet, adapter, latents, condition[chunk], pairs.prompt_embeds[chunk], added_cond_kwargs,
                        sigmas_by_timestep, prediction_type, weight_dtype, noise=all_noise[chunk],
                        timesteps=all_timesteps[chunk],
                    )
                    total[kind] += loss.item() * len(latents)
        totals[f"{low}-{high}"] = total
    loss_true = sum(total["true"] for total in totals.values())
    loss_shuffled = sum(total["shuffled"] for total in totals.values())
    count = len(pairs.latents) * draws * (len(bounds) - 1)
    return {
        "pairs": len(pairs.latents),
        "overall": 1 - loss_true / loss_shuffled,
        "ranges": {name: 1 - total["true"] / total["shuffled"] for name, total in totals.items()},
        "loss_true": loss_true / count,
        "loss_shuffled": loss_shuffled / count,
    }


def measure_control(components, adapter, args, accelerator, weight_dtype, step):
    """The conditioning gain on the validation pairs at `step`, logged to every tracker; None without pairs."""
    pairs = components.get("control_pairs")
    if pairs is None:
        return None
    scheduler = components["noise_scheduler"]
    score = conditioning_gain(
        components["unet"], accelerator.unwrap_model(adapter), pairs, sigma_table(scheduler),
        scheduler.config.prediction_type, weight_dtype, args.train_batch_size,
    )
    logs = {
        "validation/conditioning_gain": score["overall"],
        "validation/loss_true_condition": score["loss_true"],
        "validation/loss_shuffled_condition": score["loss_shuffled"],
    }
    logs.update({f"validation/conditioning_gain_t{name.replace('-', '_')}": gain for name, gain in score["ranges"].items()})
    accelerator.log(logs, step=step)
    logger.info(f"Conditioning gain at step {step}: {score['overall']:.4f} (loss {score['loss_true']:.5f} with the"
                f" true condition, {score['loss_shuffled']:.5f} with another pair's).")
    return score


# How far generated images follow their conditions, the way ControlNet++ (Li et al., 2024) scores
# it: the condition is extracted back from the generated image and compared with the input.


def edge_f1(condition, image, thresholds=CONTROL_CANNY_THRESHOLDS):
    """F1 of the image's canny edges against the condition's edges (white on black), pixel for pixel."""
    wanted = np.asarray(condition.convert("L")) > 127
    found = np.asarray(canny_condition(image, *thresholds))[..., 0] > 0
    matched = np.logical_and(wanted, found).sum()
    if matched == 0:
        return float(not wanted.any() and not found.any())
    precision, recall = matched / found.sum(), matched / wanted.sum()
    return float(2 * precision * recall / (precision + recall))


def ssim(first, second, window_size=11, sigma=1.5):
    """Structural similarity of two images in grey (Wang et al., 2004: a Gaussian window, σ 1.5,
    over the valid region); 1 for equal images."""
    pixels = [torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))[None, None] for image in (first, second)]
    offsets = torch.arange(window_size, dtype=torch.float32) - (window_size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    window = (weights[:, None] * weights[None, :])[None, None]

    def local_mean(values):
        return torch.nn.functional.conv2d(values, window)

    a, b = pixels
    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a, var_b = local_mean(a * a) - mean_a**2, local_mean(b * b) - mean_b**2
    covariance = local_mean(a * b) - mean_a * mean_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    similarity = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(similarity.mean())


def control_score(metric, condition, image):
    """--control_metric of one generated image against its condition (same size)."""
    if image.size != condition.size:
        image = image.resize(condition.size, Image.BILINEAR)
    return edge_f1(condition, image) if metric == "canny" else ssim(condition, image)


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
            condition = load_upright_rgb({"path": image_path, "bytes": None})
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
    metric = control_metric(args)
    if metric != "none":
        for log in image_logs:
            log["control_scores"] = [control_score(metric, log["validation_image"], image) for image in log["images"]]
        mean_score = float(np.mean([score for log in image_logs for score in log["control_scores"]]))
        accelerator.log({f"validation/{CONTROL_METRIC_KEYS[metric]}": mean_score}, step=step)
        logger.info(f"Validation images at step {step}: {CONTROL_METRIC_KEYS[metric]} {mean_score:.4f}.")
    return image_logs


# ------------------------------------------------------------------------------------------
# Model card and Hub
# ------------------------------------------------------------------------------------------


def save_model_card(repo_id, image_logs, base_model, repo_folder, training_details=None):
    """README.md: the Hub metadata (upstream's license, tags and `library_name: diffusers`), and a body
    with the sections of diffusers' training model card, filled in: what the adapter is, a grid per
    validation prompt (condition then samples), how to use it, its limits and how it was trained."""
    image_text = ""
    if image_logs:
        image_text = "You can find some example images below.\n\n"
        for i, log in enumerate(image_logs):
            log["validation_image"].save(os.path.join(repo_folder, f"image_control_{i}.png"))
            images = [log["validation_image"], *log["images"]]
            image_grid(images, 1, len(images)).save(os.path.join(repo_folder, f"images_{i}.png"))
            image_text += f"prompt: {log['validation_prompt']}\n\n![images_{i}](./images_{i}.png)\n\n"
    tags = "\n".join(f"- {tag}" for tag in MODEL_CARD_TAGS)
    details = "".join(f"- {name}: {value}\n" for name, value in (training_details or {}).items())
    card = f"""---
license: creativeml-openrail-m
base_model: {base_model}
library_name: diffusers
tags:
{tags}
inference: true
---

<!-- Written by train_t2i_adapter_sdxl.py from what the run knew; check it and complete it before sharing. -->

# t2iadapter-{repo_id}

These are T2I-Adapter weights trained on {base_model} with a new type of conditioning.

{image_text}## Intended uses & limitations

#### How to use

```python
import torch
from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter
from diffusers.utils import load_image

adapter = T2IAdapter.from_pretrained("{repo_id}")
pipeline = StableDiffusionXLAdapterPipeline.from_pretrained("{base_model}", adapter=adapter)
pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
condition = load_image("condition.png")  # an image of the kind the adapter was trained on
image = pipeline("a prompt", image=condition, num_inference_steps=30).images[0]
image.save("generated.png")
```

#### Limitations and bias

The adapter follows conditions like those it was trained on, and inherits the limitations and biases of
{base_model} and of its training data.

## Training details

{details or "See the training run's logs."}
"""
    with open(os.path.join(repo_folder, "README.md"), "w") as f:
        f.write(card)


def hub_upload_arguments(repo_id, output_dir, hub_token):
    """What is sent to `huggingface_hub.upload_folder` at the end of training."""
    return {
        "repo_id": repo_id,
        "folder_path": output_dir,
        "commit_message": "End of training",
        "ignore_patterns": ["step_*", "epoch_*", LOCK_FILE, FINISHED_FILE],
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


def make_accelerator(args):
    """The Accelerator (processes, mixed precision, accumulation, trackers), and logging."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    # Formatted now: a handler that formats the record later may find the state reset (old accelerate fails then).
    logger.info(str(accelerator.state), main_process_only=False)
    return accelerator


@contextlib.contextmanager
def exclusive_output_dir(output_dir, accelerator):
    """--output_dir locked for the run (by the main process) and released however the run ends. A
    refusal on the main process stops every process, before anything is loaded."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(output_dir)
        except ValueError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise ValueError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            unlock_output_dir(lock, output_dir)


def find_resume_point(args, accelerator):
    """(checkpoint, this process's data state in it) to resume from, or (None, None) for a new run.
    Every file the resume reads is checked first: a damaged checkpoint is named before anything loads."""
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is None:
        if args.resume_from_checkpoint:
            accelerator.print("No checkpoint yet: starting a new training run.")
        return None, None
    problems = checkpoint_problems(resume_path, accelerator.process_index, read=True)
    if problems:
        raise ValueError(
            f"Cannot resume from {resume_path}: {'; '.join(problems)}. Resume from an earlier checkpoint with"
            " `--resume_from_checkpoint checkpoint-<step>`, or delete this one. (A checkpoint saved by fewer"
            " processes, or by an older version of this trainer, lacks data_state files.)"
        )
    return resume_path, load_data_state(resume_path, accelerator.process_index)


def run_identity(args, accelerator, resumed_data_state=None):
    """(seed, run id). The seed of the whole run (data order, per-sample randomness, noise): --seed;
    else the one the resumed checkpoint ran with, so that it replays the same order; else one the
    main process draws and gives to all (were each process to draw its own, each would shuffle
    differently and an epoch would give some samples to two processes and others to none). The run
    id marks the checkpoints this run writes, in this launch and in the launches that resume it."""
    resumed = resumed_data_state or {}
    drawn = [(random.SystemRandom().randrange(2**31), uuid.uuid4().hex) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn)
    drawn_seed, drawn_run = drawn[0]
    seed = args.seed if args.seed is not None else resumed.get("seed", drawn_seed)
    if seed == drawn_seed:
        logger.info(f"No --seed given: this run's seed is {seed} (pass --seed {seed} to repeat it).")
    return seed, resumed.get("run") or drawn_run


def set_up_models(components, args, accelerator):
    """Checkpoints that keep the adapter in diffusers format, attention kernels, memory options and
    compilation, then each frozen model on the device in the mixed-precision dtype, which is returned.
    SDXL's own VAE stays float32 because it overflows in fp16 (a replacement VAE, e.g. the fp16-fix
    one, follows the weight dtype)."""
    accelerator.register_save_state_pre_hook(partial(save_adapter_hook, accelerator=accelerator))
    accelerator.register_load_state_pre_hook(load_adapter_hook)
    unet, adapter = components["unet"], components["adapter"]
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        # diffusers 0.30 (older releases) checkpoints only modules in training mode, and a loaded UNet is in eval
        # mode: the flag would save nothing. SDXL's UNet has no dropout, so training mode changes no output.
        unet.train()
    if args.torch_compile:
        # In place, so state-dict keys and the save/load hooks are unchanged.
        unet.compile()
        adapter.compile()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path is not None else torch.float32
    components["vae"].to(accelerator.device, dtype=vae_dtype)
    for model in (unet, *components["text_encoders"]):
        model.to(accelerator.device, dtype=weight_dtype)
    return weight_dtype


def memory_check_message(planned_bytes, free_bytes, fitting):
    """None when a step's planned peak fits in the device's free memory; else why the run stops, with
    both figures and the flag changes planned to fit (`fitting`: [(flags, planned bytes)])."""
    if planned_bytes <= free_bytes:
        return None
    gib = 2**30
    message = (
        f"This run will not fit: a training step is planned to peak at {planned_bytes / gib:.1f} GiB of GPU memory,"
        f" and {free_bytes / gib:.1f} GiB are free on this GPU."
    )
    if fitting:
        message += " Planned to fit: " + "; ".join(f"{flags} ({planned / gib:.1f} GiB)" for flags, planned in fitting) + "."
    else:
        message += (
            " Nothing planned fits, not even --gradient_checkpointing with a batch of 1: use a GPU with more memory"
            " or a lower --resolution."
        )
    return message + (
        " The breakdown: `python scripts/plan_memory.py` with these flags. The plan leaves out the CUDA context"
        " and cuDNN's workspaces; pass --skip_memory_check to train anyway."
    )


def check_memory_fits(args, accelerator):
    """On CUDA, before any model loads, stop a run whose planned peak (scripts/plan_memory.py: a step
    of this trainer on fake tensors, no memory used) exceeds the GPU's free memory, naming the flags
    that would fit. Skipped on other devices and with --skip_memory_check."""
    if accelerator.device.type != "cuda" or args.skip_memory_check:
        return
    import importlib.util

    planner_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "plan_memory.py")
    if not os.path.isfile(planner_file):  # the trainer copied without its scripts/
        logger.warning(f"No memory check: {planner_file} is not there.")
        return
    spec = importlib.util.spec_from_file_location("plan_memory", planner_file)
    planner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planner)
    options = argparse.Namespace(**vars(args), size=None, device_type="cuda", measure=False)
    free_bytes = torch.cuda.mem_get_info(accelerator.device)[0]
    plan = planner.plan_memory(options)
    logger.info(f"Planned peak of a training step: {plan['peak'] / 2**30:.1f} GiB ({plan['peak_phase']});"
                f" {free_bytes / 2**30:.1f} GiB free on {accelerator.device}.")
    if plan["peak"] > free_bytes:
        logger.info("It will not fit: planning changes that would (each plan takes seconds to a minute).")
        message = memory_check_message(plan["peak"], free_bytes, planner.fitting_changes(options, free_bytes))
        raise MemoryError(message)


def latent_files_for(train_data, components, args, accelerator):
    """With --cache_latents, each row's cached latent file (encoded now where missing); else None."""
    if not args.cache_latents:
        return None
    latent_files = cache_latents(train_data[0], components["vae"], args, accelerator)
    if accelerator.device.type != "cpu":
        components["vae"].to("cpu")  # only validation decodes now: free its GPU memory in between
    return latent_files


def total_steps(args, batches_per_epoch):
    """--max_train_steps, or as many optimisation steps as --num_train_epochs take."""
    return args.max_train_steps or args.num_train_epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)


def learning_rate(args, num_processes):
    """--learning_rate, multiplied by accumulation × batch size × processes with --scale_lr."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes


def build_optimizer(params, args, lr, device):
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
        lr=lr,
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


def build_training(adapter, args, accelerator, max_train_steps):
    """(adapter, optimizer, LR schedule), wrapped by accelerate (DDP, DeepSpeed, mixed precision). The
    loader is not prepared (each process plans its own share), so DeepSpeed is told the per-GPU
    batch here."""
    num_processes = accelerator.num_processes
    optimizer = build_optimizer(adapter.parameters(), args, learning_rate(args, num_processes), accelerator.device)
    lr_scheduler = build_lr_scheduler(optimizer, args, max_train_steps, num_processes)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    return accelerator.prepare(adapter, optimizer, lr_scheduler)


def log_run_summary(args, accelerator, train_data, batches_per_epoch, max_train_steps, seed):
    dataset, sizes = train_data.dataset, train_data.sizes
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    if sizes is None:
        logger.info(f"  Streamed in windows of {args.shuffle_buffer_size} samples")
    else:
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        logger.info(f"  Num examples = {len(dataset)}")
        logger.info(f"  Num batches each epoch = {batches_per_epoch}")
        logger.info(f"  Num epochs = {math.ceil(max_train_steps / steps_per_epoch)}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (parallel, distributed, accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimisation steps = {max_train_steps}")
    logger.info(f"  Seed = {seed}")


class RunHooks:
    """Fixed points where a program that drives `main` may watch or change a run: scripts/benchmark.py
    times each step and emulates upstream through them (tests/test_benchmark.py runs both). The
    defaults are this trainer's own behaviour."""

    def check_samples(self, dataset, args):
        """(bad rows with their problems, each good row's image size), before training."""
        return recorded_scan_samples(dataset, args)

    def models_ready(self, components, train_data, args):
        """Called once, when the models are loaded and placed and the data is ready."""

    def encode_prompt(self, captions, components):
        return encode_prompt(captions, components["text_encoders"], components["tokenizers"])

    def training_loss(self, *loss_arguments):
        return adapter_training_loss(*loss_arguments)

    def step_done(self, step, step_loss):
        """Called after each optimisation step."""


def run_settings(args, num_processes, train_data):
    """The settings a resumed run must share with the run it continues to continue it exactly; saved
    in each checkpoint."""
    dataset, sizes = train_data.dataset, train_data.sizes
    return {
        "learning_rate": learning_rate(args, num_processes),
        "processes": num_processes,
        **{flag: getattr(args, flag) for flag in RESUME_SETTINGS},
        "dataset": dataset_location(args)[1],
        "dataset fingerprint": None if sizes is None else dataset._fingerprint,
    }


def apply_changed_settings(saved, current, optimizer, lr_scheduler):
    """A resumed run with other settings than its checkpoint's: a new learning rate is applied from
    here on (the schedule keeps its shape), and every other change is named in a warning, since the
    run no longer continues exactly as it would have."""
    changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if "learning_rate" in changed:
        old, new = changed.pop("learning_rate")
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * new / old
        lr_scheduler.scheduler.base_lrs = [base * new / old for base in lr_scheduler.scheduler.base_lrs]
        logger.warning(f"Applying the new learning rate: {old} → {new} (the schedule keeps its shape).")
    if changed:
        listing = "; ".join(f"{key} {old} → {new}" for key, (old, new) in changed.items())
        logger.warning(f"Resuming with changed settings, so the run does not continue exactly as it would have: {listing}.")


def resume_from(resume_path, data_state, accelerator, train_dataloader):
    """Restore the training state and the loader's position; returns the step to continue from."""
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    try:
        accelerator.load_state(resume_path)
    except Exception as error:
        raise ValueError(
            f"Could not resume from {resume_path}: {type(error).__name__}: {error}. The checkpoint may be damaged;"
            " resume from an earlier one with `--resume_from_checkpoint checkpoint-<step>`."
        ) from error
    train_dataloader.load_state_dict(data_state["loader"])
    return checkpoint_step(resume_path)


def batch_loss(batch, components, adapter, sigmas_by_timestep, args, weight_dtype, device, hooks):
    """Latents, text embeddings and micro-conditioning for one batch, then the adapter's loss."""
    vae = components["vae"]
    if "latent_mean" in batch:
        # The loader's batch is in host memory (it is not prepared): the cached distribution goes to the device.
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = sample_cached_latents(mean, std, vae.config.scaling_factor)
    else:
        latents = encode_latents(vae, batch["pixel_values"])
    captions = select_captions(batch["captions"], args.proportion_empty_prompts)
    prompt_embeds, pooled_embeds = hooks.encode_prompt(captions, components)
    time_ids = batch_time_ids(batch, args, device)
    return hooks.training_loss(
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


class StepLosses:
    """The running sum of an optimisation step's micro-batch losses, and how many steps were
    skipped for a non-finite loss."""

    def __init__(self, device):
        self.total, self.micro_steps, self.skipped = torch.zeros((), device=device), 0, 0

    def add(self, loss):
        self.total, self.micro_steps = self.total + loss.detach(), self.micro_steps + 1

    def step_mean(self, accelerator):
        """The step's loss: the mean over its micro-batches and over the processes; then a new sum."""
        mean = accelerator.reduce(self.total / self.micro_steps, reduction="mean").item()
        self.total, self.micro_steps = torch.zeros_like(self.total), 0
        return mean


def optimisation_step(loss, adapter, optimizer, lr_scheduler, accelerator, losses, global_step, args):
    """Backward for one micro-batch. On the last micro-batch of an optimisation step, the step's
    loss is checked before the update, gradients are clipped and the adapter updated. Returns the
    step's loss then, and None inside an accumulation (accelerate's optimizer skips those steps)."""
    accelerator.backward(loss)
    losses.add(loss)
    step_loss, update = None, True
    if accelerator.sync_gradients:
        step_loss = losses.step_mean(accelerator)
        update = check_step_loss(step_loss, global_step + 1, losses.skipped, args)
        losses.skipped += not update
        if update:
            accelerator.clip_grad_norm_(adapter.parameters(), args.max_grad_norm)
    if update:
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=args.set_grads_to_none)
    return step_loss


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a request to stop at the end of the current optimisation step,
    after a checkpoint, instead of dying in the middle of one (preemptible GPUs, Ctrl-C). A context
    manager: the previous handlers come back however the run ends."""

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

    def stop(self, accelerator, step, saved):
        """Say where the run stopped and what it `saved`, then exit with 128 + the signal's number."""
        self.restore()
        name = signal.Signals(self.received).name if self.received else "a signal on another process"
        logger.warning(f"Stopped by {name} at step {step}; saved {saved}. Resume with --resume_from_checkpoint latest.")
        accelerator.end_training()
        raise SystemExit(128 + (self.received or signal.SIGTERM))

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.restore()


def model_card_training_details(args, steps, num_processes, validation=None):
    """The run's settings worth stating on the model card, and its last validation's control scores."""
    details = {
        "data": args.dataset_name or args.train_data_dir,
        "conditioning": args.conditioning_type if args.conditioning_type != "image" else args.conditioning_image_column,
        "optimisation steps": steps,
        "resolution": f"{args.resolution}" + (" (aspect-ratio buckets)" if args.aspect_ratio_buckets else ""),
        "batch size": f"{args.train_batch_size} per device × {num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation steps",
        "learning rate": f"{learning_rate(args, num_processes)} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)",
        "mixed precision": args.mixed_precision or "accelerate's default",
    }
    if validation and validation["control"]:
        score = validation["control"]
        ranges = ", ".join(f"t in [{name.replace('-', ', ')}): {gain:.3f}" for name, gain in score["ranges"].items())
        source = validation_set_location(args)
        source = f"from {source[1]}" if source else "held out of training"
        details["conditioning gain"] = (
            f"{score['overall']:.3f} at step {validation['step']} ({ranges}), on {score['pairs']} pairs {source}:"
            f" 1 − loss with the true condition ({score['loss_true']:.5f}) / loss with another pair's condition"
            f" ({score['loss_shuffled']:.5f}), the training loss with the same noise and timesteps, one per pair in"
            " each quarter of the timesteps. 0: the condition is ignored."
        )
    if validation and validation["logs"] and "control_scores" in validation["logs"][0]:
        scores = [score for log in validation["logs"] for score in log["control_scores"]]
        metric = control_metric(args)
        how = "canny edges of the image against the condition" if metric == "canny" else "image and condition in grey"
        details[CONTROL_METRIC_KEYS[metric]] = f"{np.mean(scores):.3f} over {len(scores)} validation images ({how})"
    return details


def validate(components, adapter, args, accelerator, weight_dtype, step):
    """{"step", "control", "logs"} of a validation at `step`: the conditioning gain on the validation
    pairs and the images of the validation prompts, each None when not asked for; None for neither."""
    control = measure_control(components, adapter, args, accelerator, weight_dtype, step)
    logs = None
    if args.validation_prompt is not None:
        logs = run_validation(components, adapter, args, accelerator, weight_dtype, step)
    return None if control is None and logs is None else {"step": step, "control": control, "logs": logs}


def report_step(step, step_loss, lr_scheduler, progress_bar, accelerator, hooks):
    """The step's loss and LR to the progress bar, the trackers and the hooks."""
    logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
    progress_bar.update(1)
    progress_bar.set_postfix(**logs)
    accelerator.log(logs, step=step)
    hooks.step_done(step, step_loss)


def create_hub_repo(args, accelerator):
    """The private Hub repository the adapter goes to (created at the start, as upstream), or None."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    repo_name = args.hub_model_id or Path(args.output_dir).name
    return create_repo(repo_id=repo_name, exist_ok=True, token=args.hub_token, private=True).repo_id


def finish_training(accelerator, adapter, components, args, weight_dtype, global_step, validation, repo_id, preemption):
    """The adapter in diffusers format, the final validation (unless this step was just validated),
    the model card and the Hub upload. The adapter is saved first, and the stop-signal handler is
    still on: a signal in this phase skips the validation and the upload, never the save."""
    if not accelerator.is_main_process:
        return
    accelerator.unwrap_model(adapter).save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, FINISHED_FILE), "w") as f:  # a requeue finds the run complete
        json.dump({"step": global_step}, f)
    logger.info(f"Saved the adapter to {args.output_dir}")
    if preemption.received is None and (validation is None or validation["step"] != global_step):
        validation = validate(components, adapter, args, accelerator, weight_dtype, global_step)
    logs = validation["logs"] if validation else None
    details = model_card_training_details(args, global_step, accelerator.num_processes, validation)
    save_model_card(
        repo_id or Path(args.output_dir).name, logs, args.pretrained_model_name_or_path, args.output_dir, details
    )
    if args.push_to_hub and preemption.received is not None:
        logger.warning(f"Not uploaded to {repo_id}: the run was stopped. Upload {args.output_dir} with `hf upload`.")
    elif args.push_to_hub:
        upload_folder(**hub_upload_arguments(repo_id, args.output_dir, args.hub_token))


def training_run(args, adapter_config, accelerator, hooks):
    """The run itself, from data loading to the final save; returns the last optimisation step."""
    finished = finished_step(args.output_dir)
    if args.resume_from_checkpoint and finished is not None and finished >= (args.max_train_steps or 0):
        logger.info(f"The run is complete: it finished at step {finished}. Nothing to train; the adapter in"
                    f" {args.output_dir} is left as it is.")
        return finished
    resume_path, resumed_data_state = find_resume_point(args, accelerator)
    seed, run = run_identity(args, accelerator, resumed_data_state)
    set_seed(seed, device_specific=True)  # each process its own noise; DDP keeps the adapters in step
    with accelerator.main_process_first():  # data first: a bad column fails before any model loads
        train_data = load_training_data(args, seed, hooks.check_samples)
    repo_id = create_hub_repo(args, accelerator)

    check_memory_fits(args, accelerator)
    components = load_models(args, adapter_config)
    weight_dtype = set_up_models(components, args, accelerator)
    sigmas_by_timestep = sigma_table(components["noise_scheduler"]).to(accelerator.device)
    components["control_pairs"] = control_pairs_for(train_data, components, args, accelerator)
    train_dataloader, batches_per_epoch = make_train_dataloader(
        train_data, args, seed, accelerator.process_index, accelerator.num_processes,
        adapter_total_downscale(adapter_config), latent_files_for(train_data, components, args, accelerator),
    )
    max_train_steps = total_steps(args, batches_per_epoch)
    adapter, optimizer, lr_scheduler = build_training(components["adapter"], args, accelerator, max_train_steps)
    hooks.models_ready(components, train_data, args)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    log_run_summary(args, accelerator, train_data, batches_per_epoch, max_train_steps, seed)

    global_step = 0
    settings = run_settings(args, accelerator.num_processes, train_data)
    if resume_path is not None:
        global_step = resume_from(resume_path, resumed_data_state, accelerator, train_dataloader)
        if "settings" in resumed_data_state:  # not in checkpoints of earlier versions
            apply_changed_settings(resumed_data_state["settings"], settings, optimizer, lr_scheduler)
    progress_bar = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    if global_step == 0 and accelerator.is_main_process:  # the curve starts from the untrained adapter
        measure_control(components, adapter, args, accelerator, weight_dtype, 0)
    validation, losses = None, StepLosses(accelerator.device)
    with PreemptionHandler() as preemption:
        # A run resumed at its last step (stopped before its final save) only finishes.
        for batch in train_dataloader if global_step < max_train_steps else ():
            with accelerator.accumulate(adapter):
                loss = batch_loss(
                    batch, components, adapter, sigmas_by_timestep, args, weight_dtype, accelerator.device, hooks
                )
                step_loss = optimisation_step(
                    loss, adapter, optimizer, lr_scheduler, accelerator, losses, global_step, args
                )
            if step_loss is None:  # inside a gradient accumulation
                continue
            global_step += 1
            report_step(global_step, step_loss, lr_scheduler, progress_bar, accelerator, hooks)
            stopping = preemption.requested(accelerator)
            if global_step % args.checkpointing_steps == 0 or stopping:
                data_state = {"seed": seed, "run": run, "settings": settings, "loader": train_dataloader.state_dict()}
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, data_state)
            if global_step % args.validation_steps == 0 and accelerator.is_main_process and not stopping:
                validation = validate(components, adapter, args, accelerator, weight_dtype, global_step) or validation
            if stopping:
                preemption.stop(accelerator, global_step, os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            if global_step >= max_train_steps:
                break
        if losses.skipped:
            logger.warning(f"Skipped {losses.skipped} optimisation step(s) with a non-finite loss.")

        accelerator.wait_for_everyone()
        finish_training(
            accelerator, adapter, components, args, weight_dtype, global_step, validation, repo_id, preemption
        )
        if preemption.received is not None:  # during the final phase, after the adapter was saved
            preemption.stop(accelerator, global_step, f"the adapter in {args.output_dir}")
    accelerator.end_training()
    return global_step


def main(args, hooks=None):
    adapter_config = check_inputs(args)
    accelerator = make_accelerator(args)
    with exclusive_output_dir(args.output_dir, accelerator):
        return training_run(args, adapter_config, accelerator, hooks or RunHooks())


if __name__ == "__main__":
    main(parse_args())
