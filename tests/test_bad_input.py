"""Bad inputs fail with one clear error naming the flag and the value, before any model is loaded or any
embedding computed: `load_models` and `encode_prompt` are replaced by functions that fail the test if
they are ever reached."""

import importlib.util
import json
import os
import re

import pytest
import torch

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION, run_training, training_argv
from t2i_train import configs


@pytest.fixture(autouse=True)
def nothing_expensive(monkeypatch):
    def must_not_be_reached(*args, **kwargs):
        raise AssertionError("must not be reached")

    monkeypatch.setattr(train, "load_models", must_not_be_reached)
    monkeypatch.setattr(train, "encode_prompt", must_not_be_reached)


def fails_with(argv, *fragments):
    """Run the trainer on argv; it must raise ValueError (not the AssertionError above) naming fragments."""
    with pytest.raises(ValueError) as error:
        run_training(argv)
    message = str(error.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"
    return message


def read_config(model, subfolder):
    with open(os.path.join(model, subfolder, "config.json")) as f:
        return json.load(f)


def save_adapter(folder, dtype=torch.float32, **config):
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    T2IAdapter(**config).to(dtype).save_pretrained(folder)
    return str(folder)


def test_the_guard_itself_works(tiny_sdxl, fill_data, tmp_path):
    """A good command line does reach load_models (so the other tests prove that it was not reached)."""
    with pytest.raises(AssertionError, match="must not be reached"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 1))


@pytest.mark.parametrize("flag", ["caption_column", "conditioning_image_column", "image_column"])
def test_missing_dataset_column(tiny_sdxl, fill_data, tmp_path, flag):
    """A column the dataset does not have is named, with the flag and the columns there are."""
    message = fails_with(training_argv(tiny_sdxl, fill_data, tmp_path / "out", f"--{flag}", "nope"), f"--{flag}", "nope")
    for column in ("image", "conditioning_image", "text"):
        assert column in message


def test_missing_dataset_column_in_parquet_dataset(tiny_sdxl, fill_data, tmp_path):
    """The same through --dataset_name (a local parquet dataset)."""
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--caption_column", "caption")
    i = argv.index("--train_data_dir")
    argv[i : i + 2] = ["--dataset_name", fill_data["parquet"]]
    fails_with(argv, "--caption_column", "caption")


def test_resolution_not_divisible_by_the_adapter_downscale(tiny_sdxl, fill_data, tmp_path):
    """A resolution divisible by 8 but not by the adapter's total downscale is refused naming the resolution and
    the factor. The factor is measured here: image side / side of the adapter's smallest feature map."""
    from diffusers import T2IAdapter

    config = configs.derive_adapter_config(read_config(tiny_sdxl, "unet"), read_config(tiny_sdxl, "vae"))
    with torch.no_grad():
        features = T2IAdapter(**config)(torch.zeros(1, 3, 256, 256))
    total_downscale = 256 // min(f.shape[-1] for f in features)
    assert total_downscale > 8  # otherwise every multiple of 8 would do
    resolution = next(r for r in range(RESOLUTION + 8, 10 * total_downscale, 8) if r % total_downscale)
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "out")
    argv[argv.index("--resolution") + 1] = str(resolution)
    fails_with(argv, "--resolution", resolution, total_downscale)


def test_validation_image_that_does_not_exist(tiny_sdxl, fill_data, tmp_path):
    """A missing validation image fails up front (upstream: at the first validation, defect 13)."""
    missing = str(tmp_path / "no-such-condition.png")
    fails_with(
        training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--validation_prompt", "a", "--validation_image", missing),
        "--validation_image", missing,
    )


def test_validation_image_that_is_not_an_image(tiny_sdxl, fill_data, tmp_path):
    """A text file named .png is refused as unreadable, naming flag and path."""
    fake = tmp_path / "condition.png"
    fake.write_text("this is not a PNG\n")
    fails_with(
        training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--validation_prompt", "a",
                      "--validation_image", fill_data["validation_images"][0], str(fake)),
        "--validation_image", str(fake),
    )


