"""What a new user meets in the first hour: the README's commands and snippets as written, the model
card's snippet and statements, the files a run leaves in a shared folder."""

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import RESOLUTION, run_training, training_argv
from t2i_train import lifecycle

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def save_condition(folder):
    """condition.png, the file the snippets load: a fill condition at the tiny model's size."""
    Image.new("RGB", (RESOLUTION, RESOLUTION), (255, 255, 255)).save(Path(folder) / "condition.png")


@pytest.fixture(scope="module")
def finished_run(tiny_sdxl, fill_data, tmp_path_factory):
    """Two steps with a checkpoint and the latent cache, under a group-readable umask (0o027) that
    differs from both 0o600 (safetensors' own mode) and the usual 0o644."""
    output_dir = tmp_path_factory.mktemp("first-hour") / "adapter"
    previous = os.umask(0o027)
    try:
        run_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 2, "--checkpointing_steps",
                                   2, "--cache_latents", "--latent_cache_dir", output_dir.parent / "latents"))
    finally:
        os.umask(previous)
    return output_dir


def test_every_file_a_run_writes_follows_the_umask(finished_run):
    """On a shared cluster folder teammates read what the umask lets them: the adapter's weights in the
    output folder and in each checkpoint, and the cached latents, like every other file."""
    written = [path for folder in (finished_run, finished_run.parent / "latents") for path in folder.rglob("*")
               if path.is_file()]
    weights = [path for path in written if path.suffix == ".safetensors"]
    assert {path.parent.name for path in weights} >= {"adapter", lifecycle.ADAPTER_SUBFOLDER}
    assert len(weights) > 2  # the latents too
    modes = {str(path.relative_to(finished_run.parent)): oct(stat.S_IMODE(path.stat().st_mode)) for path in written}
    assert {mode for mode in modes.values()} == {"0o640"}, modes


def test_the_model_card_snippet_runs_from_any_folder(finished_run, tmp_path, monkeypatch):
    """The card's snippet loads this adapter on this base by absolute path when there is no Hub repo,
    and runs as written from another working directory."""
    card = (finished_run / "README.md").read_text()
    snippet, = code_blocks(card, "python")
    save_condition(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "model card snippet", "exec"), {})
    assert Image.open(tmp_path / "generated.png").size[0] > 0


def test_the_model_card_states_what_the_run_did(finished_run):
    """A constant schedule has no warm-up (the default 500 warm-up steps are ignored by it), and the
    precision is the one accelerate used, not 'accelerate's default'."""
    card = (finished_run / "README.md").read_text()
    assert "- learning rate: 0.001 (constant, no warm-up)\n" in card
    assert "- mixed precision: no\n" in card
    assert "- optimisation steps: 2\n" in card


def test_warm_up_is_stated_for_a_schedule_that_has_one(tiny_sdxl, fill_data, tmp_path):
    import train_t2i_adapter_sdxl as train

    args = train.parse_args(training_argv(tiny_sdxl, fill_data, tmp_path, "--lr_scheduler", "cosine",
                                          "--lr_warmup_steps", 7))

    class Accelerator:
        num_processes, mixed_precision = 2, "bf16"

    details = train.model_card_training_details(args, 10, Accelerator())
    assert details["learning rate"] == "0.001 (cosine, 7 warm-up steps)"
    assert details["mixed precision"] == "bf16"


def test_the_model_card_states_the_vaes_precision_and_whether_latents_were_cached(tiny_sdxl, fill_data, tmp_path):
    import train_t2i_adapter_sdxl as train

    class Accelerator:
        num_processes, mixed_precision = 1, "bf16"

    def vae_encode(*flags):
        args = train.parse_args(training_argv(tiny_sdxl, fill_data, tmp_path, *flags))
        return train.model_card_training_details(args, 10, Accelerator())["VAE encode"]

    assert vae_encode() == "float32, every batch"  # SDXL's own VAE, as upstream runs it
    assert vae_encode("--vae_precision", "bf16", "--cache_latents") == "bfloat16, cached latents"
    assert vae_encode("--pretrained_vae_model_name_or_path", tiny_sdxl) == "bfloat16, every batch"


