#!/usr/bin/env python
# coding=utf-8
"""Build a tiny, randomly initialised Stable Diffusion XL pipeline in diffusers format.

Why: the T2I-Adapter trainer needs an SDXL base model to run, but the real one is
several gigabytes and cannot be downloaded everywhere (CI, offline machines). This
script writes a stand-in that is laid out exactly like SDXL -- same component
classes, same block types, two CLIP text encoders whose hidden states are
concatenated for cross-attention, "text_time" added conditioning, an 8x VAE and
SDXL's Euler scheduler -- only much narrower, so the whole folder is a few tens of
megabytes and a training step runs on a CPU in seconds. Its outputs are noise: it
is for smoke tests and demos of the plumbing, not for images.

The two tokenizers are real CLIP BPE tokenizers. Their vocabulary and merges are
derived from the BPE file that ships with the `open-clip-torch` package, so no
download is needed, and the script checks that they tokenize text exactly as
open_clip does.

Everything is deterministic: the same `--seed` gives byte-identical weight files.

Example:

    python scripts/make_tiny_sdxl.py --output_dir tiny-sdxl --seed 0

or, with the UNet and VAE pretrained on fill images (see scripts/pretrain_tiny_base.py), a base
whose images are coloured discs, which an adapter can learn to steer:

    python scripts/make_tiny_sdxl.py --output_dir tiny-sdxl --pretrained_base assets/tiny-fill-base

and then, e.g.:

    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained("tiny-sdxl")
    image = pipe("red circle with blue background", num_inference_steps=2).images[0]  # 64x64
"""

import argparse
import gzip
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Sizes of the two text encoders. The UNet's cross-attention width is the sum of
# their hidden sizes, and its pooled-text input is text encoder 2's projection.
TEXT_ENCODER_HIDDEN_SIZE = 32
TEXT_ENCODER_2_HIDDEN_SIZE = 64
TEXT_ENCODER_2_PROJECTION_DIM = 32

# CLIP's vocabulary: 256 byte characters, the same with "</w>", 48894 merges and 2 special tokens.
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# SDXL feeds 6 "time ids" (original size, crop top-left, target size) to the UNet.
NUM_TIME_IDS = 6
ADDITION_TIME_EMBED_DIM = 8
# Every attention head in the tiny UNet gets this many channels.
UNET_ATTENTION_HEAD_CHANNELS = 16

VAE_BLOCK_OUT_CHANNELS = (32, 32, 64, 64)
VAE_SAMPLE_SIZE = 64
SDXL_VAE_SCALING_FACTOR = 0.13025

TOKENIZER_CHECK_TEXT = "red circle with blue background"


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Build a tiny, randomly initialised SDXL pipeline (diffusers format) for tests and demos."
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="tiny-sdxl",
        help="Folder to write the pipeline to (created if missing, files in it are overwritten).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    parser.add_argument(
        "--unet_channels",
        type=int,
        nargs=3,
        default=[32, 64, 64],
        metavar=("C1", "C2", "C3"),
        help=(
            "Output channels of the UNet's three down blocks (SDXL uses 320 640 1280). Each must be a multiple of"
            f" {UNET_ATTENTION_HEAD_CHANNELS}. A T2I-Adapter for this UNet needs channels (C1, C2, C3, C3)."
        ),
    )
    parser.add_argument(
        "--pretrained_base",
        type=str,
        default=None,
        metavar="DIR",
        help=(
            "A folder with pretrained unet/ and vae/ (diffusers format, e.g. assets/tiny-fill-base): they replace the"
            " random ones. Text encoders, tokenizers and scheduler are still built from --seed, which must be the"
            " seed the base was pretrained with (0 for assets/tiny-fill-base). --unet_channels is then ignored."
        ),
    )
    args = parser.parse_args(input_args)
    try:
        check_unet_channels(args.unet_channels)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_unet_channels(unet_channels):
    if len(unet_channels) != 3:
        raise ValueError(f"Expected 3 UNet channel counts, got {len(unet_channels)}.")
    for channels in unet_channels:
        if channels <= 0 or channels % UNET_ATTENTION_HEAD_CHANNELS != 0:
            raise ValueError(
                f"UNet channel counts must be positive multiples of {UNET_ATTENTION_HEAD_CHANNELS}, got {channels}."
            )


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------


def find_open_clip_bpe_file():
    """Path of the CLIP BPE merges file shipped inside the open-clip-torch package (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The tokenizers are built from open-clip-torch's BPE file: `pip install open-clip-torch`.")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("open_clip is installed but its bpe_simple_vocab_16e6.txt.gz is missing.")


def byte_to_unicode_table():
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the remaining bytes (control
    characters, space, ...) are given the code points 256, 257, ... in byte order.
    The order of the returned dict (printable bytes first) is the order of the
    first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


def read_clip_merges(bpe_path):
    """The merges CLIP uses: the lines after the version header, first CLIP_NUM_MERGES of them."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]
    if len(merges) != CLIP_NUM_MERGES:
        raise ValueError(f"{bpe_path} holds {len(merges)} merges, expected {CLIP_NUM_MERGES}.")
    return merges


def build_clip_vocab(merges):
    """Token -> id, in CLIP's order: bytes, bytes + '</w>', merged pairs, then the two special tokens."""
    byte_chars = list(byte_to_unicode_table().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"Built {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}.")
    return {token: index for index, token in enumerate(tokens)}


def write_clip_bpe_files(folder, vocab, merges):
    """Write vocab.json and merges.txt (the files CLIPTokenizer is made from) into `folder`."""
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges) + "\n")


