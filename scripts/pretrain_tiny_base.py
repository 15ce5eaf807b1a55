#!/usr/bin/env python
"""Pretrain the tiny SDXL's VAE and UNet on fill-style images, so that an adapter has something to steer.

Why: the tiny SDXL from ``make_tiny_sdxl.py`` has random weights. Its UNet predicts noise, not
images, so an adapter trained on top of it cannot change anything that matters and "does training
teach control?" cannot be answered. This script aims at a tiny base that can draw the fill data
(a disc of one named colour on a background of another) but cannot know where the disc goes:
the caption names the colours only. (With the default settings it does not get there yet: see
assets/tiny-fill-base/README.md.) Where the disc is placed is exactly what a T2I-Adapter on the
circle's outline has to teach.

What it does, deterministically by ``--seed`` (same seed, same machine: same weights):

1. Builds the random tiny SDXL with ``make_tiny_sdxl.build_tiny_sdxl`` in a temporary folder and
   loads its text encoders, tokenizers, VAE, UNet and scheduler. The text encoders and tokenizers
   stay random and frozen (captions still differ by their colour words, which is all the UNet needs).
2. Trains the VAE (with 4 norm groups instead of 32, see VAE_NORM_NUM_GROUPS) on fill images: mean squared reconstruction error plus a small KL term. Then sets
   the VAE config's ``scaling_factor`` to 1 / std of the latents, so that scaled latents have unit
   std, as Stable Diffusion's does (SDXL's 0.13025 is that number for the real SDXL VAE).
3. Trains the UNet with SDXL's objective as the trainer computes it: Euler σ parameterisation
   (noisy = x₀ + σ·ε, the UNet sees noisy / sqrt(σ² + 1)), epsilon prediction and the σ⁻²-weighted
   x₀ error (which equals the ε error), text embeddings from both encoders via the trainer's
   ``encode_prompt`` and SDXL's time ids. Timesteps are uniform, as in base-model training (the
   trainer's cubic sampling is the adapter's choice). 10% of captions are replaced by zeroed text
   embeddings, which is what the SDXL pipeline feeds as the unconditional input of classifier-free
   guidance (``force_zeros_for_empty_prompt``).
4. Writes ``<output_dir>/unet`` and ``<output_dir>/vae`` in diffusers format, and ``pretrain.json``
   with the settings, losses and the hashes of the text encoders it trained against.

Samples are drawn on the fly by ``make_fill_dataset.make_fill_sample`` from a seeded stream; the
validation losses use a fixed held-out batch, fixed noise and evenly spaced timesteps.

Example (the command that made assets/tiny-fill-base, about 5 minutes on 2 CPU cores):

    python scripts/pretrain_tiny_base.py --output_dir assets/tiny-fill-base
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import train_t2i_adapter_sdxl as train  # noqa: E402
from make_fill_dataset import make_fill_sample  # noqa: E402
from make_tiny_sdxl import build_tiny_sdxl  # noqa: E402


# The random tiny VAE normalises 32 channels in 32 groups: per-channel (instance) norm, which maps
# any flat colour to the same activations, so its decoder cannot paint a flat region in a given
# colour. 4 groups of 8 channels keep colour; the parameters (and so the random start) are the same.
VAE_NORM_NUM_GROUPS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Pretrain the tiny SDXL's VAE and UNet on fill-style images (writes unet/ and vae/).",
    )
    parser.add_argument("--output_dir", default="assets/tiny-fill-base", help="Where unet/, vae/ and pretrain.json go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random tiny SDXL and of training.")
    parser.add_argument("--resolution", type=int, default=64, help="Side of the fill images, in pixels.")
    parser.add_argument("--vae_steps", type=int, default=400, help="VAE optimisation steps.")
    parser.add_argument("--vae_batch_size", type=int, default=16)
    parser.add_argument("--vae_crop", type=int, default=32, help="The VAE trains on random square crops of this side.")
    parser.add_argument("--vae_learning_rate", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the KL term of the VAE loss.")
    parser.add_argument("--unet_steps", type=int, default=600, help="UNet optimisation steps.")
    parser.add_argument(
        "--num_train_samples", type=int, default=2048, help="Fill samples drawn (and VAE-encoded once) for the UNet."
    )
    parser.add_argument("--unet_batch_size", type=int, default=32)
    parser.add_argument("--unet_learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=50, help="Linear warm-up of both learning rates.")
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.1, help="Share of zeroed text embeddings.")
    parser.add_argument("--num_validation", type=int, default=64, help="Held-out samples for the validation losses.")
    parser.add_argument(
        "--num_threads", type=int, default=1, help="torch threads (the tiny models gain nothing from more; 0: torch's default)."
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def fill_batch(rng, batch_size, resolution):
    """`batch_size` fill samples: images in [-1, 1] (N, 3, H, W) and their captions."""
    images, captions = [], []
    for _ in range(batch_size):
        target, _, caption, _ = make_fill_sample(rng, resolution)
        images.append(np.asarray(target, dtype=np.float32) / 127.5 - 1.0)
        captions.append(caption)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def train_stream(seed):
    """The training samples' random stream (distinct from make_fill_dataset's [seed, 0] and [seed, 1])."""
    return np.random.default_rng([seed, 100])


def validation_batch(seed, num_validation, resolution):
    return fill_batch(np.random.default_rng([seed, 101]), num_validation, resolution)


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + np.cos(np.pi * progress))


def make_optimizer(params, lr, warmup_steps, total_steps):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    return optimizer, scheduler


# ----------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------


def vae_loss(vae, images, kl_weight, generator=None):
    """Mean squared reconstruction error (on a posterior sample) plus kl_weight · mean KL per latent element."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator)
    reconstruction = vae.decode(latents).sample
    mse = torch.mean((reconstruction - images) ** 2)
    kl = posterior.kl().mean() / latents[0].numel()
    return mse + kl_weight * kl, mse


