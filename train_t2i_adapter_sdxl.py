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
import dataclasses
import functools
import logging
import math
import os
import random
import sys
import typing
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLAdapterPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from diffusers.utils.import_utils import is_xformers_available
from huggingface_hub import create_repo, upload_folder
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import AutoTokenizer

try:  # the machinery behind the training story, in the package beside this script
    from t2i_train import (
        configs,
        control,
        data,
        ema,
        geometry,
        images,
        lifecycle,
        loader,
        memory,
        recipes,
        sample_grid,
        stopping,
        trackers,
    )
    from t2i_train.stopping import Refusal
except ModuleNotFoundError as error:
    if error.name != "t2i_train":
        raise
    raise SystemExit("train_t2i_adapter_sdxl.py needs the t2i_train/ package beside it: copy it with the script.") from None

logger = get_logger(__name__)
# Library noise that says nothing about a run: diffusers' "should be kept in float32: []" (no module is)
# at every `.to(dtype)`, and torchdata's deprecation of the torch.set_vital it calls itself.
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "kept in float32: []" not in record.getMessage()
)
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

SDXL_DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
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
SCHEDULES_WITHOUT_WARMUP = ("constant", "piecewise_constant")  # diffusers' get_scheduler ignores the warm-up
TIMESTEP_SAMPLINGS = ("cubic", "uniform", "logit_normal")
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
    parser.add_argument(
        "--config",
        default=None,
        help="A YAML or TOML file of flags (keys are flag names, e.g. learning_rate: 1e-5), read as if given first:"
        " the command line overrides it. Each run writes what it resolved to --output_dir/training_config.yaml.",
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
        "--vae_precision",
        choices=["fp32", "bf16"],
        default=None,
        help="The dtype the VAE encodes (and validation decodes) in. Default: upstream's, float32 for the base"
        " model's VAE (SDXL's overflows in fp16) and the mixed-precision dtype for --pretrained_vae_model_name_or_path."
        " bf16 has float32's range and runs at the GPU's 16-bit rate; see the README for how far its latents are.",
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
    group = parser.add_argument_group("What the loss sees (additions to upstream)")
    group.add_argument(
        "--timestep_sampling",
        choices=TIMESTEP_SAMPLINGS,
        default="cubic",
        help="How training draws timesteps: cubic (upstream's and the paper's: t = (1 - u³)·T, favouring noisy"
        " ones), uniform, or logit_normal (t = sigmoid(n)·T, n ~ N(--logit_mean, --logit_std), as SD3 trains).",
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of --timestep_sampling logit_normal's n.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std of --timestep_sampling logit_normal's n.")
    group.add_argument(
        "--min_timestep",
        type=int,
        default=0,
        help="Draw timesteps from [--min_timestep, --max_timestep) only; e.g. 500 and 1000 train on the noisier"
        " half alone, as the T2I-Adapter authors advise for adapters that do not learn.",
    )
    group.add_argument(
        "--max_timestep", type=int, default=None, help="One past the last timestep drawn; default: the scheduler's T."
    )
    group.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR-γ loss weighting (Hang et al. 2023; 5 is the paper's choice): each sample's x₀ error is"
        " weighted by min(SNR, γ) instead of SNR = σ⁻², for every prediction type. Default: off, upstream's loss.",
    )
    group.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the adapter's weights: it is what the run exports and scores"
        " (the raw weights are validated too, as a second curve, and kept in the checkpoints).",
    )
    group.add_argument("--ema_decay", type=float, default=0.9999,
                       help="The EMA's decay, reached after a warm-up of (1 + n) / (10 + n) at its n-th update.")
    group.add_argument("--ema_update_every", type=int, default=1, help="Update the EMA every this many steps.")
    group.add_argument("--ema_on_cpu", action="store_true",
                       help="Keep the EMA in CPU memory (for small GPUs): each update copies the weights there.")
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
        "--latent_cache_crops",
        choices=["exact", "latent_grid"],
        default="exact",
        help="With --cache_latents --random_crop: 'exact' caches --latent_cache_crop_positions crops of each image,"
        " spread evenly over its room to crop and each encoded as it would be without the cache, and each step takes"
        " one of them; 'latent_grid' encodes the whole image once and cuts any crop on the 8-pixel latent grid from"
        " its latents, which is not the crop's encoding (the VAE's norms and attention see the whole image; README).",
    )
    group.add_argument(
        "--latent_cache_crop_positions",
        type=int,
        default=8,
        help="How many crops of each image --latent_cache_crops exact caches (and encodes).",
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
        "--dump_samples",
        type=int,
        default=0,
        help="Draw the first N training pairs, transformed as training takes them (image, condition, caption, target"
        " size, crop), as one grid in --output_dir (training_samples.png, listed in training_samples.json) before"
        " any model loads, and log it to the trackers before step 1.",
    )
    group.add_argument(
        "--validation_pairs",
        type=int,
        default=None,
        help="Pairs on which each validation measures the conditioning gain (see README): taken from"
        " --validation_data_dir/--validation_dataset_name when given (default: up to"
        f" {data.DEFAULT_VALIDATION_PAIRS}), otherwise held out of the training data (a fixed subset drawn from the"
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
        choices=control.CONTROL_METRICS,
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


def control_metric(args):
    """The --control_metric in effect: by default canny edges for canny adapters, nothing otherwise."""
    if args.control_metric is not None:
        return args.control_metric
    return "canny" if args.conditioning_type == "canny" else "none"


def check_args(args):
    """Checks on the flags alone; each error names the flag and its value."""
    if args.dataset_name is None and args.train_data_dir is None:
        raise Refusal("Specify either `--dataset_name` or `--train_data_dir`.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise Refusal(
            f"Specify only one of `--dataset_name` ({args.dataset_name!r}) or `--train_data_dir` ({args.train_data_dir!r})."
        )
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise Refusal(f"`--proportion_empty_prompts` must be in [0, 1], got {args.proportion_empty_prompts}.")
    if args.validation_prompt is not None and args.validation_image is None:
        raise Refusal("`--validation_image` must be set if `--validation_prompt` is set.")
    if args.validation_prompt is None and args.validation_image is not None:
        raise Refusal("`--validation_prompt` must be set if `--validation_image` is set.")
    if args.validation_prompt is not None:
        images.pair_validation_inputs(args.validation_prompt, args.validation_image)
    if not 0 < args.resolution <= MAX_RESOLUTION:
        raise Refusal(f"`--resolution` must be in 1..{MAX_RESOLUTION}, got {args.resolution}.")
    if not args.learning_rate > 0:
        raise Refusal(f"`--learning_rate` must be above 0, got {args.learning_rate}.")
    if args.resolution % 8 != 0:
        raise Refusal(
            f"`--resolution` must be divisible by 8 so that VAE latents and adapter features line up, got {args.resolution}."
        )
    if args.logit_std <= 0:
        raise Refusal(f"`--logit_std` must be above 0, got {args.logit_std}.")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise Refusal(f"`--snr_gamma` must be above 0, got {args.snr_gamma}.")
    if not 0 < args.ema_decay < 1:
        raise Refusal(f"`--ema_decay` must be between 0 and 1, got {args.ema_decay}.")
    if args.detection_resolution is not None and args.detection_resolution <= 0:
        raise Refusal(f"`--detection_resolution` must be positive, got {args.detection_resolution}.")
    for flag in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
        "num_validation_images",
        "num_train_epochs",
        "ema_update_every",
    ):
        if getattr(args, flag) < 1:
            raise Refusal(f"`--{flag}` must be at least 1, got {getattr(args, flag)}.")
    for flag in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise Refusal(f"`--{flag}` must be at least 1, got {getattr(args, flag)}.")
    if args.skip_nonfinite_steps < 0:
        raise Refusal(f"`--skip_nonfinite_steps` must be at least 0, got {args.skip_nonfinite_steps}.")
    if args.dataloader_num_workers < 0:
        raise Refusal(f"`--dataloader_num_workers` must be at least 0, got {args.dataloader_num_workers}.")
    if args.shuffle_buffer_size < 1:
        raise Refusal(f"`--shuffle_buffer_size` must be at least 1, got {args.shuffle_buffer_size}.")
    if args.streaming and args.max_train_steps is None:
        raise Refusal("`--streaming` needs `--max_train_steps`: a stream's length is not known in advance.")
    if args.dump_samples < 0:
        raise Refusal(f"`--dump_samples` must be 0 (none) or more, got {args.dump_samples}.")
    if args.streaming and args.dump_samples:
        raise Refusal("`--dump_samples` draws pairs of a dataset loaded whole; a stream is read by its workers only.")
    if args.streaming and args.max_train_samples is not None:
        raise Refusal("`--max_train_samples` cannot be used with `--streaming`; bound the run with `--max_train_steps`.")
    if args.latent_cache_crop_positions < 1:
        raise Refusal(f"`--latent_cache_crop_positions` must be at least 1, got {args.latent_cache_crop_positions}.")
    cache_conflicts = loader.latent_cache_conflicts(args)
    if args.cache_latents and cache_conflicts:
        raise Refusal(
            f"`--cache_latents` cannot be combined with {', '.join(cache_conflicts)}: a stream is read once, so there"
            " is nothing to cache."
        )
    if args.validation_data_dir is not None and args.validation_dataset_name is not None:
        raise Refusal("Specify only one of `--validation_data_dir` or `--validation_dataset_name`.")
    if args.validation_pairs is not None and args.validation_pairs < 2:
        raise Refusal(
            f"`--validation_pairs` must be at least 2 (the gain compares each pair's condition with another pair's),"
            f" got {args.validation_pairs}."
        )
    if args.streaming and args.validation_pairs and data.validation_set_location(args) is None:
        raise Refusal(
            "`--validation_pairs` holds pairs out of a dataset loaded whole; with `--streaming`, give the pairs as"
            " `--validation_data_dir` or `--validation_dataset_name`."
        )
    if args.control_metric not in (None, "none") and args.validation_prompt is None:
        raise Refusal(
            f"`--control_metric {args.control_metric}` scores the generated validation images: give"
            " `--validation_prompt` and `--validation_image` too."
        )
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise Refusal(f"`--lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}, got {args.lr_scheduler!r}.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise Refusal(
            f"`--report_to {args.report_to}` with `--hub_token` would expose the token to the tracker."
            " Log in with `huggingface-cli login` instead and drop `--hub_token`."
        )


