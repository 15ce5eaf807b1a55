#!/usr/bin/env python
"""Pretrain the tiny SDXL's VAE and UNet on fill-style images, so that an adapter has something to steer.

Why: the tiny SDXL from ``make_tiny_sdxl.py`` has random weights. Its UNet predicts noise, not
images, so an adapter trained on top of it cannot change anything that matters and "does training
teach control?" cannot be answered. This script makes a tiny base that draws the fill data (a disc
of the caption's colour on a background of the caption's other colour) but cannot know where the
disc goes: the caption names the colours only. Where the disc is placed is exactly what a
T2I-Adapter on the circle's outline has to teach.

What it does, deterministically by ``--seed`` (same seed, same machine and torch: same weights):

1. Builds the random tiny SDXL with ``make_tiny_sdxl.build_tiny_sdxl`` in a temporary folder and
   loads its text encoders, tokenizers, VAE, UNet and scheduler. The text encoders and tokenizers
   stay random and frozen (captions still differ by their colour words, which is all the UNet needs).
   The VAE and UNet are loaded with fewer GroupNorm groups (see VAE_NORM_NUM_GROUPS and
   UNET_NORM_NUM_GROUPS): same parameters, same random start.
2. Trains the VAE as an autoencoder on fill images: the decoder reconstructs from the posterior mean
   plus Gaussian noise of ``--vae_latent_noise`` times the batch's per-channel latent std (mean
   squared error). Without noise the latents carry fine detail the UNet then has to predict; with the
   learned posterior std of a KL-weighted VAE, training starts from std ≈ 1 and learns colours slowly
   (both measured; see assets/tiny-fill-base/README.md).
3. Normalises the latents: a per-channel shift and scale, folded exactly into the VAE's 1×1
   ``quant_conv`` and ``post_quant_conv``, gives the posterior mean zero mean and unit std per
   channel on fill images, so ``scaling_factor`` is 1.0 (SDXL's 0.13025 is 1 / std of its own
   latents). The posterior std is fixed to ``--posterior_std`` (in those units): the trainer samples
   from the posterior, and a posterior std of s makes the UNet's loss at noise level σ at least
   s² / (σ² + s²), e.g. 0.9 at the smallest σ (0.029) for s = 0.09.
4. Trains the UNet with SDXL's objective as the trainer computes it: Euler σ parameterisation
   (noisy = x₀ + σ·ε, the UNet sees noisy / sqrt(σ² + 1)), epsilon prediction and the σ⁻²-weighted
   x₀ error (which equals the ε error), text embeddings from both encoders via the trainer's
   ``encode_prompt`` and SDXL's time ids, uniform timesteps. One change: each sample's loss is
   weighted by min(σ² + 1, ``--high_noise_weight``) (normalised over the batch), so that high-noise
   errors, where only the caption tells the colours, are not drowned by low-noise ones (see
   ``high_noise_weights``). 10% of captions are replaced by zeroed text embeddings, which is what
   the SDXL pipeline feeds as the unconditional input of classifier-free guidance
   (``force_zeros_for_empty_prompt``). Samples come from a pool drawn and VAE-encoded once.
5. Writes ``<output_dir>/unet`` and ``<output_dir>/vae`` in diffusers format, and ``pretrain.json``
   with the settings, the validation losses (also with another sample's and with zeroed text, to
   show whether the UNet uses the caption), the time taken and the hashes of the text encoders it
   trained against.

The validation losses use a fixed held-out batch, fixed noise and evenly spaced timesteps.

Example (the command that made assets/tiny-fill-base, about 6 minutes on a 2-core CPU, one thread):

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

import train_t2i_adapter_sdxl as train
from make_fill_dataset import make_fill_sample
from make_tiny_sdxl import build_tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The random tiny VAE normalises 32 channels in 32 groups: per-channel (instance) norm, which maps
# any flat colour to the same activations, so its decoder cannot paint a flat region in a given
# colour. 4 groups of 8 channels keep colour; the parameters (and so the random start) are the same.
VAE_NORM_NUM_GROUPS = 4
# The same holds for the UNet, whose widths are 32 and 64: 32 groups normalise each channel (or
# pair) over the 8×8 latent on its own, removing its spatial mean. Its final GroupNorm then cannot
# pass on the noise's per-channel mean over 64 positions, whose variance (1/64) is a loss floor of
# about 0.016 the UNet cannot get under; at high noise it stayed worse than predicting x₀ = 0.
# With 8 groups (4 and 8 channels each; SDXL has 10) the validation loss after 300 steps fell from
# 0.064 to 0.053 and the loss for t ≥ 750 from 0.033 to 0.018. Same parameters, same random start.
UNET_NORM_NUM_GROUPS = 8
TIMESTEP_RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Pretrain the tiny SDXL's VAE and UNet on fill-style images (writes unet/ and vae/).",
    )
    parser.add_argument("--output_dir", default="assets/tiny-fill-base", help="Where unet/, vae/ and pretrain.json go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random tiny SDXL and of training.")
    parser.add_argument("--resolution", type=int, default=64, help="Side of the fill images, in pixels.")
    parser.add_argument("--vae_steps", type=int, default=600, help="VAE optimisation steps.")
    parser.add_argument("--vae_batch_size", type=int, default=16)
    parser.add_argument("--vae_crop", type=int, default=32, help="The VAE trains on random square crops of this side.")
    parser.add_argument("--vae_learning_rate", type=float, default=1e-3)
    parser.add_argument(
        "--vae_latent_noise",
        type=float,
        default=0.25,
        help="Noise added to the posterior mean before decoding in VAE training, relative to the batch's latent std.",
    )
    parser.add_argument(
        "--posterior_std", type=float, default=1e-3, help="The VAE's fixed posterior std, in units of the latents' std."
    )
    parser.add_argument("--unet_steps", type=int, default=500, help="UNet optimisation steps.")
    parser.add_argument(
        "--num_train_samples", type=int, default=2048, help="Fill samples drawn (and VAE-encoded once) for the UNet."
    )
    parser.add_argument(
        "--high_noise_weight",
        type=float,
        default=4.0,
        help="Cap of the UNet loss weight min(σ² + 1, cap), normalised over the batch (1: the trainer's plain loss).",
    )
    parser.add_argument("--unet_batch_size", type=int, default=64)
    parser.add_argument("--unet_learning_rate", type=float, default=6e-3)
    parser.add_argument("--warmup_steps", type=int, default=50, help="Linear warm-up of both learning rates.")
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.1, help="Share of zeroed text embeddings.")
    parser.add_argument("--num_validation", type=int, default=128, help="Held-out samples for the validation losses.")
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


def normalisation_batch(seed, resolution, count=256):
    """The images the latent normalisation is measured on (a stream of its own)."""
    return fill_batch(np.random.default_rng([seed, 102]), count, resolution)[0]


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


def vae_loss(vae, images, latent_noise, generator=None):
    """Mean squared reconstruction error from the posterior mean plus noise of `latent_noise` times
    the batch's per-channel latent std."""
    latents = vae.encode(images).latent_dist.mode()
    if latent_noise:
        scale = latent_noise * latents.std(dim=(0, 2, 3), keepdim=True).detach()
        latents = latents + scale * torch.randn(latents.shape, generator=generator)
    reconstruction = vae.decode(latents).sample
    return torch.mean((reconstruction - images) ** 2)


