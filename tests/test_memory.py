"""The memory planner (scripts/plan_memory.py) and the trainer's preflight check built on it.

The planner runs a training step of the trainer's code on fake tensors; calibration runs the same step
on real tensors on the CPU with the same allocation counter, and the two must agree within 10 %.
Run: bash scripts/test.sh tests/test_memory.py
"""

import argparse
import logging
import math
import types

import pytest
import torch

import plan_memory as pm
import train_t2i_adapter_sdxl as train
from helpers import training_argv
from t2i_train import memory

MIB = 2**20


def planner_options(*argv):
    return pm.parse_args(["--device_type", "cpu", *map(str, argv)])


def assert_agree(planned, measured):
    """The calibration: plan (fake tensors) against measurement (real tensors), within 10 %."""
    assert planned["fake"] and not measured["fake"]
    assert planned["weights"] == measured["weights"]
    assert planned["step_peak"] == pytest.approx(measured["step_peak"], rel=0.10)
    assert planned["peak"] == pytest.approx(measured["peak"], rel=0.10)
    assert planned["peak_phase"] == measured["peak_phase"]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--mixed_precision", "bf16", "--gradient_checkpointing"],
        ["--mixed_precision", "fp16", "--cache_latents", "--use_8bit_adam", "--set_grads_to_none"],
    ],
)
def test_plan_agrees_with_a_real_step_of_the_tiny_sdxl(tiny_sdxl, extra):
    options = planner_options("--pretrained_model_name_or_path", tiny_sdxl, "--resolution", 64, "--train_batch_size", 4, *extra)
    planned, measured = pm.plan_memory(options), pm.plan_memory(options, fake=False)
    print(f"tiny {extra}: planned {planned['peak'] / MIB:.2f} MiB, measured {measured['peak'] / MIB:.2f} MiB")
    assert_agree(planned, measured)


def test_plan_agrees_with_a_real_step_of_the_sdxl_architecture():
    """SDXL's VAE and text encoders at full size and its UNet's blocks, depths and attention heads at a
    fifth of its widths (the full UNet takes minutes a step on this CPU in bf16, and 10 GB in fp32), at 64²."""
    options = planner_options("--size", "sdxl-narrow", "--resolution", 64, "--train_batch_size", 1, "--gradient_checkpointing")
    planned, measured = pm.plan_memory(options), pm.plan_memory(options, fake=False)
    print(f"sdxl-narrow: planned {planned['peak'] / MIB:.1f} MiB, measured {measured['peak'] / MIB:.1f} MiB;"
          f" step {planned['step_peak'] / MIB:.1f} / {measured['step_peak'] / MIB:.1f} MiB")
    assert planned["weights"]["text encoder 2"] > 2.5 * 2**30  # OpenCLIP bigG, in float32
    assert_agree(planned, measured)


def test_plan_follows_the_flags(tiny_sdxl):
    # With the latent cache, so that the peak is the UNet's (the tiny VAE's encode peaks higher).
    common = ("--pretrained_model_name_or_path", tiny_sdxl, "--resolution", 64, "--cache_latents")
    base = pm.plan_memory(planner_options(*common, "--train_batch_size", 4))
    checkpointed = pm.plan_memory(planner_options(*common, "--train_batch_size", 4, "--gradient_checkpointing"))
    smaller = pm.plan_memory(planner_options(*common, "--train_batch_size", 1))
    eight_bit = pm.plan_memory(planner_options(*common, "--train_batch_size", 1, "--use_8bit_adam"))
    assert base["peak_phase"] == "adapter+UNet forward"
    assert checkpointed["activations_at_peak"] < base["activations_at_peak"]
    assert smaller["activations_at_peak"] < base["activations_at_peak"]

    # AdamW keeps two float32 values per parameter and a float32 step count per tensor; the modelled
    # AdamW8bit keeps bitsandbytes' sizes.
    models, _, _ = memory.model_configs(planner_options(*common), train)
    sizes = [p.numel() for p in memory.build_on_meta(*models["adapter"]).parameters()]
    assert base["weights"]["adapter"] == 4 * sum(sizes)
    assert base["optimizer_state"] == 8 * sum(sizes) + 4 * len(sizes)
    assert base["gradients"] == 4 * sum(sizes)
    expected = sum(2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n for n in sizes)
    assert eight_bit["optimizer_state"] == expected < base["optimizer_state"]

    # Planned for CUDA: every allocation in whole 512-byte blocks.
    cuda = pm.plan_memory(pm.parse_args([*map(str, common), "--train_batch_size", "1", "--device_type", "cuda"]))
    assert all(value % 512 == 0 for value in cuda["weights"].values())
    assert cuda["step_peak"] % 512 == 0 and cuda["peak"] >= smaller["peak"]


def test_fitting_changes_tries_single_flags_then_smaller_batches():
    def plan(options):  # a stand-in planner: 1 GiB per sample, halved by gradient checkpointing, 8-bit saves 0.5
        peak = options.train_batch_size * (0.5 if options.gradient_checkpointing else 1.0) + 1
        return {"peak": (peak - 0.5 * options.use_8bit_adam) * 2**30}

    options = argparse.Namespace(
        train_batch_size=16, gradient_accumulation_steps=2, gradient_checkpointing=False, use_8bit_adam=False,
        cache_latents=False, random_crop=False, random_flip=False, aspect_ratio_buckets=False, streaming=False,
        conditioning_type="given",
    )
    fitting = memory.fitting_changes(options, 9.5 * 2**30, plan)
    assert fitting == [
        ("--gradient_checkpointing", 9 * 2**30),
        ("--gradient_checkpointing --train_batch_size 8 --gradient_accumulation_steps 4", 5 * 2**30),
    ]
    assert memory.fitting_changes(options, 16.6 * 2**30, plan)[:2] == [
        ("--gradient_checkpointing", 9 * 2**30), ("--use_8bit_adam", 16.5 * 2**30)
    ]
    assert memory.fitting_changes(options, 0.5 * 2**30, plan) == []


def test_memory_check_message_names_the_numbers_and_the_flags():
    gib = 2**30
    assert memory.memory_check_message(10 * gib, 10 * gib, []) is None
    message = memory.memory_check_message(90.4 * gib, 79.1 * gib, [("--gradient_checkpointing", 40.2 * gib)])
    assert "90.4 GiB" in message and "79.1 GiB" in message
    assert "--gradient_checkpointing (40.2 GiB)" in message and "--skip_memory_check" in message
    assert "Nothing planned fits" in memory.memory_check_message(90 * gib, 1 * gib, [])


def test_preflight_is_skipped_on_cpu_and_stops_a_run_that_will_not_fit(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    args = train.parse_args(training_argv(tiny_sdxl, fill_data, tmp_path, "--train_batch_size", 2))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("the check ran on the CPU"))
    assert memory.check_memory_fits(args, types.SimpleNamespace(device=torch.device("cpu")), train) is None

    monkeypatch.setattr(memory, "logger", logging.getLogger("preflight test"))  # no accelerate state here
    # On "CUDA": a device name only, the plan itself needs no GPU; the free memory is what the driver reports.
    cuda = types.SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    assert memory.check_memory_fits(args, cuda, train) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**40))
    with pytest.raises(MemoryError, match=r"planned to peak at 0\.0 GiB of GPU memory, and 0\.0 GiB are free.*Nothing planned"):
        memory.check_memory_fits(args, cuda, train)
    skipping = train.parse_args([*training_argv(tiny_sdxl, fill_data, tmp_path), "--skip_memory_check"])
    assert memory.check_memory_fits(skipping, cuda, train) is None
