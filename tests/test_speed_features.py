"""Speed features keep upstream's maths: the latent cache, and what the trainer does instead of
upstream's full-dataset text-embedding precompute."""

import json
import os

import pytest
import torch
from accelerate import PartialState
from torchvision.transforms.functional import to_tensor

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION, load_adapter_weights, max_weight_difference, run_training, training_argv
from t2i_train import data, lifecycle, loader


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
    keys = loader.latent_cache_keys(dataset, "image", loader.vae_fingerprint(m["vae"]), RESOLUTION)
    def pixels_of(image):
        return train.to_training_pixels(train.centre_crop(image, RESOLUTION))

    assert loader.fill_latent_cache(dataset, keys, m["vae"], m["args"], Accelerator(cpu=True), str(tmp_path),
                                    pixels_of) == 4
    cached = [loader.load_cached_latents(loader.latent_cache_path(str(tmp_path), key)) for key in keys]
    assert cached[0]["mean"].dtype == torch.float16

    pixels = torch.stack([train.to_training_pixels(train.centre_crop(image.convert("RGB"), RESOLUTION))
                          for image in dataset["image"]])
    scaling = m["vae"].config.scaling_factor
    mean, std = train.encode_latent_distribution(m["vae"], pixels)
    posterior_noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    fresh = train.sample_latents(mean, std, posterior_noise, scaling)
    from_cache = train.sample_latents(torch.stack([c["mean"] for c in cached]), torch.stack([c["std"] for c in cached]),
                                      posterior_noise, scaling)
    assert torch.allclose(fresh, from_cache, atol=2e-3)

    conditions = torch.stack([to_tensor(train.centre_crop(i.convert("RGB"), RESOLUTION))
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
    import types

    m = tiny_models
    dataset = data.load_train_dataset(m["args"], 0, data.recorded_scan_samples)[0].select(range(4))
    keys = loader.latent_cache_keys(dataset, "image", "a-vae", RESOLUTION)
    second_process = types.SimpleNamespace(process_index=1, num_processes=2, local_process_index=0,
                                           is_local_main_process=True, wait_for_everyone=lambda: None)

    def pixels_of(image):
        return train.to_training_pixels(train.centre_crop(image, RESOLUTION))

    assert loader.fill_latent_cache(dataset, keys, m["vae"], m["args"], second_process, str(tmp_path), pixels_of) == 4
    assert all(os.path.isfile(loader.latent_cache_path(str(tmp_path), key)) for key in keys)
    assert loader.fill_latent_cache(dataset, keys, m["vae"], m["args"], second_process, str(tmp_path), pixels_of) == 0


def test_latent_cache_keys_follow_image_content_vae_and_resolution(tiny_models, fill_data):
    m = tiny_models
    dataset = data.load_train_dataset(m["args"], 0, data.recorded_scan_samples)[0].select(range(3))
    vae_id = loader.vae_fingerprint(m["vae"])
    keys = loader.latent_cache_keys(dataset, "image", vae_id, RESOLUTION)
    assert len(set(keys)) == 3
    assert keys == loader.latent_cache_keys(dataset, "image", vae_id, RESOLUTION)
    assert set(keys).isdisjoint(loader.latent_cache_keys(dataset, "image", vae_id, 2 * RESOLUTION))
    assert set(keys).isdisjoint(loader.latent_cache_keys(dataset, "image", "another-vae", RESOLUTION))


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
    import types

    import torch

    import train_t2i_adapter_sdxl as train

    seen = {}

    class Hooks(train.RunHooks):
        def encode_prompt(self, captions, components):
            return torch.zeros(len(captions), 77, 8, device="meta"), torch.zeros(len(captions), 4, device="meta")

        def training_loss(self, unet, adapter, latents, conditions, *rest):
            noise, timesteps = rest[-2:]
            seen.update(latents=latents.device, conditions=conditions.device, noise=noise.device,
                        timesteps=timesteps.device)
            return torch.zeros(())

    batch = {"latent_mean": torch.zeros(2, 4, 8, 8, dtype=torch.float16), "latent_std": torch.ones(2, 4, 8, 8),
             "conditioning_pixel_values": torch.zeros(2, 3, 64, 64), "captions": ["a", "b"], "seed": [1, 2]}
    components = types.SimpleNamespace(vae=types.SimpleNamespace(config=types.SimpleNamespace(scaling_factor=0.13025)),
                                       unet=None,
                                       noise_scheduler=types.SimpleNamespace(config=types.SimpleNamespace(prediction_type="epsilon")))
    args = types.SimpleNamespace(proportion_empty_prompts=0.0, micro_conditioning=False, aspect_ratio_buckets=False,
                                 resolution=64, crops_coords_top_left_h=0, crops_coords_top_left_w=0)
    train.batch_loss(batch, components, None, torch.ones(1000), args, torch.float32, torch.device("meta"), Hooks())
    assert set(seen.values()) == {torch.device("meta")} and len(seen) == 4
