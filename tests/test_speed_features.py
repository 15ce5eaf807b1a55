"""Speed features keep upstream's maths: the latent cache, and what the trainer does instead of
upstream's full-dataset text-embedding precompute."""

import pytest
import torch
from accelerate import PartialState

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION, load_adapter_weights, max_weight_difference, run_training, training_argv


@pytest.fixture(scope="module")
def tiny_models(tiny_sdxl, fill_data):
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(fill_data["imagefolder"]),
                             "--resolution", str(RESOLUTION)])
    adapter_config = train.check_inputs(args)
    PartialState()  # accelerate's logger needs its state
    torch.manual_seed(0)
    scheduler, tokenizers, text_encoders, vae, unet, adapter = train.load_models(args, adapter_config)
    return {"args": args, "scheduler": scheduler, "tokenizers": tokenizers, "text_encoders": text_encoders,
            "vae": vae, "unet": unet, "adapter": adapter}


def test_loss_on_cached_latents_equals_loss_on_fresh_latents(tiny_models, fill_data, tmp_path):
    """The same images, noise and timesteps: the loss from the float16 cached distribution equals
    the loss from encoding the images afresh (up to float16 rounding of mean and std)."""
    from accelerate import Accelerator

    m = tiny_models
    dataset = train.load_train_dataset(m["args"]).select(range(4))
    keys = train.latent_cache_keys(dataset, "image", train.vae_fingerprint(m["vae"]), RESOLUTION)
    assert train.fill_latent_cache(dataset, keys, m["vae"], m["args"], Accelerator(cpu=True), str(tmp_path)) == 4
    cached = [train.load_cached_latents(str(tmp_path), key) for key in keys]
    assert cached[0]["mean"].dtype == torch.float16

    to_target = train.image_transform(RESOLUTION)
    pixels = torch.stack([to_target(image.convert("RGB")) for image in dataset["image"]])
    torch.manual_seed(7)
    fresh = train.encode_latents(m["vae"], pixels)
    torch.manual_seed(7)
    from_cache = train.sample_cached_latents(torch.stack([c["mean"] for c in cached]),
                                             torch.stack([c["std"] for c in cached]), m["vae"].config.scaling_factor)
    assert torch.allclose(fresh, from_cache, atol=2e-3)

    conditions = torch.stack([train.conditioning_image_transform(RESOLUTION)(i.convert("RGB"))
                              for i in dataset["conditioning_image"]])
    prompt_embeds, pooled = train.encode_prompt(list(dataset["text"]), m["text_encoders"], m["tokenizers"])
    time_ids = train.compute_time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION), 4)
    noise, timesteps = torch.randn_like(fresh), torch.tensor([10, 300, 600, 990])
    losses = [
        train.adapter_training_loss(m["unet"], m["adapter"], latents, conditions, prompt_embeds,
                                    {"text_embeds": pooled, "time_ids": time_ids}, train.sigma_table(m["scheduler"]),
                                    "epsilon", torch.float32, noise=noise, timesteps=timesteps).item()
        for latents in (fresh, from_cache)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_latent_cache_keys_follow_image_content_vae_and_resolution(tiny_models, fill_data):
    m = tiny_models
    dataset = train.load_train_dataset(m["args"]).select(range(3))
    vae_id = train.vae_fingerprint(m["vae"])
    keys = train.latent_cache_keys(dataset, "image", vae_id, RESOLUTION)
    assert len(set(keys)) == 3
    assert keys == train.latent_cache_keys(dataset, "image", vae_id, RESOLUTION)
    assert set(keys).isdisjoint(train.latent_cache_keys(dataset, "image", vae_id, 2 * RESOLUTION))
    assert set(keys).isdisjoint(train.latent_cache_keys(dataset, "image", "another-vae", RESOLUTION))


def test_training_with_cached_latents_reuses_the_cache_and_matches_fresh_latents(tiny_sdxl, fill_data, tmp_path):
    """Two runs share one cache (the second encodes nothing and gives the same adapter), and the loss
    curve on cached latents matches the one on fresh latents up to float16 rounding."""
    from test_end_to_end import tensorboard_tags

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
    curves = [[loss for _, loss in tensorboard_tags(tmp_path / name / "logs")["scalars"]["loss"]]
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

    T2IAdapter.from_pretrained(tmp_path / "checkpoint-2" / train.ADAPTER_SUBFOLDER)


def test_a_local_dataset_loads_the_same_with_each_folder_listed_once(tmp_path, monkeypatch):
    """`datasets` finds an imagefolder's splits by globbing dozens of patterns over the whole folder.
    With the listing reused it finds the same splits and rows, and lists each folder once."""
    from datasets import load_dataset
    from fsspec.implementations.local import LocalFileSystem
    from PIL import Image

    for split, count in (("train", 5), ("test", 2)):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        lines = []
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
            lines.append(f'{{"file_name": "{i}.png", "text": "{split} {i}"}}\n')
        (folder / "metadata.jsonl").write_text("".join(lines))

    listed = []
    list_folder = LocalFileSystem.ls
    monkeypatch.setattr(LocalFileSystem, "ls", lambda self, path, *a, **k: listed.append(path) or list_folder(self, path, *a, **k))
    counting = LocalFileSystem.ls
    plain = load_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    plain_listings = len(listed)
    listed.clear()
    with train.each_local_folder_listed_once():
        once = load_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert LocalFileSystem.ls is counting  # put back as it was
    assert {split: sorted(once[split]["text"]) for split in once} == {split: sorted(plain[split]["text"]) for split in plain}
    assert sorted(once) == ["test", "train"]
    assert len(listed) == len(set(listed)) < plain_listings / 5
