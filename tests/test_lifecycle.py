"""Checkpoint folder bookkeeping: listing, pruning, choosing what to resume from, reading the step."""

import json
import os
import time

import pytest

from t2i_train import lifecycle


@pytest.fixture(autouse=True)
def accelerate_state():
    """prune_checkpoints logs through accelerate's logger, which needs a state (main() always has one)."""
    from accelerate.state import PartialState

    PartialState()
    yield
    PartialState._reset_state()


RUN = "this-run"


def make_folder(output_dir, steps, extra=(), run=RUN):
    """Checkpoints of `run` holding every file a resume needs (stand-ins, the data state saying which run
    wrote it), plus `extra` files or folders ('/')."""
    os.makedirs(output_dir, exist_ok=True)
    for step in steps:
        for name in lifecycle.CHECKPOINT_FILES:
            path = os.path.join(output_dir, f"checkpoint-{step}", name.format(0))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"run": run, "step": step}) if name == lifecycle.DATA_STATE_FILE else str(step))
    for name in extra:
        path = os.path.join(output_dir, name)
        if name.endswith("/"):
            os.makedirs(path)
        else:
            with open(path, "w") as f:
                f.write("x")
    return str(output_dir)


def names(paths):
    return [os.path.basename(path) for path in paths]


def test_list_checkpoints_sorts_numerically_and_ignores_the_rest(tmp_path):
    """Only complete checkpoint-N folders are listed, oldest first by number (10 after 9): not checkpoint-7.tmp,
    not other folders or files."""
    output_dir = make_folder(
        tmp_path / "out", [10, 9, 2, 100],
        extra=["checkpoint-7.tmp/", "checkpoint-x/", "logs/", "checkpoint-11-old/", "README.md", "checkpoint-5.zip"],
    )
    listed = lifecycle.list_checkpoints(output_dir)
    assert names(listed) == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert all(os.path.dirname(path) == output_dir for path in listed)


def test_files_named_like_checkpoints_are_not_checkpoints(tmp_path):
    """A plain file called checkpoint-N is not a checkpoint: pruning keeps the newest real checkpoints (counting the
    file, it would delete the one just saved), "latest" is a real checkpoint folder, and listing skips the file."""
    output_dir = make_folder(tmp_path / "out", [1, 2], extra=["checkpoint-8"])
    lifecycle.prune_checkpoints(output_dir, 1, RUN)
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-2")), "the newest real checkpoint was pruned"
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-1"))
    assert os.path.isfile(os.path.join(output_dir, "checkpoint-8"))
    assert lifecycle.resolve_resume_checkpoint(output_dir, "latest") == os.path.join(output_dir, "checkpoint-2")
    assert names(lifecycle.list_checkpoints(output_dir)) == ["checkpoint-2"]


def test_list_checkpoints_of_missing_or_empty_folder_is_empty(tmp_path):
    """No folder, or no checkpoints in it: an empty list."""
    assert lifecycle.list_checkpoints(str(tmp_path / "missing")) == []
    assert lifecycle.list_checkpoints(make_folder(tmp_path / "empty", [], extra=["logs/"])) == []


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_prune_keeps_exactly_the_newest_n(tmp_path, limit):
    """prune_checkpoints deletes the oldest so that exactly the newest `limit` remain; everything else stays."""
    output_dir = make_folder(tmp_path / "out", [1, 9, 10, 20], extra=["checkpoint-30.tmp/", "notes.txt"])
    removed = lifecycle.prune_checkpoints(output_dir, limit, RUN)
    remaining = names(lifecycle.list_checkpoints(output_dir))
    assert remaining == ["checkpoint-1", "checkpoint-9", "checkpoint-10", "checkpoint-20"][-limit:]
    assert sorted(names(removed)) == sorted(set(["checkpoint-1", "checkpoint-9", "checkpoint-10", "checkpoint-20"]) - set(remaining))
    for path in removed:
        assert not os.path.exists(path)
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-30.tmp"))
    assert os.path.isfile(os.path.join(output_dir, "notes.txt"))
    with open(os.path.join(output_dir, remaining[-1], lifecycle.DATA_STATE_FILE)) as f:
        assert json.load(f)["step"] == 20


