#!/usr/bin/env python
"""Score how much a T2I-Adapter controls its SDXL base, on pairs it was not trained on.

Two scores, for any (base, adapter) pair and any dataset with conditions:

* **Conditioning gain** = 1 − loss(true condition) / loss(another pair's condition), computed by the
  trainer's own ``conditioning_gain`` (the one each validation logs): the trainer's loss with the
  same latents, noise, timesteps and prompts, the other condition being the pairs rolled by one.
  0 means the adapter ignores its input; 0.3 means the true condition removes 30% of the denoising
  error that a wrong one leaves. It is reported over uniform timesteps and per quarter of the
  timesteps, for each ``--seeds`` value (which draws the latents' posterior samples, the noise and
  the timesteps).
* **Controllability of generated images**: images are generated from the pairs' conditions and
  prompts (``StableDiffusionXLAdapterPipeline``) and compared with the condition, for the adapter
  with the true condition, for the adapter with a shuffled condition (scored against the prompt's
  own condition) and for the base alone (``StableDiffusionXLPipeline``, same prompts and seeds):
  an adapter that controls its images scores clearly above the other two. ``--control_metric``:

  - ``iou`` (fill data, the default without a dataset): the IoU between the condition's disc (known
    geometry) and the image's foreground, i.e. the pixels whose colour is nearer the prompt's fill
    colour than its background colour;
  - ``canny`` (the default with ``--conditioning_type canny``): F1 of the image's canny edges
    against the condition's edges, as ControlNet++ (Li et al., 2024) scores edge control;
  - ``ssim`` (the default for other datasets): structural similarity of image and condition in grey.

The pairs are either fill samples made by ``make_fill_dataset.make_fill_sample`` with a random stream
of their own (``--data_seed``), distinct from the training set's and the pretraining's, or the first
rows of ``--data_dir`` / ``--dataset_name`` (an imagefolder, parquet files, WebDataset shards: anything
the trainer reads), centre-cropped at ``--resolution`` as the trainer's validation pairs are.

Without ``--adapter``, a freshly initialised (untrained) adapter is scored: the "step 0" numbers.

Examples:

    python scripts/evaluate.py --pretrained_model_name_or_path demo/tiny-sdxl --adapter demo/adapter \\
        --output_json demo/evaluation.json --grid demo/evaluation.png
    python scripts/evaluate.py --pretrained_model_name_or_path my-sdxl --adapter my-canny-adapter \\
        --data_dir my-canny-data --conditioning_image_column conditioning_image --resolution 1024
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image

import train_t2i_adapter_sdxl as train
from make_fill_dataset import COLORS, make_fill_sample
from t2i_train import control, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Conditioning gain and controllability of a T2I-Adapter on pairs it was not trained on."
    )
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="The SDXL base (diffusers folder).")
    parser.add_argument("--adapter", default=None, help="Adapter folder; without it an untrained adapter is scored.")
    parser.add_argument("--resolution", type=int, default=64)
    pairs = parser.add_argument_group("Pairs (default: held-out fill samples)")
    pairs.add_argument("--data_dir", default=None, help="A dataset folder (imagefolder, parquet, shards).")
    pairs.add_argument("--dataset_name", default=None, help="A dataset `datasets.load_dataset` finds by name.")
    pairs.add_argument("--split", default=None, help="Its split (default: validation, else test, else train).")
    pairs.add_argument("--image_column", default="image")
    pairs.add_argument("--conditioning_image_column", default="conditioning_image")
    pairs.add_argument("--caption_column", default="text")
    pairs.add_argument("--conditioning_type", choices=["image", "canny"], default="image",
                      help="'canny': conditions are the canny edges of the images (as the trainer's).")
    pairs.add_argument("--data_seed", type=int, default=1, help="Seed of the held-out fill samples' stream.")
    parser.add_argument("--num_samples", type=int, default=128, help="Pairs for the conditioning gain.")
    parser.add_argument("--noise_draws", type=int, default=2, help="Noise/timestep draws per pair and timestep quarter.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds of the gain's noise (one row each).")
    parser.add_argument("--control_metric", choices=["iou", "canny", "ssim"], default=None,
                        help="Default: iou for fill samples, canny with --conditioning_type canny, else ssim.")
    parser.add_argument("--num_images", type=int, default=32, help="Pairs generated from for controllability.")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output_json", default=None, help="Also write the scores here.")
    parser.add_argument("--grid", default=None, help="Write a PNG: condition, target, adapter, shuffled, base per row.")
    parser.add_argument("--grid_rows", type=int, default=8)
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (tiny models gain nothing from more).")
    args = parser.parse_args(argv)
    # One pair "rolled by one" is its own condition: a gain of exactly 0, reported as if measured.
    for flag, why in (("num_samples", "the gain compares each pair's condition with another pair's"),
                      ("num_images", "the shuffled images are generated from another pair's condition")):
        if getattr(args, flag) < 2:
            parser.error(f"--{flag} must be at least 2 ({why}), got {getattr(args, flag)}")
    if args.data_dir and args.dataset_name:
        parser.error("give only one of --data_dir and --dataset_name")
    uses_dataset = bool(args.data_dir or args.dataset_name)
    if args.control_metric is None:
        args.control_metric = "canny" if args.conditioning_type == "canny" else ("ssim" if uses_dataset else "iou")
    if args.control_metric == "iou" and uses_dataset:
        parser.error("--control_metric iou needs the held-out fill samples' circles: use it without a dataset")
    return args


# ----------------------------------------------------------------------------
# Pairs and models
# ----------------------------------------------------------------------------


def held_out_samples(num_samples, resolution=64, data_seed=1):
    """`num_samples` fill samples ``(target, condition, caption, circle)`` from a stream no training uses."""
    rng = np.random.default_rng([data_seed, 300])
    return [make_fill_sample(rng, resolution) for _ in range(num_samples)]


def data_config(args):
    """What the trainer's data code and transform read, from our flags."""
    return data.DataConfig(resolution=args.resolution, image_column=args.image_column,
                           conditioning_image_column=args.conditioning_image_column,
                           caption_column=args.caption_column, conditioning_type=args.conditioning_type)


