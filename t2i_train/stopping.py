"""Stopping: a stop signal, which abandons the optimisation step in progress (its state rolled back to where
the last completed step left it) so that the last completed step is saved at once; an error, which ends
the DataLoader workers instead of waiting for them; and a refusal of bad input, which is one message."""

import contextlib
import multiprocessing
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)

# Stop signals: a cluster's preemption or time limit (SIGTERM; SLURM's pre-timeout notice, `--signal=USR1@120`,
# is SIGUSR1), Ctrl-C (SIGINT). Each saves the last completed step and stops.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Refusal(ValueError):
    """Bad input, or a folder the run cannot use: the message says what to change. Not a bug, so the user
    gets the message alone, without a traceback (`refusals_as_messages`)."""


@contextlib.contextmanager
def refusals_as_messages():
    """Around the script's entry point: a Refusal ends the process with exit code 2 (argparse's, for a bad
    command line) and its message, printed by the first process only: every process refuses alike, and
    N copies of one sentence, each in a traceback, hide it."""
    try:
        yield
    except Refusal as refusal:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {refusal}", file=sys.stderr, flush=True)
        sys.exit(2)


class PreemptionHandler:
    """Turns a stop signal into a request that the training loop checks after every micro-batch: it
    abandons the optimisation step in progress, saves the last completed one and exits, well inside the
    5 s that a one-process `accelerate launch` waits before killing the trainer. A context manager: the
    previous handlers come back however the run ends."""

    def __init__(self):
        self.received, self.received_at = None, None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}

    def handle(self, signum, frame):
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
        logger.warning(f"Received {signal.Signals(signum).name}: saving the last completed step and stopping.")

    def requested(self, accelerator):
        """Whether any process received a signal (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0

    def stop(self, accelerator, step, saved):
        """Say where the run stopped, what it `saved` and how long after the signal, then exit with 128 + the
        signal's number."""
        self.restore()
        name = signal.Signals(self.received).name if self.received else "a signal on another process"
        after = f" {time.monotonic() - self.received_at:.1f} s after the signal" if self.received else ""
        logger.warning(f"Stopped by {name} at step {step}; saved {saved}{after}. Resume with"
                       " --resume_from_checkpoint latest.")
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


def global_rng_states():
    """The global RNGs that a checkpoint saves (accelerate's random states): Python's, NumPy's, torch's and
    every CUDA device's."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore_global_rng_states(states):
    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class StepStart:
    """What the step in progress changes and a checkpoint of the last completed step must hold as that
    step left it: the loader's position, accelerate's micro-batch count, which places the next gradient
    sync, and the global RNGs (the step's own draws come from each sample's seed, but a model with dropout
    would draw from them).
    Taken after every optimisation step; `restore` abandons the step in progress."""

    def __init__(self, batches, accelerator):
        self.position, self.micro_batches = batches.state_dict(), accelerator.step
        self.rngs = global_rng_states()

    def restore(self, accelerator):
        restore_global_rng_states(self.rngs)
        accelerator.step = self.micro_batches


@contextlib.contextmanager
def workers_ended_on_error():
    """However the run fails or stops, its DataLoader workers are killed before the process exits. They
    ignore stop signals (loader.leave_stop_signals_to_the_main_process), and at exit Python sends them
    SIGTERM and then waits for them: without this, any error with workers hung the job for ever."""
    try:
        yield
    except BaseException:
        children = multiprocessing.active_children()
        if children and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as an error
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout=10)
        raise