def test_model_path_that_does_not_exist(fill_data, tmp_path):
    """A base model path that does not exist (and cannot be a Hub id) is named with its flag."""
    missing = "/nonexistent/tiny-sdxl"
    fails_with(training_argv(missing, fill_data, tmp_path / "out"), "--pretrained_model_name_or_path", missing)


def test_vae_path_that_does_not_exist(tiny_sdxl, fill_data, tmp_path):
    """The same for --pretrained_vae_model_name_or_path."""
    missing = "/nonexistent/vae"
    fails_with(
        training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--pretrained_vae_model_name_or_path", missing),
        "--pretrained_vae_model_name_or_path", missing,
    )


def test_train_data_dir_that_does_not_exist(tiny_sdxl, fill_data, tmp_path):
    """A --train_data_dir that is not a folder is named."""
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "out")
    missing = str(tmp_path / "no-data")
    argv[argv.index("--train_data_dir") + 1] = missing
    fails_with(argv, "--train_data_dir", missing)


def test_adapter_that_does_not_fit_the_unet(tiny_sdxl, fill_data, tmp_path):
    """An adapter with the wrong channels is refused, the message giving the adapter's feature-map shapes
    (measured here by running it) and the UNet's channels."""
    from diffusers import T2IAdapter

    channels = [16, 32, 64, 64]
    folder = save_adapter(tmp_path / "wrong-adapter", in_channels=3, channels=channels, num_res_blocks=2,
                          downscale_factor=16, adapter_type="full_adapter_xl")
    with torch.no_grad():
        features = T2IAdapter.from_pretrained(folder)(torch.zeros(1, 3, RESOLUTION, RESOLUTION))
    adapter_shapes = [(f.shape[1], f.shape[2]) for f in features]
    unet_channels = list(read_config(tiny_sdxl, "unet")["block_out_channels"])
    assert [c for c, _ in adapter_shapes][: len(unet_channels)] != unet_channels
    message = fails_with(
        training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--adapter_model_name_or_path", folder),
        str(adapter_shapes), str(unet_channels), str(channels),
    )
    assert "does not fit" in message


def test_float32_adapter_with_an_fp16_variant_beside_it_is_accepted(tiny_sdxl, fill_data, tmp_path):
    """The Hub's usual layout (diffusion_pytorch_model.safetensors in float32 plus a .fp16.safetensors variant,
    e.g. TencentARC's SDXL adapters) is a float32 adapter: from_pretrained loads the float32 file, so the input
    checks pass and training goes on to load the models."""
    from diffusers import T2IAdapter

    unet_channels = list(read_config(tiny_sdxl, "unet")["block_out_channels"])
    config = dict(in_channels=3, channels=unet_channels + unet_channels[-1:], num_res_blocks=2, downscale_factor=16,
                  adapter_type="full_adapter_xl")
    folder = save_adapter(tmp_path / "adapter", **config)
    T2IAdapter(**config).to(torch.float16).save_pretrained(folder, variant="fp16")
    assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"))
    assert T2IAdapter.from_pretrained(folder).dtype == torch.float32
    with pytest.raises(AssertionError, match="must not be reached"):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--adapter_model_name_or_path", folder,
                                   "--max_train_steps", 1))


