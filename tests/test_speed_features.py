"""Speed features keep upstream's maths: the latent cache, and what the trainer does instead of
upstream's full-dataset text-embedding precompute."""

import json
import os
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image
from torchvision.transforms.functional import to_tensor

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION, load_adapter_weights, max_weight_difference, run_training, training_argv
from t2i_train import data, geometry, lifecycle, loader

SQUARE = [(RESOLUTION, RESOLUTION)]


def centre_crop_pixels(image, target_size):
    """What the trainer's cache encodes of an image without random crops or flips."""
    return {"": geometry.to_training_pixels(geometry.centre_crop(image, target_size[0]))}


@pytest.fixture(scope="module")
def tiny_models(tiny_sdxl, fill_data):
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(fill_data["imagefolder"]),
                             "--resolution", str(RESOLUTION)])
    adapter_config = train.check_inputs(args)
    PartialState()  # accelerate's logger needs its state
    torch.manual_seed(0)
    return {"args": args, **vars(train.load_models(args, adapter_config))}


def test_loss_on_cached_latents_equals_loss_on_fresh_latents(tiny_models, fill_data, tmp_path):
    """The same images, noise and timesteps: the loss from the float16 cached distribution equals
    the loss from encoding the images afresh (up to float16 rounding of mean and std)."""
    from accelerate import Accelerator

    m = tiny_models
    dataset = data.load_train_dataset(m["args"], 0, data.recorded_scan_samples)[0].select(range(4))
    keys = loader.latent_cache_keys(dataset, "image", loader.vae_fingerprint(m["vae"]), SQUARE * 4, "centre crop")
    assert loader.fill_latent_cache(dataset, keys, SQUARE * 4, m["vae"], m["args"], Accelerator(cpu=True),
                                    str(tmp_path), centre_crop_pixels) == 4
    cached = [loader.load_cached_latents(loader.latent_cache_path(str(tmp_path), key)) for key in keys]
    assert cached[0]["mean"].dtype == torch.float16

    pixels = torch.stack([geometry.to_training_pixels(geometry.centre_crop(image.convert("RGB"), RESOLUTION))
                          for image in dataset["image"]])
    scaling = m["vae"].config.scaling_factor
    mean, std = train.encode_latent_distribution(m["vae"], pixels)
    posterior_noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    fresh = train.sample_latents(mean, std, posterior_noise, scaling)
    from_cache = train.sample_latents(torch.stack([c["mean"] for c in cached]), torch.stack([c["std"] for c in cached]),
                                      posterior_noise, scaling)
    assert torch.allclose(fresh, from_cache, atol=2e-3)

    conditions = torch.stack([to_tensor(geometry.centre_crop(i.convert("RGB"), RESOLUTION))
                              for i in dataset["conditioning_image"]])
    prompt_embeds, pooled = train.encode_prompt(list(dataset["text"]), m["text_encoders"], m["tokenizers"])
    time_ids = train.compute_time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION), 4)
    noise, timesteps = torch.randn_like(fresh), torch.tensor([10, 300, 600, 990])
    losses = [
        train.adapter_training_loss(m["unet"], m["adapter"], latents, conditions, prompt_embeds,
                                    {"text_embeds": pooled, "time_ids": time_ids}, train.sigma_table(m["noise_scheduler"]),
                                    "epsilon", torch.float32, noise=noise, timesteps=timesteps).item()
        for latents in (fresh, from_cache)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_a_node_local_latent_cache_is_filled_by_each_node(tiny_models, tmp_path):
    """Process 1 of 2, on a node whose cache folder is its own: it encodes its share (rows 1 and 3), and
    then, not finding the other process's share, rows 0 and 2 as well, so training there finds them all."""

    m = tiny_models
    dataset = data.load_train_dataset(m["args"], 0, data.recorded_scan_samples)[0].select(range(4))
    keys = loader.latent_cache_keys(dataset, "image", "a-vae", SQUARE * 4, "centre crop")
    second_process = types.SimpleNamespace(process_index=1, num_processes=2, local_process_index=0,
                                           is_local_main_process=True, wait_for_everyone=lambda: None)
    fill = (dataset, keys, SQUARE * 4, m["vae"], m["args"], second_process, str(tmp_path), centre_crop_pixels)
    assert loader.fill_latent_cache(*fill) == 4
    assert all(os.path.isfile(loader.latent_cache_path(str(tmp_path), key)) for key in keys)
    assert loader.fill_latent_cache(*fill) == 0


def test_an_interrupted_cache_fill_keeps_what_it_wrote_and_the_next_fill_encodes_the_rest(tiny_models, tmp_path):
    """The VAE fails on the second chunk of 8 (an interruption): the first 8 images' files are there, whole,
    and nothing else; the next fill encodes only the 4 missing ones and leaves the 8 as they are."""

    m = tiny_models
    dataset = data.load_train_dataset(m["args"], 0, data.recorded_scan_samples)[0].select(range(12))
    keys = loader.latent_cache_keys(dataset, "image", "a-vae", SQUARE * 12, "centre crop")
    calls = []

    def encode_then_fail(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return m["vae"].encode(pixels)

    failing_vae = types.SimpleNamespace(encode=encode_then_fail, device=m["vae"].device, dtype=m["vae"].dtype)
    one_process = types.SimpleNamespace(process_index=0, num_processes=1, local_process_index=0,
                                        is_local_main_process=False, wait_for_everyone=lambda: None)
    with pytest.raises(KeyboardInterrupt):
        loader.fill_latent_cache(dataset, keys, SQUARE * 12, failing_vae, m["args"], one_process, str(tmp_path),
                                 centre_crop_pixels)
    written = sorted(tmp_path.rglob("*"))
    files = [path for path in written if path.is_file()]
    assert [path.name for path in files] == sorted(f"{key}.safetensors" for key in keys[:8])
    assert all(loader.load_cached_latents(path)["mean"].shape == (4, 8, 8) for path in files)
    stamps = [path.stat().st_mtime_ns for path in files]
    assert loader.fill_latent_cache(dataset, keys, SQUARE * 12, m["vae"], m["args"], one_process, str(tmp_path),
                                    centre_crop_pixels) == 4
    assert [path.stat().st_mtime_ns for path in files] == stamps
    assert len(list(tmp_path.rglob("*.safetensors"))) == 12


def test_the_cache_fill_is_split_among_dataloader_workers_and_writes_what_it_said_it_would(tiny_models, tmp_path):
    """Two DataLoader workers decode and crop (an image and its flip, each row): the files are those of a fill
    without workers, byte for byte, and the estimate printed before the fill is their size within 1 %."""
    import argparse
    from functools import partial

    m = tiny_models
    dataset = data.load_train_dataset(m["args"], 0, data.recorded_scan_samples)[0].select(range(10))
    keys = loader.latent_cache_keys(dataset, "image", "a-vae", SQUARE * 10, "centre crop, flipped too")
    rules = {"cache_crops": None, "crop_positions": 8, "random_flip": True}
    one_process = types.SimpleNamespace(process_index=0, num_processes=1, local_process_index=0,
                                        is_local_main_process=False, wait_for_everyone=lambda: None)
    contents = []
    for workers in (0, 2):
        folder = tmp_path / f"workers-{workers}"
        args = argparse.Namespace(**{**vars(m["args"]), "dataloader_num_workers": workers})
        assert loader.fill_latent_cache(dataset, keys, SQUARE * 10, m["vae"], args, one_process, str(folder),
                                        partial(geometry.cached_regions, **rules)) == 10
        contents.append([loader.latent_cache_path(str(folder), key) for key in keys])
    for without, with_workers in zip(*contents):
        assert open(without, "rb").read() == open(with_workers, "rb").read()
        assert set(loader.load_cached_latents(without)) == {"mean", "std", "flipped_mean", "flipped_std"}

    sizes_of = partial(geometry.cached_region_sizes, **rules)
    estimate = sum(loader.latent_entry_bytes(sizes_of(RESOLUTION, RESOLUTION, SQUARE[0]), 4, 8) for _ in keys)
    written = sum(os.path.getsize(path) for path in contents[0])
    assert estimate == pytest.approx(written, rel=0.01)


def test_latent_cache_keys_follow_image_content_vae_target_size_and_layout(tiny_models, fill_data):
    m = tiny_models
    dataset = data.load_train_dataset(m["args"], 0, data.recorded_scan_samples)[0].select(range(3))
    vae_id = loader.vae_fingerprint(m["vae"])
    keys = loader.latent_cache_keys(dataset, "image", vae_id, SQUARE * 3, "centre crop")
    assert len(set(keys)) == 3
    assert keys == loader.latent_cache_keys(dataset, "image", vae_id, SQUARE * 3, "centre crop")
    for other in [(dataset, "image", vae_id, [(2 * RESOLUTION, 2 * RESOLUTION)] * 3, "centre crop"),
                  (dataset, "image", vae_id, [(32, 128)] * 3, "centre crop"),
                  (dataset, "image", vae_id, SQUARE * 3, "random crops"),
                  (dataset, "image", vae_id, SQUARE * 3, "centre crop, flipped too"),
                  (dataset, "image", "another-vae", SQUARE * 3, "centre crop")]:
        assert set(keys).isdisjoint(loader.latent_cache_keys(*other))


@pytest.mark.parametrize("cache_crops", [None, "exact", "latent_grid"])
def test_the_latent_cache_gives_each_crop_and_flip_the_latents_of_that_crop(cache_crops):
    """The cache's geometry: what the transform takes from an image's cache entry, for every crop and flip
    it draws, is the encoding of the crop its condition gets, for an encoder that commutes with crops and
    flips on the latent grid (8×8 average pooling). For one that does not (a norm over the whole image, as
    the VAE's group norms), exact and centre crops still are, and crops cut on the latent grid are not."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 200, 3), dtype=np.uint8))
    random_crop = cache_crops is not None

    def local(pixels):
        return torch.nn.functional.avg_pool2d(pixels, geometry.LATENT_GRID)

    def normed(pixels):
        return local(pixels - pixels.mean())

    regions = geometry.cached_regions(image, (64, 64), cache_crops, 4, random_flip=True)
    corners, differences = set(), []
    for encoder in (local, normed):
        entry = {f"{prefix}{name}": encoder(pixels) for prefix, pixels in regions.items() for name in ("mean", "std")}
        for seed in range(40):
            grid, positions = geometry.LATENT_GRID, 4 if cache_crops == "exact" else None
            placement = geometry.draw_placement(70, 200, (64, 64), random.Random(seed), random_crop, True, grid, positions)
            if cache_crops == "latent_grid":
                assert placement.top % grid == placement.left % grid == 0
            corners.add((placement.left, placement.flip))
            mean, std = geometry.cached_crop(entry, placement, cache_crops)
            assert mean.shape == (3, 8, 8)
            difference = (mean - encoder(geometry.to_training_pixels(placement.apply(image)))).abs().max().item()
            if encoder is local:
                assert difference < 1e-6
            differences.append(difference)
    assert len(regions) == {None: 2, "exact": 8, "latent_grid": 2}[cache_crops]  # each crop, and its flip
    if cache_crops == "latent_grid":  # 15 corners on the grid over 118 pixels of room, both flips
        assert len(corners) > 20
    else:  # the centre, or the 4 exact crops, both flips
        assert len(corners) == {None: 2, "exact": 8}[cache_crops]
    normed_apart = max(differences[40:]) > 1e-3
    assert normed_apart == (cache_crops == "latent_grid")


def test_the_latent_measurement_is_zero_without_room_to_crop_and_shows_the_vaes_reach_and_bf16s_rounding(
        tiny_models, fill_data):
    """scripts/measure_latents.py on the tiny VAE: where a crop is the whole cached region (square
    images at their own size) the cut is the encoding, to the bit; with room to crop (images widened) the
    cut differs from encoding the crop alone, inside as much as at its edges; the flipped image's latents
    are not the flipped latents; and the VAE in bf16 differs from float32 by its rounding, far less."""
    import measure_latents

    vae = tiny_models["vae"]
    files = sorted((Path(fill_data["imagefolder"]) / "train" / "images").glob("*.png"))[:2]
    pictures = [Image.open(path).convert("RGB") for path in files]
    square = measure_latents.measure(vae, pictures, (RESOLUTION, RESOLUTION), 2, 1, seed=0)
    crop, interior, flip, bf16 = square.values()
    assert all(value == (0, 0, 0, 0) for value in crop + interior)
    assert min(value[0] for value in flip) > 0
    assert 0 < max(value[3] for value in bf16) < 0.05 < min(value[3] for value in flip)  # mean, relative
    wide = [picture.resize((2 * RESOLUTION + 24, RESOLUTION)) for picture in pictures]
    crop, interior, *_ = measure_latents.measure(vae, wide, (RESOLUTION, RESOLUTION), 4, 1, seed=0).values()
    assert max(value[0] for value in crop) > 0
    # Not an edge effect: inside the crop it differs as much (the VAE's group norms and attention see the
    # whole picture), which is why the cache's default crops are exact.
    assert sum(value[1] for value in interior) > 0.5 * sum(value[1] for value in crop)


def test_training_with_cached_latents_reuses_the_cache_and_matches_fresh_latents(tiny_sdxl, fill_data, tmp_path):
    """Two runs share one cache (the second encodes nothing and gives the same adapter), and the loss
    curve on cached latents matches the one on fresh latents up to float16 rounding."""
    from plot_control_curve import tensorboard_scalars

    cache = tmp_path / "latents"
    flags = ["--max_train_steps", 4, "--report_to", "tensorboard"]
    cached_flags = [*flags, "--cache_latents", "--latent_cache_dir", cache]
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "first", *cached_flags))
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 32
    stamps = [f.stat().st_mtime_ns for f in files]
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "second", *cached_flags))
    assert [f.stat().st_mtime_ns for f in sorted(cache.rglob("*.safetensors"))] == stamps
    assert max_weight_difference(load_adapter_weights(tmp_path / "first"), load_adapter_weights(tmp_path / "second")) == 0

    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "fresh", *flags))
    curves = [[loss for _, loss in tensorboard_scalars(tmp_path / name / "logs")["loss"]]
              for name in ("first", "fresh")]
    assert len(curves[0]) == 4
    assert curves[0] == pytest.approx(curves[1], rel=1e-2)


def test_a_cache_fill_the_disk_cannot_hold_is_refused_before_it_encodes(tiny_sdxl, fill_data, tmp_path, monkeypatch,
                                                                        caplog):
    """The fill says how much it will write and how much is free; with less free than that the run stops
    with one clear message, and the cache folder and the output folder get nothing."""
    import logging

    from t2i_train.stopping import Refusal

    cache = tmp_path / "latents"
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 1, "--cache_latents",
                         "--latent_cache_dir", cache, "--random_flip")
    monkeypatch.setattr(loader, "free_bytes", lambda folder: 40_000)
    with pytest.raises(Refusal, match=r"needs about 74\.8 kB in .* for 32 images, but only 40\.0 kB are free"):
        run_training(argv)
    assert not cache.exists() or not list(cache.rglob("*.safetensors"))
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    monkeypatch.setattr(loader, "free_bytes", lambda folder: 10**12)
    with caplog.at_level(logging.INFO):
        run_training(argv)
    assert "0 of 32 images cached; encoding 32 will write about 74.8 kB (1.0 TB free there)" in caplog.text
    assert len(list(cache.rglob("*.safetensors"))) == 32


def test_vae_precision_bf16_encodes_each_batch_in_bf16_and_trains_as_float32_does(tiny_sdxl, fill_data, tmp_path):
    """The VAE is placed in bf16 and encodes every batch so: the losses of 3 steps differ from float32's,
    by no more than bf16's rounding of the latents makes them."""

    class Watch(train.RunHooks):
        def models_ready(self, components, train_data, args):
            self.vae_dtype = components.vae.dtype

        def step_done(self, step, step_loss):
            self.losses = [*getattr(self, "losses", []), step_loss]

    runs = {}
    for precision in ("fp32", "bf16"):
        hooks = Watch()
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / precision, "--max_train_steps", 3,
                                   "--vae_precision", precision), hooks)
        runs[precision] = hooks
    assert runs["fp32"].vae_dtype == torch.float32 and runs["bf16"].vae_dtype == torch.bfloat16
    assert runs["bf16"].losses == pytest.approx(runs["fp32"].losses, rel=0.05)
    assert runs["bf16"].losses != runs["fp32"].losses


