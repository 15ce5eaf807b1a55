"""Files the run writes are written whole or not at all: a reader (a requeued run, another rank) finds
the old file or the new one, never a file cut short by a kill or a full disk."""

import contextlib
import json
import os


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a temporary path beside `path` to write to; once the block completes it replaces `path` in
    one step (a rename). If the block fails, the temporary file goes and `path` is left as it was."""
    tmp_path = f"{path}.{os.getpid()}.tmp"  # one per process: ranks writing at once never share it
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)


def write_json_atomically(path, value):
    """`value` as JSON in `path`, written whole or not at all."""
    with replaced_atomically(path) as tmp_path:
        with open(tmp_path, "w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())


def follow_umask(*paths):
    """Give `paths` the mode a new file gets under the umask (0666 less it). safetensors writes 0600
    whatever the umask, so on a shared cluster folder teammates could not read the adapter."""
    umask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)
