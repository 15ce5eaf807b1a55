"""Training that survives interruption, bad data and many processes (issue 3)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator, PartialState

import train_t2i_adapter_sdxl as train
from helpers import load_adapter_weights, max_weight_difference, run_training, training_argv
from t2i_train import data, lifecycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_TOKEN = "hf_robustnessTOKENneverLOGGED987"


def copy_checkpoints(source, destination, names):
    for name in names:
        shutil.copytree(source / name, destination / name)


def test_exact_resume_with_accumulation_workers_and_empty_prompts(tiny_sdxl, fill_data, tmp_path):
    """Interrupted mid-epoch with gradient accumulation 2, a DataLoader worker, empty prompts and
    warm-up + cosine: the resumed run ends bit for bit where the straight run ends."""
    flags = ["--max_train_steps", 7, "--gradient_accumulation_steps", 2, "--dataloader_num_workers", 1,
             "--proportion_empty_prompts", 0.5, "--lr_scheduler", "cosine", "--lr_warmup_steps", 2,
             "--checkpointing_steps", 1, "--checkpoints_total_limit", 10]
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *flags))
    # 32 samples / batch 4 / accumulation 2 = 4 steps per epoch: step 5 is inside the second epoch.
    copy_checkpoints(tmp_path / "straight", tmp_path / "resumed", ["checkpoint-5"])
    assert run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "resumed", *flags,
                                      "--resume_from_checkpoint", "latest")) == 7
    assert max_weight_difference(load_adapter_weights(tmp_path / "straight"),
                                 load_adapter_weights(tmp_path / "resumed")) == 0


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_sdxl, fill_data, tmp_path):
    """Determinism on CPU: the same seed and data give the same adapter bit for bit."""
    flags = ["--max_train_steps", 3, "--dataloader_num_workers", 1]
    for name in ("a", "b"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / name, *flags))
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "c", *flags)
    argv[argv.index("--seed") + 1] = "1"
    run_training(argv)
    a, b, c = (load_adapter_weights(tmp_path / name) for name in "abc")
    assert max_weight_difference(a, b) == 0
    assert max_weight_difference(a, c) > 0


def test_sigterm_saves_a_checkpoint_and_exits_within_seconds(tiny_sdxl, fill_data, tmp_path):
    """SIGTERM to a real training process: it finishes the current step, saves checkpoint-<step>,
    says where it stopped and exits quickly; resuming from it gives the straight run's adapter.
    The Hub token passed on the command line appears in no output and no file."""
    output_dir = tmp_path / "preempted"
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--max_train_steps", 1000, "--checkpointing_steps", 2,
                         "--hub_token", SECRET_TOKEN)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_t2i_adapter_sdxl.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (output_dir / "checkpoint-2").is_dir():
        assert process.poll() is None and time.time() < deadline, "training did not reach step 2"
        time.sleep(0.2)
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    seconds_to_exit = time.time() - signalled
    print(f"SIGTERM to exit: {seconds_to_exit:.1f} s")
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert seconds_to_exit < 30
    stopped = re.search(r"Stopped by SIGTERM at step (\d+); saved (\S+)checkpoint-(\d+) [\d.]+ s after", stderr)
    assert stopped, stderr[-2000:]
    step = int(stopped.group(1))
    assert int(stopped.group(3)) == step and 2 <= step < 1000
    assert lifecycle.list_checkpoints(output_dir)[-1] == str(output_dir / f"checkpoint-{step}")
    assert not (output_dir / "diffusion_pytorch_model.safetensors").exists()  # not a finished run

    # Secrets: nothing printed or written holds the token.
    assert SECRET_TOKEN not in stdout + stderr
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert SECRET_TOKEN.encode() not in path.read_bytes(), path

    # Resume and compare with an uninterrupted run of the same length.
    flags = ["--max_train_steps", step + 2, "--checkpointing_steps", 2]
    run_training(training_argv(tiny_sdxl, fill_data, output_dir, *flags, "--resume_from_checkpoint", "latest"))
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *flags))
    assert max_weight_difference(load_adapter_weights(output_dir), load_adapter_weights(tmp_path / "straight")) == 0


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """A crash in the middle of writing checkpoint-4 leaves checkpoint-2 complete and 'latest';
    resuming from it reproduces the straight run."""
    save_state = Accelerator.save_state

    def crash_while_saving_step_4(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "optimizer.bin"), "wb").write(b"half")
            raise RuntimeError("simulated crash while saving")
        return save_state(self, output_dir, **kwargs)

    flags = ["--max_train_steps", 6, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1]
    monkeypatch.setattr(Accelerator, "save_state", crash_while_saving_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "crashed", *flags))
    monkeypatch.setattr(Accelerator, "save_state", save_state)

    assert lifecycle.list_checkpoints(tmp_path / "crashed") == [str(tmp_path / "crashed" / "checkpoint-2")]
    assert (tmp_path / "crashed" / "checkpoint-2" / "optimizer.bin").stat().st_size > 4
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "crashed", *flags, "--resume_from_checkpoint", "latest"))
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *flags))
    assert max_weight_difference(load_adapter_weights(tmp_path / "crashed"),
                                 load_adapter_weights(tmp_path / "straight")) == 0
    # The stale partial folder was replaced by the real checkpoint; the limit then kept only the newest.
    assert sorted(p.name for p in (tmp_path / "crashed").glob("checkpoint-*")) == ["checkpoint-6"]


def inject_nan_at_calls(monkeypatch, calls):
    loss_fn = train.adapter_training_loss
    counter = {"calls": 0}

    def loss_with_nan(*args, **kwargs):
        counter["calls"] += 1
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if counter["calls"] in calls else loss

    monkeypatch.setattr(train, "adapter_training_loss", loss_with_nan)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """The run stops before the bad update, keeps its last good checkpoint, and (stopping by an error) gives
    the process back its own stop-signal handlers."""
    inject_nan_at_calls(monkeypatch, {3})
    checkpoint_flags = ["--checkpointing_steps", 2]
    handlers = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]
    with pytest.raises(FloatingPointError, match=r"Non-finite loss \(nan\) at step 3; .*checkpoint-2"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 6, *checkpoint_flags))
    assert [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)] == handlers
    assert lifecycle.list_checkpoints(tmp_path) == [str(tmp_path / "checkpoint-2")]
    weights = load_adapter_weights(tmp_path / "checkpoint-2" / lifecycle.ADAPTER_SUBFOLDER)
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()


def test_nan_loss_can_be_skipped_up_to_a_limit(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """--skip_nonfinite_steps 1: one NaN step is skipped and the run finishes with finite weights;
    a second NaN step then stops the run."""
    inject_nan_at_calls(monkeypatch, {2})
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "one", "--max_train_steps", 4,
                               "--skip_nonfinite_steps", 1))
    weights = load_adapter_weights(tmp_path / "one")
    assert all(torch.isfinite(value).all() for value in weights.values())

    inject_nan_at_calls(monkeypatch, {2, 4})
    with pytest.raises(FloatingPointError, match="at step 4"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "two", "--max_train_steps", 6,
                                   "--skip_nonfinite_steps", 1))


# ----------------------------------------------------------------------------------------------
# Bad data
# ----------------------------------------------------------------------------------------------


def copy_imagefolder(fill_data, destination):
    shutil.copytree(fill_data["imagefolder"], destination)
    metadata = destination / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    return metadata, rows


def write_rows(metadata, rows):
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))


def corrupt_image(folder, rows, row):
    path = folder / "train" / rows[row]["file_name"]
    path.write_bytes(path.read_bytes()[:60])


def squash_condition(folder, rows, row):
    """A 64×40 condition for a 64×64 image: no resize can align the two (another size in the same
    aspect ratio is fine, see test_real_world_data)."""
    from PIL import Image

    path = folder / "train" / rows[row]["conditioning_image_file_name"]
    Image.open(path).resize((64, 40)).save(path)


def drop_caption(folder, rows, row):
    rows[row]["text"] = None


def make_sliver(folder, rows, row):
    """A 4000 × 1 image and condition (web-scraped sets hold such slivers; at 4,000,000 × 1, an 11 KB PNG, the
    resize before the crop ran out of memory mid-training)."""
    from PIL import Image

    for column in ("file_name", "conditioning_image_file_name"):
        Image.new("RGB", (4000, 1), (200, 10, 10)).save(folder / "train" / rows[row][column])


def make_condition_sliver(folder, rows, row):
    """A 16 × 1 image (at the limit) with a 32 × 1 condition (beyond it), which aligns within its one-pixel
    rounding tolerance: only the limit itself refuses it."""
    from PIL import Image

    Image.new("RGB", (16, 1), (200, 10, 10)).save(folder / "train" / rows[row]["file_name"])
    Image.new("RGB", (32, 1), (200, 10, 10)).save(folder / "train" / rows[row]["conditioning_image_file_name"])


BAD_SAMPLES = {
    "corrupt image": (corrupt_image, r"row 5: unreadable image"),
    "condition of another aspect ratio": (squash_condition, r"row 5: conditioning image is 64x40 but the image is"
                                                            r" 64x64: their aspect ratios differ by 60%, so the"
                                                            r" condition cannot be aligned with the image"),
    "missing caption": (drop_caption, r"row 5: missing caption \(None\)"),
    "extreme aspect ratio": (make_sliver, r"row 5: image is 4000x1: its long side is more than 16 times its short"
                                          r" side, the limit"),
    "condition of an extreme aspect ratio": (make_condition_sliver, r"row 5: conditioning image is 32x1: its long"
                                                                    r" side is more than 16 times its short side,"
                                                                    r" the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_fails_before_training_or_is_skipped(tiny_sdxl, fill_data, tmp_path, monkeypatch, case):
    """A bad sample stops the run before any model loads, naming the row and the columns, and leaves
    what is in output_dir alone; with --skip_bad_samples the run trains on the rest."""
    damage, message = BAD_SAMPLES[case]
    folder = tmp_path / "data"
    metadata, rows = copy_imagefolder(fill_data, folder)
    # Rows are listed in metadata order (datasets' imagefolder keeps it).
    damage(folder, rows, 5)
    write_rows(metadata, rows)
    output_dir = tmp_path / "out"
    (output_dir / "notes").mkdir(parents=True)
    (output_dir / "notes" / "keep.txt").write_text("earlier work")
    data = {"imagefolder": folder}

    load_models = train.load_models
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded before the data check"))
    with pytest.raises(ValueError, match=message) as error:
        run_training(training_argv(tiny_sdxl, data, output_dir, "--max_train_steps", 1))
    assert "'image', 'conditioning_image', 'text'" in str(error.value) and "--skip_bad_samples" in str(error.value)
    assert (output_dir / "notes" / "keep.txt").read_text() == "earlier work"

    monkeypatch.setattr(train, "load_models", load_models)
    assert run_training(training_argv(tiny_sdxl, data, output_dir, "--max_train_steps", 1, "--skip_bad_samples")) == 1
    assert (output_dir / "notes" / "keep.txt").is_file()


def test_the_sample_check_is_recorded_and_done_again_when_a_file_changes(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """A second run on the same files reads the first run's sample check (no image opened) and gets
    the same rows and sizes; a trainer with other check rules, or a changed image, checks again."""
    folder = tmp_path / "data"
    copy_imagefolder(fill_data, folder)
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(folder),
                             "--cache_dir", str(tmp_path / "cache"), "--aspect_ratio_buckets", "--seed", "0"])
    PartialState()  # accelerate's logger needs its state
    inspect_sample = data.inspect_sample
    opened = []
    monkeypatch.setattr(data, "inspect_sample", lambda *sample: opened.append(sample) or inspect_sample(*sample))

    first, first_sizes, *_ = data.load_train_dataset(args, 0, data.recorded_scan_samples)
    assert len(opened) == 32
    assert len(list((tmp_path / "cache").rglob("t2i_sample_check-*.json"))) == 1
    second, second_sizes, *_ = data.load_train_dataset(args, 0, data.recorded_scan_samples)
    assert len(opened) == 32
    assert list(second["text"]) == list(first["text"])
    assert second_sizes == first_sizes == [(64, 64)] * 32

    monkeypatch.setattr(data, "SAMPLE_CHECK_RULES", data.SAMPLE_CHECK_RULES + 1)
    data.load_train_dataset(args, 0, data.recorded_scan_samples)
    assert len(opened) == 64

    image = folder / "train" / "images" / "00003.png"
    image.write_bytes(image.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"1 bad training sample\(s\).*unreadable image"):
        data.load_train_dataset(args, 0, data.recorded_scan_samples)
    assert len(opened) == 96


def test_the_sample_check_split_among_processes_and_threads_finds_what_one_thread_finds(tiny_sdxl, fill_data,
                                                                                          tmp_path, monkeypatch):
    """Three processes' shares, each inspected by 4 threads in blocks of 5 rows, gathered: the same bad rows,
    with the same problems, and the same sizes as one process on one thread."""
    folder = tmp_path / "data"
    metadata, rows = copy_imagefolder(fill_data, folder)
    for row, (damage, _) in zip((3, 7, 20), BAD_SAMPLES.values()):
        damage(folder, rows, row)
    write_rows(metadata, rows)
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(folder)])
    dataset = data.open_dataset(str(folder), args)["train"]
    monkeypatch.setattr(data, "SAMPLE_CHECK_BLOCK", 5)
    shares = [data.inspect_rows(dataset, args, list(range(rank, 32, 3)), threads=4) for rank in range(3)]

    def gather(mine):
        return [item for share in shares for item in share]  # accelerate's gather_object: every process's list

    split = data.scan_samples(dataset, args, 1, 3, gather)
    monkeypatch.setattr(data, "SAMPLE_CHECK_BLOCK", 1024)
    alone = data.scan_samples(dataset, args)
    assert [row for row, _ in alone[0]] == [3, 7, 20]
    assert split == alone and len(alone[1]) == 29


@pytest.mark.parametrize("rules,damage,message", [
    (2, make_sliver, "image is 4000x1"),  # before images beyond 16:1 were refused
    (3, make_condition_sliver, "conditioning image is 32x1"),  # before conditions beyond 16:1 were refused
])
def test_a_record_of_the_rules_before_the_aspect_limit_lets_no_sliver_through(tiny_sdxl, fill_data, tmp_path,
                                                                              monkeypatch, rules, damage, message):
    """The sample check of a version without the limit recorded a sliver as good; its record is keyed on those
    rules, so it is not read, and the sliver is refused by name."""
    folder = tmp_path / "data"
    metadata, rows = copy_imagefolder(fill_data, folder)
    damage(folder, rows, 5)
    write_rows(metadata, rows)
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(folder),
                             "--cache_dir", str(tmp_path / "cache")])
    PartialState()  # accelerate's logger needs its state
    with monkeypatch.context() as earlier:  # the check as that version made it
        earlier.setattr(data, "SAMPLE_CHECK_RULES", rules)
        earlier.setattr(data, "MAX_ASPECT_RATIO", math.inf)
        assert len(data.load_train_dataset(args, 0, data.recorded_scan_samples).dataset) == 32
    [record] = (tmp_path / "cache").rglob("t2i_sample_check-*.json")
    assert json.loads(record.read_text())["bad"] == []
    with pytest.raises(ValueError, match=rf"1 bad training sample\(s\).*row 5: {message}: its long side is more"
                                         r" than 16 times its short side, the limit"):
        data.load_train_dataset(args, 0, data.recorded_scan_samples)


def rewrite_keeping_times(path, data):
    """Rewrite a file and put its old modification time back, as `cp -p` and `rsync -a` do."""
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_file_rewritten_with_its_old_time_is_checked_again(tiny_sdxl, fill_data, tmp_path):
    """`datasets`' fingerprint follows modification times, so a file rewritten with its old time (cp -p,
    rsync -a) would leave the sample check's record in force; the record is keyed on the files' sizes too."""
    folder = tmp_path / "data"
    copy_imagefolder(fill_data, folder)
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(folder),
                             "--cache_dir", str(tmp_path / "cache")])
    PartialState()  # accelerate's logger needs its state
    data.load_train_dataset(args, 0, data.recorded_scan_samples)
    image = folder / "train" / "images" / "00003.png"
    rewrite_keeping_times(image, image.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"1 bad training sample\(s\).*unreadable image"):
        data.load_train_dataset(args, 0, data.recorded_scan_samples)


def test_a_file_that_breaks_after_its_check_stops_naming_it_or_is_skipped(tiny_sdxl, fill_data, tmp_path):
    """An image damaged after its check with its size and time kept (the record cannot tell): the run stops
    mid-training naming the file and the record to delete, or with --skip_bad_samples leaves it out."""
    folder = tmp_path / "data"
    copy_imagefolder(fill_data, folder)
    argv = training_argv(tiny_sdxl, {"imagefolder": folder}, tmp_path / "first", "--max_train_steps", 1,
                         "--cache_dir", tmp_path / "cache")
    run_training(argv)
    image = folder / "train" / "images" / "00003.png"
    data = image.read_bytes()
    rewrite_keeping_times(image, data[:40] + bytes(len(data) - 40))  # same size, pixels gone
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "second")
    flags = ["--max_train_steps", "8"]  # an epoch: every sample is read
    with pytest.raises(ValueError, match=rf"\({re.escape(str(image))}, .*\) failed mid-training: .* It passed the"
                                         r" sample check.*delete the check's record \(t2i_sample_check-\*\.json in"):
        run_training(argv + flags)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "third")
    assert run_training(argv + flags + ["--skip_bad_samples"]) == 8


def test_text_in_an_image_column_is_refused(tiny_sdxl, fill_data, tmp_path):
    """A metadata key without the '_file_name' suffix loads as text: a clear error, not a crash."""
    folder = tmp_path / "data"
    metadata, rows = copy_imagefolder(fill_data, folder)
    for row in rows:
        row["conditioning_image"] = row.pop("conditioning_image_file_name")
    write_rows(metadata, rows)
    with pytest.raises(ValueError, match=r"`--conditioning_image_column` column 'conditioning_image' holds .*string"):
        run_training(training_argv(tiny_sdxl, {"imagefolder": folder}, tmp_path / "out", "--max_train_steps", 1))


def test_an_empty_dataset_is_refused(tiny_sdxl, tmp_path):
    from datasets import Dataset, Features, Image, Value

    features = Features({"image": Image(), "conditioning_image": Image(), "text": Value("string")})
    empty = Dataset.from_dict({"image": [], "conditioning_image": [], "text": []}, features=features)
    (tmp_path / "parquet" / "data").mkdir(parents=True)
    # An explicit batch size: datasets 4.6 divides by the row count when it sizes batches itself.
    empty.to_parquet(str(tmp_path / "parquet" / "data" / "train-00000-of-00001.parquet"), batch_size=100)
    argv = training_argv(tiny_sdxl, {"imagefolder": tmp_path}, tmp_path / "out", "--max_train_steps", 1)
    index = argv.index("--train_data_dir")
    argv[index:index + 2] = ["--dataset_name", str(tmp_path / "parquet")]
    with pytest.raises(ValueError, match=r"`--dataset_name` '.*parquet' could not be loaded .*no data"):
        run_training(argv)


# ----------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------


def without_seed(argv):
    """The command line without its --seed (upstream's default)."""
    index = argv.index("--seed")
    return argv[:index] + argv[index + 2:]


def run_two_processes(tiny_sdxl, fill_data, output_dir, weights_dir, *flags, seeded=True):
    os.makedirs(weights_dir, exist_ok=True)
    argv = training_argv(tiny_sdxl, fill_data, output_dir, *flags)
    argv = argv if seeded else without_seed(argv)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "RANK_WEIGHTS_DIR": str(weights_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "tests", "ddp_worker.py"), *argv],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DistributedType.MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    if "--streaming" not in flags:  # both processes share the check, or both read an earlier run's record
        checked, read = result.stderr.count("Checked all 32 samples"), result.stderr.count("Read the sample check")
        assert (checked, read) in [(1, 0), (0, 2)], (checked, read)
        shares = [json.load(open(weights_dir / f"rank{rank}-checked.json")) for rank in (0, 1)]
        if checked:  # every other row each, by the one message of the main process
            assert "Checked all 32 samples on 2 process(es)" in result.stderr
            assert shares == [list(range(0, 32, 2)), list(range(1, 32, 2))]
        else:
            assert shares == [[], []]
    ranks = [load_adapter_weights_file(weights_dir / f"rank{rank}.safetensors") for rank in (0, 1)]
    if not seeded:  # the main process drew the seed and said so, once
        assert len(re.findall(r"No --seed given: this run's seed is \d+", result.stderr)) == 1
    assert max_weight_difference(*ranks) == 0, "the two ranks hold different adapters"
    return ranks[0]


