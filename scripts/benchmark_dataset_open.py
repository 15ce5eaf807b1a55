#!/usr/bin/env python
"""Time to open a local imagefolder with `datasets.load_dataset`: left to find its splits itself, and
given the files of one listing (`train_t2i_adapter_sdxl.open_dataset`, what the trainer does).

The arrow cache is built first, so each figure is the re-open a restarted run pays; the best of
--repeats runs, the variants alternating. Two layouts: split folders (train/images, ...) and a flat
folder (images/, conditioning_images/, metadata.jsonl at the top).

Example: python scripts/benchmark_dataset_open.py --num_samples 2048
"""

import argparse
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=2048, help="Pairs of images (2 files each).")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def seconds_to_open(folder, listed, cache_dir):
    """Seconds to open `folder`: as the trainer does when `listed` (the listing is part of the time),
    else with a plain `load_dataset`."""
    from datasets import load_dataset

    from t2i_train import data

    start = time.perf_counter()
    if listed:
        data.open_dataset(folder, argparse.Namespace(dataset_config_name=None, cache_dir=cache_dir))
    else:
        load_dataset(folder, cache_dir=cache_dir)
    return time.perf_counter() - start


def main(options):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from make_fill_dataset import build_fill_dataset

    work = tempfile.mkdtemp(prefix="t2i-open-")
    split_folders = build_fill_dataset(os.path.join(work, "fill"), num_samples=options.num_samples, resolution=16,
                                       seed=0, num_validation=0)["imagefolder"]
    flat = os.path.join(work, "flat")
    shutil.copytree(os.path.join(split_folders, "train"), flat)
    print(f"samples={options.num_samples} files={2 * options.num_samples} (best of {options.repeats})")
    print("| layout | datasets finds the splits, s | one listing, s | ratio |")
    print("|---|---|---|---|")
    for name, folder in (("split folders", split_folders), ("flat folder", flat)):
        caches = {listed: os.path.join(work, f"cache-{name}-{listed}") for listed in (False, True)}
        for listed, cache_dir in caches.items():  # each variant's arrow cache built once, untimed
            seconds_to_open(folder, listed, cache_dir)
        best = {False: float("inf"), True: float("inf")}
        for repeat in range(options.repeats):
            for listed in (False, True) if repeat % 2 == 0 else (True, False):
                best[listed] = min(best[listed], seconds_to_open(folder, listed, caches[listed]))
        print(f"| {name} | {best[False]:.2f} | {best[True]:.2f} | {best[True] / best[False]:.2f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main(parse_args())
