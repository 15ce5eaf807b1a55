"""The resume contract (lifecycle): every flag is compared with the checkpoint's but the free ones, and a
change is applied, refused, kept or warned about by name; the finished marker and every JSON file the run
writes are written whole; one policy refuses or skips a bad sample."""

import json
import logging
import re
import shutil

import pytest

import train_t2i_adapter_sdxl as train
from helpers import load_adapter_weights, max_weight_difference, run_training, training_argv
from t2i_train import data, files, lifecycle, manifest


@pytest.fixture
def accelerate_state():
    """The package logs through accelerate's logger, which needs its state (main() always has one)."""
    from accelerate.state import PartialState

    PartialState()
    yield
    PartialState._reset_state()


@pytest.fixture(scope="module")
def straight_run(tiny_sdxl, fill_data, tmp_path_factory):
    """4 steps with a checkpoint at step 2: (its folder, its command line)."""
    folder = tmp_path_factory.mktemp("straight")
    argv = training_argv(tiny_sdxl, fill_data, folder, "--max_train_steps", 4, "--checkpointing_steps", 2)
    run_training(argv)
    return folder, argv


def resumed_from_step_2(straight_run, folder, *changes):
    """The straight run's command, resumed from its checkpoint-2 in `folder`, with `changes` (flag, value)."""
    shutil.copytree(straight_run[0] / "checkpoint-2", folder / "checkpoint-2")
    argv = [str(part) for part in straight_run[1]]
    argv[argv.index("--output_dir") + 1] = str(folder)
    for flag, value in changes:
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
        else:
            argv += [flag, str(value)]
    return [*argv, "--resume_from_checkpoint", "latest"]


def test_every_flag_the_contract_names_is_a_parser_flag():
    flags = {action.dest for action in train.build_parser()._actions}
    named = (lifecycle.FREE_ON_RESUME | lifecycle.APPLIED_ON_RESUME | set(lifecycle.REFUSED_ON_RESUME)
             | lifecycle.KEPT_ON_RESUME)
    assert named - flags == set()
    assert "hub_token" in lifecycle.FREE_ON_RESUME  # free flags are not saved: the token never reaches a checkpoint


def test_a_new_seed_on_resume_keeps_the_checkpoints_data_order(straight_run, tmp_path, caplog):
    """A job script passing --seed $SLURM_JOB_ID gives each requeue another seed: the run keeps its own, says
    so, and ends exactly where the uninterrupted run did (no sample repeated or skipped)."""
    with caplog.at_level(logging.WARNING):
        assert run_training(resumed_from_step_2(straight_run, tmp_path, ("--seed", 5))) == 4
    assert "Keeping the checkpoint's seed 0, not --seed 5" in caplog.text
    assert max_weight_difference(load_adapter_weights(straight_run[0]), load_adapter_weights(tmp_path)) == 0


def test_new_optimizer_settings_are_applied_on_resume_and_said(straight_run, tmp_path, caplog):
    """accelerate restores the optimizer's state with its old weight decay; the new one is set again and said."""
    with caplog.at_level(logging.WARNING):
        run_training(resumed_from_step_2(straight_run, tmp_path, ("--adam_weight_decay", 0.5), ("--max_grad_norm", 2.0)))
    assert "Applying the new settings from here on: adam_weight_decay 0.01 → 0.5; max_grad_norm 1.0 → 2.0." in caplog.text
    assert "Resuming with changed settings" not in caplog.text
    assert max_weight_difference(load_adapter_weights(straight_run[0]), load_adapter_weights(tmp_path)) > 0


def test_a_changed_setting_outside_the_free_list_is_named(straight_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run_training(resumed_from_step_2(straight_run, tmp_path, ("--crops_coords_top_left_h", 8)))
    assert re.search(r"Resuming with changed settings, .*: crops_coords_top_left_h 0 → 8\.", caplog.text)


def test_another_worker_count_continues_map_style_data_exactly(straight_run, tmp_path):
    """A requeue on a node with other CPUs: for map-style data the position is the sampler's, so a run saved with no
    DataLoader workers continues with two (and back) and ends bit for bit where the straight run ends."""
    assert run_training(resumed_from_step_2(straight_run, tmp_path, ("--dataloader_num_workers", 2))) == 4
    assert max_weight_difference(load_adapter_weights(straight_run[0]), load_adapter_weights(tmp_path)) == 0


@pytest.mark.parametrize("field,value,message", [
    ("done", -3, r'"loader"."done" is -3, not a whole number'),
    ("epoch", -1, r'"loader"."epoch" is -1, not a whole number'),
    ("epoch", "2", r""""loader"."epoch" is '2', not a whole number"""),
    ("loader", None, r'"loader" is None, not the data position'),
    ("seed", "0", r"\"seed\" is '0', not a whole number"),
])
def test_a_hand_edited_data_state_is_refused_naming_the_file_and_field(straight_run, tmp_path, monkeypatch,
                                                                        field, value, message):
    """Negative indices would replay an epoch's last batches through Python's indexing, and a string or a missing
    position died in a bare traceback: each is refused before any model loads, naming the file and the field."""
    argv = resumed_from_step_2(straight_run, tmp_path)
    path = tmp_path / "checkpoint-2" / lifecycle.DATA_STATE_FILE
    state = json.loads(path.read_text())
    if field in ("done", "epoch"):
        state["loader"][field] = value
    else:
        state[field] = value
    path.write_text(json.dumps(state))
    (tmp_path / "checkpoint-2" / manifest.MANIFEST_FILE).unlink()  # as in a checkpoint of an earlier version
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" is not a data state this trainer wrote \(.*" + message):
        run_training(argv)


