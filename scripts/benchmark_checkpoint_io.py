#!/usr/bin/env python
"""What a stop signal waits for: the time to save a checkpoint of SDXL's T2I-Adapter (upstream's full_adapter_xl,
derived from the real SDXL configs) with its AdamW state, through the trainer's own save
(lifecycle.save_checkpoint: accelerate's save_state, the data state, the manifest), and the manifest's share of
it; the fsync that would make it durable; then the time a resume spends verifying the manifest, and the same files
hashed with each checksum the manifest could use (SHA-256, BLAKE2b, zlib's CRC-32), serially and in parallel.

The files go to --folder (default: a temporary folder) and are read back from the page cache, as a resume on the
same node reads them. Below the measured rows, the same bytes are planned at the write speeds of other disks
(the save is bound by them; the checksum is not).

Example: python scripts/benchmark_checkpoint_io.py
"""

import argparse
import hashlib
import os
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="Where to write the checkpoint (default: a temporary folder).")
    parser.add_argument("--channels_divisor", type=int, default=1,
                        help="Divide the adapter's channels by this for a quick run (1: the real adapter).")
    parser.add_argument("--repeats", type=int, default=3, help="Saves timed; the best is shown.")
    parser.add_argument("--plan_speeds", type=float, nargs="*", default=[2000, 500, 200],
                        help="Disk write speeds (MB/s) to plan the save at.")
    return parser.parse_args(argv)


def sdxl_adapter(channels_divisor):
    from diffusers import T2IAdapter

    from t2i_train import configs

    config = configs.derive_adapter_config(configs.SDXL_UNET, configs.SDXL_VAE)
    config["channels"] = [channels // channels_divisor for channels in config["channels"]]
    return T2IAdapter(**config)


class Crc32:
    """zlib.crc32 behind hashlib's update(), to be timed the same way."""

    def __init__(self):
        self.value = 0

    def update(self, chunk):
        self.value = zlib.crc32(chunk, self.value)


CHECKSUMS = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b, "crc32": Crc32}


def checksum_file(path, make):
    from t2i_train import manifest

    digest = make()
    with open(path, "rb") as f:
        while chunk := f.read(manifest.CHUNK):  # the manifest's chunks
            digest.update(chunk)


def seconds_to_checksum(paths, make, parallel):
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(paths) if parallel else 1) as pool:
        list(pool.map(lambda path: checksum_file(path, make), paths))
    return time.perf_counter() - start


def seconds_to_fsync(paths):
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - start


def checkpoint_files(folder):
    from t2i_train import manifest

    return [os.path.join(folder, name) for name in manifest.folder_files(folder)]


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def main(options):
    from accelerate import Accelerator

    from t2i_train import lifecycle, manifest

    accelerator = Accelerator(cpu=True)
    adapter = sdxl_adapter(options.channels_divisor)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    for parameter in adapter.parameters():  # one step, so that the optimizer holds both of Adam's moments
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    accelerator.register_save_state_pre_hook(
        lambda models, weights, output_dir: lifecycle.save_adapter_hook(models, weights, output_dir, accelerator))
    parameters = sum(parameter.numel() for parameter in adapter.parameters())

    work = options.folder or tempfile.mkdtemp(prefix="t2i-checkpoint-io-")
    os.makedirs(work, exist_ok=True)
    data_state = {"seed": 0, "run": "benchmark", "settings": {}, "loader": {"epoch": 0, "done": 0}}
    saves, fsyncs, manifests, verifies = [], [], [], []
    checksums = {(name, parallel): [] for name in CHECKSUMS for parallel in (False, True)}
    for repeat in range(options.repeats):
        output_dir = os.path.join(work, f"run-{repeat}")
        start = time.perf_counter()
        checkpoint = lifecycle.save_checkpoint(accelerator, output_dir, 1, None, data_state)
        saves.append(time.perf_counter() - start)
        fsyncs.append(seconds_to_fsync(checkpoint_files(checkpoint)))  # the save leaves its bytes in the page cache
        start = time.perf_counter()
        manifest.write_manifest(checkpoint)  # again, alone: its share of the save
        manifests.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert manifest.manifest_problems(checkpoint) == []
        verifies.append(time.perf_counter() - start)
        for (name, parallel), seconds in checksums.items():  # interleaved, so that a busy moment hits them all
            seconds.append(seconds_to_checksum(checkpoint_files(checkpoint), CHECKSUMS[name], parallel))
    largest = max(os.path.getsize(path) for path in checkpoint_files(checkpoint)) / 1e6
    size = folder_bytes(checkpoint) / 1e6
    if options.folder is None:
        shutil.rmtree(work)

    save, fsync, manifest_share, verify = min(saves), min(fsyncs), min(manifests), min(verifies)
    print(f"adapter parameters: {parameters / 1e6:.1f} M; checkpoint: {size:.0f} MB"
          f" (best of {options.repeats}, {torch.get_num_threads()} torch threads)")
    print("| what | seconds | MB/s | share of the save |")
    print("|---|---:|---:|---:|")
    print(f"| save_checkpoint (measured, page cache) | {save:.2f} | {size / save:.0f} | 1.00 |")
    print(f"| of which the manifest ({manifest.ALGORITHM}) | {manifest_share:.2f} | {size / manifest_share:.0f} |"
          f" {manifest_share / save:.2f} |")
    print(f"| resume: verifying the manifest | {verify:.2f} | {size / verify:.0f} | {verify / save:.2f} |")
    print(f"| fsync of its files after the save (not part of it) | {fsync:.2f} | {size / fsync:.0f} |"
          f" {fsync / save:.2f} |")
    for speed in options.plan_speeds:
        planned = size / speed + manifest_share
        print(f"| save planned on a {speed:.0f} MB/s disk (write + manifest) | {planned:.2f} | {speed:.0f} |"
              f" {planned / save:.2f} |")
    sha256 = min(checksums["sha256", True])
    print(f"\nEach checksum over the checkpoint's files (page cache, {manifest.CHUNK // 2**20} MiB chunks); in"
          f" parallel, one thread a file: the largest ({largest:.0f} MB) sets the time.")
    print("| checksum | serial, s | parallel, s | parallel MB/s | parallel / sha256's | parallel / the save |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in CHECKSUMS:
        serial, parallel = min(checksums[name, False]), min(checksums[name, True])
        label = f"{name} (the manifest's)" if name == manifest.ALGORITHM else name
        print(f"| {label} | {serial:.2f} | {parallel:.2f} |"
              f" {size / parallel:.0f} | {parallel / sha256:.2f} | {parallel / save:.2f} |")


if __name__ == "__main__":
    main(parse_args())
