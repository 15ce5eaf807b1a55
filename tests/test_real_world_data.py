"""Real-world data (issue 5): true SDXL micro-conditioning for non-square images, validation that
keeps each image's aspect ratio, aspect-ratio buckets, random crops and flips, on-the-fly canny,
and streaming from WebDataset shards with 1 and 2 processes, each resuming exactly."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION, load_adapter_weights, max_weight_difference, run_training, training_argv
from t2i_train import data, geometry, images, lifecycle, loader


@pytest.mark.parametrize("height,width", [(64, 96), (96, 64), (64, 64), (77, 131), (1024, 683)])
def test_center_crop_corner_matches_torchvision(height, width):
    """The crop corner given to the UNet is where torchvision's Resize + CenterCrop really crop."""
    image = Image.fromarray(np.arange(height * width, dtype=np.uint32).reshape(height, width).astype(np.float32))
    resized_width, resized_height = transforms.Resize(RESOLUTION)(image).size
    top, left = geometry.draw_placement(height, width, (RESOLUTION, RESOLUTION)).crop_top_left()
    assert (top, left) == (round((resized_height - RESOLUTION) / 2), round((resized_width - RESOLUTION) / 2))
    assert top == 0 or left == 0


def wide_fill_folder(fill_data, folder, width=96):
    """The fill images padded to width×64 (image and condition alike): non-square samples."""
    source = Path(fill_data["imagefolder"]) / "train"
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()]
    (folder / "train").mkdir(parents=True)
    for row in rows:
        for key in ("file_name", "conditioning_image_file_name"):
            image = Image.open(source / row[key]).convert("RGB")
            wide = Image.new("RGB", (width, image.height))
            wide.paste(image, ((width - image.width) // 2, 0))
            name = key.split("_")[0] + "_" + row[key].replace("/", "_")
            wide.save(folder / "train" / name)
            row[key] = name
    (folder / "train" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"imagefolder": folder}


@pytest.mark.parametrize("micro_conditioning", [False, True])
def test_time_ids_carry_the_real_size_and_crop_only_with_micro_conditioning(
    tiny_sdxl, fill_data, tmp_path, monkeypatch, micro_conditioning
):
    """96×64 images at resolution 64: upstream's fixed (64, 64, 0, 0, 64, 64) by default, and with
    --micro_conditioning the real (64, 96) size and the centre crop's corner (0, 16)."""
    seen = []
    loss = train.adapter_training_loss

    def recording_loss(*args, **kwargs):
        seen.append(args[5]["time_ids"].tolist())
        return loss(*args, **kwargs)

    monkeypatch.setattr(train, "adapter_training_loss", recording_loss)
    data = wide_fill_folder(fill_data, tmp_path / "wide")
    flags = ["--max_train_steps", 1] + (["--micro_conditioning"] if micro_conditioning else [])
    run_training(training_argv(tiny_sdxl, data, tmp_path / "out", *flags))
    expected = [64, 96, 0, 16, 64, 64] if micro_conditioning else [64, 64, 0, 0, 64, 64]
    assert seen and all(row == expected for row in seen[0])


def test_validation_size_keeps_the_aspect_ratio():
    assert images.validation_size(1024, 1024, 1024, 32) == (1024, 1024)
    width, height = images.validation_size(2048, 1024, 1024, 32)
    assert (width, height) == (1440, 736) and abs(width / height - 2) < 0.05
    assert images.validation_size(512, 2048, 1024, 16) == (512, 2048)


def test_validation_with_a_non_square_image_is_not_stretched(tiny_sdxl, fill_data, tmp_path):
    """A 192×64 validation condition gives 3:1 validation images, not squares."""
    condition = Image.open(fill_data["validation_images"][0]).convert("RGB").resize((192, 64))
    condition.save(tmp_path / "wide.png")
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 1,
                               "--validation_prompt", "red circle", "--validation_image", tmp_path / "wide.png",
                               "--num_validation_images", 1))
    with Image.open(tmp_path / "out" / "images_0.png") as grid:  # condition + 1 sample side by side
        assert grid.size == (2 * 96, 32)


# ----------------------------------------------------------------------------------------------
# Aspect-ratio buckets, random crops and flips, on-the-fly canny (planned batches)
# ----------------------------------------------------------------------------------------------


