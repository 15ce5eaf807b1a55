"""Validation pairing, the model card, what trackers and the Hub upload receive, and the text side of a
step: caption selection, SDXL time ids and the two-encoder prompt embeddings."""

import inspect
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import train_t2i_adapter_sdxl as train
from t2i_train import control, data, images

MINIMAL = ["--pretrained_model_name_or_path", "some/model", "--dataset_name", "some/dataset"]
TAGS = (
    "stable-diffusion-xl",
    "stable-diffusion-xl-diffusers",
    "text-to-image",
    "diffusers",
    "t2iadapter",
    "diffusers-training",
)


# ------------------------------------------------------------------------------------------
# Validation pairs
# ------------------------------------------------------------------------------------------


def test_pair_validation_inputs_equal_counts_pair_in_order():
    """Equal counts pair up position by position."""
    assert images.pair_validation_inputs(["a", "b", "c"], ["1", "2", "3"]) == [("a", "1"), ("b", "2"), ("c", "3")]
    assert images.pair_validation_inputs(["a"], ["1"]) == [("a", "1")]


def test_pair_validation_inputs_single_image_is_shared():
    """One image serves every prompt."""
    assert images.pair_validation_inputs(["a", "b", "c"], ["1"]) == [("a", "1"), ("b", "1"), ("c", "1")]


def test_pair_validation_inputs_single_prompt_is_shared():
    """One prompt serves every image."""
    assert images.pair_validation_inputs(["a"], ["1", "2", "3"]) == [("a", "1"), ("a", "2"), ("a", "3")]


@pytest.mark.parametrize("num_prompts,num_images", [(2, 3), (3, 2), (4, 2)])
def test_pair_validation_inputs_mismatch_is_refused(num_prompts, num_images):
    """Other combinations cannot be paired: the error names both flags and both counts."""
    with pytest.raises(ValueError) as error:
        images.pair_validation_inputs([f"p{i}" for i in range(num_prompts)], [f"{i}.png" for i in range(num_images)])
    message = str(error.value)
    assert "--validation_prompt" in message and "--validation_image" in message
    assert str(num_prompts) in message and str(num_images) in message


# ------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------


def solid(color, size):
    return Image.new("RGB", size, color)


def front_matter(text):
    import yaml

    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text[end + 5 :]


def test_model_card_metadata_and_grids(tmp_path):
    """README.md carries the license, base model and every upstream tag; per prompt a grid images_<i>.png of
    width (1 + num images)·w shows the condition then the samples, and the card links it under its prompt."""
    w, h = 10, 6
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image_logs = [
        {
            "validation_image": solid((i * 40, 20, 200), (w, h)),
            "images": [solid(color, (w, h)) for color in colors[:3]],
            "validation_prompt": f"prompt number {i}",
        }
        for i in range(2)
    ]
    train.save_model_card("me/my-adapter", image_logs, "base/sdxl-model", str(tmp_path))

    with open(tmp_path / "README.md") as f:
        metadata, body = front_matter(f.read())
    assert metadata["license"] == "creativeml-openrail-m"
    assert metadata["base_model"] == "base/sdxl-model"
    assert set(TAGS) <= set(metadata["tags"])
    assert "base/sdxl-model" in body
    for i, log in enumerate(image_logs):
        assert log["validation_prompt"] in body
        assert f"images_{i}.png" in body
        grid = Image.open(tmp_path / f"images_{i}.png").convert("RGB")
        assert grid.size == ((1 + len(log["images"])) * w, h)
        tiles = [grid.crop((j * w, 0, (j + 1) * w, h)) for j in range(1 + len(log["images"]))]
        for tile, expected in zip(tiles, [log["validation_image"], *log["images"]]):
            assert np.array_equal(np.asarray(tile), np.asarray(expected))
    assert body.index("prompt number 0") < body.index("images_0.png") < body.index("prompt number 1")