@torch.no_grad()
def vae_validation(vae, images):
    """Reconstruction MSE from the posterior mean (the fixed validation batch)."""
    reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
    return torch.mean((reconstruction - images) ** 2).item()


def random_crop(images, side, rng):
    """One random `side`² crop (the same place for the whole batch): the VAE is convolutional, and
    fill images look alike at every scale, so training on crops costs a quarter and loses nothing."""
    if side >= images.shape[-1]:
        return images
    top, left = (int(v) for v in rng.integers(0, images.shape[-1] - side + 1, size=2))
    return images[:, :, top : top + side, left : left + side]


def train_vae(vae, args, log_every=100):
    # Channels-last convolutions are ~10% faster here on CPU; the weights go back to the default layout after.
    vae.to(memory_format=torch.channels_last)
    vae.train()
    vae.requires_grad_(True)
    optimizer, scheduler = make_optimizer(vae.parameters(), args.vae_learning_rate, args.warmup_steps, args.vae_steps)
    rng = train_stream(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    running = []
    for step in range(args.vae_steps):
        images, _ = fill_batch(rng, args.vae_batch_size, args.resolution)
        images = random_crop(images, args.vae_crop, rng).contiguous(memory_format=torch.channels_last)
        loss = vae_loss(vae, images, args.vae_latent_noise, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == args.vae_steps:
            print(f"  vae step {step + 1:5d}  train mse {np.mean(running):.5f}", flush=True)
            running = []
    vae.to(memory_format=torch.contiguous_format)
    vae.eval()
    vae.requires_grad_(False)


@torch.no_grad()
def normalise_latents(vae, images, posterior_std):
    """Give the posterior mean zero mean and unit std per channel on `images`, and a fixed std.

    The encoder's last step is the 1×1 ``quant_conv`` (mean and log-variance channels), the
    decoder's first the 1×1 ``post_quant_conv``; a per-channel affine map of the latents folds into
    both exactly, so decoding the new latents gives the same images. The log-variance channels are
    set to the constant log(posterior_std²). Returns the per-channel means and stds removed.
    """
    means = vae.encode(images).latent_dist.mean
    shift, scale = means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))
    channels = len(shift)
    quant, post_quant = vae.quant_conv, vae.post_quant_conv
    quant.weight[:channels] /= scale[:, None, None, None]
    quant.bias[:channels] = (quant.bias[:channels] - shift) / scale
    quant.weight[channels:] = 0.0
    quant.bias[channels:] = 2 * float(np.log(posterior_std))
    # post_quant_conv(old) = W·old + b with old = scale·new + shift.
    post_quant.bias += post_quant.weight[:, :, 0, 0] @ shift
    post_quant.weight *= scale[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)
    return shift.tolist(), scale.tolist()


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