def test_buckets_follow_sdxl_list_at_1024():
    """SDXL's own buckets at 1024² (sides multiples of 64, never more pixels than 1024²)."""
    buckets = loader.aspect_ratio_buckets(1024, 32)
    for bucket in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (512, 2048)]:
        assert bucket in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and h * w > 0.85 * 1024**2 for h, w in buckets)
    assert all(1 / 4 <= h / w <= 4 for h, w in buckets)
    assert loader.nearest_bucket(683, 1024, buckets) == (832, 1216)
    assert loader.nearest_bucket(1000, 1000, buckets) == (1024, 1024)
    # Small resolutions keep the adapter's multiple.
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in loader.aspect_ratio_buckets(128, 32))


def test_planned_batches_cover_every_sample_once_each_batch_one_size():
    targets = [(64, 64)] * 10 + [(32, 128)] * 7 + [(128, 32)] * 3
    batches = loader.plan_batches(targets, 4, np.random.default_rng(0))
    positions = [p for batch in batches for p in batch]
    assert sorted(positions) == list(range(len(targets)))
    assert all(len({targets[p] for p in batch}) == 1 and 1 <= len(batch) <= 4 for batch in batches)
    assert loader.plan_batches(targets, 4, np.random.default_rng(0)) == batches
    assert loader.plan_batches(targets, 4, np.random.default_rng(1)) != batches


def stored_png(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def pair_transform(**flags):
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags.pop("argv", [])])
    for key, value in flags.items():
        setattr(args, key, value)
    return train.PairTransform(args)


@pytest.mark.parametrize("target", [(64, 64), (32, 96), (96, 32)])
def test_crop_and_flip_are_identical_on_image_and_condition(target):
    """A 77×131 image whose condition is the same picture: after random crops and flips, the
    condition matches the image pixel for pixel, and the reported crop corner is where the crop is."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, size=(77, 131, 3), dtype=np.uint8))
    sample = {"image": stored_png(picture), "conditioning_image": stored_png(picture), "text": "t"}
    transform = pair_transform(random_crop=True, random_flip=True)
    corners, flips = set(), 0
    for seed in range(12):
        out = transform(sample, target, seed)
        assert out["pixel_values"].shape == (3, *target)
        assert torch.allclose(out["conditioning_pixel_values"] * 2 - 1, out["pixel_values"], atol=1e-6)
        assert out["original_sizes"].tolist() == [77, 131]
        top, left = out["crop_top_lefts"].tolist()
        resized_h, resized_w = geometry.cover_size(77, 131, *target)
        resized = picture.resize((resized_w, resized_h), Image.BILINEAR)
        expected = resized.transpose(Image.FLIP_LEFT_RIGHT).crop((left, top, left + target[1], top + target[0]))
        if not torch.allclose(transforms.functional.to_tensor(expected), out["conditioning_pixel_values"]):
            expected = resized.crop((left, top, left + target[1], top + target[0]))
            assert torch.allclose(transforms.functional.to_tensor(expected), out["conditioning_pixel_values"])
        else:
            flips += 1
        corners.add((top, left))
    assert len(corners) > 1 and 0 < flips < 12  # really random, and both ways


def upstream_transforms(resolution):
    """Upstream's train_transforms and conditioning_image_transforms (torchvision), the reference."""
    resize_and_crop = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                       transforms.CenterCrop(resolution), transforms.ToTensor()]
    return (transforms.Compose([*resize_and_crop, transforms.Normalize([0.5], [0.5])]),
            transforms.Compose(resize_and_crop))


@pytest.mark.parametrize("height,width", [(77, 131), (131, 77), (64, 64), (200, 96)])
def test_centre_crop_without_flags_matches_upstreams_transform(height, width):
    """With the default flags the one transform gives upstream's tensors pixel for pixel, for the
    image and for its condition."""
    rng = np.random.default_rng(1)
    picture, condition = (Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
                          for _ in range(2))
    sample = {"image": stored_png(picture), "conditioning_image": stored_png(condition), "text": "t"}
    out = pair_transform()(sample, (RESOLUTION, RESOLUTION), 0)
    to_target, to_condition = upstream_transforms(RESOLUTION)
    assert torch.equal(out["pixel_values"], to_target(picture))
    assert torch.equal(out["conditioning_pixel_values"], to_condition(condition))
    resized_width, resized_height = transforms.Resize(RESOLUTION)(picture).size
    assert out["crop_top_lefts"].tolist() == [round((resized_height - RESOLUTION) / 2),
                                              round((resized_width - RESOLUTION) / 2)]


