"""A run's lifecycle on disk: the output folder's lock, checkpoints (listing, branches, pruning, saving,
checking and resolving), data states, the finished marker, the run's identity, and resume with its changed
settings. Stopping, by a signal or an error, is in `stopping`."""

import contextlib
import fcntl
import glob
import json
import os
import random
import re
import shutil
import socket
import time
import typing
import uuid
import zipfile

from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object, load
from diffusers import T2IAdapter
from safetensors import safe_open

from . import ema, manifest
from .files import follow_umask, write_json_atomically
from .stopping import Refusal

logger = get_logger(__name__)

ADAPTER_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes
ADAPTER_SUBFOLDER = "t2iadapter"  # where a checkpoint keeps the adapter in diffusers format
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LOCK_FILE = ".t2i-adapter-training.lock"  # in --output_dir while a run holds it: who holds it
FINISHED_FILE = "training_finished.json"  # in --output_dir once the final adapter is saved: its step
BRANCH_FILE = "current_checkpoint.json"  # in --output_dir: the checkpoint the current branch last reached
DATA_STATE_FILE = "data_state.json"  # in a checkpoint: the run's seed and id, settings, parent, data position
# What a resume reads from a checkpoint, in every mode (accelerate's names and ours), and what it reads
# when it is there: DeepSpeed keeps the optimizer in its own files, and accelerate's random states of
# process {} are not needed (every draw of training comes from its sample's seed), so a checkpoint of
# fewer processes has none for the others.
CHECKPOINT_FILES = (
    DATA_STATE_FILE, os.path.join(ADAPTER_SUBFOLDER, "config.json"), os.path.join(ADAPTER_SUBFOLDER, ADAPTER_WEIGHTS),
)
CHECKPOINT_FILES_IF_THERE = ("optimizer.bin", "scheduler.bin", "random_states_{}.pkl")
# The resume contract. Every flag is compared with the checkpoint's, except these, which may change freely:
# where output goes and how it is logged, validation, checkpoint cadence, the Hub, how long to train, the
# skip policies, cache folders, and kernels and memory options that leave the maths as it is.
FREE_ON_RESUME = frozenset({
    "config", "dump_samples", "output_dir", "logging_dir", "report_to", "tracker_project_name", "resume_from_checkpoint",
    "validation_prompt", "validation_image", "num_validation_images", "validation_steps", "validation_data_dir",
    "validation_dataset_name", "control_metric", "checkpointing_steps", "checkpoints_total_limit",
    "push_to_hub", "hub_token", "hub_model_id", "max_train_steps", "num_train_epochs", "skip_nonfinite_steps",
    "skip_bad_samples", "skip_memory_check", "cache_dir", "latent_cache_dir", "gradient_checkpointing",
    "enable_xformers_memory_efficient_attention", "torch_compile", "set_grads_to_none",
    # How the total batch is carried: its size is compared, and a stream's layout (refuse_other_layout).
    "dataloader_num_workers", "train_batch_size", "gradient_accumulation_steps",
})
# Compared, and a change is applied from the resumed step on (and said so); the optimizer's own are set
# again after its state is restored, which would otherwise bring back the checkpoint's values.
APPLIED_ON_RESUME = frozenset({"learning_rate", "scale_lr", "adam_beta1", "adam_beta2", "adam_weight_decay",
                               "adam_epsilon", "max_grad_norm"})
# Compared, and a change is refused: the checkpoint cannot continue under it.
REFUSED_ON_RESUME = {
    "use_8bit_adam": "the optimizer's saved state has another format",
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
        raise Refusal(f"{path!r} is not a checkpoint folder (checkpoint-<step>).")
    return int(match.group(1))


def data_state_path(checkpoint):
    return os.path.join(checkpoint, DATA_STATE_FILE)


def checkpoint_field(checkpoint, name):
    """A string field of `checkpoint`'s data state: "run" (the id of the run that wrote it) or "parent" (the
    checkpoint it continues); None when it does not say."""
    try:
        with open(data_state_path(checkpoint)) as f:
            value = json.load(f).get(name)
        return value if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError):
        return None


# Branches. A run resumed from an older checkpoint than the newest (a rewind, say with a lower learning rate)
# starts a branch: its checkpoints continue the resumed one, and the ones after it belong to the abandoned
# branch. BRANCH_FILE names the checkpoint the current branch last reached, set at each resume and each save;
# each checkpoint names its parent. `latest` follows the current branch, and pruning removes abandoned
# checkpoints first.