def load_adapter_weights_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_processes_train_checkpoint_resume_and_agree(tiny_sdxl, fill_data, tmp_path):
    """Real 2-process data parallelism (gloo on CPU): both ranks hold identical weights; the LR warm-up
    counts optimisation steps, not scheduler calls (upstream warms up twice as fast on 2 processes);
    a run resumed from a checkpoint ends where the uninterrupted run ends."""
    from plot_control_curve import tensorboard_scalars

    flags = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--lr_scheduler", "constant_with_warmup",
             "--lr_warmup_steps", 8]
    straight = run_two_processes(tiny_sdxl, fill_data, tmp_path / "straight", tmp_path / "w1", *flags)
    assert (tmp_path / "straight" / "checkpoint-4" / lifecycle.ADAPTER_SUBFOLDER / "config.json").is_file()
    logged = tensorboard_scalars(tmp_path / "straight" / "logs")
    assert [round(lr / 1e-3, 6) for _, lr in logged["lr"]] == [round(step / 8, 6) for step in (1, 2, 3, 4)]
    assert all(math.isfinite(loss) for _, loss in logged["loss"])
    assert max_weight_difference(straight, load_adapter_weights(tmp_path / "straight")) == 0

    copy_checkpoints(tmp_path / "straight", tmp_path / "resumed", ["checkpoint-2"])
    resumed = run_two_processes(tiny_sdxl, fill_data, tmp_path / "resumed", tmp_path / "w2", *flags,
                                "--resume_from_checkpoint", "latest")
    assert max_weight_difference(straight, resumed) == 0