@pytest.mark.parametrize("limit", [None, 4, 10])
def test_prune_within_limit_removes_nothing(tmp_path, limit):
    """With no limit, or no more checkpoints than the limit, nothing is removed."""
    output_dir = make_folder(tmp_path / "out", [1, 2, 3, 4])
    assert lifecycle.prune_checkpoints(output_dir, limit, RUN) == []
    assert len(lifecycle.list_checkpoints(output_dir)) == 4


def test_resolve_latest_picks_highest_step(tmp_path):
    """"latest" is the highest-numbered complete checkpoint (not the lexically last, not a .tmp one)."""
    output_dir = make_folder(tmp_path / "out", [9, 10, 2], extra=["checkpoint-99.tmp/"])
    assert lifecycle.resolve_resume_checkpoint(output_dir, "latest") == os.path.join(output_dir, "checkpoint-10")


def test_resolve_latest_without_checkpoints_is_none(tmp_path):
    """"latest" with no checkpoint (or no output folder yet) starts fresh: None."""
    assert lifecycle.resolve_resume_checkpoint(make_folder(tmp_path / "out", []), "latest") is None
    assert lifecycle.resolve_resume_checkpoint(str(tmp_path / "missing"), "latest") is None


def test_resolve_by_name_and_by_path(tmp_path):
    """A checkpoint name is looked up in output_dir; a path is used as it is (even outside output_dir)."""
    output_dir = make_folder(tmp_path / "out", [5, 10])
    other = make_folder(tmp_path / "elsewhere", [7])
    assert lifecycle.resolve_resume_checkpoint(output_dir, "checkpoint-5") == os.path.join(output_dir, "checkpoint-5")
    path = os.path.join(output_dir, "checkpoint-10")
    assert lifecycle.resolve_resume_checkpoint(output_dir, path) == path
    assert lifecycle.resolve_resume_checkpoint(output_dir, path + "/") == path + "/"
    elsewhere = os.path.join(other, "checkpoint-7")
    assert lifecycle.resolve_resume_checkpoint(output_dir, elsewhere) == elsewhere


def test_resolve_missing_checkpoint_is_an_error_listing_those_there_are(tmp_path):
    """A named checkpoint that does not exist is an error naming it and listing the checkpoints there are
    (upstream started a new run, which then overwrote the folder's work)."""
    output_dir = make_folder(tmp_path / "out", [5, 10])
    for name in ("checkpoint-6", str(tmp_path / "nowhere" / "checkpoint-6")):
        with pytest.raises(ValueError, match=r"'.*checkpoint-6'.*no such checkpoint.*checkpoint-5, checkpoint-10"):
            lifecycle.resolve_resume_checkpoint(output_dir, name)
    with pytest.raises(ValueError, match="Checkpoints in .*: none"):
        lifecycle.resolve_resume_checkpoint(make_folder(tmp_path / "empty", []), "checkpoint-6")


def test_a_new_run_refuses_a_folder_with_checkpoints(tmp_path):
    """Without --resume_from_checkpoint, a folder that holds checkpoints is refused, naming them and both ways
    on; a folder without any (or not there yet) is a new run."""
    output_dir = make_folder(tmp_path / "out", [500, 1000])
    with pytest.raises(ValueError, match=r"already holds checkpoints .*\(checkpoint-500, checkpoint-1000\)\."
                                         r" Resume it with `--resume_from_checkpoint latest`, or .*another `--output_dir`"):
        lifecycle.resolve_resume_checkpoint(output_dir, None)
    assert lifecycle.resolve_resume_checkpoint(make_folder(tmp_path / "fresh", [], extra=["logs/"]), None) is None
    assert lifecycle.resolve_resume_checkpoint(str(tmp_path / "not-yet"), None) is None


def test_resolve_missing_path_falls_back_to_its_name_in_output_dir(tmp_path):
    """Upstream resumes from output_dir/<basename of the argument>: a path that does not exist but whose name is
    a checkpoint in output_dir resolves to that checkpoint."""
    output_dir = make_folder(tmp_path / "out", [5])
    resolved = lifecycle.resolve_resume_checkpoint(output_dir, str(tmp_path / "nowhere" / "checkpoint-5"))
    assert resolved == os.path.join(output_dir, "checkpoint-5")


