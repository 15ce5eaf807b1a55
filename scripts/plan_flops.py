#!/usr/bin/env python
"""What a training step computes: its FLOPs by phase, for these flags and for upstream's settings, and
a planned time per step on named GPUs. Planned on fake tensors, not measured on a GPU.

The step is the trainer's own (`set_up_models`, `build_training`, `batch_loss`, `optimisation_step`),
run by the memory planner on fake tensors (see scripts/plan_memory.py); each matmul, convolution and
attention op adds its FLOPs by torch's formulas (torch.utils.flop_counter), to the phase it runs in:
the VAE encode, the text encoders, the adapter's forward, the UNet's forward, the backward (through
the frozen UNet to the adapter's weights) and the optimizer's update (AdamW's elementwise formula).
Elementwise ops (norms, activations) are not counted. Gradient checkpointing's recomputation is
counted in the backward, as the GPU runs it.

Upstream's settings: the same flags with the UNet left trainable (the backward also makes gradients
for every UNet weight, which nothing uses), the text embeddings precomputed once per sample before
training (not in the step), and the VAE encoding every step (no latent cache).

The planned time per step takes each op at the published dense peak of the arithmetic a GPU runs it
in, times an assumed utilisation: bf16/fp16 on the tensor cores; float32 convolutions (the VAE's,
unless a VAE that follows the weight dtype is given) in TF32, PyTorch's default for cuDNN; float32
matmuls at the float32 rate unless --allow_tf32. It is an estimate to compare settings and GPUs by.
Where the step encodes with the VAE in float32, the time table adds the same flags with
--vae_precision bf16 beside them.

Examples:
  python scripts/plan_flops.py --size sdxl --resolution 1024 --train_batch_size 4 --mixed_precision bf16
  python scripts/plan_flops.py --pretrained_model_name_or_path tiny-sdxl --resolution 64
"""

import argparse

import torch

import plan_memory
import train_t2i_adapter_sdxl as train
from t2i_train import flops, memory

TERA = 1e12


def plan_step_flops(options, upstream=False):
    """{phase: {arithmetic: FLOPs}} of one step of the trainer with `options`, or with upstream's settings."""
    if upstream:
        options = argparse.Namespace(**{**vars(options), "cache_latents": False, "vae_precision": None})
    plan = memory.plan_memory(options, train, options.size, options.device_type, unet_grads=upstream)
    return plan["flops"]


def per_step(by_phase, upstream):
    """The phases that run in each step: upstream encodes the text once per sample, before training."""
    return [phase for phase in by_phase if not (upstream and phase == "text encoders")]


def arithmetic_note(kinds):
    counted = sum(kinds.values())
    if not counted:
        return ""
    return ", ".join(f"{kind} {100 * value / counted:.0f} %" for kind, value in sorted(kinds.items()) if value)


def flop_table(ours, upstream):
    def tflop(by_phase, phase):
        return f"{flops.total(by_phase, [phase]) / TERA:.3f}" if phase in by_phase else "—"

    lines = ["| phase | ours, TFLOP | upstream's settings, TFLOP | ours, arithmetic |", "|---|---:|---:|---|"]
    for phase in dict.fromkeys([*upstream, *ours]):  # upstream has every phase, in the step's order
        theirs = tflop(upstream, phase)
        if phase == "text encoders" and phase in upstream:
            theirs = f"({theirs}, once per sample before training)"
        lines.append(f"| {phase} | {tflop(ours, phase)} | {theirs} | {arithmetic_note(ours.get(phase, {}))} |")
    lines.append(f"| **per step** | **{flops.total(ours) / TERA:.3f}** |"
                 f" **{flops.total(upstream, per_step(upstream, True)) / TERA:.3f}** | |")
    return "\n".join(lines)


def time_table(columns, allow_tf32, utilisation=flops.ASSUMED_UTILISATION):
    """Planned s/step on each GPU of {label: FLOPs by phase}, the last column upstream's settings, and the
    ratio of each other column to it."""
    *ours, upstream = columns
    kinds = {label: flops.by_arithmetic(by_phase, per_step(by_phase, label == upstream))
             for label, by_phase in columns.items()}
    lines = ["| GPU (dense peaks, TFLOP/s: bf16 / TF32 / fp32) | " + " | ".join(f"{label}, s/step" for label in columns)
             + "".join(f" | {label} / upstream" for label in ours) + " |",
             "|---|" + "---:|" * (len(columns) + len(ours))]
    for gpu, peaks in flops.GPU_PEAKS.items():
        seconds = {label: flops.planned_seconds(work, peaks, allow_tf32, utilisation) for label, work in kinds.items()}
        lines.append(f"| {gpu} ({peaks['bf16']} / {peaks['tf32']} / {peaks['fp32']}) | "
                     + " | ".join(f"{value:.3f}" for value in seconds.values())
                     + "".join(f" | {seconds[label] / seconds[upstream]:.2f}" for label in ours) + " |")
    return "\n".join(lines)


def vae_in_bf16_too(options):
    """The same flags with the VAE encoding in bf16, where the step encodes in float32 (no latent cache)."""
    if options.cache_latents or train.vae_dtype_for(options, train.weight_dtype_for(options.mixed_precision)) != torch.float32:
        return None
    return argparse.Namespace(**{**vars(options), "vae_precision": "bf16"})


def build_parser():
    parser = plan_memory.build_parser()
    parser.description = __doc__
    parser.add_argument("--utilisation", type=float, default=flops.ASSUMED_UTILISATION,
                        help="The share of each peak every op is planned to reach.")
    return parser


def main(options):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the models are cast by the trainer's code, as in a run
    ours, upstream = plan_step_flops(options), plan_step_flops(options, upstream=True)
    print(plan_memory.describe(options))
    print("PLANNED on fake tensors, not measured on a GPU. FLOPs of matmuls, convolutions and attention by torch's"
          " formulas, and of the optimizer's update:")
    print(flop_table(ours, upstream))
    print()
    print(f"Planned time per step, PLANNED (each op at {100 * options.utilisation:.0f} % of the peak of its"
          f" arithmetic; float32 matmuls at the {'TF32' if options.allow_tf32 else 'fp32'} rate):")
    columns = {"ours": ours}
    bf16_options = vae_in_bf16_too(options)
    if bf16_options is not None:
        columns["ours, --vae_precision bf16"] = plan_step_flops(bf16_options)
    columns["upstream's settings"] = upstream
    print(time_table(columns, options.allow_tf32, options.utilisation))
    print()
    print(f"TFLOP per step: {flops.total(ours) / TERA:.3f} (upstream's settings:"
          f" {flops.total(upstream, per_step(upstream, True)) / TERA:.3f})")
    return ours, upstream


if __name__ == "__main__":
    main(plan_memory.parse_args(parser=build_parser()))
