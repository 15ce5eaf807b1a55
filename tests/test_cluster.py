"""What a user on a cluster does (issue 12): a stop signal to the whole process group, the same command
relaunched by a requeue, two jobs on one output folder. Each run here is a real training process."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import train_t2i_adapter_sdxl as train
from helpers import load_adapter_weights, max_weight_difference, run_training, training_argv
from t2i_train import lifecycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_t2i_adapter_sdxl.py")
ADAPTER_FILE = "diffusion_pytorch_model.safetensors"


def start_training(argv):
    """The training script in a process group of its own, as a cluster job's processes are."""
    return subprocess.Popen([sys.executable, SCRIPT, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, process, what, seconds=300):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"training ended before {what}: {process.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.1)


def signal_group_and_wait(process, signum=signal.SIGTERM):
    os.killpg(process.pid, signum)  # every process of the job: the trainer and its DataLoader workers
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.parametrize("flags", [
    ["--dataloader_num_workers", 1],
    ["--dataloader_num_workers", 2, "--random_flip"],
    ["--dataloader_num_workers", 1, "--streaming", "--shuffle_buffer_size", 8],
])
def test_sigterm_to_the_whole_process_group_saves_and_resumes_exactly(tiny_sdxl, fill_data, tmp_path, flags):
    """scancel and pod eviction signal every process, the DataLoader workers too. The workers leave the stop to
    the trainer, which saves a checkpoint and exits 143; resuming from it gives the uninterrupted result."""
    output_dir = tmp_path / "preempted"
    process = start_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 1000,
                                           "--checkpointing_steps", 3, *flags))
    wait_for(lambda: (output_dir / "checkpoint-3").is_dir(), process, "checkpoint-3")
    returncode, stderr = signal_group_and_wait(process)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    step = int(re.search(r"Stopped by SIGTERM at step (\d+); saved \S+checkpoint-\1 [\d.]+ s after the signal\.",
                         stderr).group(1))
    assert "killed by signal" not in stderr

    common = ["--max_train_steps", step + 2, "--checkpointing_steps", 3, *flags]
    run_training(training_argv(tiny_sdxl, fill_data, output_dir, *common, "--resume_from_checkpoint", "latest"))
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *common))
    assert max_weight_difference(load_adapter_weights(output_dir), load_adapter_weights(tmp_path / "straight")) == 0


def test_sigterm_during_the_final_phase_leaves_the_final_adapter(tiny_sdxl, fill_data, tmp_path):
    """A signal during the final validation no longer kills the run at once: the adapter was saved before the
    validation, the run says so and exits 143; a requeue finds the run complete."""
    output_dir = tmp_path / "out"
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 2, "--checkpointing_steps", 1000,
                         "--validation_steps", 1000, "--validation_prompt", *fill_data["validation_prompts"],
                         "--validation_image", *fill_data["validation_images"], "--num_validation_images", 10)
    process = start_training(argv)
    wait_for(lambda: (output_dir / lifecycle.FINISHED_FILE).is_file(), process, "the final adapter")
    returncode, stderr = signal_group_and_wait(process)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert re.search(r"Stopped by SIGTERM at step 2; saved the adapter in \S+out [\d.]+ s after the signal\.", stderr)
    saved = load_adapter_weights(output_dir)
    assert run_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 2,
                                      "--resume_from_checkpoint", "latest")) == 2
    assert max_weight_difference(saved, load_adapter_weights(output_dir)) == 0


def test_a_requeued_finished_run_trains_nothing_and_keeps_its_adapter(tiny_sdxl, fill_data, tmp_path, caplog):
    """The same command relaunched after the run finished: nothing trained, no checkpoint added, the adapter
    left as it was, a line saying the run is complete, and a normal return."""
    import logging

    argv = training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 4, "--checkpointing_steps", 2,
                         "--resume_from_checkpoint", "latest")
    assert run_training(argv) == 4
    adapter = tmp_path / ADAPTER_FILE
    before = (adapter.read_bytes(), adapter.stat().st_mtime_ns, sorted(p.name for p in tmp_path.glob("checkpoint-*")))
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            assert run_training(argv) == 4
    assert (adapter.read_bytes(), adapter.stat().st_mtime_ns, sorted(p.name for p in tmp_path.glob("checkpoint-*"))) == before
    assert "The run is complete: it finished at step 4. Nothing to train" in caplog.text