def test_the_readme_says_how_to_get_the_validation_images_of_upstreams_command():
    """'Upstream's own command, which works unchanged' needs its two validation images: a command before
    it in the README fetches each one."""
    command = next(block for block in code_blocks(README, "bash") if "stabilityai/stable-diffusion-xl-base-1.0" in block
                   and "--validation_image" in block)
    words = shlex.split(command.replace("\\\n", " "))
    start = words.index("--validation_image") + 1
    images = []
    for word in words[start:]:
        if word.startswith("--"):
            break
        images.append(os.path.basename(word))
    before = README[: README.index(command)]
    fetched = {os.path.basename(line.split()[-1]) for block in code_blocks(before, "bash")
               for line in block.splitlines() if line.startswith(("wget ", "curl "))}
    assert images == ["conditioning_image_1.png", "conditioning_image_2.png"]
    assert set(images) <= fetched


def test_the_readme_inference_snippet_runs_without_a_gpu(tiny_sdxl, finished_run, tmp_path, monkeypatch):
    """The README's Python inference snippet, with the tiny base and the trained adapter in place of the
    Hub ids, runs on this CPU machine as written."""
    snippet = next(block for block in code_blocks(README, "python") if "StableDiffusionXLAdapterPipeline" in block)
    assert '"stabilityai/stable-diffusion-xl-base-1.0"' in snippet and '"t2iadapter-fill"' in snippet
    snippet = snippet.replace("stabilityai/stable-diffusion-xl-base-1.0", tiny_sdxl)
    snippet = snippet.replace("t2iadapter-fill", str(finished_run)).replace("num_inference_steps=30",
                                                                           "num_inference_steps=2")
    save_condition(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README inference snippet", "exec"), namespace)
    assert namespace["image"].size[0] > 0


def test_a_start_refused_on_its_flags_leaves_no_empty_output_folder(tiny_sdxl, fill_data, tmp_path):
    """The folder a refused start created goes again; one that was there before stays."""
    for folder, existed in ((tmp_path / "t2iadapter-model", False), (tmp_path / "mine", True)):
        if existed:
            folder.mkdir()
        with pytest.raises(ValueError, match="there is no such checkpoint"):
            run_training(training_argv(tiny_sdxl, fill_data, folder, "--max_train_steps", 2,
                                       "--resume_from_checkpoint", "checkpoint-9"))
        assert folder.exists() == existed


def trainer_command(tiny_sdxl, fill_data, output_dir, *extra):
    return [sys.executable, str(ROOT / "train_t2i_adapter_sdxl.py"),
            *training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 1, *extra)]


def test_a_refusal_is_one_message_without_a_traceback(tiny_sdxl, fill_data, tmp_path):
    """Bad input is the user's to fix, not a bug: one line on stderr, exit code 2, no traceback."""
    result = subprocess.run(trainer_command(tiny_sdxl, fill_data, tmp_path / "out", "--validation_prompt", "a circle",
                                            "--validation_image", tmp_path / "missing.png"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 1 and "missing.png" in refusals[0], result.stderr


def test_a_refusal_under_torchrun_is_printed_by_one_process(tiny_sdxl, fill_data, tmp_path):
    """Two processes refuse alike; only the first prints it (torchrun then adds its own failure report)."""
    command = trainer_command(tiny_sdxl, fill_data, tmp_path / "out", "--resume_from_checkpoint", "checkpoint-9")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *command[1:]], env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("there is no such checkpoint") == 1, output[-3000:]
    assert "Traceback" not in output.split("there is no such checkpoint")[0]


class FakeAccelerator:
    def __init__(self, num_processes):
        self.num_processes = num_processes


@pytest.mark.parametrize("environ, refused", [
    ({"WORLD_SIZE": "8", "RANK": "3", "MASTER_ADDR": "127.0.0.1"}, "8 processes \\(WORLD_SIZE=8\\)"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "MASTER_ADDR is set"),
    ({}, None),
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, None),
])
def test_a_launch_asking_for_processes_that_train_alone_is_refused(environ, refused):
    if refused is None:
        lifecycle.refuse_lone_process(FakeAccelerator(1), environ)
        return
    with pytest.raises(ValueError, match=refused + ".*trains alone.*ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
        lifecycle.refuse_lone_process(FakeAccelerator(1), environ)
    lifecycle.refuse_lone_process(FakeAccelerator(int(environ.get("WORLD_SIZE", 2))), environ)


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with two GPUs, two processes do train")
def test_accelerate_launch_of_two_processes_without_a_gpu_stops_with_one_message(tiny_sdxl, fill_data, tmp_path):
    """`accelerate launch --num_processes 2` on a machine without GPUs starts one process: it stops, before
    any model loads, instead of training a total batch half the size asked for."""
    output_dir = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*launch, *trainer_command(tiny_sdxl, fill_data, output_dir)[1:]], capture_output=True,
                            text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
    assert result.returncode != 0
    assert result.stderr.count("trains alone") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not output_dir.exists()


