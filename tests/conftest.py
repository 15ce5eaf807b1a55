"""Shared fixtures: a tiny SDXL and a small fill dataset, built once per test session, offline.

Run the suite with `bash scripts/test.sh` (or `pytest tests` inside the project's environment).
"""

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Hermetic and offline: no hub, wandb writes locally, caches in a throwaway folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONHASHSEED", "0")
# One intra-op thread, here and in every subprocess a test starts: the tiny models' ops gain nothing
# from threads, OpenMP's spinning threads make each op ~100x slower on a busy 2-core machine, and
# runs compared bit for bit across processes must use the same thread count.
os.environ["OMP_NUM_THREADS"] = "1"
# Set before any test module imports huggingface_hub or datasets, which read it at import.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="t2i-tests-hf-home-")

import torch  # noqa: E402

from helpers import RESOLUTION  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL pipeline folder (diffusers format)."""
    from make_tiny_sdxl import build_tiny_sdxl

    return str(build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0))


@pytest.fixture(scope="session")
def fill_data(tmp_path_factory):
    """32 fill samples at 64² as an imagefolder and as parquet, plus 2 held-out validation pairs."""
    from make_fill_dataset import build_fill_dataset

    return build_fill_dataset(
        tmp_path_factory.mktemp("data") / "fill", num_samples=32, resolution=RESOLUTION, seed=0, num_validation=2
    )


@pytest.fixture(scope="session")
def tiny_fill_base(tmp_path_factory):
    """The tiny SDXL with the shipped pretrained fill UNet and VAE (assets/tiny-fill-base), as a pipeline folder."""
    from make_tiny_sdxl import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("models") / "tiny-fill-base"
    return str(build_tiny_sdxl(folder, seed=0, pretrained_base=str(ROOT / "assets" / "tiny-fill-base")))
