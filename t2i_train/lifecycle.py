"""A run's lifecycle on disk: the output folder's lock, checkpoints (listing, pruning, saving, checking
and resolving), the finished marker, the run's identity, resume with its changed settings, and
preemption by a stop signal."""

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import threading
import uuid
import zipfile

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, load
from diffusers import T2IAdapter
from safetensors import safe_open

from .files import write_json_atomically

logger = get_logger(__name__)

ADAPTER_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes
ADAPTER_SUBFOLDER = "t2iadapter"  # where a checkpoint keeps the adapter in diffusers format
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LOCK_FILE = ".t2i-adapter-training.lock"  # in --output_dir while a run holds it: who holds it
FINISHED_FILE = "training_finished.json"  # in --output_dir once the final adapter is saved: its step
DATA_STATE_FILE = "data_state_{}.json"  # each process's loader position and the run's seed, in a checkpoint
# What a resume on process {} reads from a checkpoint, in every mode (accelerate's names and ours), and
# what it reads when it is there (DeepSpeed keeps the optimizer in its own files).
CHECKPOINT_FILES = (
    "random_states_{}.pkl", DATA_STATE_FILE,
    os.path.join(ADAPTER_SUBFOLDER, "config.json"), os.path.join(ADAPTER_SUBFOLDER, ADAPTER_WEIGHTS),
)
CHECKPOINT_FILES_IF_THERE = ("optimizer.bin", "scheduler.bin")
# The resume contract. Every flag is compared with the checkpoint's, except these, which may change freely:
# where output goes and how it is logged, validation, checkpoint cadence, the Hub, how long to train, the
# skip policies, cache folders, and kernels and memory options that leave the maths as it is.
FREE_ON_RESUME = frozenset({
    "output_dir", "logging_dir", "report_to", "tracker_project_name", "resume_from_checkpoint",
    "validation_prompt", "validation_image", "num_validation_images", "validation_steps", "validation_data_dir",
    "validation_dataset_name", "control_metric", "checkpointing_steps", "checkpoints_total_limit",
    "push_to_hub", "hub_token", "hub_model_id", "max_train_steps", "num_train_epochs", "skip_nonfinite_steps",
    "skip_bad_samples", "skip_memory_check", "cache_dir", "latent_cache_dir", "gradient_checkpointing",
    "enable_xformers_memory_efficient_attention", "torch_compile", "set_grads_to_none",
})
# Compared, and a change is applied from the resumed step on (and said so); the optimizer's own are set
# again after its state is restored, which would otherwise bring back the checkpoint's values.
APPLIED_ON_RESUME = frozenset({"learning_rate", "scale_lr", "adam_beta1", "adam_beta2", "adam_weight_decay",
                               "adam_epsilon", "max_grad_norm"})