def trainer_flags(args):
    """The trainer's own flags at their defaults but the resolution: how its step makes the pairs' text
    embeddings and micro-conditioning (prepare_control_pairs)."""
    return train.build_parser().parse_args([
        "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--resolution", str(args.resolution),
    ])


def fill_rows(samples):
    """Fill samples as dataset rows (PNG-encoded images), the form the trainer's pairs come in."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "conditioning_image": ImageFeature(), "text": Value("string")})
    columns = {"image": [s[0] for s in samples], "conditioning_image": [s[1] for s in samples],
               "text": [s[2] for s in samples]}
    return Dataset.from_dict(columns, features=features)


def dataset_rows(args, count):
    """The first `count` rows of --data_dir / --dataset_name's split."""
    from datasets import Dataset

    flag, location = ("--data_dir", args.data_dir) if args.data_dir else ("--dataset_name", args.dataset_name)
    splits = data.open_dataset(location, data_config(args))
    split = args.split or next((name for name in ("validation", "test", "train") if name in splits), next(iter(splits)))
    rows = splits[split]
    data.check_columns(rows.column_names, data_config(args))
    if not isinstance(rows, Dataset) or len(rows) < 2:
        raise SystemExit(f"`{flag}` {location!r} has {len(rows)} sample(s) in {split!r}; at least 2 are needed"
                         " (the gain compares each pair's condition with another pair's).")
    return rows.select(range(min(count, len(rows))))


def pair_images(batch):
    """(conditions, targets) of a pair batch as PIL images at the training crop."""
    conditions = [to_pil_image(condition) for condition in batch["conditioning_pixel_values"]]
    targets = [to_pil_image((pixels + 1) / 2) for pixels in batch["pixel_values"]]
    return conditions, targets


def load_models(args, seed=0):
    """The frozen SDXL parts and the adapter, loaded by the trainer's own load_models: the trained adapter
    (--adapter), or without it a fresh one derived like the trainer's, drawn from `seed`."""
    flags = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--resolution", str(args.resolution)]
    if args.adapter is not None:
        flags += ["--adapter_model_name_or_path", args.adapter]
    trainer_flags = train.build_parser().parse_args(flags)
    PartialState()  # the trainer logs through accelerate's logger, which needs its state
    torch.manual_seed(seed)
    models = train.load_models(trainer_flags, train.check_inputs(trainer_flags))
    models.adapter.eval()
    return models


# ----------------------------------------------------------------------------
# Conditioning gain
# ----------------------------------------------------------------------------


def conditioning_gain(components, adapter, batch, args_for_trainer, seed=0, noise_draws=2, batch_size=32):
    """The trainer's conditioning gain on a pair batch (control_pair_batch), its latents and noise from `seed`."""
    pairs = train.prepare_control_pairs(batch, components, args_for_trainer, torch.device("cpu"), seed=seed)
    scheduler = components.noise_scheduler
    sigmas = train.sigma_table(scheduler)
    loss = train.pair_loss(components.unet, adapter, sigmas, scheduler.config.prediction_type, torch.float32)
    return control.conditioning_gain(loss, pairs, len(sigmas), batch_size, seed=seed, draws=noise_draws)


# ----------------------------------------------------------------------------
# Controllability of generated images
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


def controllability(metric, images, conditions, circles=None):
    """Mean --control_metric of generated `images` against the conditions they should follow."""
    if metric == "iou":
        return control_fidelity(images, circles)
    return float(np.mean([control.control_score(metric, condition, image) for condition, image in zip(conditions, images)]))


