"""A checkpoint's manifest: every file's size and SHA-256, written when the checkpoint is complete and
verified before a resume reads it, so that a file damaged in place (a bad disk block, a partial
overwrite: same size, other bytes) is found instead of trained on."""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from .files import write_json_atomically

MANIFEST_FILE = "manifest.json"
# SHA-256: `sha256sum` checks a file by hand, and with the CPU's SHA instructions it reads ~1.3 GB/s. The
# files are hashed in parallel (hashlib lets go of the GIL): the optimizer's state, two thirds of an SDXL
# adapter's checkpoint, sets the time (scripts/benchmark_checkpoint_io.py).
ALGORITHM = "sha256"
CHUNK = 8 * 2**20


def file_digests(paths, algorithm=ALGORITHM):
    with ThreadPoolExecutor(max_workers=min(8, len(paths) or 1)) as pool:
        return list(pool.map(lambda path: file_digest(path, algorithm), paths))


def file_digest(path, algorithm=ALGORITHM):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder):
    """Every regular file under `folder` but the manifest, as relative POSIX paths, sorted."""
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST_FILE:
                names.append(relative)
    return sorted(names)


def write_manifest(folder):
    """Write MANIFEST_FILE in `folder`, listing each of its files with its size and checksum; returns it."""
    names = folder_files(folder)
    paths = [os.path.join(folder, name) for name in names]
    files = {name: {"size": os.path.getsize(path), ALGORITHM: digest}
             for name, path, digest in zip(names, paths, file_digests(paths))}
    manifest = {"algorithm": ALGORITHM, "files": files}
    write_json_atomically(os.path.join(folder, MANIFEST_FILE), manifest)
    return manifest


def manifest_problems(folder):
    """What differs between `folder` and its manifest: each listed file that is missing, of another size or
    with another checksum, or a manifest that cannot be read. Empty when every file verifies, and for a
    folder without a manifest (a checkpoint of an earlier version: nothing to verify against). A file the
    manifest does not list is not checked."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            manifest = json.load(f)
        algorithm, files = manifest["algorithm"], manifest["files"]
        hashlib.new(algorithm)
        listed = {name: (entry["size"], entry[algorithm]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"{MANIFEST_FILE} is unreadable ({type(error).__name__}: {error})"]
    problems, to_hash = [], []
    for name, (size, checksum) in listed.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing (the manifest lists it)")
        elif os.path.getsize(file) != size:
            problems.append(f"{name} has {os.path.getsize(file)} bytes, the manifest says {size}")
        else:
            to_hash.append((name, file, checksum))
    digests = file_digests([file for _, file, _ in to_hash], algorithm)
    problems += [f"{name}: its checksum differs from the manifest's (damaged after it was written: a bad disk"
                 " block, a partial overwrite)" for (name, _, checksum), digest in zip(to_hash, digests)
                 if digest != checksum]
    return problems