def test_sigterm_on_the_last_step_resumes_to_the_uninterrupted_result(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """Stopped by a signal at the last step (its checkpoint saved, the final adapter not yet), the requeued
    run trains nothing more and saves the adapter the uninterrupted run saves."""
    flags = ["--max_train_steps", 4, "--checkpointing_steps", 100]
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *flags))
    steps = []
    report_step = train.report_step

    def report_then_signal_at_step_4(step, *args):
        steps.append(step)
        report_step(step, *args)
        if step == 4 and len(steps) == 4:  # the first run only
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "report_step", report_then_signal_at_step_4)
    with pytest.raises(SystemExit) as stopped:
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "stopped", *flags))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [p.name for p in (tmp_path / "stopped").glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (tmp_path / "stopped" / ADAPTER_FILE).exists()
    assert run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "stopped", *flags,
                                      "--resume_from_checkpoint", "latest")) == 4
    assert steps == [1, 2, 3, 4]  # the requeue trained nothing
    assert max_weight_difference(load_adapter_weights(tmp_path / "stopped"),
                                 load_adapter_weights(tmp_path / "straight")) == 0


def test_two_runs_on_one_folder_the_second_refuses_naming_the_first(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """While a run holds --output_dir, a second run there stops at once, before loading anything, naming the
    first one's host and pid. A run killed with SIGKILL leaves no stale lock: the requeue goes on."""
    import socket

    output_dir = tmp_path / "shared"
    process = start_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 1000,
                                           "--checkpointing_steps", 2))
    wait_for(lambda: (output_dir / "checkpoint-2").is_dir(), process, "checkpoint-2")
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded by the second run"))
    with pytest.raises(ValueError, match=rf"in use by another training run \(host {re.escape(socket.gethostname())},"
                                         rf" pid {process.pid}\)"):
        run_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 1000,
                                   "--resume_from_checkpoint", "latest"))
    returncode, _ = signal_group_and_wait(process, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    # What the README says: the killed run's file stays, naming it, but its lock is gone with it.
    assert f"pid {process.pid}" in (output_dir / lifecycle.LOCK_FILE).read_text()
    monkeypatch.undo()
    step = lifecycle.checkpoint_step(lifecycle.list_checkpoints(output_dir)[-1])
    assert run_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", step + 1,
                                      "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")) == step + 1
    assert not (output_dir / lifecycle.LOCK_FILE).exists()


def test_a_new_run_in_a_folder_with_another_runs_checkpoints_refuses_before_loading(tiny_sdxl, fill_data, tmp_path,
                                                                                    monkeypatch):
    """Upstream's pruning would delete the new run's checkpoints as soon as they are saved, and `latest` would
    resume the old run. Here the new run stops first, naming the checkpoints, and nothing is lost."""
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 4, "--checkpointing_steps", 2))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and "logs" not in path.parts}
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(ValueError, match=r"already holds checkpoints of an earlier run \(checkpoint-2, checkpoint-4\)"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 6, "--checkpointing_steps", 2,
                                   "--seed", 1))
    assert {path: path.read_bytes() for path in before} == before


