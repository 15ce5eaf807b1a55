"""Stopping and failing as a cluster job does (issue 22): a stop signal through one-process `accelerate
launch`, which kills the trainer 5 s later; SLURM's pre-timeout SIGUSR1; a signal during validation; an
error while DataLoader workers run. Each run here is a real training process in a process group of its own."""

import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time

from helpers import load_adapter_weights, max_weight_difference, run_training, training_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_t2i_adapter_sdxl.py")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


class Job:
    """A training command in a process group of its own, its stderr (progress bars and logs) read as it
    comes, so that a test can wait for a line and then signal the group."""

    def __init__(self, command):
        self.process = subprocess.Popen([*map(str, command)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self.output = []
        self.reader = threading.Thread(target=lambda: self.output.extend(iter(self.process.stderr.readline, "")))
        self.reader.start()

    @property
    def stderr(self):
        return "".join(self.output)

    def wait_for(self, pattern, seconds=300):
        deadline = time.time() + seconds
        while not re.search(pattern, self.stderr):
            assert self.process.poll() is None, f"the run ended before {pattern!r}:\n{self.stderr[-3000:]}"
            assert time.time() < deadline, f"no {pattern!r} within {seconds} s:\n{self.stderr[-3000:]}"
            time.sleep(0.05)

    def signal_group(self, signum=signal.SIGTERM):
        os.killpg(self.process.pid, signum)
        return time.time()

    def wait(self, seconds=120):
        returncode = self.process.wait(timeout=seconds)
        self.reader.join(timeout=30)
        return returncode


def stop_line(stderr, signal_name="SIGTERM"):
    """(step, what was saved, seconds from the signal to the saved checkpoint) of the trainer's stop line."""
    match = re.search(rf"Stopped by {signal_name} at step (\d+); saved (\S+) ([\d.]+) s after the signal\.", stderr)
    assert match, stderr[-3000:]
    return int(match.group(1)), match.group(2), float(match.group(3))


def test_a_signal_to_a_one_process_accelerate_launch_saves_within_its_5_s_and_resumes_exactly(
        tiny_sdxl, fill_data, tmp_path):
    """accelerate's one-process launcher kills the trainer 5 s after a stop signal. With optimisation steps longer
    than that (32 accumulated micro-batches at 192²), the trainer abandons the step in progress and saves the last
    completed one, its data position and random states rolled back to where that step ended: the resumed run
    ends bit for bit where the uninterrupted one does."""
    flags = ["--max_train_steps", 2, "--gradient_accumulation_steps", 32, "--checkpointing_steps", 1000,
             "--dataloader_num_workers", 1, "--train_batch_size", 1, "--resolution", 192]
    output_dir = tmp_path / "stopped"
    job = Job([*LAUNCH, SCRIPT, *training_argv(tiny_sdxl, fill_data, output_dir, *flags)])
    job.wait_for(r"Steps:\s+50%")  # step 1 done
    time.sleep(1.0)  # well inside step 2
    job.signal_group()
    job.wait()
    step, saved, seconds = stop_line(job.stderr)
    print(f"signal to complete checkpoint: {seconds:.1f} s")
    assert (step, os.path.basename(saved)) == (1, "checkpoint-1") and seconds < 5, job.stderr[-3000:]
    assert (output_dir / "checkpoint-1").is_dir() and not (output_dir / "checkpoint-1.tmp").exists()

    assert run_training(training_argv(tiny_sdxl, fill_data, output_dir, *flags, "--resume_from_checkpoint",
                                      "latest")) == 2
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *flags))
    assert max_weight_difference(load_adapter_weights(output_dir), load_adapter_weights(tmp_path / "straight")) == 0