def unet_loss(unet, latents, prompt_embeds, pooled, time_ids, sigmas_by_timestep, timesteps, noise, reduce=True):
    """The trainer's loss without an adapter: Euler σ noising, epsilon prediction, σ⁻²-weighted x₀ error.
    With reduce=False: the per-sample losses."""
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
    if reduce:
        return train.weighted_denoising_loss(denoised, latents, sigmas)
    return (sigmas.float() ** -2.0 * (denoised - latents) ** 2).reshape(len(latents), -1).mean(dim=1)


def validation_noise(val_latents, num_train_timesteps, seed):
    """Fixed noise and evenly spaced timesteps over [0, num_train_timesteps) for the validation batch."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(val_latents.shape, generator=generator)
    timesteps = torch.linspace(0, num_train_timesteps - 1, len(val_latents)).round().long()
    return noise, timesteps


@torch.no_grad()
def unet_validation(unet, val_latents, val_text, time_ids, sigmas_by_timestep, seed):
    """UNet loss on the fixed validation batch: fixed noise and evenly spaced timesteps over [0, 1000)."""
    noise, timesteps = validation_noise(val_latents, len(sigmas_by_timestep), seed)
    return unet_loss(unet, val_latents, *val_text, time_ids, sigmas_by_timestep, timesteps, noise).item()


@torch.no_grad()
def text_use(unet, val_latents, val_text, time_ids, sigmas_by_timestep, seed):
    """Validation loss with the true captions, with another sample's (the batch rolled by one, which
    names other colours in 131 of 132 cases), and with zeroed text embeddings: overall and per
    timestep range. A UNet that uses the caption has the lowest loss with the true one."""
    noise, timesteps = validation_noise(val_latents, len(sigmas_by_timestep), seed)
    prompt_embeds, pooled = val_text
    variants = {
        "true caption": (prompt_embeds, pooled),
        "another sample's caption": (prompt_embeds.roll(1, 0), pooled.roll(1, 0)),
        "zeroed text": (torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)),
    }
    result = {}
    for name, text in variants.items():
        losses = unet_loss(unet, val_latents, *text, time_ids, sigmas_by_timestep, timesteps, noise, reduce=False)
        result[name] = {"all": losses.mean().item()}
        for low, high in TIMESTEP_RANGES:
            in_range = (timesteps >= low) & (timesteps < high)
            result[name][f"{low}-{high}"] = losses[in_range].mean().item()
    return result


def high_noise_weights(sigmas, cap):
    """Per-sample loss weights min(σ² + 1, cap), normalised to mean 1 over the batch.

    The ε loss of a sample is its x₀ error divided by σ², so at high noise, where only the caption
    can tell the colours, a wrong colour costs little next to the low-noise errors that dominate the
    uniform-timestep loss, and the UNet learns the captions late. Weighting by σ² + 1 would make the
    loss an x₀ error (it doubled the validation loss in 300 steps); capping it at 4 lifts only
    σ > 1 (t > ~430) and kept the validation loss within 3% of the plain one (300 steps: 0.070
    against 0.068) while the loss with another sample's caption rose from 7% to 17% above the true one.
    """
    weights = torch.clamp(sigmas.float() ** 2 + 1, max=cap)
    return weights / weights.mean()


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
        losses = unet_loss(unet, latents, prompt_embeds, pooled, time_ids, sigmas_by_timestep, timesteps, noise, False)
        weights = high_noise_weights(sigmas_by_timestep[timesteps], args.high_noise_weight)
        loss = (weights * losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(losses.mean().item())
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
        # Same weights, fewer norm groups (see VAE_NORM_NUM_GROUPS and UNET_NORM_NUM_GROUPS).
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", norm_num_groups=VAE_NORM_NUM_GROUPS),
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", norm_num_groups=UNET_NORM_NUM_GROUPS),
        "scheduler": EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
        "text_encoder_sha256": {
            s: file_sha256(os.path.join(folder, s, "model.safetensors")) for s in ("text_encoder", "text_encoder_2")
        },
    }


def save_base(output_dir, vae, unet, text_encoders, record):
    """The pretrained UNet and VAE, and the text encoders whose embeddings the UNet learned: random
    ones, but transformers' initialisation differs between versions, so they are kept with it."""
    os.makedirs(output_dir, exist_ok=True)
    unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(output_dir, "vae"), safe_serialization=True)
    for name, text_encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
        text_encoder.save_pretrained(os.path.join(output_dir, name), safe_serialization=True)
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
    shift, scale = normalise_latents(vae, normalisation_batch(args.seed, args.resolution), args.posterior_std)
    vae_mse_after = vae_validation(vae, val_images)
    vae_seconds = time.perf_counter() - start
    print(f"VAE done in {vae_seconds:.0f}s: validation MSE {vae_mse:.5f} ({vae_mse_after:.5f} after normalising the"
          f" latents; per-channel stds removed: {', '.join(f'{s:.3f}' for s in scale)})", flush=True)

    embeddings = CaptionEmbeddings(parts["text_encoders"], parts["tokenizers"])
    sigmas_by_timestep = train.sigma_table(parts["scheduler"])
    resolution = (args.resolution, args.resolution)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(args.seed + 2)
        val_latents = vae.encode(val_images).latent_dist.sample(generator=generator) * vae.config.scaling_factor
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
    text = text_use(unet, val_latents, val_text, val_time_ids, sigmas_by_timestep, args.seed + 3)
    seconds = time.perf_counter() - start
    print(f"UNet done: validation loss {unet_loss_final:.4f} (random: {unet_random:.4f})")
    for name, losses in text.items():
        print(f"  with {name:<26} " + "  ".join(f"{key} {value:.4f}" for key, value in losses.items()))

    record = {
        "command": "python scripts/pretrain_tiny_base.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "vae_norm_num_groups": VAE_NORM_NUM_GROUPS,
        "unet_norm_num_groups": UNET_NORM_NUM_GROUPS,
        "vae_validation_mse": {"random": vae_random, "trained": vae_mse, "after_normalising_latents": vae_mse_after},
        "latent_normalisation": {"shift": shift, "scale": scale},
        "scaling_factor": vae.config.scaling_factor,
        "unet_validation_loss": {"random": unet_random, "trained": unet_loss_final},
        "unet_validation_loss_by_caption": text,
        "seconds": {"vae": round(vae_seconds, 1), "total": round(seconds, 1)},
        "torch": torch.__version__,
        "text_encoder_sha256": parts["text_encoder_sha256"],
    }
    save_base(args.output_dir, vae, unet, parts["text_encoders"], record)
    print(f"Pretrained in {seconds:.0f}s ({seconds / 60:.1f} min); wrote {args.output_dir}/unet, vae, text encoders, pretrain.json")
    print(f"Final validation: VAE reconstruction MSE {vae_mse_after:.5f}, UNet loss {unet_loss_final:.4f}")


if __name__ == "__main__":
    main()
