"""scripts/make_shards.py and scripts/make_conditions.py.

Shards must come back through `datasets`' webdataset loader as the same samples (captions, pixels,
conditions) in the expected number of shards; conditioned imagefolders must load with `datasets`,
hold canny edges where the fill images' circles are, be reproducible, and have conditions of the
images' exact size. A detector that lacks its package, folder or weights must fail at once with a
message naming what is missing, whether or not controlnet_aux is installed.
"""

import collections
import importlib.util
import io
import json
import os
import random
import re
import sys
import tarfile
import types

import numpy as np
import pytest
from PIL import Image, ImageFilter

import make_conditions
import make_shards
from t2i_train.images import canny_condition, random_canny_thresholds


def fill_rows(fill_data):
    """(image path, condition path, caption) of every fill sample, in metadata order."""
    train_dir = os.path.join(fill_data["imagefolder"], "train")
    with open(os.path.join(train_dir, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [
        (
            os.path.join(train_dir, row["file_name"]),
            os.path.join(train_dir, row["conditioning_image_file_name"]),
            row["text"],
        )
        for row in rows
    ]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def pixels(image_or_path):
    image = Image.open(image_or_path) if isinstance(image_or_path, (str, os.PathLike)) else image_or_path
    return np.asarray(image.convert("RGB"))


def stream_shards(shard_paths):
    from datasets import load_dataset

    return load_dataset("webdataset", data_files={"train": list(shard_paths)}, split="train", streaming=True)


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def smooth_noise(seed, size):
    """An image whose edges have all strengths, so that canny's thresholds change its output."""
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5))


def write_plain_folder(folder, images):
    """A folder of PNGs, each with its caption in a same-named .txt; returns the paths, sorted."""
    os.makedirs(folder)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join(folder, f"photo_{index}.png")
        image.save(path)
        with open(os.path.join(folder, f"photo_{index}.txt"), "w") as f:
            f.write(f"caption number {index}\n")
        paths.append(path)
    return paths