def parse_args(input_args=None):
    """Parse the command line (or `input_args`), after the flags of its --config file, and run every check that
    needs no file."""
    parser = build_parser()
    args = parser.parse_args(recipes.argv_with_recipe(parser, sys.argv[1:] if input_args is None else input_args))
    check_args(args)
    return args


def uses_micro_conditioning(args):
    """Whether the UNet gets each sample's real size and crop. Buckets imply it: a bucket's crop is
    only meaningful to the UNet with the real sizes."""
    return args.micro_conditioning or args.aspect_ratio_buckets


# ------------------------------------------------------------------------------------------
# Input checks: files and model configs, before anything expensive is loaded
# ------------------------------------------------------------------------------------------


class TimestepSampling(typing.NamedTuple):
    """How training draws timesteps (--timestep_sampling over [--min_timestep, --max_timestep))."""

    kind: str = "cubic"
    low: int = 0
    high: typing.Optional[int] = None  # one past the last; None: the scheduler's T
    logit_mean: float = 0.0
    logit_std: float = 1.0

    @classmethod
    def from_args(cls, args, num_train_timesteps):
        high = num_train_timesteps if args.max_timestep is None else args.max_timestep
        if not 0 <= args.min_timestep < high <= num_train_timesteps:
            raise Refusal(f"`--min_timestep` {args.min_timestep} and `--max_timestep` {high} must satisfy"
                          f" 0 <= min < max <= {num_train_timesteps} (the scheduler's timesteps).")
        return cls(args.timestep_sampling, args.min_timestep, high, args.logit_mean, args.logit_std)


