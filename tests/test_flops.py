"""The FLOP plan (scripts/plan_flops.py): a training step's arithmetic, counted by phase as the memory
planner runs the trainer's step, for our settings and upstream's, and its planned time on named GPUs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import plan_flops
import plan_memory as pm
import train_t2i_adapter_sdxl as train
from t2i_train import flops, memory

BATCH = 2


def flop_options(tiny_sdxl, *extra):
    return pm.parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl), "--resolution", "64", "--train_batch_size",
                          str(BATCH), "--device_type", "cpu", *map(str, extra)], parser=plan_flops.build_parser())


def counted(plan):
    """The FLOPs of matmuls, convolutions and attention in a plan (the optimizer's formula left out)."""
    return flops.total(plan["flops"]) - plan["flops"]["optimizer step"]["elementwise"]


def test_the_phases_add_up_to_torchs_own_count_of_the_same_step(tiny_sdxl):
    """No op lost and none counted twice: over a real step (zeroed weights, CPU), the phases sum to what
    torch's FlopCounterMode counts (given the CPU flash attention's formulas, which it lacks), and the
    plan on fake tensors counts the same."""
    options = flop_options(tiny_sdxl)
    # FlopCounterMode wraps each formula of a custom mapping itself: it takes the formulas unwrapped.
    cpu_attention = {op: flops.FLOP_FORMULAS[op].__wrapped__ for op in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                                                         torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as oracle:
        real = memory.plan_memory(options, train, None, "cpu", fake=False)
    fake = memory.plan_memory(options, train, None, "cpu")
    assert counted(real) == oracle.get_total_flops() > 0
    assert fake["flops"] == real["flops"]
    assert set(fake["flops"]) == {"VAE encode", "text encoders", "adapter forward", "UNet forward",
                                  "backward (UNet and adapter)", "optimizer step"}


def test_the_adapter_forward_is_the_adapters_own_count(tiny_sdxl):
    """The adapter's phase is exactly the adapter: its forward on a batch of conditions, counted by torch
    alone; and the optimizer's row is AdamW's formula over the adapter's parameters."""
    options = flop_options(tiny_sdxl)
    plan = memory.plan_memory(options, train, None, "cpu")
    models, _, _ = memory.model_configs(options, train)
    adapter_class, adapter_config = models["adapter"]
    adapter = adapter_class.from_config(adapter_config)
    with torch.no_grad(), FlopCounterMode(display=False) as oracle:
        adapter(torch.zeros(BATCH, 3, 64, 64))
    assert flops.total(plan["flops"], ["adapter forward"]) == oracle.get_total_flops() > 0
    parameters = sum(p.numel() for p in adapter.parameters())
    assert plan["flops"]["optimizer step"] == {"elementwise": flops.ADAMW_FLOPS_PER_PARAMETER * parameters}


def test_upstreams_settings_add_the_unets_weight_gradients_and_precompute_the_text(tiny_sdxl):
    options = flop_options(tiny_sdxl, "--cache_latents")
    ours, upstream = plan_flops.plan_step_flops(options), plan_flops.plan_step_flops(options, upstream=True)
    assert "VAE encode" not in ours and flops.total(upstream, ["VAE encode"]) > 0  # upstream has no latent cache
    for phase in ("text encoders", "adapter forward", "UNet forward"):
        assert ours[phase] == upstream[phase]
    backward = "backward (UNet and adapter)"
    # A weight's gradient costs what its forward matmul or convolution does: the UNet's weights add about
    # its forward again (less attention, which has no weights), plus the input gradients of the layers that
    # run before the adapter's first feature (conv_in, the time embedding), which our backward never reaches.
    extra = flops.total(upstream, [backward]) - flops.total(ours, [backward])
    assert 0.5 * flops.total(ours, ["UNet forward"]) < extra < 1.1 * flops.total(ours, ["UNet forward"])
    assert plan_flops.per_step(upstream, upstream=True) == [phase for phase in upstream if phase != "text encoders"]


def test_bf16_runs_the_unet_in_16_bit_and_the_vae_in_float32(tiny_sdxl):
    plan = memory.plan_memory(flop_options(tiny_sdxl, "--mixed_precision", "bf16"), train, None, "cpu")
    assert set(plan["flops"]["UNet forward"]) == {flops.HALF}
    assert set(plan["flops"]["adapter forward"]) == {flops.HALF}  # accelerate's autocast
    assert flops.HALF not in plan["flops"]["VAE encode"]
    assert plan["flops"]["VAE encode"][flops.FP32_CONVOLUTION] > 0


def test_vae_precision_bf16_moves_the_vae_encode_to_16_bit_and_the_plan_shows_it_beside_float32(tiny_sdxl, capsys):
    options = flop_options(tiny_sdxl, "--mixed_precision", "bf16", "--vae_precision", "bf16")
    plan = memory.plan_memory(options, train, None, "cpu")
    assert set(plan["flops"]["VAE encode"]) == {flops.HALF}
    float32 = memory.plan_memory(flop_options(tiny_sdxl, "--mixed_precision", "bf16"), train, None, "cpu")
    assert flops.total(plan["flops"], ["VAE encode"]) == flops.total(float32["flops"], ["VAE encode"])
    assert plan_flops.plan_step_flops(options, upstream=True)["VAE encode"] == float32["flops"]["VAE encode"]
    assert plan_flops.vae_in_bf16_too(options) is None
    plan_flops.main(flop_options(tiny_sdxl, "--mixed_precision", "bf16"))
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| GPU"))
    assert header.split(" | ")[1:4] == ["ours, s/step", "ours, --vae_precision bf16, s/step", "upstream's settings, s/step"]


def test_planned_seconds_take_each_arithmetic_at_its_own_peak():
    peaks = {"bf16": 100, "tf32": 50, "fp32": 10}
    work = {flops.HALF: 1e12, flops.FP32_CONVOLUTION: 1e12, flops.FP32_MATMUL: 1e12, "elementwise": 1e15}
    assert flops.planned_seconds(work, peaks, utilisation=0.5) == pytest.approx(1 / 50 + 1 / 25 + 1 / 5)
    assert flops.planned_seconds(work, peaks, allow_tf32=True, utilisation=0.5) == pytest.approx(1 / 50 + 1 / 25 + 1 / 25)


def test_the_plan_prints_both_settings_and_ends_with_the_tflop_per_step(tiny_sdxl, capsys):
    options = flop_options(tiny_sdxl, "--mixed_precision", "bf16")
    ours, upstream = plan_flops.main(options)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == (f"TFLOP per step: {flops.total(ours) / 1e12:.3f} (upstream's settings:"
                         f" {flops.total(upstream, plan_flops.per_step(upstream, True)) / 1e12:.3f})")
    assert any(line.startswith("| H100 SXM / H200 (989 / 495 / 67) |") for line in lines)
    assert any("once per sample before training" in line for line in lines)
    assert "PLANNED" in lines[0] + lines[1]