def test_model_card_has_upstreams_library_name_and_template_sections(tmp_path):
    """Upstream's card (diffusers' training template) says `library_name: diffusers` and has sections on use,
    limitations and training; ours fills them in: a snippet that is valid Python and loads this adapter on
    this base, and the run's settings, after the grids."""
    import ast

    image_logs = [{"validation_image": solid((0, 0, 0), (4, 4)), "images": [solid((9, 9, 9), (4, 4))],
                   "validation_prompt": "a prompt"}]
    details = {"optimisation steps": 123, "resolution": 1024}
    train.save_model_card("me/my-adapter", image_logs, "base/sdxl-model", str(tmp_path), details)
    metadata, body = front_matter((tmp_path / "README.md").read_text())
    assert metadata["library_name"] == "diffusers"
    sections = ["## Intended uses & limitations", "#### How to use", "#### Limitations and bias", "## Training details"]
    positions = [body.index(section) for section in sections]
    assert body.index("images_0.png") < positions[0] and positions == sorted(positions)
    snippet = body.split("```python\n")[1].split("```")[0]
    ast.parse(snippet)
    assert 'T2IAdapter.from_pretrained("me/my-adapter")' in snippet and '"base/sdxl-model"' in snippet
    assert "- optimisation steps: 123\n" in body and "- resolution: 1024\n" in body


def test_model_card_without_validation(tmp_path):
    """Without validation images the card still has its metadata, and no grid is written."""
    train.save_model_card("me/my-adapter", None, "base/sdxl-model", str(tmp_path))
    with open(tmp_path / "README.md") as f:
        metadata, _ = front_matter(f.read())
    assert metadata["license"] == "creativeml-openrail-m" and set(TAGS) <= set(metadata["tags"])
    assert metadata["library_name"] == "diffusers"
    assert not [name for name in os.listdir(tmp_path) if name.startswith("images_")]


# ------------------------------------------------------------------------------------------
# Trackers and Hub
# ------------------------------------------------------------------------------------------


def test_tracker_config_has_no_token_and_no_lists():
    """The tracker config is every argument but --hub_token, with list values (the validation flags) turned into
    strings that keep every item; the arguments themselves are left unchanged."""
    args = train.parse_args(
        MINIMAL + ["--hub_token", "hf_SECRET123", "--validation_prompt", "red circle", "blue square",
                   "--validation_image", "a.png", "b.png"]
    )
    config = train.tracker_config(args)
    assert "hub_token" not in config
    assert "hf_SECRET123" not in repr(config)
    assert set(config) == set(vars(args)) - {"hub_token"}
    assert not any(isinstance(value, (list, tuple, dict)) for value in config.values())
    for prompt in ("red circle", "blue square"):
        assert prompt in config["validation_prompt"]
    assert "a.png" in config["validation_image"] and "b.png" in config["validation_image"]
    assert config["learning_rate"] == args.learning_rate and config["resolution"] == args.resolution
    assert args.validation_prompt == ["red circle", "blue square"] and args.hub_token == "hf_SECRET123"


def test_tracker_config_is_accepted_by_tensorboard_hparams():
    """TensorBoard's hparams (what accelerate's tensorboard tracker calls) accepts the config: no list values."""
    from torch.utils.tensorboard.summary import hparams

    args = train.parse_args(MINIMAL + ["--validation_prompt", "a", "b", "--validation_image", "x.png"])
    with pytest.raises(ValueError):
        hparams(dict(vars(args)), {})  # the raw arguments are not (lists), so this check means something
    hparams(train.tracker_config(args), {})


def test_hub_upload_arguments():
    """upload_folder gets the repo, the output folder, the token, and ignores step_* and epoch_*; every key is a
    parameter of huggingface_hub.upload_folder."""
    from huggingface_hub import upload_folder

    arguments = train.hub_upload_arguments("me/adapter", "/out/dir", "hf_tok")
    assert arguments["repo_id"] == "me/adapter"
    assert arguments["folder_path"] == "/out/dir"
    assert arguments["token"] == "hf_tok"
    assert {"step_*", "epoch_*"} <= set(arguments["ignore_patterns"])
    assert set(arguments) <= set(inspect.signature(upload_folder).parameters)


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------