def check_inputs(args):
    """Every check that reads files or configs but loads no weights, run before any model or data loads.

    Returns the adapter config that training will use, so the same derivation is not repeated.
    """
    for flag in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "adapter_model_name_or_path"):
        configs.check_model_location(f"--{flag}", getattr(args, flag))
    configs.check_model_location("--tokenizer_name", args.tokenizer_name)
    for flag in ("train_data_dir", "validation_data_dir"):
        if getattr(args, flag) is not None and not os.path.isdir(getattr(args, flag)):
            raise Refusal(f"`--{flag}` {getattr(args, flag)!r} is not an existing folder.")
    for path in args.validation_image or []:
        images.check_image_file("--validation_image", path)
    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            raise Refusal("`--enable_xformers_memory_efficient_attention` needs xformers: `pip install xformers`.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401  (optional: only --use_8bit_adam needs it)
        except ImportError:
            raise Refusal("`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes`.") from None

    base, base_flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
    unet_config = configs.load_model_config(UNet2DConditionModel, base, "unet", args, base_flag)
    if args.pretrained_vae_model_name_or_path is None:
        vae_config = configs.load_model_config(AutoencoderKL, base, "vae", args, base_flag)
    else:
        vae_config = configs.load_model_config(
            AutoencoderKL, args.pretrained_vae_model_name_or_path, None, args, "--pretrained_vae_model_name_or_path"
        )
    if args.adapter_model_name_or_path is None:
        adapter_config = configs.derive_adapter_config(unet_config, vae_config)
    else:
        adapter_config = configs.load_model_config(
            T2IAdapter, args.adapter_model_name_or_path, None, args, "--adapter_model_name_or_path"
        )
    configs.check_adapter_fits(adapter_config, unet_config, vae_config, args.resolution)
    scheduler_config = EulerDiscreteScheduler.load_config(base, subfolder="scheduler", revision=args.revision,
                                                          cache_dir=args.cache_dir)
    TimestepSampling.from_args(args, scheduler_config["num_train_timesteps"])  # refuses a range outside [0, T)
    return adapter_config


# ------------------------------------------------------------------------------------------
# Data: loading, and checking every sample
# ------------------------------------------------------------------------------------------
# One path for every mode. The training split is loaded whole or streamed, and every sample is
# checked before it is trained on. Each epoch is planned ahead from the run's seed in total batches
# (one per optimisation step, split among the processes and accumulation steps), each sample with a
# seed of its own for every random draw of its training: crop, flip, canny thresholds and caption
# here, timestep and noise in the loss. So the adapter depends on the total batch only, not on how
# many processes carry it, and one transform serves plain centre crops (pixel-equal to upstream's),
# buckets, random crops and flips and on-the-fly canny. The data position is saved in every
# checkpoint: a resumed run continues exactly where it stopped, on any number of processes.


# ------------------------------------------------------------------------------------------
# The transform: one for every mode, image and condition placed alike
# ------------------------------------------------------------------------------------------

def condition_at_image_size(condition, image_size, detection_resolution=None):
    """The condition brought to its image's (width, height), so that one placement fits both:
    conditions are often stored at another size (depth maps at half size). With a detection
    resolution it first passes through the detector's working size (shorter side), as if a
    detector had made it there."""
    if detection_resolution is not None:
        width, height = image_size
        working_height, working_width = geometry.cover_size(height, width, detection_resolution, detection_resolution)
        condition = condition.resize((working_width, working_height), Image.BILINEAR)
    return condition if condition.size == tuple(image_size) else condition.resize(image_size, Image.BILINEAR)


def choose_caption(caption, proportion_empty_prompts, rng=None):
    """A sample's caption: in training (with the sample's `rng`) a random one of a list, and the empty
    prompt with probability `proportion_empty_prompts`; without an rng (validation) the first."""
    if not (isinstance(caption, str) or (isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0)):
        raise Refusal(f"A caption must be a string or a non-empty list of strings, got {caption!r}.")
    if rng is not None and rng.random() < proportion_empty_prompts:
        return ""
    if isinstance(caption, str):
        return caption
    return caption[rng.randrange(len(caption))] if rng is not None else caption[0]


class PairTransform:
    """The one transform: a stored sample to training tensors at a target size, with the sample's
    own RNG (which also picks its caption). Image and condition are placed identically (pixel for
    pixel); with --conditioning_type canny the condition is the edge map of the final crop; with
    cached latents the crop lies on the latent grid and the image is not decoded (only its size is read)
    unless canny needs its pixels. The seed goes on with the sample, for its noise."""

    def __init__(self, args, augment=True):  # args: the run's data.DataConfig
        self.image_column = args.image_column
        self.conditioning_image_column = args.conditioning_image_column
        self.caption_column = args.caption_column
        self.conditioning_type = args.conditioning_type
        self.detection_resolution = args.detection_resolution
        self.random_crop = args.random_crop and augment  # off for validation pairs: always the centre crop
        self.random_flip = args.random_flip and augment
        self.augment, self.proportion_empty_prompts = augment, args.proportion_empty_prompts
        self.cache_crops = args.latent_cache_crops if self.random_crop else None  # how cached latents are cropped
        self.crop_positions = args.latent_cache_crop_positions

    def __call__(self, sample, target_size, seed, cached_latents=None):
        rng = random.Random(seed)
        if cached_latents is None or self.conditioning_type == "canny":
            image = images.load_upright_rgb(sample[self.image_column])
            width, height = image.size
        else:
            with images.open_stored_image(sample[self.image_column]) as opened:
                width, height = images.upright_size(opened)
        grid, positions = 1, None
        if cached_latents is not None:
            grid, positions = geometry.LATENT_GRID, self.crop_positions if self.cache_crops == "exact" else None
        placement = geometry.draw_placement(height, width, target_size, rng, self.random_crop, self.random_flip, grid, positions)
        pair = {
            "original_sizes": torch.tensor((height, width)),
            "crop_top_lefts": torch.tensor(placement.crop_top_left()),
        }
        if cached_latents is None:
            image = placement.apply(image)
            pair["pixel_values"] = geometry.to_training_pixels(image)
        else:
            pair["latent_mean"], pair["latent_std"] = geometry.cached_crop(cached_latents, placement, self.cache_crops)
            if self.conditioning_type == "canny":
                image = placement.apply(image)
        if self.conditioning_type == "canny":
            condition = images.canny_condition(image, *images.random_canny_thresholds(rng))
        else:
            condition = images.load_upright_rgb(sample[self.conditioning_image_column])
            condition = placement.apply(condition_at_image_size(condition, (width, height), self.detection_resolution))
        pair["conditioning_pixel_values"] = transforms.functional.to_tensor(condition)
        pair["captions"] = choose_caption(sample[self.caption_column], self.proportion_empty_prompts,
                                          rng if self.augment else None)
        pair["seed"] = seed
        return pair


# ------------------------------------------------------------------------------------------
# Text embeddings (SDXL: two CLIP encoders, penultimate hidden states, pooled embedding)
# ------------------------------------------------------------------------------------------


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


def vae_dtype_for(args, weight_dtype):
    """--vae_precision, or upstream's rule: SDXL's own VAE in float32, as it overflows in fp16; a replacement
    VAE (e.g. the fp16-fix one) in the weight dtype."""
    if args.vae_precision is not None:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.vae_precision]
    return weight_dtype if args.pretrained_vae_model_name_or_path is not None else torch.float32


def text_encoder_class(location, subfolder, args):
    """The transformers class named in a text encoder's config."""
    config = transformers.AutoConfig.from_pretrained(
        location, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir
    )
    name = config.architectures[0]
    if name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise Refusal(f"Text encoder class {name} in {location}/{subfolder} is not supported.")
    return getattr(transformers, name)


def load_tokenizers(args):
    """The two CLIP tokenizers: from --tokenizer_name when given, else from the base model."""
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
        raise Refusal("The noise scheduler does not cover every training timestep.")
    return table