class RunsCodeWhenUnpickled:
    """A planted pickle: unpickling it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def a_checkpoint(tiny_sdxl, fill_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("checkpointed")
    run_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 2, "--checkpointing_steps", 2))
    return output_dir / "checkpoint-2"


def resume_from_a_copy(tiny_sdxl, fill_data, checkpoint, output_dir, damage):
    import shutil

    shutil.copytree(checkpoint, output_dir / "checkpoint-2")
    damage(output_dir / "checkpoint-2")
    return run_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 4,
                                      "--resume_from_checkpoint", "checkpoint-2"))


@pytest.mark.parametrize("name,how", [
    ("optimizer.bin", "pickle"), ("scheduler.bin", "pickle"), ("random_states_0.pkl", "pickle"),
    ("data_state.json", "pickle"), ("t2iadapter/diffusion_pytorch_model.safetensors", "pickle"),
    ("optimizer.bin", "torch.save"), ("scheduler.bin", "torch.save"), ("random_states_0.pkl", "torch.save"),
])
def test_a_pickle_planted_in_a_checkpoint_never_runs(tiny_sdxl, fill_data, tmp_path, a_checkpoint, name, how):
    """Every file a resume reads is read as data: a pickle planted in any of them, bare or in torch.save's zip,
    is refused with the checkpoint named (the file too, where the check reads it), and never unpickled."""
    import pickle

    import torch

    marker = tmp_path / "code-ran"

    def plant(checkpoint):
        if how == "pickle":
            (checkpoint / name).write_bytes(pickle.dumps(RunsCodeWhenUnpickled(str(marker))))
        else:
            torch.save(RunsCodeWhenUnpickled(str(marker)), checkpoint / name)

    named = re.escape(name.split("/")[-1]) if how == "pickle" or name.startswith("random") else "checkpoint-2"
    with pytest.raises(ValueError, match=named):
        resume_from_a_copy(tiny_sdxl, fill_data, a_checkpoint, tmp_path / "out", plant)
    assert not marker.exists()


@pytest.mark.parametrize("damage,message", [
    (lambda c: (c / "optimizer.bin").write_bytes((c / "optimizer.bin").read_bytes()[:1000]), "optimizer.bin is unreadable"),
    (lambda c: (c / "scheduler.bin").write_bytes(b""), "scheduler.bin is empty"),
    (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing (the manifest lists it)"),
])
def test_a_damaged_checkpoint_is_named_before_anything_loads(tiny_sdxl, fill_data, tmp_path, a_checkpoint,
                                                              monkeypatch, damage, message):
    """A truncated optimizer, an empty scheduler state, a file its manifest lists gone: one message naming the
    checkpoint and the file, before any model loads."""
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(ValueError, match=rf"Cannot resume from \S+checkpoint-2: {re.escape(message)}"):
        resume_from_a_copy(tiny_sdxl, fill_data, a_checkpoint, tmp_path / "out", damage)


def test_resuming_with_changed_settings_says_so_and_applies_a_new_learning_rate(tiny_sdxl, fill_data, tmp_path,
                                                                                caplog):
    """The checkpoint keeps the run's settings. A resumed run with another share of empty prompts is warned,
    old → new; a new learning rate is applied from the resumed step on (upstream silently kept the old one) and said so."""
    import logging

    from plot_control_curve import tensorboard_scalars

    argv = training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 2, "--checkpointing_steps", 2,
                         "--report_to", "tensorboard")
    run_training(argv)
    settings = __import__("json").loads((tmp_path / "checkpoint-2" / lifecycle.DATA_STATE_FILE).read_text())["settings"]
    assert settings["total batch size"] == 4 and settings["learning_rate"] == 1e-3 and "processes" not in settings
    resumed = [*argv, "--resume_from_checkpoint", "latest", "--logging_dir", "logs-resumed", "--proportion_empty_prompts",
               "0.5"]
    for flag, value in (("--max_train_steps", "3"), ("--learning_rate", "5e-4")):
        resumed[resumed.index(flag) + 1] = value
    with caplog.at_level(logging.WARNING):
        assert run_training(resumed) == 3
    assert "Applying the new learning rate: 0.001 → 0.0005" in caplog.text
    assert re.search(r"Resuming with changed settings, .*: proportion_empty_prompts 0(\.0)? → 0\.5\.", caplog.text)
    logged = dict(tensorboard_scalars(tmp_path / "logs-resumed")["lr"])
    assert list(logged) == [3] and logged[3] == pytest.approx(5e-4)  # constant schedule: the new rate itself


def flip_64_bytes(path):
    """A bad disk block or a partial overwrite: 64 bytes in the middle inverted, the size unchanged."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - byte for byte in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def six_steps(tiny_sdxl, fill_data, tmp_path_factory):
    """A straight 6-step run with checkpoints at steps 2, 4 and 6."""
    output_dir = tmp_path_factory.mktemp("six-steps")
    run_training(training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 6, "--checkpointing_steps", 2))
    return output_dir


