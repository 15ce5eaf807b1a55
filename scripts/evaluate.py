#!/usr/bin/env python
"""Score how much a T2I-Adapter controls its SDXL base, on held-out fill samples.

Two numbers, for any (base, adapter) pair:

* **Conditioning gain** = 1 − loss(true condition) / loss(another sample's condition), where both
  losses are the trainer's own ``adapter_training_loss`` with the same latents, noise, timesteps
  and prompts; the other condition is the batch rolled by one. 0 means the adapter ignores its
  input; 0.3 means the true condition removes 30% of the denoising error that a wrong one leaves.
  It is reported over uniform timesteps and per timestep range, for each ``--seeds`` value (which
  draws the latents' posterior samples, the noise and the timesteps).
* **Control fidelity**: images are generated from the held-out conditions and prompts
  (``StableDiffusionXLAdapterPipeline``) and compared with the condition's circle: the IoU between
  the circle's disc (known geometry) and the generated image's foreground, i.e. the pixels whose
  colour is nearer the prompt's fill colour than its background colour. It is reported for the
  adapter with the true condition, for the adapter with a shuffled condition (scored against the
  prompt's own circle) and for the base alone (``StableDiffusionXLPipeline``, same prompts and
  seeds): an adapter that controls placement scores clearly above the other two.

The held-out samples come from ``make_fill_dataset.make_fill_sample`` with a random stream of their
own (``--data_seed``), distinct from the training set's and the pretraining's.

Without ``--adapter``, a freshly initialised (untrained) adapter is scored: the "step 0" numbers.

Example:

    python scripts/evaluate.py --pretrained_model_name_or_path demo/tiny-sdxl --adapter demo/adapter \\
        --output_json demo/evaluation.json --grid demo/evaluation.png
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import train_t2i_adapter_sdxl as train  # noqa: E402
from make_fill_dataset import COLORS, make_fill_sample  # noqa: E402

TIMESTEP_RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Conditioning gain and control fidelity of a T2I-Adapter on held-out fill samples.")
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="The SDXL base (diffusers folder).")
    parser.add_argument("--adapter", default=None, help="Adapter folder; without it an untrained adapter is scored.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--data_seed", type=int, default=1, help="Seed of the held-out samples' stream.")
    parser.add_argument("--num_samples", type=int, default=128, help="Held-out samples for the conditioning gain.")
    parser.add_argument("--noise_draws", type=int, default=2, help="Noise/timestep draws per sample and timestep range.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds of the gain's noise (one row each).")
    parser.add_argument("--num_images", type=int, default=32, help="Held-out samples generated for control fidelity.")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output_json", default=None, help="Also write the scores here.")
    parser.add_argument("--grid", default=None, help="Write a PNG: condition, target, adapter, shuffled, base per row.")
    parser.add_argument("--grid_rows", type=int, default=8)
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (tiny models gain nothing from more).")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------
# Held-out data and models
# ----------------------------------------------------------------------------


def held_out_samples(num_samples, resolution=64, data_seed=1):
    """`num_samples` fill samples ``(target, condition, caption, circle)`` from a stream no training uses."""
    rng = np.random.default_rng([data_seed, 300])
    return [make_fill_sample(rng, resolution) for _ in range(num_samples)]


def samples_to_tensors(samples, resolution):
    """Pixel values in [-1, 1], conditions in [0, 1] (the trainer's transforms) and captions."""
    pixel_values = torch.stack([train.to_training_pixels(train.centre_crop(target, resolution)) for target, *_ in samples])
    conditions = torch.stack([to_tensor(train.centre_crop(condition, resolution)) for _, condition, *_ in samples])
    return pixel_values, conditions, [caption for _, _, caption, _ in samples]


def load_components(base):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    return {
        "tokenizers": [CLIPTokenizer.from_pretrained(base, subfolder=s) for s in ("tokenizer", "tokenizer_2")],
        "text_encoders": [
            CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval(),
            CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2").eval(),
        ],
        "vae": AutoencoderKL.from_pretrained(base, subfolder="vae").eval(),
        "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval(),
        "noise_scheduler": EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
    }


def load_adapter(adapter_dir, components, seed=0):
    """The trained adapter, or (adapter_dir None) a fresh one derived like the trainer's, seeded."""
    from diffusers import T2IAdapter

    if adapter_dir is not None:
        return T2IAdapter.from_pretrained(adapter_dir).eval()
    torch.manual_seed(seed)
    config = train.derive_adapter_config(dict(components["unet"].config), dict(components["vae"].config))
    return T2IAdapter(**config).eval()


# ----------------------------------------------------------------------------
# Conditioning gain
# ----------------------------------------------------------------------------


@torch.no_grad()
def paired_losses(components, adapter, latents, conditions, prompt_embeds, added_cond_kwargs, noise, timesteps):
    """adapter_training_loss with the true conditions and with the batch's conditions rolled by one."""
    sigmas_by_timestep = train.sigma_table(components["noise_scheduler"])
    prediction_type = components["noise_scheduler"].config.prediction_type
    losses = []
    for condition in (conditions, conditions.roll(1, dims=0)):
        losses.append(
            train.adapter_training_loss(
                components["unet"], adapter, latents, condition, prompt_embeds, added_cond_kwargs,
                sigmas_by_timestep, prediction_type, torch.float32, noise=noise, timesteps=timesteps,
            ).item()
        )
    return losses


@torch.no_grad()
def conditioning_gain(components, adapter, samples, seed=0, noise_draws=2, batch_size=32, ranges=TIMESTEP_RANGES):
    """1 − loss(true condition) / loss(rolled condition) on `samples`, overall and per timestep range.

    Every range gets `noise_draws` draws of (noise, uniform timesteps in the range) per sample, so
    "overall" is the gain under uniform timesteps. Returns ``{"overall", "ranges": {"lo-hi": gain},
    "loss_true", "loss_shuffled"}`` (losses: means over all draws).
    """
    resolution = samples[0][0].width
    pixel_values, conditions, captions = samples_to_tensors(samples, resolution)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # encode_latents draws the posterior sample from the global RNG
    totals = {r: [0.0, 0.0] for r in ranges}
    for start in range(0, len(samples), batch_size):
        chunk = slice(start, start + batch_size)
        latents = train.encode_latents(components["vae"], pixel_values[chunk])
        prompt_embeds, pooled = train.encode_prompt(captions[chunk], components["text_encoders"], components["tokenizers"])
        time_ids = train.compute_time_ids((resolution, resolution), (0, 0), (resolution, resolution), len(latents))
        added = {"text_embeds": pooled, "time_ids": time_ids}
        for low, high in ranges:
            for _ in range(noise_draws):
                timesteps = torch.randint(low, high, (len(latents),), generator=generator)
                noise = torch.randn(latents.shape, generator=generator)
                true, shuffled = paired_losses(
                    components, adapter, latents, conditions[chunk], prompt_embeds, added, noise, timesteps
                )
                totals[(low, high)][0] += true * len(latents)
                totals[(low, high)][1] += shuffled * len(latents)
    loss_true = sum(t for t, _ in totals.values())
    loss_shuffled = sum(s for _, s in totals.values())
    count = len(samples) * noise_draws * len(ranges)
    return {
        "overall": 1 - loss_true / loss_shuffled,
        "ranges": {f"{low}-{high}": 1 - t / s for (low, high), (t, s) in totals.items()},
        "loss_true": loss_true / count,
        "loss_shuffled": loss_shuffled / count,
    }


# ----------------------------------------------------------------------------
# Control fidelity
# ----------------------------------------------------------------------------


def circle_mask(circle, resolution):
    """The condition's disc as a boolean (resolution, resolution) array, drawn as make_fill_sample draws it."""
    x, y, r = circle["center_x"], circle["center_y"], circle["radius"]
    mask = Image.new("L", (resolution, resolution), 0)
    ImageDraw.Draw(mask).ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(mask) > 0


def foreground_mask(image, circle):
    """Pixels whose colour is nearer the prompt's fill colour than its background colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    to_fill = np.linalg.norm(pixels - np.array(COLORS[circle["fill"]], dtype=np.float32), axis=-1)
    to_background = np.linalg.norm(pixels - np.array(COLORS[circle["background"]], dtype=np.float32), axis=-1)
    return to_fill < to_background


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def fidelity_scores(images, circles):
    """Per-image IoU between the circle's disc and the image's fill-coloured foreground."""
    scores = []
    for image, circle in zip(images, circles):
        if image.size != (image.width, image.width):
            raise ValueError(f"Expected square images, got {image.size}.")
        scores.append(iou(circle_mask(circle, image.width), foreground_mask(image, circle)))
    return scores


def control_fidelity(images, circles):
    """Mean IoU of `images` against their circles (1.0: every disc drawn exactly where its condition is)."""
    return float(np.mean(fidelity_scores(images, circles)))


def make_pipelines(base, components, adapter):
    """The adapter pipeline and the plain SDXL pipeline, sharing the same modules."""
    from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLPipeline

    shared = {
        "vae": components["vae"],
        "text_encoder": components["text_encoders"][0],
        "text_encoder_2": components["text_encoders"][1],
        "tokenizer": components["tokenizers"][0],
        "tokenizer_2": components["tokenizers"][1],
        "unet": components["unet"],
        "scheduler": components["noise_scheduler"],
    }
    adapter_pipe = StableDiffusionXLAdapterPipeline(adapter=adapter, force_zeros_for_empty_prompt=True, **shared)
    base_pipe = StableDiffusionXLPipeline(force_zeros_for_empty_prompt=True, add_watermarker=False, **shared)
    for pipe in (adapter_pipe, base_pipe):
        pipe.set_progress_bar_config(disable=True)
    return adapter_pipe, base_pipe


@torch.no_grad()
def generate(pipe, prompts, conditions=None, seed=0, num_inference_steps=20, guidance_scale=5.0, resolution=64, batch_size=32):
    """One image per prompt; image i starts from the noise of seed + i, whatever the pipeline."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        kwargs = {} if conditions is None else {"image": [conditions[i] for i in chunk]}
        images += pipe(
            prompt=[prompts[i] for i in chunk],
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seed + i) for i in chunk],
            **kwargs,
        ).images
    return images