def test_a_signal_during_validation_stops_at_the_next_image(tiny_sdxl, fill_data, tmp_path):
    """A stop signal during a mid-run validation of many images ends it at the next image: the run saves the
    step it validated and exits within seconds, not after the whole validation."""
    output_dir = tmp_path / "out"
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 100, "--checkpointing_steps", 1000,
                         "--validation_steps", 2, "--validation_prompt", *fill_data["validation_prompts"],
                         "--validation_image", *fill_data["validation_images"], "--num_validation_images", 500)
    job = Job([sys.executable, SCRIPT, *argv])
    job.wait_for(r"Running validation at step 2\.")
    time.sleep(0.5)
    signalled = job.signal_group()
    assert job.wait() == 128 + signal.SIGTERM, job.stderr[-3000:]
    assert time.time() - signalled < 20, "the validation ran on after the signal"
    assert "Validation at step 2 stopped by the signal" in job.stderr
    assert stop_line(job.stderr)[:2] == (2, str(output_dir / "checkpoint-2"))


def folder_is_locked(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)


def test_an_error_with_dataloader_workers_ends_the_run_within_seconds_and_frees_the_folder(
        tiny_sdxl, fill_data, tmp_path):
    """A NaN loss (a learning rate of 1e30) while two DataLoader workers run: the trainer names the step, its
    workers are killed rather than waited for, the run exits with status 1, and nothing keeps the output folder
    locked, so the requeue can start."""
    output_dir = tmp_path / "out"
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 50, "--learning_rate", 1e30,
                         "--dataloader_num_workers", 2)
    job = Job([sys.executable, SCRIPT, *argv])
    job.wait_for(r"Steps:")
    assert job.wait(seconds=120) == 1, job.stderr[-3000:]
    assert re.search(r"FloatingPointError: Non-finite loss \(\S+\) at step \d+", job.stderr)
    assert not folder_is_locked(output_dir), "a DataLoader worker outlived the trainer, holding its lock"


def test_sigusr1_saves_the_last_step_and_stops_like_sigterm(tiny_sdxl, fill_data, tmp_path):
    """SLURM's pre-timeout notice (`#SBATCH --signal=USR1@120`) reaches every process of the job, the DataLoader
    workers too: the trainer saves and exits 128 + SIGUSR1, and the requeue resumes exactly."""
    flags = ["--max_train_steps", 1000, "--checkpointing_steps", 3, "--dataloader_num_workers", 1]
    output_dir = tmp_path / "out"
    job = Job([sys.executable, SCRIPT, *training_argv(tiny_sdxl, fill_data, output_dir, *flags)])
    job.wait_for(r"Saved state to \S+checkpoint-3")
    job.signal_group(signal.SIGUSR1)
    assert job.wait() == 128 + signal.SIGUSR1, job.stderr[-3000:]
    step, saved, _ = stop_line(job.stderr, "SIGUSR1")
    assert os.path.basename(saved) == f"checkpoint-{step}"

    common = ["--max_train_steps", step + 2, "--checkpointing_steps", 3, "--dataloader_num_workers", 1]
    run_training(training_argv(tiny_sdxl, fill_data, output_dir, *common, "--resume_from_checkpoint", "latest"))
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *common))
    assert max_weight_difference(load_adapter_weights(output_dir), load_adapter_weights(tmp_path / "straight")) == 0


def test_a_rank_killed_with_sigkill_ends_the_whole_job_within_seconds(tiny_sdxl, fill_data, tmp_path):
    """Two processes under torchrun (gloo), each with a DataLoader worker; one is killed with SIGKILL (the
    out-of-memory killer, a lost node). The other fails in its next collective and, its worker killed rather
    than waited for, exits at once: the job ends with a non-zero status well before torchrun's 30 s grace, no
    process is left, and the output folder is free for the requeue."""
    import psutil

    output_dir = tmp_path / "out"
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 1000, "--checkpointing_steps", 2,
                         "--dataloader_num_workers", 1)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            SCRIPT, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.time() + 300
    while not (output_dir / "checkpoint-2").is_dir():
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.1)
    trainers = psutil.Process(job.pid).children()
    every_process = psutil.Process(job.pid).children(recursive=True)  # the trainers and their workers
    assert len(trainers) == 2 and len(every_process) == 4
    killed = time.time()
    trainers[1].kill()
    try:
        returncode = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert returncode != 0 and time.time() - killed < 25, f"the job took {time.time() - killed:.0f} s to end"
    assert not [process for process in every_process if process.is_running()
                and process.status() != psutil.STATUS_ZOMBIE]
    assert not folder_is_locked(output_dir)