# Compared, and a change is refused: the checkpoint cannot continue under it.
REFUSED_ON_RESUME = {
    "use_8bit_adam": "the optimizer's saved state has another format",
    "dataloader_num_workers": "the loader's saved position holds one state per DataLoader worker",
}
# Compared, and the checkpoint's value is kept: a new seed would replan the epoch mid-way, repeating some
# samples and skipping others.
KEPT_ON_RESUME = frozenset({"seed"})
# Every other flag is compared and a change is warned about by name: the run continues, but not exactly
# as it would have.


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first. Checkpoints still being written carry
    a '.tmp' suffix and are never listed."""
    if not os.path.isdir(output_dir):
        return []
    matches = (CHECKPOINT_PATTERN.match(name) for name in os.listdir(output_dir))
    steps = sorted(int(m.group(1)) for m in matches if m and os.path.isdir(os.path.join(output_dir, m.group(0))))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def checkpoint_step(path):
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"{path!r} is not a checkpoint folder (checkpoint-<step>).")
    return int(match.group(1))


def data_state_path(checkpoint, process_index):
    return os.path.join(checkpoint, DATA_STATE_FILE.format(process_index))


def checkpoint_run(checkpoint):
    """The id of the run that wrote `checkpoint` (None when it does not say)."""
    try:
        with open(data_state_path(checkpoint, 0)) as f:
            return json.load(f).get("run")
    except (OSError, ValueError):
        return None


def prune_checkpoints(output_dir, total_limit, run):
    """Delete the oldest checkpoints of `run` (an id that its resumed launches share) so that at most
    `total_limit` of them remain. A checkpoint that another run wrote stays."""
    checkpoints = list_checkpoints(output_dir)
    own = [path for path in checkpoints if checkpoint_run(path) == run]
    if total_limit is None or len(own) <= total_limit:
        return []
    removed = own[: len(own) - total_limit]  # never the newest: the limit is at least 1
    logger.info(f"Removing checkpoints beyond the limit of {total_limit}: {', '.join(map(os.path.basename, removed))}")
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(accelerator, output_dir, step, total_limit, data_state):
    """Save the full training state as output_dir/checkpoint-<step>.

    Every process takes part (DeepSpeed needs each rank's shard), and each saves its `data_state`
    (the run's seed and its loader's position) as JSON. The state is written under a temporary
    name and renamed once complete, and only then are old checkpoints pruned: a crash while saving
    leaves the previous checkpoints intact and never a half-written one as 'latest'.
    """
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    tmp_path = final_path + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp_path):
        shutil.rmtree(tmp_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp_path)
    write_json_atomically(data_state_path(tmp_path, accelerator.process_index), data_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final_path):  # the same step saved again after a resume
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
        prune_checkpoints(output_dir, total_limit, data_state["run"])
        logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()
    return final_path


def load_data_state(checkpoint, process_index):
    """This process's data state saved with the checkpoint: the run's seed and the loader's position.
    Plain JSON, so reading it never runs code; `checkpoint_problems` has made sure it is there."""
    with open(data_state_path(checkpoint, process_index)) as f:
        return json.load(f)


def checkpoint_problems(checkpoint, process_index, read=False):
    """What is wrong with the files a resume on this process reads from `checkpoint`: each missing or
    empty one, and with `read` each whose format is broken, read without running any code (JSON,
    safetensors headers, torch's zip directory; the small random states loaded as tensors only). Empty
    when the checkpoint is complete."""
    problems = []
    names = [name.format(process_index) for name in CHECKPOINT_FILES]
    names += [name for name in CHECKPOINT_FILES_IF_THERE if os.path.exists(os.path.join(checkpoint, name))]
    for name in names:
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            problems.append(f"{name} is {'empty' if os.path.isfile(path) else 'missing'}")
        elif read and name.endswith(".json"):
            try:
                with open(path) as f:
                    json.load(f)
            except ValueError as error:
                problems.append(f"{name} is not readable JSON ({error})")
        elif read and name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):  # reads and checks the header only
                    pass
            except Exception as error:
                problems.append(f"{name} is not readable safetensors ({str(error)[:200]})")
        elif read and name.endswith((".bin", ".pkl")) and not zipfile.is_zipfile(path):
            # torch.save writes a zip; its directory, at the end, is lost when a file is truncated.
            # Nothing is unpickled here (accelerate loads these with weights_only).
            problems.append(f"{name} is unreadable (not a complete torch file)")
        elif read and name.startswith("random_states"):
            try:  # small; accelerate would skip unreadable random states with an INFO line, losing exactness
                load(path, map_location="cpu")  # weights_only: tensors and plain data, never code
            except Exception as error:
                problems.append(f"{name} is unreadable ({type(error).__name__}: {str(error)[:200]})")
    return problems


def mark_finished(output_dir, step):
    """Write the finished marker, once the final adapter is saved: a requeue finds the run complete."""
    write_json_atomically(os.path.join(output_dir, FINISHED_FILE), {"step": step})


def finished_step(output_dir):
    """The step at which a run in `output_dir` finished (its final adapter saved), or None. A marker that
    cannot be read (written by hand, or by an older version in place and cut short) is warned about and
    taken as absent: the run then decides from its checkpoints and the adapter in the folder."""
    path = os.path.join(output_dir, FINISHED_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            step = json.load(f)["step"]
        if isinstance(step, int) and step >= 0:
            return step
        problem = f"its step is {step!r}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"{type(error).__name__}: {error}"
    logger.warning(f"The finished marker {path} is unreadable ({problem}); deciding from the checkpoints and the"
                   " adapter in the folder instead.")
    return None


def holds_final_adapter(output_dir):
    """Whether `output_dir` holds a saved final adapter (its weights), whatever its marker says."""
    return os.path.isfile(os.path.join(output_dir, ADAPTER_WEIGHTS))


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, or None for a new run: without the flag, or with 'latest'
    before any checkpoint exists (as upstream, so that one command serves the first launch and every
    requeue). A new run refuses a folder that holds checkpoints, and a named checkpoint must exist."""
    checkpoints = list_checkpoints(output_dir)
    names = ", ".join(os.path.basename(path) for path in checkpoints)
    if resume_from_checkpoint is None:
        earlier = f"checkpoints of an earlier run ({names})" if checkpoints else "a finished run"
        if checkpoints or finished_step(output_dir) is not None or holds_final_adapter(output_dir):
            raise ValueError(
                f"`--output_dir` {output_dir!r} already holds {earlier}. Resume it with `--resume_from_checkpoint"
                " latest`, or start the new run in another `--output_dir`."
            )
        return None
    if resume_from_checkpoint == "latest":
        for path in reversed(checkpoints):  # the newest complete one
            problems = checkpoint_problems(path, process_index=0)
            if not problems:
                return path
            logger.warning(f"Skipping {path}, which is incomplete: {'; '.join(problems)}.")
        return None
    if os.path.isdir(resume_from_checkpoint):
        path = resume_from_checkpoint
    else:
        path = os.path.join(output_dir, os.path.basename(os.path.normpath(resume_from_checkpoint)))
    if not os.path.isdir(path):
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r}: there is no such checkpoint ({path})."
            f" Checkpoints in {output_dir}: {names or 'none'}. Pass one of them or 'latest'."
        )
    checkpoint_step(path)
    return path