def test_demo_help_prints_its_usage_and_does_nothing_else(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--help"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "DEMO_DIR": str(tmp_path / "demo")})
    assert result.returncode == 0 and "Usage: bash scripts/demo.sh" in result.stdout
    assert not (tmp_path / "demo").exists()
    wrong = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--steps", "5"], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "DEMO_DIR": str(tmp_path / "demo")})
    assert wrong.returncode == 2 and "takes no arguments" in wrong.stderr and not (tmp_path / "demo").exists()


def test_the_demo_runs_twice_and_the_second_continues_the_first(tmp_path):
    """The README's tip after a demo, `DEMO_STEPS=<more> bash scripts/demo.sh`: the second demo says that it
    continues the first adapter, resumes its checkpoint on the dataset it kept (no "changed settings"
    warning), and ends at the new step count."""
    demo = tmp_path / "demo"
    outputs = []
    for steps in (2, 3):
        result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True,
                                timeout=900, env={**os.environ, "DEMO_DIR": str(demo), "DEMO_STEPS": str(steps)})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
        if steps == 2:
            dataset_built = (demo / "fill-data" / "fill_dataset.json").stat().st_mtime_ns
    assert "Training a new adapter" in outputs[0] and "continuing" not in outputs[0]
    assert f"{demo}/adapter holds an earlier demo: continuing it to 3 steps" in outputs[1]
    assert f"Resuming from checkpoint {demo}/adapter/checkpoint-2" in outputs[1]
    assert "changed settings" not in outputs[1] and "Downloading data" not in "".join(outputs)
    assert (demo / "fill-data" / "fill_dataset.json").stat().st_mtime_ns == dataset_built
    assert lifecycle.finished_run(demo / "adapter").step == 3
    assert (demo / "samples" / "grid.png").is_file() and (demo / "evaluation.json").is_file()


def test_a_run_and_its_resume_print_no_library_noise(tiny_sdxl, fill_data, tmp_path):
    """What a user reads is about the run: no diffusers warning about an empty list of float32 modules,
    no torchdata deprecation, no "Downloading data" for local files, and no "Initialising a new adapter"
    when the adapter comes from a checkpoint."""
    output_dir = tmp_path / "out"
    noise = ("kept in float32: []", "set_vital", "Downloading data")
    outputs = []
    for steps, resume in ((2, []), (3, ["--resume_from_checkpoint", "latest"])):
        command = trainer_command(tiny_sdxl, fill_data, output_dir, "--checkpointing_steps", 2,
                                  "--dataloader_num_workers", 1, "--cache_dir", tmp_path / "hub-cache", *resume)
        command[command.index("--max_train_steps") + 1] = str(steps)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    for output in outputs:
        assert [phrase for phrase in noise if phrase in output] == []
    assert "Initialising a new adapter" in outputs[0]  # the log is read: the first run does say it
    assert "Initialising a new adapter" not in outputs[1] and "Resum" in outputs[1]