def test_torch_compile_flag_trains(tiny_sdxl, fill_data, tmp_path):
    """--torch_compile compiles the UNet and adapter in place; checkpoints keep diffusers' keys."""
    pytest.importorskip("torch._dynamo")
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 2, "--checkpointing_steps", 2,
                               "--torch_compile"))
    saved = load_adapter_weights(tmp_path)
    assert all(not key.startswith("_orig_mod") for key in saved)
    from diffusers import T2IAdapter

    T2IAdapter.from_pretrained(tmp_path / "checkpoint-2" / lifecycle.ADAPTER_SUBFOLDER)


def write_imagefolder(folder, count, prefix=""):
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "conditioning_images").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / "images" / f"{i}.png")
        Image.new("RGB", (8, 8), (0, i, 0)).save(folder / "conditioning_images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conditioning_images/{i}.png",
                                 "text": f"{prefix}{i}"}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))


def split_folders(root):
    write_imagefolder(root / "train", 5, "train ")
    write_imagefolder(root / "test", 2, "test ")


def flat_imagefolder(root):
    write_imagefolder(root, 4)
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "metadata.jsonl").write_text("not json")


def parquet_folder(root):
    from datasets import Dataset

    (root / "data").mkdir(parents=True)
    Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_dict({"text": ["c"]}).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))