def make_tokenizers():
    """SDXL's two CLIP tokenizers: the same BPE, but tokenizer 1 pads with EOS and tokenizer 2 with '!'."""
    merges = read_clip_merges(find_open_clip_bpe_file())
    vocab = build_clip_vocab(merges)
    with tempfile.TemporaryDirectory() as folder:
        write_clip_bpe_files(folder, vocab, merges)
        common = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        common["model_max_length"] = CLIP_MAX_LENGTH
        tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=EOS_TOKEN, **common)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, pad_token="!", **common)
    return tokenizer, tokenizer_2


def check_tokenizers_match_open_clip(tokenizers, text=TOKENIZER_CHECK_TEXT):
    """Raise if any of `tokenizers` gives other ids for `text` than open_clip's own CLIP tokenizer.

    (For ordinary text only: open_clip also unescapes HTML entities, and it does not treat a literal
    "<|endoftext|>" in the text as the special token, whereas transformers' CLIPTokenizer does.)
    """
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    # The encoder's table, not sot_token_id/eot_token_id: those arrived in open_clip 2.x, the table is in every release.
    start, end = reference.encoder["<start_of_text>"], reference.encoder["<end_of_text>"]
    expected = [start] + reference.encode(text) + [end]
    for tokenizer in tokenizers:
        ids = tokenizer(text).input_ids
        if ids != expected:
            raise AssertionError(f"Tokenizer disagrees with open_clip on {text!r}: {ids} != {expected}")


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def clip_text_config(hidden_size, intermediate_size, hidden_act, projection_dim=None):
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=1,
    )
    if projection_dim is not None:
        config.projection_dim = projection_dim
    return config


def make_text_encoders(seed):
    """SDXL's text encoders: a CLIP ViT-L-like encoder and a CLIP bigG-like encoder with a text projection."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        clip_text_config(TEXT_ENCODER_HIDDEN_SIZE, 2 * TEXT_ENCODER_HIDDEN_SIZE, hidden_act="quick_gelu")
    )
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(
            TEXT_ENCODER_2_HIDDEN_SIZE,
            2 * TEXT_ENCODER_2_HIDDEN_SIZE,
            hidden_act="gelu",
            projection_dim=TEXT_ENCODER_2_PROJECTION_DIM,
        )
    )
    return text_encoder, text_encoder_2


def group_norm_groups(channel_counts):
    """32 groups as in SDXL, or 16 when some width is not a multiple of 32."""
    return 32 if all(channels % 32 == 0 for channels in channel_counts) else 16


def make_unet(seed, unet_channels=(32, 64, 64)):
    """An SDXL-shaped UNet: no attention in the first block, text_time added conditioning, linear projections."""
    check_unet_channels(unet_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=VAE_SAMPLE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(unet_channels),
        layers_per_block=2,
        transformer_layers_per_block=1,
        attention_head_dim=tuple(channels // UNET_ATTENTION_HEAD_CHANNELS for channels in unet_channels),
        cross_attention_dim=TEXT_ENCODER_HIDDEN_SIZE + TEXT_ENCODER_2_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM + TEXT_ENCODER_2_PROJECTION_DIM,
        use_linear_projection=True,
        norm_num_groups=group_norm_groups(unet_channels),
    )


def make_vae(seed):
    """A KL autoencoder with four blocks, so images are downscaled 8x into 4 latent channels like SDXL's."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=group_norm_groups(VAE_BLOCK_OUT_CHANNELS),
        sample_size=VAE_SAMPLE_SIZE,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
    )


def make_scheduler():
    """The Euler scheduler with SDXL base 1.0's settings."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


# ----------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------


def copy_pretrained_base(pretrained_base, output_dir):
    """Replace output_dir's unet/, vae/ and text encoders by those in `pretrained_base`. The text
    encoders are random, but the UNet was pretrained on their embeddings, and transformers'
    initialisation differs between versions (4.45 and 5 draw text_encoder_2 differently)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        source = os.path.join(pretrained_base, name)
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise FileNotFoundError(f"--pretrained_base {pretrained_base!r} has no {name}/config.json.")
        target = os.path.join(output_dir, name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def build_tiny_sdxl(output_dir="tiny-sdxl", seed=0, unet_channels=(32, 64, 64), pretrained_base=None):
    """Build the tiny SDXL pipeline, save it to `output_dir` and return that path.

    With `pretrained_base` (a folder holding unet/, vae/, text_encoder/ and text_encoder_2/ in
    diffusers format), those replace the random ones; the rest is still built from `seed`.
    """
    tokenizer, tokenizer_2 = make_tokenizers()
    check_tokenizers_match_open_clip([tokenizer, tokenizer_2])
    text_encoder, text_encoder_2 = make_text_encoders(seed)
    pipeline = StableDiffusionXLPipeline(
        vae=make_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=make_unet(seed, unet_channels),
        scheduler=make_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    if pretrained_base is not None:
        copy_pretrained_base(pretrained_base, output_dir)
    return output_dir


def folder_size_bytes(folder):
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names
    )


def count_saved_parameters(folder):
    """Number of parameters stored in the safetensors files of one component folder."""
    total = 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def print_summary(output_dir, seconds):
    print(f"Tiny SDXL pipeline written to {os.path.abspath(output_dir)} in {seconds:.1f}s")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        print(f"  {name:<15} {count_saved_parameters(os.path.join(output_dir, name)):>10,} parameters")
    print(f"  total on disk   {folder_size_bytes(output_dir) / 2**20:.1f} MB")


def main(args):
    start = time.perf_counter()
    output_dir = build_tiny_sdxl(
        args.output_dir, seed=args.seed, unet_channels=tuple(args.unet_channels), pretrained_base=args.pretrained_base
    )
    print_summary(output_dir, time.perf_counter() - start)


if __name__ == "__main__":
    main(parse_args())