def test_a_string_caption_passes_through():
    """String captions are kept as they are with proportion 0, in training and in validation."""
    for caption in ["a red circle", ""]:
        assert train.choose_caption(caption, 0.0, random.Random(0)) == caption
        assert train.choose_caption(caption, 0.0) == caption


def test_a_list_caption_gives_a_random_item_in_training_and_the_first_otherwise():
    """A list caption gives one of its items from the sample's own RNG in training (all of them turn up over
    the samples' seeds, and one seed always gives the same) and the first otherwise."""
    options = ["first", "second", "third"]
    assert {train.choose_caption(options, 0.0, random.Random(seed)) for seed in range(200)} == set(options)
    assert len({train.choose_caption(options, 0.0, random.Random(5)) for _ in range(20)}) == 1
    for container in (options, tuple(options), np.array(options)):
        assert train.choose_caption(container, 0.0) == "first"


def test_empty_prompts_follow_the_proportion_and_the_samples_seed():
    """Proportion 1 empties every caption in training and 0 none; 0.5 about half, and which ones is each sample's
    seed's, so another epoch (which gives each sample a new seed) empties other samples (upstream draws once, so
    the same samples are empty in every epoch: defect 7). Validation never empties one."""
    assert all(train.choose_caption(["b", "c"], 1.0, random.Random(seed)) == "" for seed in range(50))
    assert all(train.choose_caption("d", 0.0, random.Random(seed)) == "d" for seed in range(50))
    assert train.choose_caption("d", 1.0) == "d"
    first = [train.choose_caption("x", 0.5, random.Random(seed)) == "" for seed in range(2000)]
    second = [train.choose_caption("x", 0.5, random.Random(seed)) == "" for seed in range(2000, 4000)]
    assert abs(sum(first) / 2000 - 0.5) < 0.05 and first != second
    assert first == [train.choose_caption("x", 0.5, random.Random(seed)) == "" for seed in range(2000)]


@pytest.mark.parametrize("bad", [5, None, [], {"text": "x"}])
def test_a_bad_caption_type_is_refused(bad):
    """A caption that is neither a string nor a non-empty list is refused, showing it."""
    with pytest.raises(ValueError, match="caption"):
        train.choose_caption(bad, 0.0, random.Random(0))


# ------------------------------------------------------------------------------------------
# SDXL micro-conditioning and text embeddings
# ------------------------------------------------------------------------------------------


