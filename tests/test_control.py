"""Training teaches control: on the shipped pretrained tiny base (assets/tiny-fill-base), a short
training run makes the adapter's true condition lower the denoising loss clearly more than another
sample's condition does; with every condition blanked, training teaches nothing of the kind. Also
the control-fidelity score of scripts/evaluate.py on known answers."""

import os

import pytest
from PIL import Image

import evaluate
from helpers import RESOLUTION, run_training, training_argv
from make_fill_dataset import COLORS, build_fill_dataset

# Measured on the 2-core CPU machine (one thread), base pretrained as in assets/tiny-fill-base: 200 steps
# of batch 8 at lr 1e-3 (30-36 s) reach a held-out gain of 0.229 overall and 0.292 for t in [250, 500),
# the same in two runs (the run is seeded; the evaluation's seeds 0 and 1 differ by 0.02 in the demo);
# with blank conditions the gain is -0.0002 overall and within ±0.005 in every timestep range.
# Thresholds: under half the measured gain; for blank conditions 0.01, twice the largest blank range.
TRAIN_STEPS = 200
MIN_GAIN = 0.1
MAX_BLANK_GAIN = 0.01


@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    return build_fill_dataset(tmp_path_factory.mktemp("data") / "control", num_samples=512, resolution=RESOLUTION,
                              seed=0, num_validation=0)


@pytest.fixture(scope="module")
def blank_data(control_data):
    """The same dataset with every conditioning image replaced by a black one (in place: a module-only copy)."""
    import shutil

    folder = os.path.join(os.path.dirname(control_data["imagefolder"]), "blank-imagefolder")
    shutil.copytree(control_data["imagefolder"], folder)
    conditions = os.path.join(folder, "train", "conditioning_images")
    black = Image.new("RGB", (RESOLUTION, RESOLUTION), (0, 0, 0))
    for name in os.listdir(conditions):
        black.save(os.path.join(conditions, name))
    return {"imagefolder": folder}


def train_and_measure_gain(model, data, output_dir):
    run_training(training_argv(
        model, data, output_dir,
        "--max_train_steps", TRAIN_STEPS, "--train_batch_size", 8, "--learning_rate", 1e-3,
        "--checkpointing_steps", 10 * TRAIN_STEPS,
    ))
    components = evaluate.load_components(model)
    adapter = evaluate.load_adapter(str(output_dir), components)
    samples = evaluate.held_out_samples(64, RESOLUTION)
    return evaluate.conditioning_gain(components, adapter, samples, seed=0, noise_draws=1)


def test_training_on_the_pretrained_base_teaches_control(tiny_fill_base, control_data, tmp_path):
    gain = train_and_measure_gain(tiny_fill_base, control_data, tmp_path / "adapter")
    print(f"conditioning gain after {TRAIN_STEPS} steps: {gain}")
    assert gain["overall"] > MIN_GAIN, gain
    # Mid-range noise: the disc is hidden enough that where it is matters, visible enough to be weighed.
    assert gain["ranges"]["250-500"] > MIN_GAIN, gain


def test_training_with_blank_conditions_teaches_no_control(tiny_fill_base, blank_data, tmp_path):
    gain = train_and_measure_gain(tiny_fill_base, blank_data, tmp_path / "adapter")
    print(f"conditioning gain after {TRAIN_STEPS} steps on blank conditions: {gain}")
    assert gain["overall"] < MAX_BLANK_GAIN, gain


def test_control_fidelity_of_the_targets_themselves_is_one():
    samples = evaluate.held_out_samples(16, RESOLUTION)
    targets = [target for target, *_ in samples]
    circles = [circle for *_, circle in samples]
    assert evaluate.fidelity_scores(targets, circles) == [1.0] * len(samples)
    assert evaluate.control_fidelity(targets, circles) == 1.0


def test_control_fidelity_of_a_plain_background_is_zero():
    samples = evaluate.held_out_samples(16, RESOLUTION)
    backgrounds = [Image.new("RGB", (RESOLUTION, RESOLUTION), COLORS[c["background"]]) for *_, c in samples]
    assert evaluate.control_fidelity(backgrounds, [c for *_, c in samples]) == 0.0


def test_control_fidelity_of_a_shifted_disc_is_partial():
    target, _, _, circle = evaluate.held_out_samples(1, RESOLUTION)[0]
    shifted = Image.new("RGB", target.size, COLORS[circle["background"]])
    shifted.paste(target, (circle["radius"], 0))
    assert 0.0 < evaluate.control_fidelity([shifted], [circle]) < 1.0