@pytest.mark.parametrize("position,message", [
    ({"epoch": 0, "done": 10**6}, r'"done" is 1000000, more than the 8 total batches of an epoch'),
    ({"epoch": 999, "done": 0}, r'"epoch" 999 and "done" 0 are 7992 total batches of 8 an epoch, more than the 2'
                                r' steps the run took by then'),
])
def test_a_position_beyond_the_run_is_refused(straight_run, tmp_path, position, message):
    """An epoch the run cannot have reached, or more batches done than an epoch has, were taken silently."""
    argv = resumed_from_step_2(straight_run, tmp_path)
    path = tmp_path / "checkpoint-2" / lifecycle.DATA_STATE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "loader": position}))
    (tmp_path / "checkpoint-2" / manifest.MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match=r"its data position in \S+data_state.json does not fit this run .*" + message):
        run_training(argv)


def test_a_cut_short_finished_marker_is_warned_about_and_the_run_decides_from_its_checkpoints(
    straight_run, tmp_path, caplog
):
    """A marker cut short (a full disk, a kill while an older version wrote it in place) no longer crashes
    every requeue: the run resumes its last checkpoint, trains nothing more and writes the marker whole."""
    folder = tmp_path / "run"
    shutil.copytree(straight_run[0], folder)
    (folder / lifecycle.FINISHED_FILE).write_text('{"st')
    argv = resumed_from_step_2(straight_run, tmp_path / "unused")
    argv[argv.index("--output_dir") + 1] = str(folder)
    with caplog.at_level(logging.WARNING):
        assert run_training(argv) == 4
    assert f"The finished marker {folder / lifecycle.FINISHED_FILE} is unreadable" in caplog.text
    assert json.loads((folder / lifecycle.FINISHED_FILE).read_text()) == {"step": 4, "steps_per_epoch": 8}
    assert max_weight_difference(load_adapter_weights(straight_run[0]), load_adapter_weights(folder)) == 0
    (folder / lifecycle.FINISHED_FILE).write_text("[]")
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    new_run = [part for part in argv if part not in ("--resume_from_checkpoint", "latest")]
    with pytest.raises(ValueError, match="already holds a finished run"):  # the adapter there is not overwritten
        run_training(new_run)


def test_a_finished_runs_requeue_with_more_epochs_trains_them(tiny_sdxl, fill_data, tmp_path):
    """--num_train_epochs 2 on the requeue of a finished 1-epoch run trains the second epoch (it said "The run is
    complete"), ending bit for bit where a straight 2-epoch run ends."""
    run = tmp_path / "run"
    first = training_argv(tiny_sdxl, fill_data, run, "--num_train_epochs", 1, "--checkpointing_steps", 4)
    assert run_training(first) == 8  # 32 samples, batches of 4
    assert run_training([*first, "--resume_from_checkpoint", "latest"]) == 8  # the same command: nothing to train
    second = training_argv(tiny_sdxl, fill_data, run, "--num_train_epochs", 2, "--checkpointing_steps", 4,
                           "--resume_from_checkpoint", "latest")
    assert run_training(second) == 16
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "straight", "--num_train_epochs", 2))
    assert max_weight_difference(load_adapter_weights(run), load_adapter_weights(tmp_path / "straight")) == 0


def test_a_json_write_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    files.write_json_atomically(path, {"step": 1})

    def dump_half_then_fail(value, f):
        f.write('{"st')
        raise OSError("No space left on device")

    monkeypatch.setattr(json, "dump", dump_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        files.write_json_atomically(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_one_policy_refuses_or_skips_a_bad_sample_in_the_same_words(accelerate_state, caplog):
    with pytest.raises(ValueError) as refused:
        data.refuse_or_skip("Bad training sample 'a': unreadable image", skip=False)
    assert str(refused.value) == "Bad training sample 'a': unreadable image. Fix it, or pass --skip_bad_samples."
    with caplog.at_level(logging.WARNING):
        data.refuse_or_skip("Bad training sample 'a': unreadable image", skip=True, fix="Fix it, then start again")
    assert caplog.messages[-1].endswith("Bad training sample 'a': unreadable image. Skipped.")  # after the rank


def test_the_sample_check_handed_in_reaches_the_training_and_the_validation_set(fill_data, accelerate_state):
    """check_samples is passed down, not bound as a default at each level: one handed to load_training_data
    checks the training rows and the validation set's."""
    checked = []

    def counting_check(dataset, args):
        checked.append(len(dataset))
        return data.recorded_scan_samples(dataset, args)

    args = train.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", fill_data["imagefolder"],
                             "--validation_data_dir", fill_data["imagefolder"], "--validation_pairs", "3"])
    loaded = data.load_training_data(data.DataConfig.from_args(args), 0, counting_check)
    assert checked == [32, 3] and len(loaded.control_pairs) == 3


def test_the_data_code_takes_one_frozen_config_built_from_the_flags(fill_data, tmp_path, accelerate_state):
    """DataConfig holds what the data code reads, built once from the command line; a program that is not
    the trainer builds one directly; a validation set opens with a changed copy, not a forged namespace."""
    import dataclasses

    args = train.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", fill_data["imagefolder"],
                             "--validation_data_dir", fill_data["imagefolder"], "--validation_pairs", "3",
                             "--resolution", "64"])
    config = data.DataConfig.from_args(args)
    assert config.train_data_dir == fill_data["imagefolder"] and config.resolution == 64 and config.validation_pairs == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.resolution = 128
    assert len(data.load_validation_set(config, data.recorded_scan_samples)) == 3
    direct = data.DataConfig(train_data_dir=fill_data["imagefolder"], resolution=64)
    assert len(data.load_training_data(direct, 0, data.recorded_scan_samples).dataset) == 32