def test_two_processes_without_seed_give_each_sample_to_exactly_one_rank(tiny_sdxl, fill_data, tmp_path):
    """No --seed on 2 processes: the main process draws the seed and gives it to the other, so every epoch
    gives each of the 32 samples to exactly one rank (with a shuffle of its own per rank, one epoch saw 46 of
    64). The seed is stored in the checkpoint, once for all processes."""
    weights = tmp_path / "w"
    # 32 samples, batch 4, 2 ranks: 4 steps an epoch; 8 steps are 2 epochs.
    run_two_processes(tiny_sdxl, fill_data, tmp_path / "out", weights, "--max_train_steps", 8,
                      "--checkpointing_steps", 8, seeded=False)
    rows = [json.loads((weights / f"rank{rank}-rows.json").read_text()) for rank in (0, 1)]
    assert [len(r) for r in rows] == [32, 32]
    epochs = [[r[epoch * 16:(epoch + 1) * 16] for r in rows] for epoch in (0, 1)]
    for first_rank, second_rank in epochs:
        assert not set(first_rank) & set(second_rank)
        assert sorted(first_rank + second_rank) == list(range(32))
    assert epochs[0] != epochs[1]  # a new shuffle each epoch
    assert json.loads((tmp_path / "out" / "checkpoint-8" / lifecycle.DATA_STATE_FILE).read_text())["seed"] >= 0