def test_canny_condition_is_made_from_the_final_crop(fill_data):
    """--conditioning_type canny: white edges on the filled circle's outline, none in flat areas,
    thresholds random per sample yet reproducible from the sample's seed."""
    row = json.loads((Path(fill_data["imagefolder"]) / "train" / "metadata.jsonl").read_text().splitlines()[0])
    target = Image.open(Path(fill_data["imagefolder"]) / "train" / row["file_name"]).convert("RGB")
    sample = {"image": stored_png(target), "text": row["text"]}
    transform = pair_transform(conditioning_type="canny")
    out = transform(sample, (RESOLUTION, RESOLUTION), 3)
    edges = out["conditioning_pixel_values"]
    assert edges.shape == (3, RESOLUTION, RESOLUTION) and set(edges.unique().tolist()) <= {0.0, 1.0}
    pixels = np.asarray(target).astype(int)
    # Where all 3×3 neighbours share the pixel's colour the image is flat: no edge there.
    flat = np.ones(pixels.shape[:2], bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            flat &= (np.roll(pixels, (dy, dx), axis=(0, 1)) == pixels).all(axis=2)
    edge_map = edges[0].numpy() > 0
    assert edge_map.sum() > 20 and not (edge_map & flat)[2:-2, 2:-2].any()
    assert torch.equal(transform(sample, (RESOLUTION, RESOLUTION), 3)["conditioning_pixel_values"], edges)
    thresholds = {images.random_canny_thresholds(__import__("random").Random(seed)) for seed in range(20)}
    assert len(thresholds) > 10


def mixed_aspect_folder(fill_data, folder):
    """Half the fill samples widened to 256×64, half kept square: buckets (64, 64) and (32, 128)
    at resolution 64."""
    wide = wide_fill_folder(fill_data, folder, width=256)
    metadata = Path(wide["imagefolder"]) / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    for row in rows[::2]:
        for key in ("file_name", "conditioning_image_file_name"):
            path = Path(wide["imagefolder"]) / "train" / row[key]
            Image.open(path).crop((96, 0, 160, 64)).save(path)
    return wide


def test_buckets_train_each_batch_at_one_bucket_with_real_micro_conditioning(
    tiny_sdxl, fill_data, tmp_path, monkeypatch
):
    """Square and 4:1 samples at resolution 64: batches of 64×64 and of 32×128, each with its own
    target size in the time ids, and the real original sizes."""
    seen = []
    loss = train.adapter_training_loss

    def recording_loss(*args, **kwargs):
        seen.append((tuple(args[3].shape[-2:]), args[5]["time_ids"].tolist()))
        return loss(*args, **kwargs)

    monkeypatch.setattr(train, "adapter_training_loss", recording_loss)
    data = mixed_aspect_folder(fill_data, tmp_path / "mixed")
    run_training(training_argv(tiny_sdxl, data, tmp_path / "out", "--max_train_steps", 8, "--aspect_ratio_buckets"))
    assert loader.aspect_ratio_buckets(RESOLUTION, 32) == [(32, 128), (64, 64), (128, 32)]
    assert {shape for shape, _ in seen} == {(64, 64), (32, 128)}
    for shape, time_ids in seen:
        for original_h, original_w, top, left, target_h, target_w in time_ids:
            assert (target_h, target_w) == shape
            assert (original_h, original_w) == ((64, 64) if shape == (64, 64) else (64, 256))
            assert (top, left) == (0, 0)  # centre crop of a resize that fits exactly


def test_canny_on_the_fly_needs_no_stored_conditions(tiny_sdxl, fill_data, tmp_path):
    """A dataset without a conditioning column trains with --conditioning_type canny."""
    source = Path(fill_data["imagefolder"]) / "train"
    (tmp_path / "plain" / "train").mkdir(parents=True)
    rows = []
    for line in (source / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        shutil.copy(source / row["file_name"], tmp_path / "plain" / "train" / Path(row["file_name"]).name)
        rows.append({"file_name": Path(row["file_name"]).name, "text": row["text"]})
    (tmp_path / "plain" / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = training_argv(tiny_sdxl, {"imagefolder": tmp_path / "plain"}, tmp_path / "out", "--max_train_steps", 2)
    with pytest.raises(ValueError, match="conditioning_image"):
        run_training(argv)
    assert run_training(argv + ["--conditioning_type", "canny"]) == 2
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()


def assert_resume_is_exact(model, data, tmp_path, flags):
    """7 steps straight, and 7 steps resumed from the straight run's checkpoint-3: the same adapter."""
    common = ["--max_train_steps", 7, "--checkpointing_steps", 3, *flags]
    run_training(training_argv(model, data, tmp_path / "straight", *common))
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert run_training(training_argv(model, data, tmp_path / "resumed", *common,
                                      "--resume_from_checkpoint", "latest")) == 7
    assert max_weight_difference(load_adapter_weights(tmp_path / "straight"),
                                 load_adapter_weights(tmp_path / "resumed")) == 0


@pytest.mark.parametrize("flags", [
    ["--aspect_ratio_buckets", "--random_crop", "--random_flip", "--dataloader_num_workers", 1,
     "--gradient_accumulation_steps", 2],
    ["--conditioning_type", "canny", "--random_crop"],
    ["--cache_latents", "--aspect_ratio_buckets", "--random_crop", "--random_flip", "--dataloader_num_workers", 1],
    ["--cache_latents", "--conditioning_type", "canny", "--random_crop", "--random_flip"],
    ["--cache_latents", "--random_crop", "--random_flip", "--latent_cache_crops", "latent_grid"],
    ["--timestep_sampling", "logit_normal", "--min_timestep", 200, "--snr_gamma", 5],
    ["--use_ema", "--ema_decay", 0.9, "--ema_update_every", 2],  # the exported adapter is the EMA
])
def test_planned_batches_resume_exactly(tiny_sdxl, fill_data, tmp_path, flags):
    """Random crops, flips, buckets, canny thresholds and timesteps (with any sampling) are drawn per
    sample from the plan's seeds, and the plan's position is saved: a resumed run ends bit for bit where
    the straight run ends; also with the latent cache (the resumed run finds it filled)."""
    if "--cache_latents" in flags:
        flags = [*flags, "--latent_cache_dir", tmp_path / "latents"]
    data = mixed_aspect_folder(fill_data, tmp_path / "mixed")
    assert_resume_is_exact(tiny_sdxl, data, tmp_path, flags)
    if "--cache_latents" in flags:
        # One entry an image, with its exact crops (8 over the room of a wide image at a square target,
        # one where there is no room, as in a bucket that fits) or its one region to cut crops from, each
        # beside its flip, at its bucket's size.
        entries = [load_file(path) for path in (tmp_path / "latents").rglob("*.safetensors")]
        assert len(entries) == len((Path(data["imagefolder"]) / "train" / "metadata.jsonl").read_text().splitlines())
        crops, heights = set(), set()
        for entry in entries:
            prefixes = {name[: -len("mean")] for name in entry if name.endswith("mean")}
            assert set(entry) == {prefix + name for prefix in prefixes for name in ("mean", "std")}
            unflipped = {prefix for prefix in prefixes if not prefix.startswith("flipped_")}
            assert {"flipped_" + prefix for prefix in unflipped} == prefixes - unflipped
            crops.add(len(unflipped))
            heights.update(entry[prefix + "mean"].shape[1] for prefix in prefixes)
        buckets, one_region = "--aspect_ratio_buckets" in flags, "latent_grid" in flags
        assert crops == ({1} if buckets or one_region else {1, 8}) and heights == ({8, 4} if buckets else {8})


@pytest.mark.parametrize("flags,message", [
    (["--streaming"], "`--streaming` needs `--max_train_steps`"),
    (["--streaming", "--max_train_steps", "2", "--max_train_samples", "4"], "cannot be used with `--streaming`"),
    (["--cache_latents", "--streaming", "--max_train_steps", "2"], "cannot be combined with --streaming"),
    (["--shuffle_buffer_size", "0"], "`--shuffle_buffer_size` must be at least 1"),
])
def test_data_option_conflicts_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags])


def test_buckets_turn_on_micro_conditioning():
    """--aspect_ratio_buckets implies micro-conditioning; the parsed flags are left as given."""
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--aspect_ratio_buckets"])
    assert train.uses_micro_conditioning(args) and not args.micro_conditioning
    plain = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"])
    assert not train.uses_micro_conditioning(plain)


# ----------------------------------------------------------------------------------------------
# Streaming from WebDataset shards
# ----------------------------------------------------------------------------------------------

SHARD_COLUMNS = ["--image_column", "png", "--conditioning_image_column", "cond.png", "--caption_column", "txt"]


@pytest.fixture(scope="module")
def fill_shards(fill_data, tmp_path_factory):
    """The 32 fill samples as 4 WebDataset shards of 8, made by scripts/make_shards.py."""
    from make_shards import main as make_shards

    folder = tmp_path_factory.mktemp("shards")
    make_shards(["--train_data_dir", str(fill_data["imagefolder"]), "--output_dir", str(folder),
                 "--samples_per_shard", "8"])
    assert len(list(folder.glob("*.tar"))) == 4
    return {"imagefolder": folder}


def streaming_args(fill_shards, world_size=1, **overrides):
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(fill_shards["imagefolder"]),
                             "--streaming", "--max_train_steps", "1", "--seed", "0", *SHARD_COLUMNS])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_each_process_streams_its_own_shards_in_a_new_order_each_epoch(fill_shards):
    args = streaming_args(fill_shards)
    stream = data.load_streaming_dataset(args)
    assert stream.num_shards == 4
    keys = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            batches = loader.StreamingBatches(stream, None, args, seed=0, rank=rank, world_size=2)
            keys[epoch, rank] = [sample["__key__"] for sample in batches.epoch_stream(epoch)]
    for epoch in (0, 1):
        assert not set(keys[epoch, 0]) & set(keys[epoch, 1])
        assert len(keys[epoch, 0]) == len(keys[epoch, 1]) == 16 and len(set(keys[epoch, 0] + keys[epoch, 1])) == 32
    assert (keys[0, 0], keys[0, 1]) != (keys[1, 0], keys[1, 1])