@dataclasses.dataclass
class Models:
    """The run's models: the frozen SDXL parts and the adapter that trains."""

    noise_scheduler: typing.Any
    tokenizers: list
    text_encoders: list
    vae: typing.Any
    unet: typing.Any
    adapter: typing.Any

    @functools.cached_property
    def sigmas_by_timestep(self):
        """The scheduler's σ table (sigma_table), built once for the loss, the loop and the gain."""
        return sigma_table(self.noise_scheduler)


def load_models(args, adapter_config, resume_path=None, tokenizers=None):
    """The components by name: scheduler, tokenizers (`load_tokenizers`' unless given), text encoders, VAE,
    UNet and the adapter, all frozen but the adapter (whose weights come from `resume_path`'s checkpoint
    when resuming)."""
    base = args.pretrained_model_name_or_path
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    noise_scheduler = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **hub)
    tokenizers = tokenizers or load_tokenizers(args)
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
        stored = configs.safetensors_dtypes(location) - {"F32"} if os.path.isdir(location) else set()
        if stored:
            logger.info(f"The adapter in {location} is stored in {'/'.join(sorted(stored))}; it trains in float32.")
        adapter = T2IAdapter.from_pretrained(location, torch_dtype=torch.float32, cache_dir=args.cache_dir)
    else:
        if resume_path is None:
            logger.info(f"Initialising a new adapter: {adapter_config}.")
        adapter = T2IAdapter(**adapter_config)

    # Only the adapter trains. Upstream leaves the UNet trainable, which costs a full backward
    # through its weights and ~10 GB of unused gradients at SDXL size.
    for model in (*text_encoders, vae, unet):
        model.requires_grad_(False)
    adapter.train()
    return Models(noise_scheduler, tokenizers, text_encoders, vae, unet, adapter)


# ------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------


def sample_timesteps(batch_size, num_train_timesteps, device=None, generator=None, sampling=TimestepSampling()):
    """Timesteps in [low, high) by `sampling`; by default cubic over all of them (T2I-Adapter paper §3.4:
    t = (1 - u³)·T favours early, noisy timesteps), as upstream draws them."""
    low, high = sampling.low, sampling.high or num_train_timesteps
    if sampling.kind == "logit_normal":
        normal = torch.randn((batch_size,), device=device, generator=generator)
        fraction = torch.sigmoid(sampling.logit_mean + sampling.logit_std * normal)
    else:
        u = torch.rand((batch_size,), device=device, generator=generator)
        fraction = 1 - u**3 if sampling.kind == "cubic" else u
    timesteps = (low + fraction * (high - low)).long()
    return timesteps.clamp(low, high - 1)