def fidelity_table(base, components, adapter, samples, seed=0, num_inference_steps=20, guidance_scale=5.0, batch_size=32):
    """IoU for the adapter with true and shuffled conditions and for the base alone; also the images."""
    adapter_pipe, base_pipe = make_pipelines(base, components, adapter)
    prompts = [caption for _, _, caption, _ in samples]
    circles = [circle for *_, circle in samples]
    conditions = [condition for _, condition, _, _ in samples]
    shuffled = conditions[-1:] + conditions[:-1]  # the batch rolled by one, as for the gain
    common = {"seed": seed, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "resolution": samples[0][0].width, "batch_size": batch_size}
    images = {
        "adapter, true condition": generate(adapter_pipe, prompts, conditions, **common),
        "adapter, shuffled condition": generate(adapter_pipe, prompts, shuffled, **common),
        "base alone": generate(base_pipe, prompts, None, **common),
    }
    scores = {name: control_fidelity(generated, circles) for name, generated in images.items()}
    return scores, images


def save_grid(path, samples, images, rows):
    """Per row: condition, target, adapter (true condition), adapter (shuffled), base alone."""
    from generate import make_grid

    grid_rows = [
        [samples[i][1], samples[i][0], *(generated[i] for generated in images.values())]
        for i in range(min(rows, len(samples)))
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    make_grid(grid_rows).save(path)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def format_table(gains, fidelity, adapter_label):
    ranges = list(next(iter(gains.values()))["ranges"])
    lines = [f"Conditioning gain ({adapter_label}): 1 - loss(true condition) / loss(shuffled condition)", ""]
    lines.append("| seed | all t | " + " | ".join(f"t in [{r.replace('-', ', ')})" for r in ranges) + " |")
    lines.append("| --- " * (len(ranges) + 2) + "|")
    for seed, gain in gains.items():
        lines.append(f"| {seed} | {gain['overall']:.3f} | " + " | ".join(f"{gain['ranges'][r]:.3f}" for r in ranges) + " |")
    overall = [g["overall"] for g in gains.values()]
    lines.append(f"| mean | {np.mean(overall):.3f} (spread {np.ptp(overall):.3f}) | " + " | ".join(
        f"{np.mean([g['ranges'][r] for g in gains.values()]):.3f}" for r in ranges) + " |")
    lines += ["", "Control fidelity: IoU of the generated disc with the condition's circle", ""]
    lines += ["| generation | IoU |", "| --- | --- |"]
    lines += [f"| {name} | {score:.3f} |" for name, score in fidelity.items()]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    components = load_components(args.pretrained_model_name_or_path)
    adapter = load_adapter(args.adapter, components)
    adapter_label = args.adapter or "untrained adapter"
    samples = held_out_samples(max(args.num_samples, args.num_images), args.resolution, args.data_seed)

    gains = {
        seed: conditioning_gain(components, adapter, samples[: args.num_samples], seed, args.noise_draws, args.batch_size)
        for seed in args.seeds
    }
    fidelity, images = fidelity_table(
        args.pretrained_model_name_or_path, components, adapter, samples[: args.num_images], seed=0,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
    )
    print(format_table(gains, fidelity, adapter_label))
    print(f"\n({args.num_samples} held-out samples x {len(TIMESTEP_RANGES)} ranges x {args.noise_draws} draws for the gain,"
          f" {args.num_images} images at {args.num_inference_steps} steps for the IoU; {time.perf_counter() - start:.0f}s)")
    if args.grid:
        save_grid(args.grid, samples, images, args.grid_rows)
        print(f"Grid (condition, target, adapter, adapter with a shuffled condition, base alone): {args.grid}")
    if args.output_json:
        result = {
            "base": args.pretrained_model_name_or_path,
            "adapter": args.adapter,
            "settings": vars(args),
            "conditioning_gain": {str(seed): gain for seed, gain in gains.items()},
            "conditioning_gain_mean": float(np.mean([g["overall"] for g in gains.values()])),
            "control_fidelity_iou": fidelity,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