def make_pipelines(base, components, adapter):
    """The adapter pipeline and the plain SDXL pipeline, sharing the same modules."""
    from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLPipeline

    shared = {
        "vae": components.vae,
        "text_encoder": components.text_encoders[0],
        "text_encoder_2": components.text_encoders[1],
        "tokenizer": components.tokenizers[0],
        "tokenizer_2": components.tokenizers[1],
        "unet": components.unet,
        "scheduler": components.noise_scheduler,
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


def controllability_table(base, components, adapter, prompts, conditions, metric, circles=None, seed=0,
                          num_inference_steps=20, guidance_scale=5.0, resolution=64, batch_size=32):
    """The metric for the adapter with true and shuffled conditions and for the base alone; also the images."""
    adapter_pipe, base_pipe = make_pipelines(base, components, adapter)
    shuffled = conditions[-1:] + conditions[:-1]  # rolled by one, as for the gain
    common = {"seed": seed, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "resolution": resolution, "batch_size": batch_size}
    images = {
        "adapter, true condition": generate(adapter_pipe, prompts, conditions, **common),
        "adapter, shuffled condition": generate(adapter_pipe, prompts, shuffled, **common),
        "base alone": generate(base_pipe, prompts, None, **common),
    }
    scores = {name: controllability(metric, generated, conditions, circles) for name, generated in images.items()}
    return scores, images


def save_grid(path, conditions, targets, images, rows):
    """Per row: condition, target, adapter (true condition), adapter (shuffled), base alone."""
    from generate import make_grid

    grid_rows = [
        [conditions[i], targets[i], *(generated[i] for generated in images.values())]
        for i in range(min(rows, len(conditions)))
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    make_grid(grid_rows).save(path)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

METRIC_NAMES = {
    "iou": "IoU of the generated disc with the condition's circle",
    "canny": "F1 of the generated image's canny edges against the condition's",
    "ssim": "SSIM of the generated image and the condition, in grey",
}


def format_table(gains, scores, adapter_label, metric):
    ranges = list(next(iter(gains.values()))["ranges"])
    lines = [f"Conditioning gain ({adapter_label}): 1 - loss(true condition) / loss(shuffled condition)", ""]
    lines.append("| seed | all t | " + " | ".join(f"t in [{r.replace('-', ', ')})" for r in ranges) + " |")
    lines.append("| --- " * (len(ranges) + 2) + "|")
    for seed, gain in gains.items():
        lines.append(f"| {seed} | {gain['overall']:.3f} | " + " | ".join(f"{gain['ranges'][r]:.3f}" for r in ranges) + " |")
    overall = [g["overall"] for g in gains.values()]
    lines.append(f"| mean | {np.mean(overall):.3f} (spread {np.ptp(overall):.3f}) | " + " | ".join(
        f"{np.mean([g['ranges'][r] for g in gains.values()]):.3f}" for r in ranges) + " |")
    lines += ["", f"Controllability: {METRIC_NAMES[metric]}", ""]
    lines += [f"| generation | {metric} |", "| --- | --- |"]
    lines += [f"| {name} | {score:.3f} |" for name, score in scores.items()]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    count = max(args.num_samples, args.num_images)
    samples = None
    if args.data_dir or args.dataset_name:
        rows = dataset_rows(args, count)
    else:
        samples = held_out_samples(count, args.resolution, args.data_seed)
        rows = fill_rows(samples)
    args_for_trainer = trainer_flags(args)
    batch = train.control_pair_batch(rows, data_config(args))
    components = load_models(args)
    adapter = components.adapter
    adapter_label = args.adapter or "untrained adapter"

    gain_batch = {key: value[: args.num_samples] for key, value in batch.items()}
    gains = {
        seed: conditioning_gain(components, adapter, gain_batch, args_for_trainer, seed, args.noise_draws, args.batch_size)
        for seed in args.seeds
    }
    conditions, targets = pair_images({key: value[: args.num_images] for key, value in batch.items()})
    prompts = batch["captions"][: args.num_images]  # each pair's first caption
    circles = [circle for *_, circle in samples[: args.num_images]] if samples else None
    scores, images = controllability_table(
        args.pretrained_model_name_or_path, components, adapter, prompts, conditions, args.control_metric, circles,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        resolution=args.resolution, batch_size=args.batch_size,
    )
    print(format_table(gains, scores, adapter_label, args.control_metric))
    print(f"\n({len(gain_batch['captions'])} pairs x 4 timestep quarters x {args.noise_draws} draws for the gain,"
          f" {len(prompts)} images at {args.num_inference_steps} steps for {args.control_metric};"
          f" {time.perf_counter() - start:.0f}s)")
    if args.grid:
        save_grid(args.grid, conditions, targets, images, args.grid_rows)
        print(f"Grid (condition, target, adapter, adapter with a shuffled condition, base alone): {args.grid}")
    if args.output_json:
        result = {
            "base": args.pretrained_model_name_or_path,
            "adapter": args.adapter,
            "settings": vars(args),
            "conditioning_gain": {str(seed): gain for seed, gain in gains.items()},
            "conditioning_gain_mean": float(np.mean([g["overall"] for g in gains.values()])),
            "control_metric": args.control_metric,
            "controllability": scores,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
