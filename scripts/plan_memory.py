#!/usr/bin/env python
"""Will it fit? The GPU memory of a training step, planned on any machine, without a GPU.

The trainer's own code (`set_up_models`, `build_training`, `batch_loss`, `optimisation_step`) runs a
training step on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`): tensors with a shape,
a dtype and a device but no memory, so the real SDXL runs in seconds on a CPU. A dispatch mode counts
the bytes of every tensor an op allocates until the tensor is freed, and notes the peak and the phase
of the step it falls in (the VAE encode, the text encoders, the adapter and UNet forward, the
backward, the optimizer step). The step counted is a step after the first (the steady state): the
optimizer's state, which step 1 makes, is made first by one update, and held through the step.

What is modelled, and what is not:
  - each allocation rounded up to the CUDA caching allocator's 512-byte blocks, as
    `torch.cuda.max_memory_allocated` counts them (--device_type cpu counts exact bytes);
  - a single process: DDP adds its gradient buckets (about one more copy of the adapter's gradients);
  - the fake step runs the CPU kernels' shapes: their saved tensors match CUDA's for what SDXL uses
    (flash attention keeps the output and log-sum-exp on both), but workspaces that cuDNN or cuBLAS
    take inside a kernel, and the CUDA context (~0.5 GB outside PyTorch's count), are not seen;
  - fp16 plans as bf16 (both 2 bytes a value); its grad scaler adds a few scalars;
  - --use_8bit_adam: bitsandbytes' AdamW8bit is modelled by its state sizes (two 1-byte states a
    value and a float32 scale per 256 values, float32 states for tensors under 4096 values), updated
    in place, as its fused kernel does; the real optimizer cannot run on fake tensors;
  - --pretrained_model_name_or_path: the models are built from the folder's configs, no weights read;
  - --torch_compile and --enable_xformers_memory_efficient_attention are planned as eager PyTorch
    (scaled_dot_product_attention), whose saved tensors are flash attention's.

The engine is t2i_train/memory.py, handed the trainer; this file is its command line and tables.

Calibration: `--measure` runs the same step on real tensors (zeroed weights, on the CPU) with the
same counter, and tests/test_memory.py asserts that plan and measurement agree.

Examples:
  python scripts/plan_memory.py --size sdxl --resolution 1024 --train_batch_size 16 --mixed_precision bf16
  python scripts/plan_memory.py --pretrained_model_name_or_path tiny-sdxl --resolution 64 --measure
  python scripts/plan_memory.py --size sdxl --grid   # the README's table
"""

import argparse
import sys
import time

import train_t2i_adapter_sdxl as train
from t2i_train import memory

GIB = 2**30


def plan_memory(options, fake=True):
    """The engine's plan of a step of the trainer with these command-line options."""
    return memory.plan_memory(options, train, options.size, options.device_type, fake)


def describe(options):
    model = {"sdxl": "SDXL", "sdxl-narrow": "SDXL (narrow UNet)"}.get(options.size, options.pretrained_model_name_or_path)
    return (f"{model} at"
            f" {options.resolution}², batch {options.train_batch_size}, mixed precision {options.mixed_precision},"
            f" gradient checkpointing {'on' if options.gradient_checkpointing else 'off'},"
            f" {'8-bit AdamW (modelled)' if options.use_8bit_adam else 'AdamW'},"
            f" latent cache {'on' if options.cache_latents else 'off'}")


