"""The exponential moving average of the adapter's weights (--use_ema), kept as DiT keeps one: a frozen
float32 copy of the adapter, moved towards its weights in place after every `--ema_update_every`-th
optimisation step. With it, the EMA is what the run exports and scores; the raw weights stay in the
checkpoints. Its state is its weights alone (the update count follows from the step), saved in each
checkpoint in diffusers format, so a resume continues it bit for bit."""

import copy

import torch

EMA_SUBFOLDER = "t2iadapter_ema"  # in a checkpoint, beside the raw adapter's folder


def averaged_copy(adapter, device):
    """A new EMA of `adapter`, starting at its weights, in float32 on `device`."""
    return copy.deepcopy(adapter).to(device=device, dtype=torch.float32).requires_grad_(False).eval()


def decay_at(update, decay):
    """The decay of the EMA's update number `update` (from 0): (1 + n) / (10 + n), as diffusers' EMAModel
    warms up, capped at `decay`. Without the warm-up an EMA of decay 0.9999 would stay near the initial
    weights for its first ~10,000 steps, longer than many adapter runs."""
    return min(decay, (1 + update) / (10 + update))


@torch.no_grad()
def update_ema(averaged, model, decay):
    """averaged ← decay · averaged + (1 − decay) · model, parameter by parameter."""
    for average, current in zip(averaged.parameters(), model.parameters()):
        average.lerp_(current.detach().to(average.device, average.dtype), 1 - decay)


def last_decay(step, args):
    """The decay of the last update made by optimisation step `step` (one every --ema_update_every steps;
    the first's for a step before any): what the EMA's horizon was then."""
    return decay_at(max(step // args.ema_update_every - 1, 0), args.ema_decay)


def update_after_step(averaged, model, step, args):
    """After optimisation step `step` (from 1): an update every --ema_update_every steps, none without an EMA."""
    if averaged is not None and step % args.ema_update_every == 0:
        update_ema(averaged, model, last_decay(step, args))


def on_device(averaged, device):
    """The EMA for a forward pass on `device`: itself, or a copy there when it is kept on the CPU."""
    return averaged if next(averaged.parameters()).device == device else copy.deepcopy(averaged).to(device)