def conditioned_rows(output_dir):
    """metadata.jsonl rows of a make_conditions output, with absolute paths."""
    train_dir = os.path.join(output_dir, "train")
    with open(os.path.join(train_dir, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        row["file_name"] = os.path.join(train_dir, row["file_name"])
        row["conditioning_image_file_name"] = os.path.join(train_dir, row["conditioning_image_file_name"])
    return rows


# ---------------------------------------------------------------------------------------------
# make_shards
# ---------------------------------------------------------------------------------------------


def test_shards_round_trip_through_datasets_webdataset(fill_data, tmp_path):
    rows = fill_rows(fill_data)
    shard_paths, counts = make_shards.make_shards(
        str(tmp_path / "shards"), train_data_dir=fill_data["imagefolder"], samples_per_shard=10
    )

    assert [os.path.basename(path) for path in shard_paths] == [f"shard-0000{i}.tar" for i in range(4)]
    assert counts == {"samples": 32}  # nothing re-encoded, skipped or shortened
    with tarfile.open(shard_paths[-1]) as tar:
        assert tar.getnames() == [f"000000{key}.{field}" for key in (30, 31) for field in ("png", "cond.png", "txt")]
        # PNG sources are copied byte for byte.
        assert tar.extractfile("00000031.png").read() == read_bytes(rows[31][0])
        assert tar.extractfile("00000031.cond.png").read() == read_bytes(rows[31][1])

    samples = list(stream_shards(shard_paths))
    assert len(samples) == 32
    assert set(samples[0]) == {"png", "cond.png", "txt", "__key__", "__url__"}
    for index, (sample, (image_path, condition_path, caption)) in enumerate(zip(samples, rows)):
        assert isinstance(sample["png"], Image.Image) and isinstance(sample["cond.png"], Image.Image)
        assert sample["txt"] == caption
        assert np.array_equal(pixels(sample["png"]), pixels(image_path))
        assert np.array_equal(pixels(sample["cond.png"]), pixels(condition_path))
        assert sample["__key__"] == f"{index:08d}"
        assert os.path.basename(sample["__url__"]) == f"shard-{index // 10:05d}.tar"


def test_shards_from_parquet_equal_shards_from_imagefolder_and_load_as_a_folder(fill_data, tmp_path, capsys):
    from datasets import load_dataset

    from_folder = make_shards.main(
        ["--train_data_dir", fill_data["imagefolder"], "--output_dir", str(tmp_path / "a"), "--samples_per_shard", "12"]
    )
    assert "Wrote 32 samples in 3 shards" in capsys.readouterr().out
    from_parquet = make_shards.main(
        ["--dataset_name", fill_data["parquet"], "--output_dir", str(tmp_path / "b"), "--samples_per_shard", "12"]
    )
    out = capsys.readouterr().out
    assert "--image_column png --conditioning_image_column cond.png --caption_column txt" in out
    # The same PNG bytes and fixed tar metadata: the shards are byte-identical.
    assert [read_bytes(path) for path in from_folder] == [read_bytes(path) for path in from_parquet]

    # What the trainer's `--dataset_name <folder> --streaming` does.
    stream = load_dataset(str(tmp_path / "a"), split="train", streaming=True)
    assert [sample["txt"] for sample in stream] == [caption for _, _, caption in fill_rows(fill_data)]


def test_shards_are_not_mixed_with_an_earlier_run(fill_data, tmp_path):
    output_dir = str(tmp_path / "shards")
    arguments = ["--train_data_dir", fill_data["imagefolder"], "--output_dir", output_dir]
    make_shards.main(arguments + ["--samples_per_shard", "5"])
    assert len(os.listdir(output_dir)) == 7
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_shards.main(arguments)
    make_shards.main(arguments + ["--overwrite"])
    assert os.listdir(output_dir) == ["shard-00000.tar"]


def test_shards_without_conditions(fill_data, tmp_path):
    with pytest.raises(ValueError, match="'cond' is not a column.*--no_conditions"):
        make_shards.make_shards(
            str(tmp_path / "refused"), train_data_dir=fill_data["imagefolder"], conditioning_image_column="cond"
        )
    assert not os.path.exists(tmp_path / "refused")

    shard_paths, _ = make_shards.make_shards(
        str(tmp_path / "shards"), dataset_name=fill_data["parquet"], no_conditions=True, samples_per_shard=32
    )
    samples = list(stream_shards(shard_paths))
    assert set(samples[0]) == {"png", "txt", "__key__", "__url__"}
    assert [sample["txt"] for sample in samples] == [caption for _, _, caption in fill_rows(fill_data)]


def test_dataset_samples_keep_jpeg_bytes_reencode_strays_and_check_samples(tmp_path):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    photo, other = smooth_noise(0, (20, 10)), smooth_noise(1, (20, 10))
    condition, small_condition = Image.new("RGB", (20, 10), (255, 255, 255)), Image.new("RGB", (10, 10))
    features = Features(
        {"image": ImageFeature(), "conditioning_image": ImageFeature(), "text": Sequence(Value("string"))}
    )
    dataset = Dataset.from_dict(
        {
            "image": [{"bytes": jpeg(photo), "path": None}, {"bytes": png(other), "path": None}]
            + [{"bytes": jpeg(photo), "path": None}] * 2
            + [{"bytes": b"not an image", "path": None}],
            "conditioning_image": [{"bytes": png(condition), "path": None}] * 2
            + [{"bytes": png(small_condition), "path": None}]
            + [{"bytes": png(condition), "path": None}] * 2,
            "text": [["first caption", "second caption"], ["only caption"], ["mismatched"], [], ["broken"]],
        },
        features=features,
    )
    columns = ("image", "conditioning_image", "text")

    with pytest.raises(ValueError, match="row 2: conditioning image is 10x10 but the image is 20x10"):
        list(make_shards.dataset_samples(dataset, *columns))

    counts = collections.Counter()
    samples = list(make_shards.dataset_samples(dataset, *columns, skip_bad_samples=True, counts=counts))
    assert [key for key, _ in samples] == ["00000000", "00000001"]
    assert counts == {
        "re-encoded images": 1,
        "list captions (first kept)": 2,
        "skipped bad samples": 3,  # the size mismatch, the empty caption list and the broken image
    }
    first, second = samples[0][1], samples[1][1]
    # "auto" takes the first sample's format: its JPEG bytes are kept, the PNG is re-encoded.
    assert first["jpg"] == jpeg(photo)
    assert Image.open(io.BytesIO(second["jpg"])).format == "JPEG"
    assert first["txt"] == b"first caption"

    shard_paths = make_shards.write_shards(samples, str(tmp_path / "shards"))
    loaded = list(stream_shards(shard_paths))
    assert set(loaded[0]) == {"jpg", "cond.png", "txt", "__key__", "__url__"}
    assert loaded[0]["jpg"].format == "JPEG" and loaded[0]["jpg"].size == (20, 10)
    # Re-encoding at quality 95 keeps the pixels close.
    assert np.abs(pixels(loaded[1]["jpg"]).astype(int) - pixels(other).astype(int)).mean() < 8
    assert [sample["txt"] for sample in loaded] == ["first caption", "only caption"]


def test_shards_store_an_image_turned_by_exif_upright(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display, so 30x20 shows as 20x30
    buffer = io.BytesIO()
    smooth_noise(0, (30, 20)).save(buffer, format="JPEG", exif=exif)
    features = Features({"image": ImageFeature(), "conditioning_image": ImageFeature(), "text": Value("string")})
    dataset = Dataset.from_dict(
        {
            "image": [{"bytes": buffer.getvalue(), "path": None}],
            "conditioning_image": [{"bytes": png(Image.new("RGB", (20, 30))), "path": None}],
            "text": ["a turned photo"],
        },
        features=features,
    )
    counts = collections.Counter()
    ((key, fields),) = make_shards.dataset_samples(dataset, "image", "conditioning_image", "text", counts=counts)
    assert counts == {"re-encoded images": 1}
    with Image.open(io.BytesIO(fields["jpg"])) as stored:
        assert stored.size == (20, 30) and stored.getexif().get(0x0112, 1) == 1


def test_write_shards_refuses_mixed_fields_and_leaves_no_partial_dataset(tmp_path):
    def samples(bad_key=None):
        for index in range(5):
            fields = {"png": png(Image.new("RGB", (4, 4))), "txt": b"caption"}
            if index == 3:
                fields.pop("txt")
            yield (bad_key if bad_key and index == 0 else f"{index:08d}"), fields

    output_dir = str(tmp_path / "shards")
    mixed = re.escape("'00000003' has fields ['png'] but the first sample has ['png', 'txt']")
    with pytest.raises(ValueError, match=mixed):
        make_shards.write_shards(samples(), output_dir, samples_per_shard=2)
    assert os.listdir(output_dir) == []  # the finished first shard and the partial one are gone
    with pytest.raises(ValueError, match="hold no '.'"):
        make_shards.write_shards(samples(bad_key="a.b"), output_dir)


# ---------------------------------------------------------------------------------------------
# make_conditions
# ---------------------------------------------------------------------------------------------


def test_canny_conditions_trace_the_fill_circles(fill_data, tmp_path):
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    output_dir = str(tmp_path / "canny")
    summary = make_conditions.main(["--input_dir", fill_data["imagefolder"], "--output_dir", output_dir])
    assert summary["num_samples"] == 32 and summary["num_re_encoded"] == 0

    with open(fill_data["circles"]) as f:
        circles = [json.loads(line) for line in f]
    rows = conditioned_rows(output_dir)
    for row, (source_image, _, caption), circle in zip(rows, fill_rows(fill_data), circles):
        assert row["text"] == caption
        assert read_bytes(row["file_name"]) == read_bytes(source_image)  # copied, not re-encoded
        condition = pixels(row["conditioning_image_file_name"])
        image = Image.open(row["file_name"])
        assert condition.shape[:2] == (image.height, image.width)
        # Fixed thresholds: exactly the trainer's canny at 100/200, white edges on black.
        assert np.array_equal(condition, pixels(canny_condition(image, 100, 200)))
        assert set(np.unique(condition)) <= {0, 255}

        ys, xs = np.nonzero(condition[:, :, 0])
        distance = np.hypot(xs - circle["center_x"], ys - circle["center_y"])
        # Edges lie on the boundary between fill and background, none in the flat regions ...
        assert np.all(np.abs(distance - circle["radius"]) <= 2.5), circle
        # ... and they go all the way round.
        angles = np.degrees(np.arctan2(ys - circle["center_y"], xs - circle["center_x"]))
        assert len(np.unique(np.floor(angles / 45) % 8)) == 8, circle

    dataset = load_dataset(output_dir)["train"]
    assert dataset.column_names == ["image", "conditioning_image", "text"]
    assert isinstance(dataset.features["image"], ImageFeature)
    assert isinstance(dataset.features["conditioning_image"], ImageFeature)
    assert dataset[5]["conditioning_image"].size == dataset[5]["image"].size
    assert np.array_equal(pixels(dataset[5]["conditioning_image"]), pixels(rows[5]["conditioning_image_file_name"]))


def test_canny_thresholds_fixed_and_random_are_reproducible(tmp_path):
    images = [smooth_noise(seed, size) for seed, size in enumerate([(48, 40), (40, 56), (64, 64), (33, 47)])]
    input_dir = str(tmp_path / "photos")
    write_plain_folder(input_dir, images)

    def run(name, *flags):
        output_dir = str(tmp_path / name)
        make_conditions.main(["--input_dir", input_dir, "--output_dir", output_dir, *flags])
        return [pixels(row["conditioning_image_file_name"]) for row in conditioned_rows(output_dir)]

    fixed = run("fixed")
    assert [row["text"] for row in conditioned_rows(str(tmp_path / "fixed"))] == [
        f"caption number {index}" for index in range(4)
    ]
    for condition, image in zip(fixed, images):
        assert np.array_equal(condition, pixels(canny_condition(image, 100, 200)))

    first = run("random-a", "--random_thresholds", "--seed", "5")
    again = run("random-a", "--random_thresholds", "--seed", "5")  # rerun into the same folder: replaced
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    rng = random.Random(5)
    for condition, image in zip(first, images):
        assert np.array_equal(condition, pixels(canny_condition(image, *random_canny_thresholds(rng))))
    # The thresholds matter on these images: another seed, or fixed thresholds, give other edges.
    other_seed = run("random-b", "--random_thresholds", "--seed", "6")
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))
    assert not all(np.array_equal(a, b) for a, b in zip(first, fixed))


def test_images_turned_by_exif_are_stored_upright_with_a_matching_condition(tmp_path):
    input_dir = tmp_path / "photos"
    input_dir.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    smooth_noise(0, (30, 20)).save(input_dir / "turned.jpg", exif=exif)
    (input_dir / "turned.txt").write_text("a turned photo")

    summary = make_conditions.make_conditions(str(tmp_path / "out"), input_dir=str(input_dir))
    assert summary["num_re_encoded"] == 1
    (row,) = conditioned_rows(str(tmp_path / "out"))
    assert row["file_name"].endswith(".png") and Image.open(row["file_name"]).size == (20, 30)
    assert Image.open(row["conditioning_image_file_name"]).size == (20, 30)


def test_missing_caption_files_are_listed_before_anything_is_written(tmp_path):
    input_dir = str(tmp_path / "photos")
    write_plain_folder(input_dir, [smooth_noise(0, (16, 16))] * 2)
    os.remove(os.path.join(input_dir, "photo_1.txt"))
    with pytest.raises(ValueError, match="1 image\\(s\\) have no caption file.*photo_1.png"):
        make_conditions.make_conditions(str(tmp_path / "out"), input_dir=input_dir)
    assert not os.path.exists(tmp_path / "out")


def test_an_unreadable_image_is_named_and_the_run_can_be_repeated(tmp_path):
    input_dir = str(tmp_path / "photos")
    paths = write_plain_folder(input_dir, [smooth_noise(0, (16, 16))] * 3)
    with open(paths[1], "wb") as f:
        f.write(b"not an image")
    output_dir = str(tmp_path / "out")
    with pytest.raises(ValueError, match=f"Cannot read the image of {re.escape(paths[1])}"):
        make_conditions.make_conditions(output_dir, input_dir=input_dir)

    smooth_noise(1, (16, 16)).save(paths[1])
    assert make_conditions.make_conditions(output_dir, input_dir=input_dir)["num_samples"] == 3
    with open(os.path.join(output_dir, "make_conditions.json")) as f:
        assert json.load(f)["complete"] is True


def test_missing_detector_is_one_clear_error_before_any_input_is_read(tmp_path):
    package_missing = importlib.util.find_spec("controlnet_aux") is None
    # The input does not exist: the detector check must come first.
    base = ["--input_dir", str(tmp_path / "no-such-input"), "--output_dir", str(tmp_path / "out")]
    base += ["--condition", "depth"]

    with pytest.raises(make_conditions.MissingDetectorError) as no_path:
        make_conditions.main(base)
    message = str(no_path.value)
    assert "--detector_path was not given" in message and "dpt_hybrid-midas-501f0c75.pt" in message
    assert ("pip install controlnet_aux" in message) == package_missing

    empty = tmp_path / "annotators"
    empty.mkdir()
    with pytest.raises(make_conditions.MissingDetectorError) as no_weights:
        make_conditions.main(base + ["--detector_path", str(empty)])
    message = str(no_weights.value)
    assert f"weight file(s) not found in --detector_path {str(empty)!r}: dpt_hybrid-midas-501f0c75.pt" in message
    assert "was not given" not in message
    assert ("pip install controlnet_aux" in message) == package_missing
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("condition", ["depth", "lineart", "sketch", "openpose"])
def test_detector_problems_name_exactly_what_is_missing(condition, tmp_path, monkeypatch):
    files = list(make_conditions.DETECTORS[condition].weight_files.values())
    folder = tmp_path / "annotators"
    folder.mkdir()
    for name in files[1:]:
        (folder / name).write_bytes(b"")

    # The package absent (None in sys.modules makes its import fail), the first weight file missing.
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    problems = make_conditions.detector_problems(condition, str(folder))
    assert len(problems) == 2
    assert "controlnet_aux package is not installed (`pip install controlnet_aux`)" in problems[0]
    assert problems[1].endswith(f"{str(folder)!r}: {files[0]} (from the hub repo lllyasviel/Annotators)")

    # The package present: only the weight file is missing, then nothing.
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    assert make_conditions.detector_problems(condition, str(folder)) == problems[1:]
    (folder / files[0]).write_bytes(b"")
    assert make_conditions.detector_problems(condition, str(folder)) == []
    assert make_conditions.detector_problems("canny", None) == []


def test_detector_output_is_resized_back_to_each_image(tmp_path, monkeypatch):
    calls = []

    class FakeLineartDetector:
        """Stands in for controlnet_aux.LineartDetector: answers at the detector's own size, as the
        real one does (shorter side = detect_resolution, both sides multiples of 64), inverted."""

        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.append(("from_pretrained", path, kwargs))
            return cls()

        def to(self, device):
            calls.append(("to", device))
            return self

        def __call__(self, image, detect_resolution, image_resolution, output_type, **kwargs):
            calls.append(("call", detect_resolution, image_resolution, output_type, kwargs))
            scale = detect_resolution / min(image.size)
            size = tuple(int(round(side * scale / 64)) * 64 for side in image.size)
            return Image.fromarray(255 - np.asarray(image.resize(size, Image.BILINEAR)))

    module = types.ModuleType("controlnet_aux")
    module.LineartDetector = FakeLineartDetector
    monkeypatch.setitem(sys.modules, "controlnet_aux", module)
    weights = tmp_path / "annotators"
    weights.mkdir()
    (weights / "sk_model.pth").write_bytes(b"")
    (weights / "sk_model2.pth").write_bytes(b"")

    # Smooth gradients, so that going to the detector's size and back keeps the picture.
    sizes = [(48, 40), (57, 131)]
    gradients = [
        Image.fromarray(np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, w, 3)).copy())
        for w, h in sizes
    ]
    input_dir = str(tmp_path / "photos")
    write_plain_folder(input_dir, gradients)
    make_conditions.main([
        "--input_dir", input_dir, "--output_dir", str(tmp_path / "out"), "--condition", "lineart",
        "--detector_path", str(weights), "--detect_resolution", "64", "--device", "cpu",
    ])

    assert calls[:2] == [
        ("from_pretrained", str(weights), {"filename": "sk_model.pth", "coarse_filename": "sk_model2.pth"}),
        ("to", "cpu"),
    ]
    assert calls[2:] == [("call", 64, 64, "pil", {"coarse": False})] * 2
    for row, gradient, size in zip(conditioned_rows(str(tmp_path / "out")), gradients, sizes):
        condition = Image.open(row["conditioning_image_file_name"])
        assert condition.size == Image.open(row["file_name"]).size == size
        difference = np.abs(pixels(condition).astype(int) - (255 - pixels(gradient).astype(int)))
        assert difference.mean() < 6