def test_resolve_non_checkpoint_folder_is_an_error(tmp_path):
    """An existing folder that is not named checkpoint-<step> cannot give a step: an error naming it."""
    output_dir = make_folder(tmp_path / "out", [5], extra=["logs/"])
    with pytest.raises(ValueError, match="logs"):
        lifecycle.resolve_resume_checkpoint(output_dir, "logs")
    with pytest.raises(ValueError, match="logs"):
        lifecycle.resolve_resume_checkpoint(output_dir, os.path.join(output_dir, "logs"))


@pytest.mark.parametrize(
    "path,step",
    [("checkpoint-0", 0), ("checkpoint-12", 12), ("/a/b/checkpoint-1500", 1500), ("out/checkpoint-7/", 7)],
)
def test_checkpoint_step(path, step):
    """The step is read from the folder name, with or without a leading path or trailing slash."""
    assert lifecycle.checkpoint_step(path) == step


@pytest.mark.parametrize("path", ["checkpoint-7.tmp", "checkpoint-", "checkpoint-x", "logs", "/a/checkpoint-3/logs"])
def test_checkpoint_step_refuses_other_names(path):
    """Names that are not checkpoint-<step> are refused."""
    with pytest.raises(ValueError):
        lifecycle.checkpoint_step(path)


def test_latest_skips_an_incomplete_newest_checkpoint(tmp_path, caplog):
    """An empty checkpoint folder, or one whose files are missing or empty, is never 'latest': the newest complete
    one is, with a warning naming what is wrong with the skipped one."""
    output_dir = make_folder(tmp_path / "out", [2, 4])
    os.makedirs(os.path.join(output_dir, "checkpoint-6"))
    open(os.path.join(output_dir, "checkpoint-4", "scheduler.bin"), "w").close()
    assert lifecycle.resolve_resume_checkpoint(output_dir, "latest") == os.path.join(output_dir, "checkpoint-2")
    assert "checkpoint-6, which is incomplete or damaged: data_state.json is missing" in caplog.text
    assert "checkpoint-4, which is incomplete or damaged: scheduler.bin is empty" in caplog.text


def test_pruning_leaves_checkpoints_of_another_run_and_the_newest(tmp_path):
    """Only this run's checkpoints are pruned: another run's (say, copied in) stay, and so does the newest of
    all, whoever wrote it."""
    output_dir = make_folder(tmp_path / "out", [1, 3, 5])
    make_folder(output_dir, [2, 4], run="another-run")
    removed = lifecycle.prune_checkpoints(output_dir, 1, RUN)
    assert names(removed) == ["checkpoint-1", "checkpoint-3"]
    assert names(lifecycle.list_checkpoints(output_dir)) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    make_folder(output_dir, [6], run="another-run")
    assert lifecycle.prune_checkpoints(output_dir, 1, RUN) == []  # its only one, though not the newest
    assert names(lifecycle.prune_checkpoints(output_dir, 1, "another-run")) == ["checkpoint-2", "checkpoint-4"]
    assert names(lifecycle.list_checkpoints(output_dir)) == ["checkpoint-5", "checkpoint-6"]


def test_pruning_removes_an_abandoned_branch_first_and_latest_follows_the_current_one(tmp_path):
    """Checkpoints 2, 4, 6; a rewind to 2 wrote 3 (its parent 2). `latest` is 3, not 6, and pruning to three
    removes 4, of the abandoned branch, not the rewind point 2."""
    output_dir = make_folder(tmp_path / "out", [2, 4, 6, 3])
    path = os.path.join(output_dir, "checkpoint-3", lifecycle.DATA_STATE_FILE.format(0))
    with open(path, "w") as f:
        json.dump({"run": RUN, "parent": "checkpoint-2"}, f)
    lifecycle.set_branch_head(output_dir, os.path.join(output_dir, "checkpoint-3"))
    assert names(lifecycle.current_branch(output_dir)) == ["checkpoint-3", "checkpoint-2"]
    assert lifecycle.resolve_resume_checkpoint(output_dir, "latest") == os.path.join(output_dir, "checkpoint-3")
    assert names(lifecycle.prune_checkpoints(output_dir, 3, RUN)) == ["checkpoint-4"]
    assert names(lifecycle.prune_checkpoints(output_dir, 1, RUN)) == ["checkpoint-2", "checkpoint-6"]
    assert names(lifecycle.list_checkpoints(output_dir)) == ["checkpoint-3"]


