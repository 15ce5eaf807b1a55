"""See what you train on (#26 item 4): --dump_samples N draws and lists the first N pairs training takes in
the output folder before any model loads, and logs them to the trackers; captions the text encoders cut
at 77 tokens are counted by the sample check and warned of once."""

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

import train_t2i_adapter_sdxl as train
from helpers import run_training, training_argv
from t2i_train import data, loader, sample_grid
from test_end_to_end import tensorboard_image_tags


@pytest.fixture
def taken(monkeypatch):
    """Every (key, pair) the planned pairs give, in order: the dump's first, then the training loop's."""
    given, get = [], loader.PlannedPairs.__getitem__

    def recorded(pairs, key):
        pair = get(pairs, key)
        given.append((key, pair))
        return pair

    monkeypatch.setattr(loader.PlannedPairs, "__getitem__", recorded)
    return given


def test_the_dump_shows_the_pairs_training_takes_first(tiny_sdxl, fill_data, tmp_path, taken):
    """6 pairs with random crops and flips and empty prompts: the dump's keys and pairs are the first 6 the
    loop trains on (its first step of 4, then 2 of the second), the list gives their captions, sizes and
    crops, the grid's first cell is the first image as trained, and tensorboard has the grid."""
    class Captions(train.RunHooks):
        captions = []

        def encode_prompt(self, captions, components):
            self.captions.extend(captions)
            return super().encode_prompt(captions, components)

    out = tmp_path / "out"
    argv = training_argv(tiny_sdxl, fill_data, out, "--max_train_steps", 2, "--dump_samples", 6, "--random_crop",
                         "--random_flip", "--proportion_empty_prompts", 0.5)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    run_training(argv, Captions())
    dumped, trained = taken[:6], taken[6:12]
    assert [key for key, _ in dumped] == [key for key, _ in trained]
    for (_, a), (_, b) in zip(dumped, trained):
        assert all(np.array_equal(a[name], b[name]) for name in ("pixel_values", "conditioning_pixel_values"))
    listed = json.loads((out / sample_grid.LIST_FILE).read_text())
    assert [entry["caption"] for entry in listed] == Captions.captions[:6]
    assert "" in Captions.captions[:6] or len(set(Captions.captions[:6])) > 1
    assert [entry["row"] for entry in listed] == [key[0] for key, _ in trained]
    assert all(entry["target_size"] == [64, 64] and entry["crop_top_left"] == pair["crop_top_lefts"].tolist()
               for entry, (_, pair) in zip(listed, trained))
    grid = Image.open(out / sample_grid.GRID_FILE).convert("RGB")
    first = sample_grid.to_image(trained[0][1]["pixel_values"], -1)
    first.thumbnail((sample_grid.CELL, sample_grid.CELL))
    cell = grid.crop((4, 4, 4 + first.width, 4 + first.height))
    assert np.array_equal(np.asarray(cell), np.asarray(first))
    assert grid.height == 2 * (sample_grid.CELL + 12 * (sample_grid.TEXT_LINES + 1) + 8)  # 6 pairs: 2 rows of 4
    assert "training_samples" in tensorboard_image_tags(out / "logs")


def test_the_dump_is_written_before_any_model_loads(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    def no_models(*_):
        raise RuntimeError("the models would load here")

    monkeypatch.setattr(train, "load_models", no_models)
    with pytest.raises(RuntimeError, match="would load here"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 1, "--dump_samples", 3))
    assert len(json.loads((tmp_path / sample_grid.LIST_FILE).read_text())) == 3
    assert (tmp_path / sample_grid.GRID_FILE).is_file()


def test_the_first_planned_keys_are_the_first_total_batches():
    targets = [(64, 64)] * 10 + [(32, 96)] * 6
    sampler = loader.PlannedBatchSampler(targets, 4, 2, seed=5)
    plan = sampler.epoch_plan(0)
    assert sample_grid.first_planned_keys(targets, 4, 5, 6) == [*plan[0], *plan[1][:2]]


@pytest.mark.parametrize("flags,message", [
    (["--dump_samples", "-1"], "`--dump_samples` must be 0"),
    (["--dump_samples", "4", "--streaming", "--max_train_steps", "2"], "a stream is read by its workers only"),
])
def test_bad_dump_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags])


def test_captions_beyond_77_tokens_are_counted_in_the_sample_check_and_warned_of_once(tiny_sdxl, fill_data, tmp_path,
                                                                                      caplog):
    """3 of 32 captions made long: one warning before training with the count and the first of them, from
    the first check and again from its record; the tiny tokenizer cuts at 77, as SDXL's do."""
    folder = tmp_path / "data"
    shutil.copytree(fill_data["imagefolder"], folder)
    metadata = folder / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    for row in (5, 9, 30):
        rows[row]["text"] = f"row {row}: " + "a bright red disc on a dark ground, " * 12
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = training_argv(tiny_sdxl, {"imagefolder": folder}, tmp_path / "out", "--max_train_steps", 1)
    assert train.load_tokenizers(train.parse_args(argv))[0].model_max_length == 77
    for run in ("checked", "record read"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run_training(argv + (["--resume_from_checkpoint", "latest", "--max_train_steps", "2"] if run != "checked" else []))
        warnings = [r.getMessage() for r in caplog.records if "longer than the text encoders' 77 tokens" in r.getMessage()]
        assert len(warnings) == 1, run
        assert "3 of 32 samples have a caption" in warnings[0] and "For example row 5 (" in warnings[0]
        assert "'row 5: a bright red disc" in warnings[0]


def test_a_caption_count_takes_each_rows_longest_caption():
    class Tokenizer:  # a token a word, plus start and end
        def __call__(self, texts, verbose=True):
            return type("Encoded", (), {"input_ids": [[0, *text.split(), 1] for text in texts]})

    assert data.caption_tokens(["a b", ["a", "a b c d"], None, []], Tokenizer()) == [4, 6, None, None]
    inspected = [(0, None, (64, 64), 80), (1, "bad", None, 90), (2, None, (64, 64), 10), (3, None, (64, 64), None)]
    assert data.long_captions(inspected, 77) == (2, 0, 80)
    assert data.long_captions(inspected[2:], 77) is None