@torch.no_grad()
def vae_validation(vae, images):
    """Reconstruction MSE from the posterior mean (the fixed validation batch)."""
    reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
    return torch.mean((reconstruction - images) ** 2).item()


@torch.no_grad()
def latent_std(vae, images, seed):
    """Std of unscaled posterior samples over the validation batch."""
    generator = torch.Generator().manual_seed(seed)
    return vae.encode(images).latent_dist.sample(generator=generator).std().item()


def random_crop(images, side, rng):
    """One random `side`² crop (the same place for the whole batch): the VAE is convolutional, and
    fill images look alike at every scale, so training on crops costs a quarter and loses nothing."""
    if side >= images.shape[-1]:
        return images
    top, left = (int(v) for v in rng.integers(0, images.shape[-1] - side + 1, size=2))
    return images[:, :, top : top + side, left : left + side]


def train_vae(vae, args, log_every=100):
    vae.train()
    vae.requires_grad_(True)
    optimizer, scheduler = make_optimizer(vae.parameters(), args.vae_learning_rate, args.warmup_steps, args.vae_steps)
    rng = train_stream(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        images, _ = fill_batch(rng, args.vae_batch_size, args.resolution)
        images = random_crop(images, args.vae_crop, rng)
        loss, mse = vae_loss(vae, images, args.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == args.vae_steps:
            print(f"  vae step {step + 1:5d}  train mse {mse.item():.5f}", flush=True)
    vae.eval()
    vae.requires_grad_(False)


# ----------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------


class CaptionEmbeddings:
    """Text embeddings by caption, computed once each with the trainer's encode_prompt (the encoders are frozen)."""

    def __init__(self, text_encoders, tokenizers):
        self.text_encoders, self.tokenizers, self.cache = text_encoders, tokenizers, {}

    def __call__(self, captions):
        missing = sorted({caption for caption in captions if caption not in self.cache})
        if missing:
            prompt_embeds, pooled = train.encode_prompt(missing, self.text_encoders, self.tokenizers)
            self.cache.update({c: (prompt_embeds[i], pooled[i]) for i, c in enumerate(missing)})
        return (
            torch.stack([self.cache[c][0] for c in captions]),
            torch.stack([self.cache[c][1] for c in captions]),
        )


def drop_text(prompt_embeds, pooled, proportion, generator):
    """Zero the text embeddings of a random `proportion` of samples (SDXL's unconditional input)."""
    keep = (torch.rand(len(pooled), generator=generator) >= proportion).float()
    return prompt_embeds * keep[:, None, None], pooled * keep[:, None]


def unet_loss(unet, latents, prompt_embeds, pooled, time_ids, sigmas_by_timestep, timesteps, noise):
    """The trainer's loss without an adapter: Euler σ noising, epsilon prediction, σ⁻²-weighted x₀ error."""
    sigmas = sigmas_by_timestep[timesteps].reshape(-1, 1, 1, 1)
    noisy_latents = latents + sigmas * noise
    model_pred = unet(
        noisy_latents / (sigmas**2 + 1) ** 0.5,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )[0]
    denoised = train.predict_clean_latents(model_pred.float(), noisy_latents, sigmas, "epsilon")
    return train.weighted_denoising_loss(denoised, latents, sigmas)


@torch.no_grad()
def unet_validation(unet, val_latents, val_text, time_ids, sigmas_by_timestep, seed):
    """UNet loss on the fixed validation batch: fixed noise and evenly spaced timesteps over [0, 1000)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(val_latents.shape, generator=generator)
    count = len(val_latents)
    timesteps = torch.linspace(0, len(sigmas_by_timestep) - 1, count).round().long()
    return unet_loss(unet, val_latents, *val_text, time_ids, sigmas_by_timestep, timesteps, noise).item()


@torch.no_grad()
def encode_pool(vae, seed, num_samples, resolution, chunk_size=64):
    """Draw the UNet's training samples and encode them once: posterior means and stds (unscaled), captions."""
    rng = train_stream(seed + 1)
    means, stds, captions = [], [], []
    for start in range(0, num_samples, chunk_size):
        images, chunk_captions = fill_batch(rng, min(chunk_size, num_samples - start), resolution)
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += chunk_captions
    return torch.cat(means), torch.cat(stds), captions


def train_unet(unet, vae, embeddings, sigmas_by_timestep, args, validate, log_every=100):
    means, stds, pool_captions = encode_pool(vae, args.seed, args.num_train_samples, args.resolution)
    unet.train()
    unet.requires_grad_(True)
    optimizer, scheduler = make_optimizer(unet.parameters(), args.unet_learning_rate, args.warmup_steps, args.unet_steps)
    generator = torch.Generator().manual_seed(args.seed + 1)
    order = torch.cat([torch.randperm(len(means), generator=generator) for _ in range(
        1 + args.unet_steps * args.unet_batch_size // len(means))])
    resolution = (args.resolution, args.resolution)
    time_ids = train.compute_time_ids(resolution, (0, 0), resolution, args.unet_batch_size)
    num_train_timesteps = len(sigmas_by_timestep)
    running = []
    for step in range(args.unet_steps):
        index = order[step * args.unet_batch_size : (step + 1) * args.unet_batch_size]
        # A fresh posterior sample each time, like the trainer's encode_latents, then scaled.
        posterior_noise = torch.randn(means[index].shape, generator=generator)
        latents = (means[index] + stds[index] * posterior_noise) * vae.config.scaling_factor
        captions = [pool_captions[i] for i in index.tolist()]
        prompt_embeds, pooled = drop_text(*embeddings(captions), args.proportion_empty_prompts, generator)
        timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        loss = unet_loss(unet, latents, prompt_embeds, pooled, time_ids, sigmas_by_timestep, timesteps, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == args.unet_steps:
            unet.eval()
            print(f"  unet step {step + 1:5d}  train {np.mean(running):.4f}  validation {validate():.4f}", flush=True)
            unet.train()
            running = []
    unet.eval()
    unet.requires_grad_(False)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_random_base(folder, seed):
    """Build the deterministic random tiny SDXL in `folder` and load its parts."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    build_tiny_sdxl(folder, seed=seed)
    return {
        "tokenizers": [CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")],
        "text_encoders": [
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval(),
            CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2").eval(),
        ],
        # Same weights, fewer norm groups (see VAE_NORM_NUM_GROUPS).
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", norm_num_groups=VAE_NORM_NUM_GROUPS),
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "scheduler": EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
        "text_encoder_sha256": {
            s: file_sha256(os.path.join(folder, s, "model.safetensors")) for s in ("text_encoder", "text_encoder_2")
        },
    }


def save_base(output_dir, vae, unet, record):
    os.makedirs(output_dir, exist_ok=True)
    unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(output_dir, "vae"), safe_serialization=True)
    with open(os.path.join(output_dir, "pretrain.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        parts = load_random_base(folder, args.seed)
    vae, unet = parts["vae"], parts["unet"]
    val_images, val_captions = validation_batch(args.seed, args.num_validation, args.resolution)

    vae_random = vae_validation(vae, val_images)
    print(f"VAE: {args.vae_steps} steps (validation reconstruction MSE before: {vae_random:.4f})", flush=True)
    torch.manual_seed(args.seed)
    train_vae(vae, args)
    vae_mse = vae_validation(vae, val_images)
    std = latent_std(vae, val_images, args.seed)
    scaling_factor = round(1.0 / std, 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae_seconds = time.perf_counter() - start
    print(f"VAE done in {vae_seconds:.0f}s: validation MSE {vae_mse:.5f}, latent std {std:.4f},"
          f" scaling_factor set to {scaling_factor} (was 0.13025)", flush=True)

    embeddings = CaptionEmbeddings(parts["text_encoders"], parts["tokenizers"])
    sigmas_by_timestep = train.sigma_table(parts["scheduler"])
    resolution = (args.resolution, args.resolution)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(args.seed + 2)
        val_latents = vae.encode(val_images).latent_dist.sample(generator=generator) * scaling_factor
    val_text = embeddings(val_captions)
    val_time_ids = train.compute_time_ids(resolution, (0, 0), resolution, len(val_latents))

    def validate():
        return unet_validation(unet, val_latents, val_text, val_time_ids, sigmas_by_timestep, args.seed + 3)

    unet.eval()
    unet_random = validate()
    print(f"UNet: {args.unet_steps} steps (validation loss before: {unet_random:.4f})", flush=True)
    torch.manual_seed(args.seed + 1)
    train_unet(unet, vae, embeddings, sigmas_by_timestep, args, validate)
    unet_loss_final = validate()
    seconds = time.perf_counter() - start
    print(f"UNet done: validation loss {unet_loss_final:.4f} (random: {unet_random:.4f})")

    record = {
        "command": "python scripts/pretrain_tiny_base.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "vae_validation_mse": {"random": vae_random, "trained": vae_mse},
        "latent_std_unscaled": std,
        "scaling_factor": scaling_factor,
        "unet_validation_loss": {"random": unet_random, "trained": unet_loss_final},
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "text_encoder_sha256": parts["text_encoder_sha256"],
    }
    save_base(args.output_dir, vae, unet, record)
    print(f"Pretrained in {seconds:.0f}s ({seconds / 60:.1f} min); wrote {args.output_dir}/unet, vae, pretrain.json")
    print(f"Final validation: VAE reconstruction MSE {vae_mse:.5f}, UNet loss {unet_loss_final:.4f}")


if __name__ == "__main__":
    main()