def test_streaming_batches_cover_the_stream_once_per_epoch(fill_shards, monkeypatch):
    """Windows of 12 over 32 samples, batch 4: every sample exactly once in the first epoch."""
    args = streaming_args(fill_shards, shuffle_buffer_size=12, train_batch_size=4)
    batches = loader.StreamingBatches(data.load_streaming_dataset(args), lambda s, target, seed: s["__key__"], args,
                                     seed=0)
    monkeypatch.setattr(loader, "collate_fn", list)  # the transform above gives keys: batches of keys
    epoch = []
    for batch in batches:
        assert 1 <= len(batch) <= 4
        epoch += batch
        if len(epoch) >= 32:
            break
    assert len(epoch) == 32 and len(set(epoch)) == 32


def test_each_dataloader_worker_streams_its_own_shards(fill_shards, monkeypatch):
    """2 DataLoader workers over 4 shards: both give batches, and the first epoch holds every sample
    once. (datasets before 4.6 joins the reordered shards into one, which only the first worker reads.)"""
    from accelerate import PartialState
    from torchdata.stateful_dataloader import StatefulDataLoader

    PartialState()  # accelerate's logger, which a worker without a share would use, needs its state
    args = streaming_args(fill_shards, shuffle_buffer_size=8, train_batch_size=4, dataloader_num_workers=2)
    batches = loader.StreamingBatches(data.load_streaming_dataset(args), lambda s, target, seed: s["__key__"], args,
                                     seed=0)
    monkeypatch.setattr(loader, "collate_fn", lambda keys: (torch.utils.data.get_worker_info().id, keys))
    workers, epoch = set(), []
    for worker, keys in StatefulDataLoader(batches, batch_size=None, **loader.loader_options(args, 0)):
        workers.add(worker)
        epoch += keys
        if len(epoch) >= 32:
            break
    assert workers == {0, 1}
    assert len(epoch) == 32 and len(set(epoch)) == 32


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_a_reader_with_nothing_to_stream_stops_instead_of_spinning(fill_shards, monkeypatch, num_workers):
    """A reader whose share of an epoch is empty: a worker among several stops (the others go on), a
    lone reader is an error. Neither goes on to the next epoch, which would loop for ever."""
    from accelerate import PartialState

    PartialState()  # accelerate's logger needs its state
    args = streaming_args(fill_shards)
    batches = loader.StreamingBatches(data.load_streaming_dataset(args), None, args, seed=0)
    epochs = []

    def empty_epoch(epoch):
        epochs.append(epoch)
        assert len(epochs) == 1, "went on to another epoch"
        return []

    monkeypatch.setattr(batches, "epoch_stream", empty_epoch)
    worker = None if num_workers == 0 else type("Worker", (), {"id": 1, "num_workers": num_workers})()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    if num_workers > 1:
        assert list(batches) == []
    else:
        with pytest.raises(ValueError, match="Process 0 of 1 has no sample of the stream to read"):
            list(batches)
    assert epochs == [0]


