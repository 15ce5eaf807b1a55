"""Recipes as files (--config, #26 item 5): keys are flag names, the command line overrides the file, bad
keys and values are refused naming them, and each run writes what it resolved, a recipe itself."""

import pytest
import yaml

import train_t2i_adapter_sdxl as train
from helpers import run_training, training_argv
from t2i_train import recipes

REQUIRED = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
YAML = """
learning_rate: 2.0e-5
train_batch_size: 3
random_flip: true
validation_prompt: [a red disc, a blue disc]
validation_image: [red.png, blue.png]
timestep_sampling: logit_normal
max_train_steps: null
"""
TOML = """
learning_rate = 2.0e-5
train_batch_size = 3
random_flip = true
validation_prompt = ["a red disc", "a blue disc"]
validation_image = ["red.png", "blue.png"]
timestep_sampling = "logit_normal"
"""


@pytest.mark.parametrize("name,text", [("recipe.yaml", YAML), ("recipe.toml", TOML)])
def test_a_recipe_sets_flags_and_the_command_line_overrides_it(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    args = train.parse_args([*REQUIRED, "--config", str(tmp_path / name)])
    assert (args.learning_rate, args.train_batch_size, args.random_flip) == (2e-5, 3, True)
    assert args.validation_prompt == ["a red disc", "a blue disc"] and args.timestep_sampling == "logit_normal"
    assert args.max_train_steps is None and args.gradient_accumulation_steps == 1  # null and absent: defaults
    over = train.parse_args(["--learning_rate", "1e-4", *REQUIRED, "--config", str(tmp_path / name),
                             "--validation_prompt", "a disc", "--validation_image", "red.png",
                             "--timestep_sampling", "cubic"])
    assert (over.learning_rate, over.train_batch_size) == (1e-4, 3)
    assert over.validation_prompt == ["a disc"] and over.timestep_sampling == "cubic"


def test_a_recipe_can_name_the_required_flags():
    parser = train.build_parser()
    assert recipes.recipe_argv({"pretrained_model_name_or_path": "m", "--train_data_dir": "d"}, parser, "r") == \
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]


@pytest.mark.parametrize("text,message", [
    ("learning_rte: 1.0e-5", "'learning_rte' is not a flag of this trainer \\(did you mean 'learning_rate'\\?\\)"),
    ("config: other.yaml", "'config' is not a flag"),
    ("random_flip: 1", "'random_flip' is a switch: give true or false, not 1"),
    ("learning_rate: [1, 2]", "'learning_rate' takes one value, not a list"),
    ("- learning_rate", "must map flag names to values, not hold a list"),
    ("learning_rate: [1", "cannot be read"),
    ("train_batch_size: 0", "`--train_batch_size` must be at least 1"),  # the parser's own checks
])
def test_a_bad_recipe_is_refused_naming_what_is_wrong(tmp_path, text, message):
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        train.parse_args([*REQUIRED, "--config", str(tmp_path / "recipe.yaml")])


def test_a_recipe_value_outside_a_flags_choices_fails_as_on_the_command_line(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("timestep_sampling: gaussian")
    with pytest.raises(SystemExit):
        train.parse_args([*REQUIRED, "--config", str(tmp_path / "recipe.yaml")])
    assert "--timestep_sampling: invalid choice: 'gaussian'" in capsys.readouterr().err


def test_a_missing_recipe_is_refused():
    with pytest.raises(ValueError, match="`--config` 'nowhere.yaml' is not a file"):
        train.parse_args([*REQUIRED, "--config", "nowhere.yaml"])


def test_a_run_writes_the_settings_it_resolved_as_a_recipe_that_repeats_it(tiny_sdxl, fill_data, tmp_path):
    (tmp_path / "recipe.yaml").write_text("random_flip: true\nsnr_gamma: 5\n")
    argv = training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 1, "--config",
                         tmp_path / "recipe.yaml", "--hub_token", "secret")
    run_training(argv)
    written = tmp_path / "out" / recipes.RESOLVED_FILE
    resolved = yaml.safe_load(written.read_text())
    assert resolved["random_flip"] is True and resolved["snr_gamma"] == 5 and resolved["max_train_steps"] == 1
    assert "hub_token" not in resolved and "config" not in resolved and "secret" not in written.read_text()
    again = train.parse_args(["--config", str(written)])
    assert vars(again) == {**vars(train.parse_args([str(a) for a in argv])), "config": str(written), "hub_token": None}


def test_the_shipped_recipes_parse_and_set_what_they_say():
    import glob
    import os

    recipes_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "recipes")
    shipped = sorted(glob.glob(os.path.join(recipes_dir, "*.yaml")))
    assert shipped, "no recipe in configs/recipes"
    for path in shipped:
        args = train.parse_args([*REQUIRED, "--config", path])
        for key, value in yaml.safe_load(open(path)).items():
            assert getattr(args, key) == value, (path, key)
    assert train.parse_args([*REQUIRED, "--config", os.path.join(recipes_dir, "learn_control.yaml")]).timestep_sampling \
        == "logit_normal"