def lock_output_dir(output_dir):
    """An exclusive lock on `output_dir` for the whole run, so that two runs never write (and prune)
    one folder: `flock` on the folder itself, which the system releases however the process ends, so
    a crashed run leaves no stale lock. While it is held, LOCK_FILE in the folder names the holder.
    Returns the locked folder's descriptor, for `unlock_output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    folder = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(folder)
        try:
            with open(os.path.join(output_dir, LOCK_FILE)) as f:
                holder = f.read().strip()
        except OSError:
            holder = "its holder did not say who it is"
        raise ValueError(
            f"`--output_dir` {output_dir!r} is in use by another training run ({holder}). Wait for it to end,"
            " or use another `--output_dir`."
        ) from None
    with open(os.path.join(output_dir, LOCK_FILE), "w") as f:
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    return folder


def unlock_output_dir(folder, output_dir):
    """Release `lock_output_dir`'s lock, leaving the folder as the run's own files left it."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, LOCK_FILE))
    os.close(folder)


def save_adapter_hook(models, weights, output_dir, accelerator):
    """accelerate save hook: keep the adapter in diffusers format inside the checkpoint."""
    for model in models:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, ADAPTER_SUBFOLDER))
        if weights:
            weights.pop()  # saved above; accelerate need not write it again


def load_adapter_hook(models, input_dir):
    """accelerate load hook: read the adapter back from its diffusers-format folder."""
    while models:
        model = models.pop()
        saved = T2IAdapter.from_pretrained(os.path.join(input_dir, ADAPTER_SUBFOLDER))
        model.load_state_dict(saved.state_dict())


