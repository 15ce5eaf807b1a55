"""The EMA of the adapter (--use_ema, #26): its maths against the formula written out, and through the
script: the exported adapter is the EMA, each checkpoint keeps both, validation logs both curves, the
card says so, the memory planner counts it, and bad flags are refused before anything loads."""

import argparse
import os

import pytest
import torch

import train_t2i_adapter_sdxl as train
from helpers import load_adapter_weights, max_weight_difference, run_training, training_argv
from plot_control_curve import tensorboard_scalars
from t2i_train import ema, lifecycle, memory


def test_the_ema_follows_its_formula_with_the_warm_up():
    """Updated every 2nd step, decay min(0.8, (1 + n) / (10 + n)) at its n-th update, against the same
    average kept by hand in float64 from the weights at those steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv2d(4, 2, 1))
    averaged = ema.averaged_copy(model, "cpu")
    expected = [param.detach().double().clone() for param in model.parameters()]
    args = argparse.Namespace(ema_update_every=2, ema_decay=0.8)
    for step in range(1, 41):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.update_after_step(averaged, model, step, args)
        if step % 2 == 0:
            n = step // 2 - 1
            decay = min(0.8, (1 + n) / (10 + n))
            expected = [decay * old + (1 - decay) * param.detach().double()
                        for old, param in zip(expected, model.parameters())]
    for average, want in zip(averaged.parameters(), expected):
        assert average.dtype == torch.float32 and not average.requires_grad
        torch.testing.assert_close(average.double(), want, rtol=0, atol=1e-5)
    assert ema.decay_at(0, 0.9999) == pytest.approx(0.1)  # the first update keeps a tenth of the start
    assert ema.decay_at(79, 0.9) == pytest.approx(80 / 89) and ema.decay_at(100, 0.9) == 0.9  # capped from n = 80
    assert all(param.requires_grad for param in model.parameters())


def test_ema_on_another_device_is_copied_there_for_validation_only():
    model = torch.nn.Linear(2, 2)
    averaged = ema.averaged_copy(model, "cpu")
    assert ema.on_device(averaged, torch.device("cpu")) is averaged


def test_a_run_with_ema_exports_the_ema_and_keeps_both_in_its_checkpoints(tiny_sdxl, fill_data, tmp_path):
    """6 steps, the EMA updated every 2nd step: the output folder holds the EMA, the last checkpoint holds
    the raw adapter and the EMA (equal to the export), the EMA differs from the raw weights, both curves
    are logged at every validation, and the model card says the adapter and its scores are the EMA's."""
    out = tmp_path / "ema"
    argv = training_argv(tiny_sdxl, fill_data, out, "--max_train_steps", 6, "--checkpointing_steps", 6,
                         "--validation_steps", 3, "--validation_pairs", 4, "--use_ema", "--ema_decay", 0.5,
                         "--ema_update_every", 2)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    assert run_training(argv) == 6
    exported = load_adapter_weights(out)
    checkpoint = out / "checkpoint-6"
    assert max_weight_difference(exported, load_adapter_weights(checkpoint / ema.EMA_SUBFOLDER)) == 0
    raw = load_adapter_weights(checkpoint / lifecycle.ADAPTER_SUBFOLDER)
    assert max_weight_difference(exported, raw) > 0
    scalars = tensorboard_scalars(os.path.join(out, "logs"))
    for prefix in ("validation", "validation_raw"):
        assert [step for step, _ in scalars[f"{prefix}/conditioning_gain"]] == [0, 3, 6], prefix
    assert scalars["validation/conditioning_gain"][0] == scalars["validation_raw/conditioning_gain"][0]
    assert scalars["validation/conditioning_gain"][-1] != scalars["validation_raw/conditioning_gain"][-1]
    card = (out / "README.md").read_text()
    assert "weights: the exponential moving average of the adapter's weights (decay 0.5" in card
    assert "this adapter and its scores below are the EMA's" in card
    assert f"conditioning gain: {scalars['validation/conditioning_gain'][-1][1]:.3f} at step 6" in card


def test_a_checkpoint_without_ema_resumed_with_it_starts_the_ema_at_its_weights(tiny_sdxl, fill_data, tmp_path):
    """--use_ema turned on at a resume: the EMA starts at the checkpoint's adapter (with a warning), so
    the first update after it averages the resumed weights with the new ones."""
    out = tmp_path / "late"
    common = ["--checkpointing_steps", 2, "--ema_decay", 0.5]  # the decay alone does nothing without --use_ema
    run_training(training_argv(tiny_sdxl, fill_data, out, "--max_train_steps", 2, *common))
    start = load_adapter_weights(out / "checkpoint-2" / lifecycle.ADAPTER_SUBFOLDER)
    assert not (out / "checkpoint-2" / ema.EMA_SUBFOLDER).exists()
    run_training(training_argv(tiny_sdxl, fill_data, out, "--max_train_steps", 3, *common, "--use_ema",
                               "--resume_from_checkpoint", "latest", "--checkpointing_steps", 3))
    raw = load_adapter_weights(out / "checkpoint-3" / lifecycle.ADAPTER_SUBFOLDER)
    exported = load_adapter_weights(out)
    decay = ema.decay_at(2, 0.5)  # update number 2, at step 3
    for key in exported:
        torch.testing.assert_close(exported[key], decay * start[key] + (1 - decay) * raw[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--use_ema", "--ema_decay", "1"], "`--ema_decay` must be between 0 and 1, got 1.0"),
    (["--use_ema", "--ema_decay", "0"], "`--ema_decay` must be between 0 and 1"),
    (["--use_ema", "--ema_update_every", "0"], "`--ema_update_every` must be at least 1"),
])
def test_bad_ema_flags_are_refused_at_parse_time(flags, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags])


def test_the_memory_planner_counts_the_ema_on_the_device_and_not_on_the_cpu(tiny_sdxl, fill_data, tmp_path):
    def plan(*flags):
        return memory.plan_memory(train.parse_args(training_argv(tiny_sdxl, fill_data, tmp_path, *flags)), train)

    plain, with_ema, on_cpu = plan(), plan("--use_ema"), plan("--use_ema", "--ema_on_cpu")
    assert with_ema["weights"]["adapter EMA"] == with_ema["weights"]["adapter"] > 0
    assert with_ema["weight_dtypes"]["adapter EMA"] == "fp32"
    assert with_ema["weights_total"] == plain["weights_total"] + with_ema["weights"]["adapter"]
    assert "adapter EMA" not in on_cpu["weights"] and on_cpu["weights_total"] == plain["weights_total"]