def test_streaming_from_shards_resumes_exactly_with_workers(tiny_sdxl, fill_shards, tmp_path):
    """Streamed from 4 tar shards by 2 DataLoader workers, windows of 12, random flips, interrupted
    mid-window: the resumed run ends bit for bit where the straight run ends."""
    flags = ["--streaming", *SHARD_COLUMNS, "--shuffle_buffer_size", 12, "--random_flip", "--dataloader_num_workers", 2]
    assert_resume_is_exact(tiny_sdxl, fill_shards, tmp_path, flags)


def test_a_stream_resumed_with_another_worker_count_is_refused_naming_the_flag(tiny_sdxl, fill_shards, tmp_path,
                                                                             monkeypatch):
    """A stream's position lives in its DataLoader workers, each reading its own shards: a requeue with another
    --dataloader_num_workers stops before any model loads, naming the saved layout and the flag (torchdata died in
    a bare AssertionError, or hung)."""
    flags = ["--streaming", *SHARD_COLUMNS, "--shuffle_buffer_size", 8, "--checkpointing_steps", 2]
    run_training(training_argv(tiny_sdxl, fill_shards, tmp_path, *flags, "--max_train_steps", 2,
                               "--dataloader_num_workers", 2))
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(ValueError, match=r"on 1 process\(es\) × 1 DataLoader worker\(s\) × --train_batch_size 4: its"
                                         r" stream position was saved by 1 process\(es\) × 2 DataLoader worker\(s\)"
                                         r".* \(--dataloader_num_workers 2, --train_batch_size 4\)"):
        run_training(training_argv(tiny_sdxl, fill_shards, tmp_path, *flags, "--max_train_steps", 4,
                                   "--dataloader_num_workers", 1, "--resume_from_checkpoint", "latest"))