def test_resume_without_seed_is_exact(tiny_sdxl, fill_data, tmp_path):
    """Without --seed the run draws one, stores it in its checkpoints and a resumed run uses it: the
    --max_train_samples subset, the shuffle, the per-sample randomness and the noise all continue, and the
    result is the straight run's bit for bit. Two launches without --seed draw different seeds."""
    flags = ["--max_train_steps", 7, "--checkpointing_steps", 3, "--random_flip", "--max_train_samples", 24]
    run_training(without_seed(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", *flags)))
    copy_checkpoints(tmp_path / "straight", tmp_path / "resumed", ["checkpoint-3"])
    assert run_training(without_seed(training_argv(tiny_sdxl, fill_data, tmp_path / "resumed", *flags,
                                                   "--resume_from_checkpoint", "latest"))) == 7
    assert max_weight_difference(load_adapter_weights(tmp_path / "straight"),
                                 load_adapter_weights(tmp_path / "resumed")) == 0
    run_training(without_seed(training_argv(tiny_sdxl, fill_data, tmp_path / "other", *flags)))
    seeds = [json.loads((tmp_path / name / "checkpoint-6" / lifecycle.DATA_STATE_FILE).read_text())["seed"]
             for name in ("straight", "other")]
    assert seeds[0] != seeds[1]