@pytest.mark.parametrize("name", [f"{lifecycle.ADAPTER_SUBFOLDER}/{ADAPTER_FILE}", "optimizer.bin",
                                  "random_states_0.pkl"])
def test_a_bit_flip_in_the_newest_checkpoint_falls_back_to_the_one_before(tiny_sdxl, fill_data, tmp_path, caplog,
                                                                         six_steps, name):
    """Each checkpoint carries a manifest of its files' sizes and checksums. Flipped bytes in the newest one's
    adapter, optimizer or random states (which resumed silently, the optimizer's writing NaN weights into the
    next checkpoint) are found: naming that checkpoint is refused, and `latest` warns naming the damaged file and
    resumes the checkpoint before, so the run still ends bit for bit where the uninterrupted one does."""
    import logging
    import shutil

    output_dir = tmp_path / "preempted"  # a run stopped after step 4
    for step in (2, 4):
        shutil.copytree(six_steps / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    flip_64_bytes(output_dir / "checkpoint-4" / name)
    flags = ["--max_train_steps", 6, "--checkpointing_steps", 2]
    with pytest.raises(ValueError, match=rf"Cannot resume from \S+checkpoint-4: .*{re.escape(name)}.* checksum"):
        run_training(training_argv(tiny_sdxl, fill_data, output_dir, *flags, "--resume_from_checkpoint", "checkpoint-4"))
    with caplog.at_level(logging.WARNING):
        assert run_training(training_argv(tiny_sdxl, fill_data, output_dir, *flags, "--resume_from_checkpoint",
                                          "latest")) == 6
    assert re.search(rf"Skipping \S+checkpoint-4, which is incomplete or damaged: .*{re.escape(name)}", caplog.text)
    assert max_weight_difference(load_adapter_weights(output_dir), load_adapter_weights(six_steps)) == 0


def test_latest_follows_the_branch_of_a_rewind_and_pruning_keeps_it(tiny_sdxl, fill_data, tmp_path, six_steps,
                                                                    monkeypatch, capsys):
    """A run with checkpoints 2, 4, 6 is rewound to checkpoint-2 with a lower learning rate and stopped again at
    step 3. Its requeue with `latest` continues the rewound branch (checkpoint-3), not the abandoned checkpoint-6,
    and pruning to 3 checkpoints removed the abandoned checkpoint-4, not the rewind point."""
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(six_steps, output_dir)
    rewound = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 8, "--checkpointing_steps", 1,
                            "--checkpoints_total_limit", 3, "--learning_rate", 5e-4)
    report_step = train.report_step

    def report_then_signal_at_step_3(step, *args):
        report_step(step, *args)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "report_step", report_then_signal_at_step_3)
    with pytest.raises(SystemExit):
        run_training([*rewound, "--resume_from_checkpoint", "checkpoint-2"])
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-6"]
    assert not (output_dir / lifecycle.FINISHED_FILE).exists()  # the rewound run is not finished
    monkeypatch.setattr(train, "report_step", report_step)
    capsys.readouterr()
    assert run_training([*rewound, "--resume_from_checkpoint", "latest"]) == 8
    assert re.search(r"Resuming from checkpoint \S+checkpoint-3\n", capsys.readouterr().out)