def test_two_processes_stream_with_buckets_and_resume(tiny_sdxl, fill_shards, tmp_path):
    """2 processes (gloo), each streaming its own 2 shards with buckets: both ranks agree, the checkpoint holds
    both positions in one data state, and the resumed run ends where the straight one ends. On 1 process
    (the same total batch by accumulation) the stream cannot continue exactly: refused, naming both layouts."""
    from test_robustness import run_two_processes

    flags = ["--streaming", *SHARD_COLUMNS, "--shuffle_buffer_size", 8, "--aspect_ratio_buckets",
             "--max_train_steps", 4, "--checkpointing_steps", 2]
    straight = run_two_processes(tiny_sdxl, fill_shards, tmp_path / "straight", tmp_path / "w1", *flags)
    position = json.loads((tmp_path / "straight" / "checkpoint-4" / lifecycle.DATA_STATE_FILE).read_text())["loader"]
    assert position["layout"] == {"processes": 2, "workers": 0, "batch_size": 4} and len(position["ranks"]) == 2
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run_two_processes(tiny_sdxl, fill_shards, tmp_path / "resumed", tmp_path / "w2", *flags,
                                "--resume_from_checkpoint", "latest")
    assert max_weight_difference(straight, resumed) == 0
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "one" / "checkpoint-2")
    with pytest.raises(ValueError, match=r"on 1 process\(es\) × 0 DataLoader worker\(s\) × --train_batch_size 4: its"
                                         r" stream position was saved by 2 process\(es\) × 0 DataLoader"):
        run_training(training_argv(tiny_sdxl, fill_shards, tmp_path / "one", *flags, "--gradient_accumulation_steps", 2,
                                   "--resume_from_checkpoint", "latest"))


def test_a_bad_streamed_sample_stops_naming_its_key_or_is_skipped(tiny_sdxl, fill_shards, tmp_path):
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(fill_shards["imagefolder"], shards)
    with tarfile.open(shards / "shard-00001.tar") as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    bad_name = next(member.name for member, _ in members if member.name.endswith(".png")
                    and not member.name.endswith(".cond.png"))
    with tarfile.open(shards / "shard-00001.tar", "w") as tar:
        for member, data in members:
            data = b"not a png" if member.name == bad_name else data
            member.size = len(data)
            tar.addfile(member, __import__("io").BytesIO(data))
    flags = ["--streaming", *SHARD_COLUMNS, "--max_train_steps", 9, "--shuffle_buffer_size", 8]
    key = bad_name.split(".")[0]
    with pytest.raises(ValueError, match=f"Bad training sample '{key}': unreadable image"):
        run_training(training_argv(tiny_sdxl, {"imagefolder": shards}, tmp_path / "out", *flags))
    assert run_training(training_argv(tiny_sdxl, {"imagefolder": shards}, tmp_path / "out", *flags,
                                      "--skip_bad_samples")) == 9


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_an_image_turned_by_exif_is_checked_and_loaded_upright(image_format):
    """A 96×64 image whose EXIF says 'turn a quarter' is shown (and decoded by datasets) as 64×96:
    its upright 64×96 condition fits it, and training sees it upright too."""
    import io

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buffer, format=image_format, exif=exif)
    image = {"bytes": buffer.getvalue(), "path": None}
    condition = stored_png(Image.new("RGB", (64, 96)))
    assert data.inspect_sample(image, condition, "red") == (None, (96, 64))
    problem, _ = data.inspect_sample(image, stored_png(Image.new("RGB", (96, 64))), "red")
    assert problem.startswith("conditioning image is 96x64 but the image is 64x96: their aspect ratios differ by")
    assert images.load_upright_rgb(image).size == (64, 96)


# ----------------------------------------------------------------------------------------------
# Conditions stored at another size than their images
# ----------------------------------------------------------------------------------------------