def draw_sample_noise(seeds, latent_shape, num_train_timesteps, sampling=TimestepSampling()):
    """(timesteps, posterior noise, noise) of a batch, each sample's from its own seed in the plan, so
    that a sample is noised alike whichever process, micro-batch or device trains it: its timestep, the
    standard-normal draw of its VAE latent sample, and the noise added to its latents. Drawn on the
    CPU, one small generator per sample."""
    timesteps, posterior_noise, noise = [], [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        timesteps.append(sample_timesteps(1, num_train_timesteps, generator=generator, sampling=sampling))
        posterior_noise.append(torch.randn(latent_shape, generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
    return torch.cat(timesteps), torch.stack(posterior_noise), torch.stack(noise)


def predict_clean_latents(model_pred, noisy_latents, sigmas, prediction_type):
    """x₀ estimated from the UNet's output, for the Euler (σ) parameterisation."""
    if prediction_type == "epsilon":
        return noisy_latents - sigmas * model_pred
    if prediction_type == "v_prediction":
        # Upstream uses the epsilon formula here and a velocity target: wrong (defect 16).
        return noisy_latents / (sigmas**2 + 1) - sigmas / (sigmas**2 + 1) ** 0.5 * model_pred
    if prediction_type == "sample":
        return model_pred
    raise Refusal(f"Unknown prediction type {prediction_type!r}.")


def weighted_denoising_loss(denoised, target, sigmas, snr_gamma=None):
    """mean over the batch of the per-sample mean of SNR·(x̂₀ − x₀)², SNR = σ⁻², in float32: for ε-prediction
    the ε error itself. With `snr_gamma`, min(SNR, γ) instead (min-SNR-γ): the weight of ε's error becomes
    min(SNR, γ)/SNR and of v's min(SNR, γ)/(SNR + 1), the paper's, since both are this x₀ error."""
    weighting = sigmas.float() ** -2.0
    if snr_gamma is not None:
        weighting = weighting.clamp(max=snr_gamma)
    per_sample = (weighting * (denoised.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    return per_sample.mean()


def adapter_training_loss(
    unet, adapter, latents, conditioning_pixel_values, prompt_embeds, added_cond_kwargs, sigmas_by_timestep,
    prediction_type, weight_dtype, noise=None, timesteps=None, snr_gamma=None,
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
    return weighted_denoising_loss(denoised, latents, sigmas, snr_gamma)


@torch.no_grad()
def encode_latent_distribution(vae, pixel_values, chunk_size=8):
    """(mean, std) of the VAE's latent distribution, at most `chunk_size` images at a time to bound memory."""
    pixel_values = pixel_values.to(vae.device, dtype=vae.dtype)
    distributions = [vae.encode(chunk).latent_dist for chunk in pixel_values.split(chunk_size)]
    return torch.cat([d.mean for d in distributions]), torch.cat([d.std for d in distributions])


def sample_latents(mean, std, posterior_noise, scaling_factor):
    """The scaled latent sample `vae.encode(x).latent_dist.sample() * scaling_factor` makes, with its
    standard-normal draw given: for freshly encoded and cached distributions alike."""
    return (mean.float().contiguous() + std.float() * posterior_noise.to(mean.device)) * scaling_factor


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


# The conditioning gain: how much the adapter's true condition lowers the training loss against
# another pair's condition, on pairs never trained on, with noise and timesteps that are the same at
# every validation (so that the curve moves only with the adapter). Forward passes only.


def control_pair_batch(rows, args):  # args: a data.DataConfig
    """Rows of a dataset as one batch of the trainer's tensors: centre crops at --resolution, never
    augmented; each pair's canny thresholds (--conditioning_type canny) drawn from its index."""
    rows = data.undecoded_images(rows, args)
    transform = PairTransform(args, augment=False)
    return loader.collate_fn([transform(rows[index], (args.resolution, args.resolution), index) for index in range(len(rows))])


@contextlib.contextmanager
def global_rngs_kept():
    """The global RNGs as they were when the block began: what runs inside (validation, the gain's pairs)
    never changes the draws training makes."""
    states = stopping.global_rng_states()
    try:
        yield
    finally:
        stopping.restore_global_rng_states(states)


@torch.no_grad()
def prepare_control_pairs(batch, components, args, device, seed=control.CONTROL_SCORE_SEED):
    """ControlPairs on `device`: latents (a posterior sample drawn from `seed`), conditions, the first
    caption's embeddings and the micro-conditioning. The global RNGs are left as they were."""
    vae = components.vae
    mean, std = encode_latent_distribution(vae, batch["pixel_values"])
    posterior_noise = torch.randn(mean.shape, generator=torch.Generator(vae.device).manual_seed(seed), device=vae.device,
                                  dtype=mean.dtype)
    latents = sample_latents(mean, std, posterior_noise, vae.config.scaling_factor)
    prompt_embeds, pooled_embeds = encode_prompt(batch["captions"], components.text_encoders, components.tokenizers)
    return control.ControlPairs(
        latents.float().to(device), batch["conditioning_pixel_values"].to(device), prompt_embeds.to(device),
        pooled_embeds.to(device), batch_time_ids(batch, args, device),
    )


def control_pairs_for(train_data, components, args, data_config, accelerator):
    """The validation pairs, prepared on the main process (which alone validates); None without them.
    Called while the VAE is still on the device (--cache_latents moves it off afterwards)."""
    if train_data.control_pairs is None or not accelerator.is_main_process:
        return None
    batch = control_pair_batch(train_data.control_pairs, data_config)
    return prepare_control_pairs(batch, components, args, accelerator.device)


WHOSE = {"validation": "", "validation_raw": " of the raw weights"}  # the EMA's is the run's own


def validated_adapters(adapter, averaged, device):
    """(prefix, adapter) pairs to validate: the adapter, or with --use_ema its EMA (what the run exports)
    and then the raw weights, as a second curve."""
    if averaged is None:
        return [("validation", adapter)]
    return [("validation", ema.on_device(averaged, device)), ("validation_raw", adapter)]


def pair_loss(unet, adapter, sigmas_by_timestep, prediction_type, weight_dtype):
    """The training loss of given pairs, noise and timesteps with these models: what the conditioning
    gain (control.conditioning_gain) compares."""
    return partial(adapter_training_loss, unet, adapter, sigmas_by_timestep=sigmas_by_timestep,
                   prediction_type=prediction_type, weight_dtype=weight_dtype)


def measure_control(components, adapter, pairs, args, accelerator, weight_dtype, step, prefix="validation"):
    """The conditioning gain on the validation `pairs` (ControlPairs) at `step`, logged to every tracker
    under `prefix`; None without pairs."""
    if pairs is None:
        return None
    scheduler = components.noise_scheduler
    loss = pair_loss(components.unet, accelerator.unwrap_model(adapter), components.sigmas_by_timestep,
                     scheduler.config.prediction_type, weight_dtype)
    score = control.conditioning_gain(loss, pairs, scheduler.config.num_train_timesteps, args.train_batch_size)
    logs = {
        f"{prefix}/conditioning_gain": score["overall"],
        f"{prefix}/loss_true_condition": score["loss_true"],
        f"{prefix}/loss_shuffled_condition": score["loss_shuffled"],
    }
    logs.update({f"{prefix}/conditioning_gain_t{name.replace('-', '_')}": gain for name, gain in score["ranges"].items()})
    accelerator.log(logs, step=step)
    logger.info(f"Conditioning gain{WHOSE[prefix]} at step {step}: {score['overall']:.4f} (loss {score['loss_true']:.5f} with the"
                f" true condition, {score['loss_shuffled']:.5f} with another pair's).")
    return score


# How far generated images follow their conditions, the way ControlNet++ (Li et al., 2024) scores
# it: the condition is extracted back from the generated image and compared with the input.


def validation_dtype(device, weight_dtype):
    """The dtype validation runs in. CUDA autocast covers the mixed dtypes of a reduced-precision
    pipeline; CPU and MPS autocast do not cover group norm, so there validation runs in float32."""
    return weight_dtype if device.type == "cuda" else torch.float32


def cast_to(model, dtype):
    """Cast a model only when its dtype differs (a no-op cast still makes diffusers warn)."""
    return model if model.dtype == dtype else model.to(dtype)


def run_validation(components, adapter, args, accelerator, weight_dtype, step, preemption, prefix="validation"):
    """Generate `num_validation_images` per (prompt, image) pair with the adapter as it is now,
    log them to every tracker and return them (for the model card); None when a stop signal ends
    it, which it does at the next image.

    The pipeline is built from the components already in memory (upstream re-reads the base
    model from disk each time), autocast follows the actual device (upstream assumes CUDA), and
    the global RNGs are left untouched so that validation never changes training.
    """
    logger.info(f"Running validation{WHOSE[prefix]} at step {step}.")
    device = accelerator.device
    dtype = validation_dtype(device, weight_dtype)
    frozen = [components.unet, *components.text_encoders]
    for model in frozen:
        cast_to(model, dtype)
    vae_device = components.vae.device  # off the GPU between validations with --cache_latents
    components.vae.to(device)
    pipeline = StableDiffusionXLAdapterPipeline(
        vae=components.vae,
        text_encoder=components.text_encoders[0],
        text_encoder_2=components.text_encoders[1],
        tokenizer=components.tokenizers[0],
        tokenizer_2=components.tokenizers[1],
        unet=components.unet,
        # A copy in the UNet's dtype: float32 features would promote the UNet's activations.
        adapter=cast_to(copy.deepcopy(accelerator.unwrap_model(adapter)), dtype),
        scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config),
    )
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        pipeline.enable_xformers_memory_efficient_attention()
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    multiple = pipeline.adapter.total_downscale_factor
    image_logs = []
    with global_rngs_kept(), autocast:
        generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
        for prompt, image_path in images.pair_validation_inputs(args.validation_prompt, args.validation_image):
            condition = images.load_upright_rgb({"path": image_path, "bytes": None})
            width, height = images.validation_size(condition.width, condition.height, args.resolution, multiple)
            condition = condition.resize((width, height), Image.BILINEAR)
            samples = []
            for _ in range(args.num_validation_images):
                if preemption.received is not None:
                    break
                samples.append(pipeline(prompt=prompt, image=condition, height=height, width=width,
                                        num_inference_steps=20, generator=generator).images[0])
            image_logs.append({"validation_image": condition, "images": samples, "validation_prompt": prompt})
    for model in frozen:
        cast_to(model, weight_dtype)
    components.vae.to(vae_device)
    if preemption.received is not None:
        logger.warning(f"Validation at step {step} stopped by the signal; its images are not logged.")
        return None
    trackers.log_validation_images(image_logs, accelerator.trackers, step, prefix)
    metric = control_metric(args)
    if metric != "none":
        for log in image_logs:
            log["control_scores"] = [control.control_score(metric, log["validation_image"], image) for image in log["images"]]
        mean_score = float(np.mean([score for log in image_logs for score in log["control_scores"]]))
        accelerator.log({f"{prefix}/{control.CONTROL_METRIC_KEYS[metric]}": mean_score}, step=step)
        logger.info(f"Validation images{WHOSE[prefix]} at step {step}: {control.CONTROL_METRIC_KEYS[metric]} {mean_score:.4f}.")
    return image_logs


# ------------------------------------------------------------------------------------------
# Model card and Hub
# ------------------------------------------------------------------------------------------


def save_model_card(repo_id, image_logs, base_model, repo_folder, training_details=None):
    """README.md: the Hub metadata (upstream's license, tags and `library_name: diffusers`), and a body
    with the sections of diffusers' training model card, filled in: what the adapter is, a grid per
    validation prompt (condition then samples), how to use it, its limits and how it was trained.
    Without a Hub repo (`repo_id` None) the snippet loads the folder and a local base by absolute path,
    so that it runs from any working directory."""
    adapter_location = repo_id or os.path.abspath(repo_folder)
    base_location = os.path.abspath(base_model) if repo_id is None and os.path.isdir(base_model) else base_model
    image_text = ""
    if image_logs:
        image_text = "You can find some example images below.\n\n"
        for i, log in enumerate(image_logs):
            log["validation_image"].save(os.path.join(repo_folder, f"image_control_{i}.png"))
            row = [log["validation_image"], *log["images"]]
            images.image_grid(row, 1, len(row)).save(os.path.join(repo_folder, f"images_{i}.png"))
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

# t2iadapter-{repo_id or Path(repo_folder).name}

These are T2I-Adapter weights trained on {base_model} with a new type of conditioning.

{image_text}## Intended uses & limitations

#### How to use

```python
import torch
from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter
from diffusers.utils import load_image

adapter = T2IAdapter.from_pretrained("{adapter_location}")
pipeline = StableDiffusionXLAdapterPipeline.from_pretrained("{base_location}", adapter=adapter)
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
        "ignore_patterns": ["step_*", "epoch_*", lifecycle.LOCK_FILE, lifecycle.FINISHED_FILE, lifecycle.BRANCH_FILE],
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
        step_scheduler_with_optimizer=False,  # the LR schedule counts optimisation steps, on any number of processes
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
    )
    lifecycle.refuse_lone_process(accelerator)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    # Formatted now: a handler that formats the record later may find the state reset (old accelerate fails then).
    logger.info(str(accelerator.state), main_process_only=False)
    return accelerator


def set_up_models(components, args, accelerator, averaged=None):
    """Checkpoints that keep the adapter (and its EMA, `averaged`) in diffusers format, attention kernels,
    memory options and compilation, then each frozen model on the device in the mixed-precision dtype,
    which is returned (the VAE in `vae_dtype_for`'s)."""
    accelerator.register_save_state_pre_hook(partial(lifecycle.save_adapter_hook, accelerator=accelerator,
                                                     averaged=averaged))
    accelerator.register_load_state_pre_hook(partial(lifecycle.load_adapter_hook, averaged=averaged))
    unet, adapter = components.unet, components.adapter
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
    components.vae.to(accelerator.device, dtype=vae_dtype_for(args, weight_dtype))
    for model in (unet, *components.text_encoders):
        model.to(accelerator.device, dtype=weight_dtype)
    return weight_dtype


def latent_files_for(train_data, components, args, data_config, accelerator, multiple):
    """With --cache_latents, each row's cached latent file (encoded now where missing); else None.
    `multiple` is the adapter's total downscale (bucket sides are multiples of it)."""
    if not args.cache_latents:
        return None

    cache_crops = args.latent_cache_crops if args.random_crop else None
    rules = {"cache_crops": cache_crops, "crop_positions": args.latent_cache_crop_positions,
             "random_flip": args.random_flip}
    layout = {None: "centre crop", "latent_grid": "crops on the latent grid",
              "exact": f"{args.latent_cache_crop_positions} exact crops"}[cache_crops]
    layout += ", flipped too" if args.random_flip else ""
    latent_files = loader.cache_latents(train_data, layout, components.vae, data_config, accelerator,
                                        partial(geometry.cached_regions, **rules),  # picklable, for workers
                                        partial(geometry.cached_region_sizes, **rules), multiple)
    if accelerator.device.type != "cpu":
        components.vae.to("cpu")  # only validation decodes now: free its GPU memory in between
    return latent_files


def total_steps(args, steps_per_epoch):
    """--max_train_steps, or as many optimisation steps as --num_train_epochs take."""
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch


def learning_rate(args, num_processes):
    """--learning_rate, multiplied by accumulation × batch size × processes with --scale_lr."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * lifecycle.total_batch(args, num_processes)


def build_optimizer(params, args, lr, device):
    """AdamW (bitsandbytes' 8-bit variant with --use_8bit_adam); PyTorch's fused kernel on CUDA."""
    extra = {}
    if args.use_8bit_adam:
        import bitsandbytes as bnb  # optional: only --use_8bit_adam needs it

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


def build_lr_scheduler(optimizer, args, max_train_steps):
    """The LR schedule, counted in optimisation steps: it is stepped once per step (the Accelerator does not
    step it once per process, as upstream's does), so it is the same on any number of processes and a
    checkpoint's schedule continues on another."""
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def build_training(adapter, args, accelerator, max_train_steps):
    """(adapter, optimizer, LR schedule), wrapped by accelerate (DDP, DeepSpeed, mixed precision). The
    loader is not prepared (each process plans its own share), so DeepSpeed is told the per-GPU
    batch here."""
    num_processes = accelerator.num_processes
    optimizer = build_optimizer(adapter.parameters(), args, learning_rate(args, num_processes), accelerator.device)
    lr_scheduler = build_lr_scheduler(optimizer, args, max_train_steps)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    return accelerator.prepare(adapter, optimizer, lr_scheduler)


def log_run_summary(args, accelerator, train_data, steps_per_epoch, max_train_steps, seed):
    dataset = train_data.dataset
    total_batch_size = lifecycle.total_batch(args, accelerator.num_processes)
    logger.info("***** Running training *****")
    if train_data.streamed:
        logger.info(f"  Streamed in windows of {args.shuffle_buffer_size} samples")
    else:
        logger.info(f"  Num examples = {len(dataset)}")
        logger.info(f"  Num total batches (optimisation steps) each epoch = {steps_per_epoch}")
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

    def check_samples(self, dataset, args, accelerator, tokenizer=None):
        """(bad rows with their problems, each good row's image size), before training, with a warning
        for the captions `tokenizer` cuts; every process calls it at once."""
        return data.recorded_scan_samples(dataset, args, accelerator, tokenizer)

    def models_ready(self, components, train_data, args):
        """Called once, when the models are loaded and placed and the data is ready."""

    def encode_prompt(self, captions, components):
        return encode_prompt(captions, components.text_encoders, components.tokenizers)

    def training_loss(self, *loss_arguments):
        return adapter_training_loss(*loss_arguments)

    def step_done(self, step, step_loss):
        """Called after each optimisation step."""


def batch_loss(batch, components, adapter, sigmas_by_timestep, args, weight_dtype, device, hooks):
    """Latents, text embeddings and micro-conditioning for one batch, then the adapter's loss."""
    vae = components.vae
    if "latent_mean" in batch:
        # The loader's batch is in host memory (it is not prepared): the cached distribution goes to the device.
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
    else:
        mean, std = encode_latent_distribution(vae, batch["pixel_values"])
    timesteps, posterior_noise, noise = draw_sample_noise(
        batch["seed"], mean.shape[1:], len(sigmas_by_timestep), TimestepSampling.from_args(args, len(sigmas_by_timestep))
    )
    latents = sample_latents(mean, std, posterior_noise, vae.config.scaling_factor)
    prompt_embeds, pooled_embeds = hooks.encode_prompt(batch["captions"], components)
    time_ids = batch_time_ids(batch, args, device)
    return hooks.training_loss(
        components.unet,
        adapter,
        latents,
        batch["conditioning_pixel_values"].to(device),
        prompt_embeds,
        {"text_embeds": pooled_embeds, "time_ids": time_ids},
        sigmas_by_timestep,
        components.noise_scheduler.config.prediction_type,
        weight_dtype,
        noise.to(device),
        timesteps.to(device),
        args.snr_gamma,
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
    checkpoints = lifecycle.list_checkpoints(args.output_dir)
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
    if accelerator.sync_gradients:  # a skipped step counts too
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=args.set_grads_to_none)
    return step_loss


def model_card_training_details(args, steps, accelerator, validation=None):
    """The run's settings worth stating on the model card, as the run used them (the warm-up only where
    the schedule has one, the precision accelerate chose), and its last validation's control scores."""
    num_processes = accelerator.num_processes
    warmup = args.lr_warmup_steps if args.lr_scheduler not in SCHEDULES_WITHOUT_WARMUP else 0
    details = {
        "data": args.dataset_name or args.train_data_dir,
        "conditioning": args.conditioning_type if args.conditioning_type != "image" else args.conditioning_image_column,
        "optimisation steps": steps,
        "resolution": f"{args.resolution}" + (" (aspect-ratio buckets)" if args.aspect_ratio_buckets else ""),
        "batch size": f"{args.train_batch_size} per device × {num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation steps",
        "learning rate": f"{learning_rate(args, num_processes)} ({args.lr_scheduler}, "
        + (f"{warmup} warm-up steps)" if warmup else "no warm-up)"),
        "mixed precision": accelerator.mixed_precision,
        "VAE encode": str(vae_dtype_for(args, weight_dtype_for(accelerator.mixed_precision))).removeprefix("torch.")
        + (", cached latents" if args.cache_latents else ", every batch"),
        "timesteps": f"{args.timestep_sampling} over [{args.min_timestep}, {args.max_timestep or 'T'})"
        + (f", n ~ N({args.logit_mean}, {args.logit_std})" if args.timestep_sampling == "logit_normal" else ""),
        "loss weighting": f"min-SNR-γ, γ = {args.snr_gamma}" if args.snr_gamma else "SNR = σ⁻² on the x₀ error (upstream's)",
    }
    if args.use_ema:
        details["weights"] = (
            f"the exponential moving average of the adapter's weights (decay {args.ema_decay}, reached"
            f" {ema.last_decay(steps, args):.4g} at step {steps} after its warm-up; updated every"
            f" {args.ema_update_every} step(s)): this adapter and its scores below are the EMA's"
        )
    if validation and validation["control"]:
        score = validation["control"]
        ranges = ", ".join(f"t in [{name.replace('-', ', ')}): {gain:.3f}" for name, gain in score["ranges"].items())
        source = data.validation_set_location(args)
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
        details[control.CONTROL_METRIC_KEYS[metric]] = f"{np.mean(scores):.3f} over {len(scores)} validation images ({how})"
    return details


def validate(components, adapter, averaged, control_pairs, args, accelerator, weight_dtype, step, preemption):
    """{"step", "control", "logs"} of a validation at `step`: the conditioning gain on the validation
    pairs and the images of the validation prompts, each None when not asked for (or, for the images,
    when a stop signal cut them short); None for neither. With an EMA (`averaged`), the EMA's, and the
    raw weights' are logged beside them."""
    results = []
    for prefix, model in validated_adapters(adapter, averaged, accelerator.device):
        control = measure_control(components, model, control_pairs, args, accelerator, weight_dtype, step, prefix)
        logs = None
        if args.validation_prompt is not None:
            logs = run_validation(components, model, args, accelerator, weight_dtype, step, preemption, prefix)
        results.append(None if control is None and logs is None else {"step": step, "control": control, "logs": logs})
    return results[0]


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


def finish_training(accelerator, adapter, averaged, components, control_pairs, args, weight_dtype, global_step,
                    validation, repo_id, preemption, steps_per_epoch):
    """The adapter in diffusers format (with --use_ema, its EMA `averaged`), the final validation (unless
    this step was just validated), the model card and the Hub upload. The adapter is saved first, and the
    stop-signal handler is still on: a signal in this phase ends the validation at its next image and skips
    the upload, never the save."""
    if not accelerator.is_main_process:
        return
    lifecycle.save_adapter(averaged if averaged is not None else accelerator.unwrap_model(adapter), args.output_dir)
    lifecycle.mark_finished(args.output_dir, global_step, steps_per_epoch)
    logger.info(f"Saved the adapter to {args.output_dir}")
    if preemption.received is None and (validation is None or validation["step"] != global_step):
        validation = validate(components, adapter, averaged, control_pairs, args, accelerator, weight_dtype,
                              global_step, preemption)
    logs = validation["logs"] if validation else None
    details = model_card_training_details(args, global_step, accelerator, validation)
    save_model_card(repo_id, logs, args.pretrained_model_name_or_path, args.output_dir, details)
    if args.push_to_hub and preemption.received is not None:
        logger.warning(f"Not uploaded to {repo_id}: the run was stopped. Upload {args.output_dir} with `hf upload`.")
    elif args.push_to_hub:
        upload_folder(**hub_upload_arguments(repo_id, args.output_dir, args.hub_token))


def training_run(args, adapter_config, accelerator, hooks):
    """The run itself, from data loading to the final save; returns the last optimisation step."""
    finished = lifecycle.finished_run(args.output_dir)  # (step, steps per epoch) or None
    # A requeue of a finished run trains on only for more steps or epochs; a named checkpoint is a rewind.
    requeued = args.resume_from_checkpoint == "latest"
    if requeued and finished and finished.step >= total_steps(args, finished.steps_per_epoch):
        logger.info(f"The run is complete: it finished at step {finished.step}. Nothing to train; the adapter in"
                    f" {args.output_dir} is left as it is.")
        return finished.step
    resume_path, resumed_data_state = lifecycle.find_resume_point(args, accelerator)
    seed, run = lifecycle.run_identity(args, accelerator, resumed_data_state)
    set_seed(seed)  # the new adapter's initial weights; every draw of training comes from its sample's seed
    data_config = data.DataConfig.from_args(args)  # what the data code reads of the flags, once
    # Data first, so that a bad column fails before any model loads: prepared by the main process, then
    # loaded by all, which share the sample check.
    with accelerator.main_process_first():
        data.prepare_datasets(data_config)
    tokenizers = load_tokenizers(args)  # now, for the sample check to count caption tokens with
    check = partial(hooks.check_samples, accelerator=accelerator, tokenizer=tokenizers[0])
    train_data = data.load_training_data(data_config, seed, check)
    repo_id = create_hub_repo(args, accelerator)
    multiple = configs.adapter_total_downscale(adapter_config)
    if accelerator.is_main_process:
        recipes.write_resolved_recipe(args, args.output_dir)
    grid = None
    if args.dump_samples and accelerator.is_main_process:  # before any model loads: look before paying
        grid = sample_grid.write_sample_grid(train_data, PairTransform(data_config), data_config, seed,
                                             lifecycle.total_batch(args, accelerator.num_processes), multiple,
                                             args.dump_samples, args.output_dir)

    memory.check_memory_fits(args, accelerator, trainer=sys.modules[__name__])  # the planner runs this file's step
    components = load_models(args, adapter_config, resume_path, tokenizers)
    averaged = (ema.averaged_copy(components.adapter, "cpu" if args.ema_on_cpu else accelerator.device)
                if args.use_ema else None)  # the EMA, a copy of the adapter before it is wrapped
    weight_dtype = set_up_models(components, args, accelerator, averaged)
    sigmas_by_timestep = components.sigmas_by_timestep.to(accelerator.device)
    control_pairs = control_pairs_for(train_data, components, args, data_config, accelerator)
    batches, steps_per_epoch = loader.make_train_dataloader(
        train_data, PairTransform(data_config), data_config, seed, accelerator.process_index,
        accelerator.num_processes, lifecycle.total_batch(args, accelerator.num_processes), multiple,
        latent_files_for(train_data, components, args, data_config, accelerator, multiple),
    )
    max_train_steps = total_steps(args, steps_per_epoch)
    adapter, optimizer, lr_scheduler = build_training(components.adapter, args, accelerator, max_train_steps)
    hooks.models_ready(components, train_data, args)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
        if grid is not None:
            trackers.log_sample_grid(grid, accelerator.trackers)
    log_run_summary(args, accelerator, train_data, steps_per_epoch, max_train_steps, seed)

    global_step = 0
    settings = lifecycle.run_settings(
        args, learning_rate(args, accelerator.num_processes), accelerator.num_processes, train_data
    )
    if resume_path is not None:
        global_step = lifecycle.resume_from(resume_path, resumed_data_state, accelerator, batches)
        if "settings" in resumed_data_state:  # not in checkpoints of earlier versions
            lifecycle.apply_changed_settings(resumed_data_state["settings"], settings, args, optimizer, lr_scheduler)
    progress_bar = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    if global_step == 0 and accelerator.is_main_process:  # the curve starts from the untrained adapter
        for prefix, model in validated_adapters(adapter, averaged, accelerator.device):
            measure_control(components, model, control_pairs, args, accelerator, weight_dtype, 0, prefix)

    def save_checkpoint(position):
        data_state = {"seed": seed, "run": run, "settings": settings,
                      "loader": lifecycle.saved_position(position, accelerator, args)}
        lifecycle.save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, data_state)
        return global_step

    validation, losses, saved_step = None, StepLosses(accelerator.device), global_step
    step_start = stopping.StepStart(batches, accelerator)
    with stopping.PreemptionHandler() as preemption:
        # A run resumed at its last step (stopped before its final save) only finishes.
        for batch in batches if global_step < max_train_steps else ():
            with accelerator.accumulate(adapter):
                loss = batch_loss(
                    batch, components, adapter, sigmas_by_timestep, args, weight_dtype, accelerator.device, hooks
                )
                step_loss = optimisation_step(
                    loss, adapter, optimizer, lr_scheduler, accelerator, losses, global_step, args
                )
            if step_loss is not None:  # the last micro-batch of an optimisation step
                global_step += 1
                ema.update_after_step(averaged, accelerator.unwrap_model(adapter), global_step, args)
                report_step(global_step, step_loss, lr_scheduler, progress_bar, accelerator, hooks)
                step_start = stopping.StepStart(batches, accelerator)
                if global_step % args.checkpointing_steps == 0:
                    saved_step = save_checkpoint(step_start.position)
                if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    validation = (
                        validate(components, adapter, averaged, control_pairs, args, accelerator, weight_dtype,
                                 global_step, preemption) or validation
                    )
            if preemption.requested(accelerator):  # after every micro-batch: the step in progress is abandoned
                step_start.restore(accelerator)
                if saved_step != global_step:
                    saved_step = save_checkpoint(step_start.position)
                checkpoint = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                preemption.stop(accelerator, global_step, checkpoint if global_step else "nothing (no step completed)")
            if global_step >= max_train_steps:
                break
        if losses.skipped:
            logger.warning(f"Skipped {losses.skipped} optimisation step(s) with a non-finite loss.")

        accelerator.wait_for_everyone()
        finish_training(accelerator, adapter, averaged, components, control_pairs, args, weight_dtype, global_step,
                        validation, repo_id, preemption, steps_per_epoch)
        if preemption.received is not None:  # during the final phase, after the adapter was saved
            preemption.stop(accelerator, global_step, f"the adapter in {args.output_dir}")
    accelerator.end_training()
    return global_step


def main(args, hooks=None):
    adapter_config = check_inputs(args)
    accelerator = make_accelerator(args)
    with lifecycle.exclusive_output_dir(args.output_dir, accelerator), stopping.workers_ended_on_error():
        return training_run(args, adapter_config, accelerator, hooks or RunHooks())


if __name__ == "__main__":
    with stopping.refusals_as_messages():
        main(parse_args())