def splits_named_by_file(root):
    root.mkdir(parents=True)
    (root / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (root / "validation.jsonl").write_text('{"text": "c"}\n')


def a_readme_beside(root):
    flat_imagefolder(root)
    (root / "README.md").write_text("A dataset card.")


@pytest.mark.parametrize("layout,expected_splits", [
    (split_folders, ["test", "train"]), (flat_imagefolder, ["train"]), (parquet_folder, None),
    (splits_named_by_file, None), (a_readme_beside, None),
])
def test_a_local_imagefolder_listed_once_loads_as_datasets_finds_it(tmp_path, layout, expected_splits):
    """A local imagefolder is opened from the files of one listing, much faster than `datasets`' own search
    (see local_imagefolder_files), with the same splits, columns and rows. Anything else, or a folder that
    names its splits otherwise, is left to `datasets`."""
    from datasets import load_dataset

    layout(tmp_path / "data")
    files = data.local_imagefolder_files(str(tmp_path / "data"))
    assert (sorted(files) if files else None) == expected_splits
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path / "data"),
                             "--cache_dir", str(tmp_path / "a")])
    opened = data.open_dataset(str(tmp_path / "data"), args)
    plain = load_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "b"))
    assert sorted(opened) == sorted(plain)
    for split in plain:
        assert opened[split].features == plain[split].features
        assert sorted(opened[split]["text"]) == sorted(plain[split]["text"])
    assert data.local_imagefolder_files("stabilityai/stable-diffusion-xl-base-1.0") is None


