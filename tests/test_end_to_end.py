"""End-to-end runs of the training script on the tiny SDXL: outputs, checkpoints, resume,
trackers and the Hub upload path."""

import glob
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import generate
import train_t2i_adapter_sdxl as train
from helpers import (
    RESOLUTION,
    load_adapter_weights,
    max_weight_difference,
    run_training,
    training_argv,
    wandb_offline_history,
)
from plot_control_curve import tensorboard_scalars
from t2i_train import lifecycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_TOKEN = "hf_testTOKENthatMustNeverBeLogged123"


def save_initial_adapter(model, folder):
    """A fresh adapter derived from the tiny model, saved so a run's starting weights are known."""
    from diffusers import T2IAdapter

    os.makedirs(folder)
    args = train.parse_args(["--pretrained_model_name_or_path", model, "--train_data_dir", folder, "--resolution", "64"])
    torch.manual_seed(123)
    T2IAdapter(**train.check_inputs(args)).save_pretrained(folder)
    return folder


def validation_flags(data, num_images=1):
    return [
        "--validation_prompt", *data["validation_prompts"],
        "--validation_image", *data["validation_images"],
        "--num_validation_images", str(num_images),
    ]


def tensorboard_image_tags(logdir):
    """The tags of every image logged under `logdir` (its scalars: plot_control_curve.tensorboard_scalars)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    assert events, f"no tensorboard event file under {logdir}"
    tags = set()
    for path in events:
        accumulator = EventAccumulator(path, size_guidance={"images": 0})
        accumulator.Reload()
        tags.update(accumulator.Tags()["images"])
    return tags


def test_accelerate_launch_trains_an_adapter_that_the_sdxl_adapter_pipeline_loads(tiny_sdxl, fill_data, tmp_path):
    """Through `accelerate launch`: the adapter is written in diffusers format, its weights moved
    away from the starting ones, validation images reach tensorboard and an offline wandb run,
    and StableDiffusionXLAdapterPipeline loads the result and generates an image."""
    initial = save_initial_adapter(tiny_sdxl, str(tmp_path / "initial"))
    output_dir = tmp_path / "out"
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 4, "--validation_steps", 2,
                         "--adapter_model_name_or_path", initial, "--validation_pairs", 4, *validation_flags(fill_data))
    argv[argv.index("--report_to") + 1] = "all"
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "WANDB_MODE": "offline"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*launch, os.path.join(ROOT, "train_t2i_adapter_sdxl.py"), *argv],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    assert (output_dir / "config.json").is_file()
    assert (output_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert max_weight_difference(load_adapter_weights(initial), load_adapter_weights(output_dir)) > 1e-4

    assert set(fill_data["validation_prompts"]) <= tensorboard_image_tags(output_dir / "logs")
    scalars = tensorboard_scalars(output_dir / "logs")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    wandb_images = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "*.png"))
    # Two validations (steps 2 and 4) × two pairs × (condition + one sample).
    assert len(wandb_images) == 2 * 2 * 2
    # The conditioning gain on 4 held-out pairs: before the first step and at each validation, in both trackers.
    assert [step for step, _ in scalars["validation/conditioning_gain"]] == [0, 2, 4]
    run_file, = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    wandb_gain = [(row["_step"], row["validation/conditioning_gain"]) for row in wandb_offline_history(run_file)
                  if "validation/conditioning_gain" in row]
    tensorboard_gain = scalars["validation/conditioning_gain"]
    assert [step for step, _ in wandb_gain] == [0, 2, 4]
    assert [gain for _, gain in wandb_gain] == pytest.approx([gain for _, gain in tensorboard_gain], abs=1e-6)

    # Loaded as scripts/generate.py loads it, in bfloat16 (not the default; float64 fails in transformers 4.45's
    # causal mask), with the keyword this diffusers release takes for it and no deprecation warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline = generate.load_pipeline(tiny_sdxl, str(output_dir), "cpu", torch.bfloat16)
    assert pipeline.adapter.dtype == pipeline.unet.dtype == torch.bfloat16
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
    pipeline.set_progress_bar_config(disable=True)
    from PIL import Image

    image = pipeline(prompt="red circle with blue background", image=Image.open(fill_data["validation_images"][0]),
                     num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)


def test_checkpoint_pruning_keeps_exactly_the_newest(tiny_sdxl, fill_data, tmp_path):
    """Checkpoints every step with a limit of 2: exactly the last two remain, each holding the
    adapter in diffusers format and the full training state."""
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 5,
                               "--checkpointing_steps", 1, "--checkpoints_total_limit", 2))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    checkpoint = tmp_path / "checkpoint-5"
    assert (checkpoint / lifecycle.ADAPTER_SUBFOLDER / "config.json").is_file()
    assert (checkpoint / "optimizer.bin").is_file() and (checkpoint / "scheduler.bin").is_file()
    # The last checkpoint's adapter is the final adapter.
    assert max_weight_difference(load_adapter_weights(checkpoint / lifecycle.ADAPTER_SUBFOLDER),
                                 load_adapter_weights(tmp_path)) == 0


@pytest.mark.parametrize("resume", ["latest", "checkpoint-3"])
def test_resume_continues_at_the_right_step_and_matches_a_straight_run(tiny_sdxl, fill_data, tmp_path, resume):
    """A run interrupted mid-epoch (8 batches per epoch) and resumed, with shuffling, empty prompts
    and warm-up + cosine LR, ends with exactly the adapter of the uninterrupted run."""
    common = ["--max_train_steps", 10, "--checkpointing_steps", 1, "--checkpoints_total_limit", 10,
              "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--proportion_empty_prompts", 0.3]
    straight = tmp_path / "straight"
    run_training(training_argv(tiny_sdxl, fill_data, straight, *common))

    # The interrupted run's folder holds what it had saved when it stopped.
    interrupted = tmp_path / "interrupted"
    for name in ["checkpoint-2", "checkpoint-4"] if resume == "latest" else ["checkpoint-3"]:
        shutil.copytree(straight / name, interrupted / name)
    final_step = run_training(training_argv(tiny_sdxl, fill_data, interrupted, *common,
                                            "--resume_from_checkpoint", resume))
    assert final_step == 10
    assert max_weight_difference(load_adapter_weights(straight), load_adapter_weights(interrupted)) == 0


def test_push_to_hub_uploads_the_adapter_and_model_card(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """--push_to_hub creates a private repo and uploads output_dir with the adapter, the model card
    and one grid per validation prompt, ignoring step_*/epoch_*; the token goes only to the Hub."""
    calls = {}

    class Repo:
        repo_id = "me/fill-adapter"

    def fake_create_repo(**kwargs):
        calls["create_repo"] = kwargs
        return Repo()

    def fake_upload_folder(**kwargs):
        calls["upload_folder"] = kwargs
        calls["uploaded_files"] = sorted(os.listdir(kwargs["folder_path"]))

    monkeypatch.setattr(train, "create_repo", fake_create_repo)
    monkeypatch.setattr(train, "upload_folder", fake_upload_folder)
    output_dir = tmp_path / "out"
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 2, "--validation_steps", 2,
                         "--push_to_hub", "--hub_model_id", "fill-adapter", "--hub_token", SECRET_TOKEN,
                         *validation_flags(fill_data, num_images=2))
    argv[argv.index("--report_to") + 1] = "tensorboard"
    run_training(argv)

    assert calls["create_repo"] == {"repo_id": "fill-adapter", "exist_ok": True, "token": SECRET_TOKEN, "private": True}
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/fill-adapter" and upload["folder_path"] == str(output_dir)
    assert upload["ignore_patterns"][:2] == ["step_*", "epoch_*"] and upload["token"] == SECRET_TOKEN
    assert {lifecycle.LOCK_FILE, lifecycle.FINISHED_FILE} <= set(upload["ignore_patterns"])  # ours, not the adapter's
    for name in ("README.md", "config.json", "diffusion_pytorch_model.safetensors", "images_0.png", "images_1.png"):
        assert name in calls["uploaded_files"]
    card = (output_dir / "README.md").read_text()
    assert f"base_model: {tiny_sdxl}" in card and "license: creativeml-openrail-m" in card
    for tag in train.MODEL_CARD_TAGS:
        assert f"- {tag}\n" in card
    assert "library_name: diffusers" in card and "- optimisation steps: 2\n" in card
    for i, prompt in enumerate(fill_data["validation_prompts"]):
        assert f"prompt: {prompt}" in card and f"](./images_{i}.png)" in card
    from PIL import Image

    with Image.open(output_dir / "images_0.png") as grid:  # condition + 2 samples in a row
        assert grid.size == (3 * RESOLUTION, RESOLUTION)

    # The token was given to the Hub client only: no tracker file, log or saved config holds it.
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert SECRET_TOKEN.encode() not in path.read_bytes(), path


def test_parquet_dataset_bf16_accumulation_and_gradient_checkpointing(tiny_sdxl, fill_data, tmp_path):
    """--dataset_name on a local parquet folder, bf16 mixed precision (upstream crashes, defect 21),
    gradient accumulation and gradient checkpointing together: a short run completes, logs a finite
    loss at each of its 2 steps and moves the adapter's weights away from the starting ones."""
    initial = save_initial_adapter(tiny_sdxl, str(tmp_path / "initial"))
    argv = training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 2, "--gradient_accumulation_steps", 2,
                         "--mixed_precision", "bf16", "--gradient_checkpointing", "--set_grads_to_none",
                         "--adapter_model_name_or_path", initial)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    index = argv.index("--train_data_dir")
    argv[index:index + 2] = ["--dataset_name", str(fill_data["parquet"])]
    assert run_training(argv) == 2
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loss = tensorboard_scalars(tmp_path / "logs")["loss"]
    assert [step for step, _ in loss] == [1, 2]
    assert all(math.isfinite(value) for _, value in loss), loss
    assert max_weight_difference(load_adapter_weights(initial), load_adapter_weights(tmp_path)) > 0