def set_branch_head(output_dir, checkpoint):
    """Make `checkpoint` the one the current branch last reached; None, or a checkpoint from elsewhere,
    starts a new branch here."""
    path = os.path.join(output_dir, BRANCH_FILE)
    if checkpoint is None or os.path.dirname(os.path.abspath(checkpoint.rstrip(os.sep))) != os.path.abspath(output_dir):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    write_json_atomically(path, {"checkpoint": os.path.basename(checkpoint.rstrip(os.sep))})


def branch_head(output_dir):
    """The name of the checkpoint the current branch last reached, or None (no branch recorded: a new run,
    or a folder of an earlier version)."""
    try:
        with open(os.path.join(output_dir, BRANCH_FILE)) as f:
            name = json.load(f).get("checkpoint")
        return name if isinstance(name, str) and CHECKPOINT_PATTERN.match(name) else None
    except (OSError, ValueError, AttributeError):
        return None


def current_branch(output_dir):
    """The current branch's checkpoints that exist, newest first (its head, the head's parent, ...), or None
    when no branch is recorded."""
    name = branch_head(output_dir)
    if name is None:
        return None
    branch = []
    while name is not None and CHECKPOINT_PATTERN.match(name) and os.path.isdir(os.path.join(output_dir, name)):
        path = os.path.join(output_dir, name)
        if path in branch:  # a loop (hand-edited parents)
            break
        branch.append(path)
        name = checkpoint_field(path, "parent")
    return branch