def test_compute_time_ids_shape_and_values():
    """One (orig_h, orig_w, crop_top, crop_left, target_h, target_w) row per sample, in the requested dtype."""
    time_ids = train.compute_time_ids((96, 80), (3, 5), (64, 72), 3, dtype=torch.float32)
    assert time_ids.shape == (3, 6) and time_ids.dtype == torch.float32
    for row in time_ids.tolist():
        assert row == [96, 80, 3, 5, 64, 72]
    assert train.compute_time_ids((64, 64), (0, 0), (64, 64), 2, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def text_side(tiny_sdxl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [
        CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder").eval(),
        CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2").eval(),
    ]
    return tokenizers, encoders


def ids_for(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_encode_prompt_matches_penultimate_hidden_states_of_both_encoders(text_side):
    """encode_prompt gives (B, 77, 32 + 64) prompt embeddings equal to the two encoders' hidden_states[-2]
    concatenated, and (B, 32) pooled embeddings equal to the second encoder's projected output."""
    tokenizers, encoders = text_side
    captions = ["a red circle on white", "", "word " * 200]  # empty and over-long captions too
    prompt_embeds, pooled = train.encode_prompt(captions, encoders, tokenizers)
    hidden = [encoder.config.hidden_size for encoder in encoders]
    assert prompt_embeds.shape == (len(captions), 77, sum(hidden)) == (3, 77, 96)
    assert pooled.shape == (len(captions), encoders[1].config.projection_dim) == (3, 32)

    expected_states = []
    with torch.no_grad():
        for tokenizer, encoder in zip(tokenizers, encoders):
            output = encoder(ids_for(tokenizer, captions), output_hidden_states=True)
            expected_states.append(output.hidden_states[-2])
        expected_pooled = output.text_embeds
    torch.testing.assert_close(prompt_embeds, torch.cat(expected_states, dim=-1))
    torch.testing.assert_close(pooled, expected_pooled)
    # The penultimate layer, not the last one.
    with torch.no_grad():
        last = encoders[0](ids_for(tokenizers[0], captions)).last_hidden_state
    assert not torch.allclose(prompt_embeds[..., : hidden[0]], last)


def test_encode_prompt_is_per_caption(text_side):
    """Each row depends on its own caption only: encoding a caption alone gives the same row as in a batch."""
    tokenizers, encoders = text_side
    batch_embeds, batch_pooled = train.encode_prompt(["one caption", "another caption"], encoders, tokenizers)
    alone_embeds, alone_pooled = train.encode_prompt(["another caption"], encoders, tokenizers)
    torch.testing.assert_close(batch_embeds[1:], alone_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_pooled[1:], alone_pooled, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch_embeds[0], batch_embeds[1])


# ---- The validation pairs of the conditioning gain --------------------------------------------------


@pytest.fixture
def accelerate_state():
    """The data functions log through accelerate's logger, which needs its state."""
    from accelerate.state import PartialState

    PartialState()
    yield
    PartialState._reset_state()


def data_args(data, *extra):
    """The data config of a command line on `data`, as the trainer builds it."""
    return train.data.DataConfig.from_args(train.parse_args([
        "--pretrained_model_name_or_path", "m", "--train_data_dir", data["imagefolder"], "--resolution", "64",
        *map(str, extra)]))


def row_files(dataset):
    return [row["image"]["path"] for row in data.undecoded_images(dataset, data_args({"imagefolder": "x"}))]


def test_validation_pairs_are_held_out_of_training_the_same_for_the_same_seed(fill_data, accelerate_state):
    everything = data.load_training_data(data_args(fill_data), 0, data.recorded_scan_samples)
    assert everything.control_pairs is None and len(everything.dataset) == 32
    held = data.load_training_data(data_args(fill_data, "--validation_pairs", 4), 0, data.recorded_scan_samples)
    pairs, trained = row_files(held.control_pairs), row_files(held.dataset)
    assert len(pairs) == 4 and len(trained) == 28 and len(held.sizes) == 28
    assert not set(pairs) & set(trained) and set(pairs) | set(trained) == set(row_files(everything.dataset))
    assert row_files(data.load_training_data(data_args(fill_data, "--validation_pairs", 4), 0, data.recorded_scan_samples).control_pairs) == pairs
    assert row_files(data.load_training_data(data_args(fill_data, "--validation_pairs", 4), 1, data.recorded_scan_samples).control_pairs) != pairs
    # --max_train_samples draws from what is left after holding out.
    capped = data.load_training_data(data_args(fill_data, "--validation_pairs", 4, "--max_train_samples", 20), 0, data.recorded_scan_samples)
    assert row_files(capped.control_pairs) == pairs and not set(pairs) & set(row_files(capped.dataset))


def test_holding_out_every_sample_is_refused(fill_data, accelerate_state):
    with pytest.raises(ValueError, match="--validation_pairs. 32 would hold out the whole training set"):
        data.load_training_data(data_args(fill_data, "--validation_pairs", 32), 0, data.recorded_scan_samples)


def test_a_validation_set_gives_its_first_pairs_and_leaves_training_whole(fill_data, tmp_path, accelerate_state):
    from make_fill_dataset import build_fill_dataset

    other = build_fill_dataset(tmp_path / "other", num_samples=24, resolution=64, seed=5, num_validation=0)
    loaded = data.load_training_data(data_args(fill_data, "--validation_data_dir", other["imagefolder"]), 0, data.recorded_scan_samples)
    assert len(loaded.dataset) == 32 and len(loaded.control_pairs) == 16  # DEFAULT_VALIDATION_PAIRS
    assert set(row_files(loaded.control_pairs)) <= set(row_files(data.open_dataset(other["imagefolder"], data_args(other))["train"]))
    loaded = data.load_training_data(
        data_args(fill_data, "--validation_data_dir", other["imagefolder"], "--validation_pairs", 6), 0, data.recorded_scan_samples
    )
    assert len(loaded.control_pairs) == 6
    with pytest.raises(ValueError, match="has 24 sample.s. in 'train'; 30 are needed"):
        data.load_training_data(
            data_args(fill_data, "--validation_data_dir", other["imagefolder"], "--validation_pairs", 30), 0, data.recorded_scan_samples
        )
    with pytest.raises(ValueError, match="--conditioning_image_column. value 'condition' not found"):
        data.load_training_data(data_args(fill_data, "--validation_data_dir", other["imagefolder"],
                                           "--conditioning_image_column", "condition"), 0,
                                data.recorded_scan_samples)


def test_a_stream_takes_its_pairs_from_the_validation_set(fill_data, tmp_path, accelerate_state):
    loaded = data.load_training_data(data_args(fill_data, "--streaming", "--max_train_steps", 2,
                                              "--validation_data_dir", fill_data["imagefolder"], "--validation_pairs", 3),
                                     0, data.recorded_scan_samples)
    assert loaded.sizes is None and len(loaded.control_pairs) == 3


def test_control_pairs_are_centre_crops_whatever_the_augmentation_and_leave_the_rngs_alone(tiny_sdxl, fill_data, accelerate_state):
    plain = data_args(fill_data, "--validation_pairs", 4)
    augmented = data_args(fill_data, "--validation_pairs", 4, "--random_crop", "--random_flip")
    rows = data.load_training_data(plain, 0, data.recorded_scan_samples).control_pairs
    first, second = train.control_pair_batch(rows, plain), train.control_pair_batch(rows, augmented)
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert torch.equal(first["conditioning_pixel_values"], second["conditioning_pixel_values"])
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", fill_data["imagefolder"],
                             "--resolution", "64", "--validation_pairs", "4"])
    components = train.load_models(args, train.check_inputs(args))
    states = (random.getstate(), torch.get_rng_state())
    pairs = train.prepare_control_pairs(first, components, args, torch.device("cpu"))
    again = train.prepare_control_pairs(first, components, args, torch.device("cpu"))
    assert (random.getstate(), torch.get_rng_state().tolist()) == (states[0], states[1].tolist())
    assert all(torch.equal(a, b) for a, b in zip(pairs, again))
    assert pairs.latents.shape == (4, 4, 8, 8) and pairs.time_ids.shape == (4, 6)
    scheduler = components.noise_scheduler
    loss = train.pair_loss(components.unet, components.adapter, train.sigma_table(scheduler),
                           scheduler.config.prediction_type, torch.float32)
    score = control.conditioning_gain(loss, pairs, 1000, batch_size=3)
    # The batch size bounds memory only: the noise and timesteps of each pair are the same.
    in_one_batch = control.conditioning_gain(loss, pairs, 1000, batch_size=4)
    assert in_one_batch["overall"] == pytest.approx(score["overall"], abs=1e-5)
    assert in_one_batch["loss_true"] == pytest.approx(score["loss_true"], rel=1e-5)
    assert score["pairs"] == 4 and list(score["ranges"]) == ["0-250", "250-500", "500-750", "750-1000"]
    assert score["overall"] == pytest.approx(1 - score["loss_true"] / score["loss_shuffled"])