def smooth_picture(height, width, seed=0):
    """A smooth random picture: resizing it changes its pixels little, a misplaced crop a lot."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("target,flags", [
    ((64, 64), {}),
    ((64, 64), {"random_crop": True, "random_flip": True}),
    ((32, 128), {"random_crop": True, "random_flip": True}),
    ((64, 64), {"argv": ["--detection_resolution", "32"]}),
])
@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5])
def test_a_condition_stored_at_another_size_is_placed_like_its_image(target, flags, scale):
    """A condition stored at half, the same or 1.5 times its image's size is brought to the image's size
    first, then cropped and flipped with it: it stays aligned with the image in every mode."""
    picture = smooth_picture(90, 150)
    condition = picture.resize((round(150 * scale), round(90 * scale)), Image.BILINEAR)
    sample = {"image": stored_png(picture), "conditioning_image": stored_png(condition), "text": "t"}
    transform = pair_transform(**flags)
    for seed in range(6):
        out = transform(sample, target, seed)
        image = (out["pixel_values"] + 1) / 2
        assert out["conditioning_pixel_values"].shape == image.shape == (3, *target)
        difference = (out["conditioning_pixel_values"] - image).abs().mean().item()
        if scale == 1.0 and "argv" not in flags:
            assert difference < 1e-6  # the very same pixels
        else:
            assert difference < 0.02, difference
        # A condition one tenth of the crop out of place is far off: the bound above means aligned.
        shifted = torch.roll(image, shifts=max(target) // 10, dims=2)
        assert (out["conditioning_pixel_values"] - shifted).abs().mean().item() > 2 * max(difference, 0.01)


@pytest.mark.parametrize("image_size,condition_size,fits", [
    ((1024, 768), (512, 384), True),  # a depth map at half size
    ((1024, 683), (512, 342), True),  # rounded
    ((1023, 767), (512, 384), True),
    ((101, 67), (51, 34), True),
    ((96, 64), (64, 64), False),  # a square condition for a 3:2 image
    ((1024, 768), (768, 1024), False),  # turned a quarter
    ((1000, 1000), (1000, 960), False),  # 4 % out of proportion
])
def test_the_sample_check_refuses_only_conditions_that_cannot_be_aligned(image_size, condition_size, fits):
    image, condition = stored_png(Image.new("RGB", image_size)), stored_png(Image.new("RGB", condition_size))
    problem, size = data.inspect_sample(image, condition, "a caption")
    if fits:
        assert problem is None and size == image_size[::-1]
    else:
        width, height = condition_size
        assert problem.startswith(f"conditioning image is {width}x{height} but the image is"), problem
        assert "cannot be aligned" in problem


@pytest.mark.parametrize("size,refused", [((4_000_000, 1), True), ((170, 10), True), ((10, 170), True),
                                          ((160, 10), False), ((10, 160), False)])
def test_the_sample_check_refuses_slivers_beyond_16_to_1(size, refused):
    """The transform resizes the short side to the resolution before it crops: a 4,000,000 × 1 sliver would become
    a 256,000,000 × 64 picture. Beyond 16:1 an image is a bad sample, named with its size."""
    stored = stored_png(Image.new("RGB", size))
    problem, _ = data.inspect_sample(stored, stored, "a caption")
    if refused:
        assert problem.startswith(f"image is {size[0]}x{size[1]}: its long side is more than 16 times"), problem
    else:
        assert problem is None


@pytest.mark.parametrize("image_size,condition_size,refused", [
    ((16, 1), (32, 1), True),  # aligns within the one-pixel rounding tolerance, but 32:1
    ((1600, 100), (1610, 100), True),  # aligns within 1 %, but just beyond 16:1
    ((1600, 100), (800, 50), False),  # a half-size condition of an image at the limit
    ((64, 64), (4000, 1), True),  # named as a sliver rather than as a condition that cannot be aligned
])
def test_the_sample_check_refuses_conditions_beyond_16_to_1(image_size, condition_size, refused):
    """A condition beyond the limit is a bad sample by the same rule as an image, even where it would align."""
    image, condition = stored_png(Image.new("RGB", image_size)), stored_png(Image.new("RGB", condition_size))
    problem, _ = data.inspect_sample(image, condition, "a caption")
    width, height = condition_size
    if refused:
        assert problem == (f"conditioning image is {width}x{height}: its long side is more than 16 times its short"
                           " side, the limit"), problem
    else:
        assert problem is None


def half_size_condition_folder(fill_data, folder):
    """The fill samples with every condition stored at half size (32×32 for 64×64 images)."""
    source = Path(fill_data["imagefolder"])
    shutil.copytree(source, folder)
    for path in (folder / "train" / "conditioning_images").iterdir():
        Image.open(path).resize((32, 32), Image.BILINEAR).save(path)
    return {"imagefolder": folder}


@pytest.mark.parametrize("flags", [[], ["--aspect_ratio_buckets", "--random_crop", "--random_flip"]])
def test_training_on_conditions_stored_at_half_size(tiny_sdxl, fill_data, tmp_path, flags):
    """Upstream trains on conditions stored at half size; so does this trainer, without dropping a sample."""
    data = half_size_condition_folder(fill_data, tmp_path / "half")
    assert run_training(training_argv(tiny_sdxl, data, tmp_path / "out", "--max_train_steps", 2, *flags)) == 2
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# 16-bit and float images; rows without a condition
# ----------------------------------------------------------------------------------------------


def sixteen_bit_gradient(width=64, height=64):
    """A 16-bit grey gradient from 0 to 65535 across the width, as a depth map is often stored."""
    values = np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))
    return Image.fromarray(values)  # mode I;16


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_sixteen_bit_and_float_images_are_scaled_not_clipped(mode):
    """Pillow's convert('RGB') clips a 16-bit image to white; here it is scaled by its bit depth (a float
    image taken as [0, 1]): the gradient stays a gradient from 0 to 1."""
    gradient = sixteen_bit_gradient()
    if mode == "I":
        gradient = gradient.convert("I")
    elif mode == "F":
        gradient = Image.fromarray(np.asarray(gradient).astype(np.float32) / 65535)
    assert gradient.mode == mode
    assert len(np.unique(np.asarray(gradient.convert("RGB")))) <= 2  # Pillow alone clips the gradient away
    rgb = np.asarray(images.to_rgb(gradient)).astype(int)
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and abs(rgb[0, 32, 0] - 32 * 255 / 63) <= 1
    assert (np.diff(rgb[0, :, 0]) >= 0).all()


def test_a_sixteen_bit_condition_reaches_training_as_its_gradient():
    """A 16-bit PNG condition (stored as such) becomes the same gradient in the training tensor, and the
    sample check accepts it."""
    import io

    buffer = io.BytesIO()
    sixteen_bit_gradient().save(buffer, format="PNG")
    condition = {"bytes": buffer.getvalue(), "path": None}
    assert Image.open(io.BytesIO(condition["bytes"])).mode in ("I;16", "I")
    image = stored_png(Image.new("RGB", (64, 64), (10, 20, 30)))
    assert data.inspect_sample(image, condition, "a depth map") == (None, (64, 64))
    out = pair_transform()({"image": image, "conditioning_image": condition, "text": "t"}, (64, 64), 0)
    row = out["conditioning_pixel_values"][0, 0]
    assert row[0] == 0 and row[-1] == 1
    expected = torch.tensor(np.linspace(0, 65535, 64).round() / 65535 * 255).round() / 255
    assert torch.allclose(row.double(), expected, atol=1 / 255 + 1e-6)


@pytest.mark.parametrize("missing", ["null", "absent"])
def test_a_row_without_its_condition_is_a_bad_sample(missing):
    """Without an on-the-fly condition type, a row whose condition is null or missing is refused (or dropped
    with --skip_bad_samples); with canny the condition is not read at all."""
    sample = {"image": stored_png(Image.new("RGB", (8, 8))), "text": "t"}
    if missing == "null":
        sample["conditioning_image"] = None
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"])
    assert data.inspect_sample(*data.stored_sample(sample, args)) == ("missing conditioning image", None)
    args.conditioning_type = "canny"
    assert data.inspect_sample(*data.stored_sample(sample, args)) == (None, (8, 8))


def test_a_row_with_a_null_condition_stops_the_run_or_is_skipped(tiny_sdxl, fill_data, tmp_path):
    """A parquet row whose conditioning image is null: named with its row before training; dropped with
    --skip_bad_samples."""
    from datasets import load_dataset

    dataset = load_dataset(str(fill_data["parquet"]), split="train")
    rows = dataset.to_list()
    rows[3]["conditioning_image"] = None
    folder = tmp_path / "parquet"
    folder.mkdir()
    type(dataset).from_list(rows, features=dataset.features).to_parquet(str(folder / "train.parquet"))
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 1)
    index = argv.index("--train_data_dir")
    argv[index:index + 2] = ["--dataset_name", str(folder)]
    with pytest.raises(ValueError, match="row 3: missing conditioning image"):
        run_training(argv)
    assert run_training(argv + ["--skip_bad_samples"]) == 1