def prune_checkpoints(output_dir, total_limit, run):
    """Delete the oldest checkpoints of `run` (an id that its resumed launches share) so that at most
    `total_limit` of them remain: those of abandoned branches first, the current branch's last. A
    checkpoint that another run wrote stays, and so does the current branch's head."""
    checkpoints = list_checkpoints(output_dir)
    own = [path for path in checkpoints if checkpoint_field(path, "run") == run]
    if total_limit is None or len(own) <= total_limit:
        return []
    on_branch = set(current_branch(output_dir) or own[-1:])
    by_removal = [path for path in own if path not in on_branch] + [path for path in own if path in on_branch]
    removed = sorted(by_removal[: len(own) - total_limit], key=checkpoint_step)  # never the head: the limit is at least 1
    logger.info(f"Removing checkpoints beyond the limit of {total_limit}: {', '.join(map(os.path.basename, removed))}")
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(accelerator, output_dir, step, total_limit, data_state):
    """Save the full training state as output_dir/checkpoint-<step>.

    Every process takes part (DeepSpeed needs each rank's shard); the main process saves `data_state`
    (the run's seed, id and settings and the data position) as JSON, with the checkpoint's parent. The state is
    written under a temporary name, given a manifest of every file's size and checksum, and renamed
    once complete; only then are old checkpoints pruned: a crash while saving leaves the previous
    checkpoints intact and never a half-written one as 'latest'.
    """
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    tmp_path = final_path + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp_path):
        shutil.rmtree(tmp_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomically(data_state_path(tmp_path), {**data_state, "parent": branch_head(output_dir)})
        manifest.write_manifest(tmp_path)  # every process's files: a resume verifies them
        if os.path.exists(final_path):  # the same step saved again after a resume
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
        set_branch_head(output_dir, final_path)
        prune_checkpoints(output_dir, total_limit, data_state["run"])
        logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()
    return final_path


def load_data_state(checkpoint):
    """The data state saved with the checkpoint: the run's seed and id, its settings, the checkpoint's
    parent and the data position. Plain JSON, so reading it never runs code;
    `checkpoint_problems` has made sure it is there. A field that a resume could not use (a hand edit)
    stops it here, named, before anything loads."""
    path = data_state_path(checkpoint)
    with open(path) as f:
        state = json.load(f)
    problems = data_state_problems(state)
    if problems:
        raise Refusal(f"Cannot resume from {checkpoint}: {path} is not a data state this trainer wrote"
                         f" ({'; '.join(problems)}). Resume from another checkpoint, or delete this one.")
    return state


def data_state_problems(state):
    """Each field of a data state that is missing or of the wrong type or range, named."""
    if not isinstance(state, dict):
        return [f"it holds a JSON {type(state).__name__}, not an object"]

    def is_count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    problems = []
    if not (is_count(state.get("seed")) and state["seed"] < 2**32):
        problems.append(f'"seed" is {state.get("seed")!r}, not a whole number from 0 to 2**32 - 1')
    # Each absent from earlier versions' states; a run's first checkpoint has a null parent.
    for name, kind, nullable in (("run", str, False), ("parent", str, True), ("settings", dict, False)):
        if name in state and not isinstance(state[name], kind) and not (nullable and state[name] is None):
            problems.append(f'"{name}" is {state[name]!r}, not a JSON {"string" if kind is str else "object"}')
    position = state.get("loader")
    if not isinstance(position, dict):
        problems.append(f'"loader" is {position!r}, not the data position (a JSON object)')
    elif "ranks" in position:  # a stream's: torchdata's state on each process, and the layout that saved them
        layout = position.get("layout")
        if not (isinstance(layout, dict) and all(is_count(layout.get(name)) for name in STREAM_LAYOUT)):
            problems.append(f'"loader"."layout" is {layout!r}, not the {", ".join(STREAM_LAYOUT)} that saved the stream')
        elif not (isinstance(position["ranks"], list) and len(position["ranks"]) == layout["processes"]
                  and all(isinstance(rank, dict) for rank in position["ranks"])):
            problems.append(f'"loader"."ranks" is not one stream position (a JSON object) for each of the'
                            f' {layout["processes"]} processes')
    else:  # a map-style dataset's: the same on every process
        for name in ("epoch", "done"):
            if not is_count(position.get(name)):
                problems.append(f'"loader"."{name}" is {position.get(name)!r}, not a whole number from 0 up')
    return problems


# A stream's position is each process's torchdata state, its DataLoader workers each reading their own shards,
# and each window planned in micro-batches: it continues only on the same layout.
STREAM_LAYOUT = ("processes", "workers", "batch_size")


def stream_layout(args, num_processes):
    return dict(zip(STREAM_LAYOUT, (num_processes, args.dataloader_num_workers, args.train_batch_size)))


def saved_position(position, accelerator, args):
    """The data position a checkpoint saves, once for the whole run, from this process's `position`
    (loader.TrainingBatches.state_dict). A map-style dataset's is the same on every process; a stream's
    is gathered from all, with the layout that made them. Every process calls this."""
    if "epoch" in position:
        return position
    return {"layout": stream_layout(args, accelerator.num_processes), "ranks": gather_object([position])}


def process_position(saved, process_index):
    """This process's part of a checkpoint's data position (`saved_position`)."""
    return saved["ranks"][process_index] if "ranks" in saved else saved


def total_batch(args, num_processes):
    return args.train_batch_size * num_processes * args.gradient_accumulation_steps


def refuse_lone_process(accelerator, environ=os.environ):
    """Stop when the launcher asked for several processes but this one trains alone, as accelerate sets
    them up without a GPU: N runs side by side on one folder, or one run where N were meant."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes > 1:
        return
    if world_size > 1:
        asked = f"{world_size} processes (WORLD_SIZE={world_size})"
    elif "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ:
        asked = "several processes (MASTER_ADDR is set, as `accelerate launch --num_processes N` sets it)"
    else:
        return
    raise Refusal(
        f"The launcher asked for {asked}, but this process trains alone (accelerate found no GPU to join them"
        " on). On CPUs, launch N processes with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"
        " --num_processes N`; for one process, launch without `--num_processes` (and with MASTER_ADDR unset)."
    )


def refuse_other_layout(data_state, args, num_processes, checkpoint):
    """Stop, before anything loads, a resume that cannot continue exactly on this layout: another total
    batch (the epoch's plan is made of total batches), or a stream on other processes, workers or
    micro-batches. Names what keeps it exact."""
    saved_total = data_state.get("settings", {}).get("total batch size")
    total = total_batch(args, num_processes)
    if saved_total is not None and saved_total != total:
        per_step = args.train_batch_size * num_processes
        keep = (f"pass --gradient_accumulation_steps {saved_total // per_step}" if saved_total % per_step == 0 else
                f"choose --train_batch_size and --gradient_accumulation_steps whose product with {num_processes}"
                f" process(es) is {saved_total}")
        raise Refusal(
            f"Cannot resume {checkpoint} with a total batch of {total} (--train_batch_size {args.train_batch_size} ×"
            f" {num_processes} process(es) × --gradient_accumulation_steps {args.gradient_accumulation_steps}): it"
            f" trained with a total batch of {saved_total}, and each epoch is planned in total batches. To continue"
            f" it exactly, {keep}. To train on with {total}, start a new run from its adapter"
            f" (--adapter_model_name_or_path {os.path.join(checkpoint, ADAPTER_SUBFOLDER)}) in another --output_dir."
        )
    saved_layout = data_state["loader"].get("layout")
    layout = stream_layout(args, num_processes)
    if saved_layout is not None and saved_layout != layout:
        def named(values):
            return (f"{values['processes']} process(es) × {values['workers']} DataLoader worker(s) ×"
                    f" --train_batch_size {values['batch_size']}")

        raise Refusal(
            f"Cannot resume {checkpoint} on {named(layout)}: its stream position was saved by {named(saved_layout)},"
            " each process and worker reading its own shards, so another layout would skip or repeat samples."
            f" Launch it on {named(saved_layout)} (--dataloader_num_workers {saved_layout['workers']},"
            f" --train_batch_size {saved_layout['batch_size']}), or start a new run from its adapter"
            f" (--adapter_model_name_or_path {os.path.join(checkpoint, ADAPTER_SUBFOLDER)}) in another --output_dir."
        )


def checkpoint_problems(checkpoint, process_index, read=False):
    """What is wrong with the files a resume on process `process_index` reads from `checkpoint`: each missing or
    empty one, and with `read` each whose format is broken, read without running any code (JSON,
    safetensors headers, torch's zip directory; the small random states loaded as tensors only). Empty
    when the checkpoint is complete."""
    problems = []
    names = list(CHECKPOINT_FILES)
    names += [name.format(process_index) for name in CHECKPOINT_FILES_IF_THERE
              if os.path.exists(os.path.join(checkpoint, name.format(process_index)))]
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


class FinishedRun(typing.NamedTuple):
    step: int
    steps_per_epoch: int  # for how many steps --num_train_epochs makes; 0 when unknown


def mark_finished(output_dir, step, steps_per_epoch):
    """Write the finished marker, once the final adapter is saved: a requeue finds the run complete, unless
    it asks for more steps or more epochs (None for a stream, which counts steps only)."""
    write_json_atomically(os.path.join(output_dir, FINISHED_FILE), {"step": step, "steps_per_epoch": steps_per_epoch})


def finished_run(output_dir):
    """The FinishedRun in `output_dir` (its final adapter saved), or None. A marker that cannot be read
    (written by hand, or by an older version in place and cut short) is warned about and taken as absent:
    the run then decides from its checkpoints and the adapter in the folder. An older marker does not
    say how many steps an epoch had (0): only a larger --max_train_steps trains on."""
    path = os.path.join(output_dir, FINISHED_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
        step, steps_per_epoch = marker["step"], marker.get("steps_per_epoch") or 0
        if isinstance(step, int) and step >= 0 and isinstance(steps_per_epoch, int):
            return FinishedRun(step, steps_per_epoch)
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
        if checkpoints or finished_run(output_dir) is not None or holds_final_adapter(output_dir):
            raise Refusal(
                f"`--output_dir` {output_dir!r} already holds {earlier}. Resume it with `--resume_from_checkpoint"
                " latest`, or start the new run in another `--output_dir`."
            )
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir, checkpoints)
    if os.path.isdir(resume_from_checkpoint):
        path = resume_from_checkpoint
    else:
        path = os.path.join(output_dir, os.path.basename(os.path.normpath(resume_from_checkpoint)))
    if not os.path.isdir(path):
        raise Refusal(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r}: there is no such checkpoint ({path})."
            f" Checkpoints in {output_dir}: {names or 'none'}. Pass one of them or 'latest'."
        )
    checkpoint_step(path)
    return path


HELD_LOCKS = set()  # descriptors of the locked output folders, which no forked child may keep


def close_held_locks_in_child():
    """A forked child (a DataLoader worker) closes its copies of the lock's descriptor: the lock is the
    parent's, and a child that outlived it would otherwise keep the folder locked against the requeue."""
    for folder in HELD_LOCKS:
        os.close(folder)
    HELD_LOCKS.clear()


os.register_at_fork(after_in_child=close_held_locks_in_child)


def latest_checkpoint(output_dir, checkpoints):
    """The newest checkpoint of the current branch that is complete and verifies against its manifest (the
    newest of all when no branch is recorded), each one skipped named in a warning; None before any
    checkpoint. Checkpoints that all fail stop the run: a new one would start beside them."""
    branch = current_branch(output_dir)
    if branch is not None and checkpoints and not branch:
        logger.warning(f"{BRANCH_FILE} in {output_dir} names {branch_head(output_dir)}, which is gone; taking the"
                       " newest checkpoint instead.")
    skipped = []
    for path in branch or list(reversed(checkpoints)):
        problems = checkpoint_problems(path, process_index=0) + manifest.manifest_problems(path)
        if not problems:
            return path
        logger.warning(f"Skipping {path}, which is incomplete or damaged: {'; '.join(problems)}.")
        skipped.append(os.path.basename(path))
    if skipped:
        raise Refusal(f"No checkpoint in {output_dir} can be resumed: each is incomplete or damaged"
                         f" ({', '.join(skipped)}; see the warnings above). Delete them, or start a new run in"
                         " another `--output_dir`.")
    return None


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
        raise Refusal(
            f"`--output_dir` {output_dir!r} is in use by another training run ({holder}). Wait for it to end,"
            " or use another `--output_dir`."
        ) from None
    with open(os.path.join(output_dir, LOCK_FILE), "w") as f:
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    HELD_LOCKS.add(folder)
    return folder


def unlock_output_dir(folder, output_dir):
    """Release `lock_output_dir`'s lock, leaving the folder as the run's own files left it."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, LOCK_FILE))
    HELD_LOCKS.discard(folder)
    os.close(folder)


def save_adapter(adapter, folder):
    """The adapter in diffusers format in `folder`, its weights readable as the umask allows."""
    adapter.save_pretrained(folder)
    follow_umask(*glob.glob(os.path.join(folder, "*.safetensors")))


def save_adapter_hook(models, weights, output_dir, accelerator, averaged=None):
    """accelerate save hook: keep the adapter in diffusers format inside the checkpoint, and its EMA
    (`averaged`, with --use_ema) beside it."""
    for model in models:
        if accelerator.is_main_process:
            save_adapter(accelerator.unwrap_model(model), os.path.join(output_dir, ADAPTER_SUBFOLDER))
            if averaged is not None:
                save_adapter(averaged, os.path.join(output_dir, ema.EMA_SUBFOLDER))
        if weights:
            weights.pop()  # saved above; accelerate need not write it again


def load_adapter_hook(models, input_dir, averaged=None):
    """accelerate load hook: read the adapter back from its diffusers-format folder, and the EMA from
    its own; a checkpoint saved without --use_ema starts the EMA at the adapter's weights."""
    while models:
        model = models.pop()
        saved = T2IAdapter.from_pretrained(os.path.join(input_dir, ADAPTER_SUBFOLDER))
        model.load_state_dict(saved.state_dict())
        if averaged is None:
            continue
        if os.path.isdir(os.path.join(input_dir, ema.EMA_SUBFOLDER)):
            saved = T2IAdapter.from_pretrained(os.path.join(input_dir, ema.EMA_SUBFOLDER))
        else:
            logger.warning(f"{input_dir} has no EMA (it was saved without --use_ema): the EMA starts at its weights.")
        averaged.load_state_dict(saved.state_dict())


@contextlib.contextmanager
def exclusive_output_dir(output_dir, accelerator):
    """--output_dir locked for the run (by the main process) and released however the run ends. A
    refusal on the main process stops every process, before anything is loaded. A folder the run created
    and left without a file when it was refused (its flags, its data) is removed again."""
    lock, refusal = None, None
    created = accelerator.is_main_process and not os.path.exists(output_dir)
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(output_dir)
        except ValueError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise Refusal(refusal)
    refused = False
    try:
        if accelerator.num_processes > 1:
            refuse_unshared_output_dir(output_dir, accelerator)
        yield
    except Refusal:
        refused = True
        raise
    finally:
        if lock is not None:
            unlock_output_dir(lock, output_dir)
        if refused and created and not any(files for _, _, files in os.walk(output_dir)):
            shutil.rmtree(output_dir)  # a failure keeps its folder: what it wrote is evidence


def refuse_unshared_output_dir(output_dir, accelerator, patience_s=5.0):
    """Every process must see the one --output_dir the main process locked: it alone writes the checkpoints,
    the adapter and the lock, so a folder local to each node would hide them from the others (a requeue would
    resume on some nodes and start anew on others). The main process leaves a file of a new name there (a name
    no node has looked up, which a network filesystem cannot answer from a stale cache); each process looks
    for it, a few seconds if need be, since such a filesystem may show a new file late."""
    probe = os.path.join(output_dir, broadcast_object_list([f".shared-{uuid.uuid4().hex}"])[0])
    if accelerator.is_main_process:
        open(probe, "w").close()
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + patience_s
    while not (seen := os.path.exists(probe)) and time.monotonic() < deadline:
        time.sleep(0.1)
    # The gather is a collective: once it returns, every process has looked, and the probe can go.
    blind = [who for who in gather_object([None if seen else f"process {accelerator.process_index} on"
                                           f" {socket.gethostname()}"]) if who]
    if accelerator.is_main_process:
        os.remove(probe)
    if blind:
        raise Refusal(
            f"`--output_dir` {output_dir!r} is not one folder for every process: {', '.join(blind)} cannot see"
            f" what the main process wrote there. Put it on a filesystem every node shares (checkpoints, the"
            f" adapter and the lock are written once, by the main process); `--cache_dir` may be node-local."
        )


def find_resume_point(args, accelerator):
    """(checkpoint, its data state) to resume from, or (None, None) for a new run.
    Every file the resume reads is checked first: a damaged checkpoint is named before anything loads."""
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is None:
        if args.resume_from_checkpoint:
            accelerator.print("No checkpoint yet: starting a new training run.")
        if accelerator.is_main_process:
            set_branch_head(args.output_dir, None)
        return None, None
    problems = checkpoint_problems(resume_path, accelerator.process_index, read=True)
    if args.resume_from_checkpoint != "latest":  # `latest` verified it while choosing
        problems += manifest.manifest_problems(resume_path)
    if problems:
        raise Refusal(
            f"Cannot resume from {resume_path}: {'; '.join(problems)}. Resume from an earlier checkpoint with"
            " `--resume_from_checkpoint checkpoint-<step>`, or delete this one."
            + (" It was saved by an earlier version of this trainer (data_state_0.json), which planned each epoch"
               " otherwise: resume it with that version." if os.path.exists(os.path.join(resume_path, "data_state_0.json"))
               else "")
        )
    data_state = load_data_state(resume_path)
    refuse_changed_settings(data_state.get("settings", {}), vars(args), resume_path)
    refuse_other_layout(data_state, args, accelerator.num_processes, resume_path)
    if accelerator.is_main_process:  # the checkpoints this run saves continue the resumed one's branch
        set_branch_head(args.output_dir, resume_path)
        with contextlib.suppress(FileNotFoundError):  # the run is in progress again
            os.remove(os.path.join(args.output_dir, FINISHED_FILE))
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
    never the Hub token), the learning rate in effect, the total batch and the dataset's fingerprint. The
    number of processes is not among them: the adapter depends on the total batch only."""
    dataset = train_data.dataset
    flags = {name: value for name, value in vars(args).items() if name not in FREE_ON_RESUME}
    return {
        **flags,
        "learning_rate": learning_rate,
        "total batch size": total_batch(args, num_processes),
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
        raise Refusal(f"Cannot resume {checkpoint} with changed settings: {listing}. Pass the checkpoint's"
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


def resume_from(resume_path, data_state, accelerator, batches):
    """Restore the training state and the loader's position (into `batches`, loader.TrainingBatches);
    returns the step to continue from."""
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    step = checkpoint_step(resume_path)
    try:  # each step takes one total batch: a position beyond the step is not this run's
        batches.load_state_dict(process_position(data_state["loader"], accelerator.process_index), most_steps=step)
    except Exception as error:  # torchdata checks a stream's state with bare asserts
        raise Refusal(
            f"Cannot resume from {resume_path}: its data position in {data_state_path(resume_path)}"
            f" does not fit this run ({type(error).__name__}: {error})."
        ) from error
    try:
        accelerator.load_state(resume_path)
    except Exception as error:
        raise Refusal(
            f"Could not resume from {resume_path}: {type(error).__name__}: {error}. The checkpoint may be damaged;"
            " resume from an earlier one with `--resume_from_checkpoint checkpoint-<step>`."
        ) from error
    # accelerate restores its micro-batch count, which places each gradient sync, from the random states that
    # the saving layout wrote (or not at all without them): counted again for this layout's accumulation.
    accelerator.step = step * accelerator.gradient_accumulation_steps
    return step