@contextlib.contextmanager
def exclusive_output_dir(output_dir, accelerator):
    """--output_dir locked for the run (by the main process) and released however the run ends. A
    refusal on the main process stops every process, before anything is loaded."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(output_dir)
        except ValueError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise ValueError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            unlock_output_dir(lock, output_dir)


def find_resume_point(args, accelerator):
    """(checkpoint, this process's data state in it) to resume from, or (None, None) for a new run.
    Every file the resume reads is checked first: a damaged checkpoint is named before anything loads."""
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is None:
        if args.resume_from_checkpoint:
            accelerator.print("No checkpoint yet: starting a new training run.")
        return None, None
    problems = checkpoint_problems(resume_path, accelerator.process_index, read=True)
    if problems:
        raise ValueError(
            f"Cannot resume from {resume_path}: {'; '.join(problems)}. Resume from an earlier checkpoint with"
            " `--resume_from_checkpoint checkpoint-<step>`, or delete this one. (A checkpoint saved by fewer"
            " processes, or by an older version of this trainer, lacks data_state files.)"
        )
    data_state = load_data_state(resume_path, accelerator.process_index)
    refuse_changed_settings(data_state.get("settings", {}), vars(args), resume_path)
    return resume_path, data_state


def run_identity(args, accelerator, resumed_data_state=None):
    """(seed, run id). The seed of the whole run (data order, per-sample randomness, noise): --seed;
    else the one the resumed checkpoint ran with, so that it replays the same order; else one the
    main process draws and gives to all (were each process to draw its own, each would shuffle
    differently and an epoch would give some samples to two processes and others to none). The run
    id marks the checkpoints this run writes, in this launch and in the launches that resume it."""
    resumed = resumed_data_state or {}
    drawn = [(random.SystemRandom().randrange(2**31), uuid.uuid4().hex) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn)
    drawn_seed, drawn_run = drawn[0]
    seed = resumed.get("seed", args.seed if args.seed is not None else drawn_seed)
    if args.seed is not None and seed != args.seed:
        logger.warning(f"Keeping the checkpoint's seed {seed}, not --seed {args.seed}: a new seed would replan the"
                       " epoch mid-way, repeating some samples and skipping others. Start a new run for a new seed.")
    if seed == drawn_seed:
        logger.info(f"No --seed given: this run's seed is {seed} (pass --seed {seed} to repeat it).")
    return seed, resumed.get("run") or drawn_run


def run_settings(args, learning_rate, num_processes, train_data):
    """What a resumed run is compared with, saved in each checkpoint: every flag but FREE_ON_RESUME (so
    never the Hub token), the learning rate in effect, the number of processes and the dataset's
    fingerprint."""
    dataset = train_data.dataset
    flags = {name: value for name, value in vars(args).items() if name not in FREE_ON_RESUME}
    return {
        **flags,
        "learning_rate": learning_rate,
        "processes": num_processes,
        "dataset fingerprint": None if train_data.streamed else dataset._fingerprint,
    }


def changed_settings(saved, current):
    """{name: (checkpoint's value, new value)} of what differs; a setting the checkpoint does not record
    (an older version's checkpoint) is not compared."""
    return {name: (saved[name], value) for name, value in current.items() if name in saved and saved[name] != value}


def listed_changes(changes):
    """{name: (old, new)} as the warnings name them: "name old → new; ..."."""
    return "; ".join(f"{name} {old} → {new}" for name, (old, new) in changes.items())


def refuse_changed_settings(saved, flags, checkpoint):
    """Stop, before anything loads, when a flag in REFUSED_ON_RESUME differs from the checkpoint's."""
    refused = {name: change for name, change in changed_settings(saved, flags).items() if name in REFUSED_ON_RESUME}
    if refused:
        listing = "; ".join(f"--{name} {old} → {new} ({REFUSED_ON_RESUME[name]})" for name, (old, new) in refused.items())
        raise ValueError(f"Cannot resume {checkpoint} with changed settings: {listing}. Pass the checkpoint's"
                         " values, or start a new run in another `--output_dir`.")


def apply_changed_settings(saved, current, args, optimizer, lr_scheduler):
    """A resumed run with other settings than its checkpoint's. The flags in APPLIED_ON_RESUME act from
    here on and are said so: a new learning rate (the schedule keeps its shape), the optimizer's betas,
    epsilon and weight decay (set again after its state was restored from the checkpoint, which brought
    back the old ones), the gradient clipping; every other change is named in a warning, since the run no
    longer continues exactly as it would have."""
    for group in optimizer.param_groups:
        group.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                     weight_decay=args.adam_weight_decay)
    changed = {name: change for name, change in changed_settings(saved, current).items() if name not in KEPT_ON_RESUME}
    if "learning_rate" in changed:
        old, new = changed["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * new / old
        lr_scheduler.scheduler.base_lrs = [base * new / old for base in lr_scheduler.scheduler.base_lrs]
        logger.warning(f"Applying the new learning rate: {old} → {new} (the schedule keeps its shape).")
    applied = {name: change for name, change in changed.items() if name in APPLIED_ON_RESUME - {"learning_rate"}}
    if applied:
        logger.warning(f"Applying the new settings from here on: {listed_changes(applied)}.")
    warned = {name: change for name, change in changed.items() if name not in APPLIED_ON_RESUME}
    if warned:
        logger.warning("Resuming with changed settings, so the run does not continue exactly as it would have:"
                       f" {listed_changes(warned)}.")


def resume_from(resume_path, data_state, accelerator, train_dataloader):
    """Restore the training state and the loader's position; returns the step to continue from."""
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    try:
        accelerator.load_state(resume_path)
    except Exception as error:
        raise ValueError(
            f"Could not resume from {resume_path}: {type(error).__name__}: {error}. The checkpoint may be damaged;"
            " resume from an earlier one with `--resume_from_checkpoint checkpoint-<step>`."
        ) from error
    train_dataloader.load_state_dict(data_state["loader"])
    return checkpoint_step(resume_path)


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a request to stop at the end of the current optimisation step,
    after a checkpoint, instead of dying in the middle of one (preemptible GPUs, Ctrl-C). A context
    manager: the previous handlers come back however the run ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def handle(self, signum, frame):
        self.received = signum
        logger.warning(f"Received {signal.Signals(signum).name}: stopping after the current step.")

    def requested(self, accelerator):
        """Whether any process received a signal (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0

    def stop(self, accelerator, step, saved):
        """Say where the run stopped and what it `saved`, then exit with 128 + the signal's number."""
        self.restore()
        name = signal.Signals(self.received).name if self.received else "a signal on another process"
        logger.warning(f"Stopped by {name} at step {step}; saved {saved}. Resume with --resume_from_checkpoint latest.")
        accelerator.end_training()
        raise SystemExit(128 + (self.received or signal.SIGTERM))

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.restore()
