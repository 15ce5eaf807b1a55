"""Real-world data: true SDXL micro-conditioning for non-square images and validation that keeps
each image's aspect ratio."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION, run_training, training_argv


@pytest.mark.parametrize("height,width", [(64, 96), (96, 64), (64, 64), (77, 131), (1024, 683)])
def test_center_crop_corner_matches_torchvision(height, width):
    """The crop corner given to the UNet is where torchvision's Resize + CenterCrop really crop."""
    image = Image.fromarray(np.arange(height * width, dtype=np.uint32).reshape(height, width).astype(np.float32))
    resized_width, resized_height = transforms.Resize(RESOLUTION)(image).size
    top, left = train.center_crop_top_left(height, width, RESOLUTION)
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
    assert train.validation_size(1024, 1024, 1024, 32) == (1024, 1024)
    width, height = train.validation_size(2048, 1024, 1024, 32)
    assert (width, height) == (1440, 736) and abs(width / height - 2) < 0.05
    assert train.validation_size(512, 2048, 1024, 16) == (512, 2048)


def test_validation_with_a_non_square_image_is_not_stretched(tiny_sdxl, fill_data, tmp_path):
    """A 192×64 validation condition gives 3:1 validation images, not squares."""
    condition = Image.open(fill_data["validation_images"][0]).convert("RGB").resize((192, 64))
    condition.save(tmp_path / "wide.png")
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 1,
                               "--validation_prompt", "red circle", "--validation_image", tmp_path / "wide.png",
                               "--num_validation_images", 1))
    with Image.open(tmp_path / "out" / "images_0.png") as grid:  # condition + 1 sample side by side
        assert grid.size == (2 * 96, 32)