def test_cached_latents_reach_the_device_of_the_step():
    """The loader's batch stays in host memory: with --cache_latents the sampled latents must be made on the
    step's device (the meta device stands in for a GPU here), like the conditions, and each sample's noise
    and timestep, drawn on the CPU, are moved there too."""

    import torch

    import train_t2i_adapter_sdxl as train

    seen = {}

    class Hooks(train.RunHooks):
        def encode_prompt(self, captions, components):
            return torch.zeros(len(captions), 77, 8, device="meta"), torch.zeros(len(captions), 4, device="meta")

        def training_loss(self, unet, adapter, latents, conditions, *rest):
            noise, timesteps, _ = rest[-3:]  # then --snr_gamma
            seen.update(latents=latents.device, conditions=conditions.device, noise=noise.device,
                        timesteps=timesteps.device)
            return torch.zeros(())

    batch = {"latent_mean": torch.zeros(2, 4, 8, 8, dtype=torch.float16), "latent_std": torch.ones(2, 4, 8, 8),
             "conditioning_pixel_values": torch.zeros(2, 3, 64, 64), "captions": ["a", "b"], "seed": [1, 2]}
    components = types.SimpleNamespace(vae=types.SimpleNamespace(config=types.SimpleNamespace(scaling_factor=0.13025)),
                                       unet=None,
                                       noise_scheduler=types.SimpleNamespace(config=types.SimpleNamespace(prediction_type="epsilon")))
    args = train.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", "unused", "--resolution", "64"])
    train.batch_loss(batch, components, None, torch.ones(1000), args, torch.float32, torch.device("meta"), Hooks())
    assert set(seen.values()) == {torch.device("meta")} and len(seen) == 4