def test_gradient_checkpointing_does_not_change_the_result(tiny_sdxl, fill_data, tmp_path):
    """Recomputing activations must give the same adapter as keeping them."""
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "plain", "--max_train_steps", 2))
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "ckpt", "--max_train_steps", 2,
                               "--gradient_checkpointing"))
    difference = max_weight_difference(load_adapter_weights(tmp_path / "plain"), load_adapter_weights(tmp_path / "ckpt"))
    assert difference < 1e-5


def test_scale_lr_and_warmup_reach_the_logged_lr(tiny_sdxl, fill_data, tmp_path):
    """--scale_lr multiplies the LR by accumulation × batch × processes; linear warm-up over 4 steps
    logs lr·step/4 at each step."""
    argv = training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 3, "--gradient_accumulation_steps", 2,
                         "--scale_lr", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 4)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    run_training(argv)
    scaled = 1e-3 * 2 * 4 * 1
    logged = tensorboard_scalars(tmp_path / "logs")["lr"]
    assert [step for step, _ in logged] == [1, 2, 3]
    for step, lr in logged:
        assert lr == pytest.approx(scaled * step / 4, rel=1e-5)


def test_tokenizer_name_is_used(tiny_sdxl, tmp_path):
    """--tokenizer_name replaces the base model's tokenizers (upstream parses and ignores it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer", use_fast=False)
    tokenizer.model_max_length = 20
    tokenizer.save_pretrained(tmp_path / "tok")
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(tmp_path),
                             "--tokenizer_name", str(tmp_path / "tok")])
    assert [t.model_max_length for t in train.load_tokenizers(args)] == [20, 20]
    args.tokenizer_name = None
    assert [t.model_max_length for t in train.load_tokenizers(args)] == [77, 77]


def test_an_adapter_stored_in_float16_trains_in_float32(tiny_sdxl, tmp_path, fill_data, caplog):
    """Adapters are often shared in float16. As upstream, such an adapter is loaded as float32 and trained;
    one log line says so, and the saved adapter is float32."""
    import logging

    from diffusers import T2IAdapter
    from safetensors import safe_open

    initial = save_initial_adapter(tiny_sdxl, str(tmp_path / "initial"))
    T2IAdapter.from_pretrained(initial).half().save_pretrained(tmp_path / "fp16")
    with safe_open(str(tmp_path / "fp16" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        assert {str(weights.get_slice(key).get_dtype()) for key in weights.keys()} == {"F16"}
    with caplog.at_level(logging.INFO):
        assert run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 2,
                                          "--adapter_model_name_or_path", tmp_path / "fp16")) == 2
    assert len([r for r in caplog.records if "is stored in F16; it trains in float32" in r.getMessage()]) == 1
    trained, start = load_adapter_weights(tmp_path / "out"), load_adapter_weights(tmp_path / "fp16")
    assert {tensor.dtype for tensor in trained.values()} == {torch.float32}
    assert max_weight_difference(trained, start) > 1e-4