def test_without_a_recorded_branch_latest_is_the_newest(tmp_path, caplog):
    """A folder of an earlier version (no branch file) resumes its newest checkpoint; a branch file naming a
    deleted checkpoint is warned about and the newest taken."""
    output_dir = make_folder(tmp_path / "out", [2, 4])
    assert lifecycle.resolve_resume_checkpoint(output_dir, "latest") == os.path.join(output_dir, "checkpoint-4")
    lifecycle.set_branch_head(output_dir, os.path.join(output_dir, "checkpoint-3"))
    assert lifecycle.resolve_resume_checkpoint(output_dir, "latest") == os.path.join(output_dir, "checkpoint-4")
    assert "names checkpoint-3, which is gone" in caplog.text


def set_then_sleep(event):
    event.set()
    time.sleep(30)


def test_a_forked_child_does_not_keep_the_output_folder_locked(tmp_path):
    """A DataLoader worker is a forked child: it closes its copy of the lock, so a worker that outlives its
    trainer (for up to 5 s it notices nothing) never keeps the requeue out."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    started = context.Event()
    folder = lifecycle.lock_output_dir(str(tmp_path))
    child = context.Process(target=set_then_sleep, args=(started,))
    child.start()
    try:
        assert started.wait(30)
        lifecycle.unlock_output_dir(folder, str(tmp_path))
        lifecycle.unlock_output_dir(lifecycle.lock_output_dir(str(tmp_path)), str(tmp_path))  # free at once
    finally:
        child.kill()
        child.join()


@pytest.mark.parametrize("state,problem", [
    ([], "it holds a JSON list, not an object"),
    ({"seed": True, "loader": {"epoch": 0, "done": 0}}, '"seed" is True'),
    ({"seed": 2**32, "loader": {"epoch": 0, "done": 0}}, '"seed" is 4294967296'),
    ({"seed": 0, "run": 5, "loader": {"epoch": 0, "done": 0}}, '"run" is 5, not a JSON string'),
    ({"seed": 0, "settings": [], "loader": {"epoch": 0, "done": 0}}, '"settings" is [], not a JSON object'),
    ({"seed": 0, "settings": None, "loader": {"epoch": 0, "done": 0}}, '"settings" is None, not a JSON object'),
    ({"seed": 0, "run": None, "loader": {"epoch": 0, "done": 0}}, '"run" is None, not a JSON string'),
    ({"seed": 0}, '"loader" is None'),
    ({"seed": 0, "loader": {"epoch": 1.5, "done": 0}}, '"loader"."epoch" is 1.5'),
    ({"seed": 0, "loader": {"epoch": 1}}, '"loader"."done" is None'),
    ({"seed": 0, "loader": {"ranks": [{}]}}, '"loader"."layout" is None'),
    ({"seed": 0, "loader": {"layout": {"processes": 2, "workers": 0, "batch_size": 4}, "ranks": [{}]}},
     '"loader"."ranks" is not one stream position (a JSON object) for each of the 2 processes'),
])
def test_each_bad_field_of_a_data_state_is_named(state, problem):
    problems = lifecycle.data_state_problems(state)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_data_state_this_trainer_writes_has_no_problem():
    state = {"seed": 7, "run": "abc", "parent": None, "settings": {"seed": 7}, "loader": {"epoch": 2, "done": 3}}
    assert lifecycle.data_state_problems(state) == []
    stream = {"layout": {"processes": 2, "workers": 1, "batch_size": 4}, "ranks": [{"_snapshot": {}}] * 2}
    assert lifecycle.data_state_problems({**state, "loader": stream}) == []  # a stream's: torchdata's, per process
