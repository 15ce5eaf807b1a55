"""How far an adapter follows its conditions: the conditioning gain (the trainer's loss with the true
condition against another pair's, the loss handed in), and scores of generated images against their
conditions (edge F1, SSIM), the way ControlNet++ (Li et al., 2024) scores them: the condition is
extracted back from the generated image and compared with the input."""

import typing

import numpy as np
import torch
from PIL import Image

from .images import canny_condition

CONTROL_METRICS = ("canny", "ssim", "none")
CONTROL_CANNY_THRESHOLDS = (100, 200)  # canny of generated images for --control_metric canny (OpenCV's usual)
CONTROL_SCORE_SEED = 0  # the conditioning gain's latents, noise and timesteps: the same in every run
CONTROL_METRIC_KEYS = {"canny": "control_f1", "ssim": "control_ssim"}  # tracker names, after "validation/"


class ControlPairs(typing.NamedTuple):
    """The validation pairs as the loss takes them, computed once."""

    latents: torch.Tensor
    conditions: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    time_ids: torch.Tensor


@torch.no_grad()
def conditioning_gain(pair_loss, pairs, num_train_timesteps, batch_size, seed=CONTROL_SCORE_SEED, draws=1):
    """1 − loss(true conditions) / loss(conditions rolled by one pair), with the trainer's loss handed in
    as `pair_loss(latents, conditions, prompt_embeds, added_cond_kwargs, noise=, timesteps=)`.

    Each pair is noised `draws` times in each quarter of the timesteps (noise and timesteps drawn
    from `seed`), so the overall gain is the gain under uniform timesteps. Returns {"overall",
    "ranges": {"low-high": gain}, "loss_true", "loss_shuffled"} (losses: means over all draws).
    """
    device = pairs.latents.device
    generator = torch.Generator(device).manual_seed(seed)
    bounds = [num_train_timesteps * quarter // 4 for quarter in range(5)]
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
                    loss = pair_loss(latents, condition[chunk], pairs.prompt_embeds[chunk], added_cond_kwargs,
                                     noise=all_noise[chunk], timesteps=all_timesteps[chunk])
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