def test_max_train_samples_larger_than_the_dataset(tiny_sdxl, fill_data, tmp_path):
    """--max_train_samples beyond the dataset's size is refused, naming the value and the size."""
    with open(os.path.join(fill_data["imagefolder"], "train", "metadata.jsonl")) as f:
        size = sum(1 for line in f if line.strip())
    fails_with(
        training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_samples", size + 1),
        "--max_train_samples", size + 1, size,
    )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes(tiny_sdxl, fill_data, tmp_path):
    """--use_8bit_adam without bitsandbytes fails up front, naming the flag and the package."""
    fails_with(training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--use_8bit_adam"), "--use_8bit_adam", "bitsandbytes")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_xformers(tiny_sdxl, fill_data, tmp_path):
    """--enable_xformers_memory_efficient_attention without xformers fails up front."""
    fails_with(
        training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--enable_xformers_memory_efficient_attention"),
        "--enable_xformers_memory_efficient_attention", "xformers",
    )


def snapshot(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


@pytest.mark.parametrize(
    "bad",
    [
        ["--caption_column", "nope"],  # fails after the output folder is made, while loading the dataset
        ["--max_train_samples", "100000"],
        ["--validation_prompt", "a", "--validation_image", "/nonexistent/condition.png"],  # fails in the input checks
    ],
)
def test_failing_run_leaves_existing_checkpoints_untouched(tiny_sdxl, fill_data, tmp_path, bad):
    """An output_dir holding checkpoints (more than --checkpoints_total_limit, with a resume request) is left
    exactly as it was by a run that fails on bad input: nothing pruned, overwritten or added."""
    output_dir = tmp_path / "out"
    for step in (5, 10, 15):
        checkpoint = output_dir / f"checkpoint-{step}"
        (checkpoint / "t2iadapter").mkdir(parents=True)
        (checkpoint / "t2iadapter" / "config.json").write_text(json.dumps({"step": step}))
        (checkpoint / "random_states_0.pkl").write_bytes(os.urandom(64))
    (output_dir / "notes.txt").write_text("keep me")
    before = snapshot(output_dir)
    argv = training_argv(tiny_sdxl, fill_data, output_dir, "--checkpoints_total_limit", 1,
                         "--resume_from_checkpoint", "latest", *bad)
    with pytest.raises(ValueError):
        run_training(argv)
    assert snapshot(output_dir) == before


@pytest.mark.parametrize("flags,message", [
    (["--resolution", "0"], "`--resolution` must be in 1..8192, got 0"),
    (["--resolution=-64"], "`--resolution` must be in 1..8192, got -64"),
    (["--resolution", "16384"], "`--resolution` must be in 1..8192, got 16384"),
    (["--learning_rate", "0"], "`--learning_rate` must be above 0, got 0.0"),
    (["--learning_rate=-1e-5"], "`--learning_rate` must be above 0, got -1e-05"),
    (["--num_train_epochs", "0"], "`--num_train_epochs` must be at least 1, got 0"),
])
def test_impossible_numbers_are_refused_by_name(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags])


@pytest.mark.parametrize("swap", ["unet as adapter", "pipeline as adapter", "adapter as base", "unet as base"])
def test_a_model_folder_of_the_wrong_kind_is_named(tiny_sdxl, fill_data, tmp_path, swap):
    """A UNet or a whole pipeline given as the adapter, an adapter or a UNet given as the base: one message naming
    the flag, the folder and what it holds, instead of a KeyError."""
    adapter = save_adapter(tmp_path / "adapter", in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1,
                           downscale_factor=16, adapter_type="full_adapter_xl")
    unet = os.path.join(tiny_sdxl, "unet")
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "out")
    flag, folder, expected = {
        "unet as adapter": ("--adapter_model_name_or_path", unet, "holds a UNet2DConditionModel config, not a T2IAdapter's"),
        "pipeline as adapter": ("--adapter_model_name_or_path", tiny_sdxl, "no T2IAdapter config found"),
        "adapter as base": ("--pretrained_model_name_or_path", adapter, "UNet2DConditionModel"),
        "unet as base": ("--pretrained_model_name_or_path", unet, "UNet2DConditionModel"),
    }[swap]
    if flag in argv:
        argv[argv.index(flag) + 1] = folder
    else:
        argv += [flag, folder]
    fails_with(argv, flag, folder, expected)


def test_a_caption_column_of_numbers_is_refused(tiny_sdxl, fill_data, tmp_path):
    """Captions that are numbers would reach the tokenizer mid-training; the column is refused up front."""
    folder = tmp_path / "data"
    import shutil

    shutil.copytree(fill_data["imagefolder"], folder)
    metadata = folder / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    metadata.write_text("".join(json.dumps({**row, "text": i}) + "\n" for i, row in enumerate(rows)))
    fails_with(training_argv(tiny_sdxl, {"imagefolder": folder}, tmp_path / "out"),
               "`--caption_column` column 'text' holds", "int64", "not text")