def plan_table(plan):
    """The plan as a two-column table, in GiB (MiB for a plan under 1 GiB)."""
    unit, scale = ("GiB", GIB) if plan["peak"] >= GIB else ("MiB", 2**20)
    optimizer = "8-bit AdamW, modelled" if plan.get("use_8bit_adam") else "AdamW"
    rows = [(f"weights: {name} ({plan['weight_dtypes'][name]})", value) for name, value in plan["weights"].items()]
    rows += [
        ("weights, total", plan["weights_total"]),
        ("adapter gradients", plan["gradients"]),
        (f"optimizer state after step 1 ({optimizer})", plan["optimizer_state"]),
        ("activations and temporaries at the peak", plan["activations_at_peak"]),
        (f"peak ({plan['peak_phase']})", plan["peak"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'':<{width}} | {unit} |", f"|{'-' * (width + 2)}|----:|"]
    lines += [f"| {name:<{width}} | {value / scale:.2f} |" for name, value in rows]
    return "\n".join(lines)


GRID_VARIANTS = (  # (label, flag changes) of each row of --grid, per batch size and precision
    ("", {}),
    ("gc", {"gradient_checkpointing": True}),
    ("gc+8bit", {"gradient_checkpointing": True, "use_8bit_adam": True}),
    ("gc+8bit+cache", {"gradient_checkpointing": True, "use_8bit_adam": True, "cache_latents": True}),
)


def grid_table(options, resolutions, batch_sizes, precisions, fits_in=79.6 * GIB):
    """One plan per resolution, batch size, precision and GRID_VARIANTS row, as one table (GiB). The
    last columns: whether the peak fits in `fits_in` bytes (an 80 GB GPU: 81,559 MiB), and the peak with the text
    encoders off the GPU during the UNet's forward and backward (their weights move back for the next
    step's prompts)."""
    lines = ["| resolution | batch | precision | flags | weights | activations | gradients + optimizer | peak |"
             " peak phase | fits 80 GB | peak, text encoders offloaded |", "|" + "---|" * 11]
    for resolution in resolutions:
        for batch in batch_sizes:
            for precision in precisions:
                for label, change in GRID_VARIANTS:
                    row = argparse.Namespace(**{**vars(options), "resolution": resolution, "train_batch_size": batch,
                                                "mixed_precision": precision, **change})
                    plan = plan_memory(row)
                    text = plan["weights"]["text encoder 1"] + plan["weights"]["text encoder 2"]
                    in_unet = plan["peak_phase"] in ("adapter+UNet forward", "backward", "optimizer step")
                    lines.append(
                        f"| {resolution}² | {batch} | {precision} | {label or '—'} | {plan['weights_total'] / GIB:.2f} |"
                        f" {plan['activations_at_peak'] / GIB:.2f} |"
                        f" {(plan['gradients_at_peak'] + plan['optimizer_state_at_peak']) / GIB:.2f} |"
                        f" **{plan['peak'] / GIB:.2f}** | {plan['peak_phase']} | {'yes' if plan['peak'] <= fits_in else 'no'} |"
                        f" {(plan['peak'] - text * in_unet) / GIB:.2f} |"
                    )
                    print(lines[-1], file=sys.stderr, flush=True)  # each row as it comes
    return "\n".join(lines)


def build_parser():
    """The trainer's own flags (a data set is not needed), and the planner's."""
    parser = train.build_parser()
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if action.dest == "pretrained_model_name_or_path":
            action.required = False
    group = parser.add_argument_group("Planner")
    group.add_argument("--size", choices=["sdxl", "sdxl-narrow"], default=None,
                       help="sdxl: the real SDXL, built from its configs, instead of --pretrained_model_name_or_path."
                            " sdxl-narrow: the same with the UNet (and so the adapter) at a fifth of SDXL's widths,"
                            " the same blocks, depths and 64-channel attention heads: an SDXL a CPU can run for real"
                            " (--measure) in seconds.")
    group.add_argument("--device_type", choices=["cuda", "cpu"], default="cuda",
                       help="cuda: allocations rounded to the CUDA allocator's 512-byte blocks; cpu: exact bytes.")
    group.add_argument("--grid", action="store_true",
                       help="Plan a table instead: every --grid_resolutions × --grid_batch_sizes × --grid_precisions,"
                            " each plain, with gradient checkpointing (gc), gc and 8-bit Adam, and gc, 8-bit Adam and"
                            " the latent cache.")
    group.add_argument("--grid_resolutions", type=int, nargs="+", default=[1024, 512])
    group.add_argument("--grid_batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    group.add_argument("--grid_precisions", nargs="+", default=["bf16", "fp16"])
    group.add_argument("--measure", action="store_true",
                       help="Also run the step on real tensors on this CPU (zeroed weights) and print both.")
    return parser


def parse_args(argv=None, parser=None):
    options = (parser or build_parser()).parse_args(argv)
    if (options.size is None) == (options.pretrained_model_name_or_path is None):
        raise SystemExit("Give one of --size sdxl or --pretrained_model_name_or_path.")
    return options


def main(options):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the models are cast by the trainer's code, as in a run
    if options.grid:
        started = time.perf_counter()
        table = grid_table(options, options.grid_resolutions, options.grid_batch_sizes, options.grid_precisions)
        print(f"PLANNED on fake tensors ({options.device_type} allocator blocks), not measured on a GPU;"
              f" {time.perf_counter() - started:.0f} s. GiB; gc: --gradient_checkpointing, 8bit: --use_8bit_adam"
              " (modelled), cache: --cache_latents.")
        print(table)
        return None
    print(describe(options))
    plan = plan_memory(options)
    plan["use_8bit_adam"] = options.use_8bit_adam
    print(f"Planned on fake tensors in {plan['seconds']:.1f} s (not measured on a GPU):")
    print(plan_table(plan))
    if options.measure:
        measured = plan_memory(options, fake=False)
        measured["use_8bit_adam"] = options.use_8bit_adam
        print(f"Measured on real tensors on this CPU in {measured['seconds']:.1f} s:")
        print(plan_table(measured))
        print(f"Step's own peak: planned {plan['step_peak'] / 2**20:.1f} MiB, measured {measured['step_peak'] / 2**20:.1f}"
              f" MiB ({100 * (plan['step_peak'] / measured['step_peak'] - 1):+.1f} %)")
    return plan


if __name__ == "__main__":
    main(parse_args())
