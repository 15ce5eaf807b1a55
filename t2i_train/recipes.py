"""Recipes as files (--config FILE): a YAML or TOML file whose keys are the trainer's flag names, read as if
its flags came first on the command line, so that every flag given there wins and every value is checked
by the same parser. Each run writes the settings it resolved to its output folder as such a file."""

import argparse
import difflib
import os

import yaml

from .files import replaced_atomically
from .stopping import Refusal

RESOLVED_FILE = "training_config.yaml"  # in --output_dir: the settings of the last launch, a --config file itself
NOT_WRITTEN = frozenset({"config", "hub_token"})  # the file named, and a secret


def read_recipe(path):
    """{key: value} of a YAML (.yaml, .yml) or TOML (.toml) file."""
    if not os.path.isfile(path):
        raise Refusal(f"`--config` {path!r} is not a file.")
    if path.endswith(".toml"):
        try:
            import tomllib  # Python 3.11 and newer
        except ModuleNotFoundError:
            raise Refusal(f"`--config` {path!r}: reading TOML needs Python 3.11 or newer; write it in YAML.") from None
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f) if path.endswith(".toml") else yaml.safe_load(f) or {}
    except (ValueError, yaml.YAMLError) as error:  # tomllib.TOMLDecodeError is a ValueError
        raise Refusal(f"`--config` {path!r} cannot be read: {error}") from None
    if not isinstance(recipe, dict):
        raise Refusal(f"`--config` {path!r} must map flag names to values, not hold a {type(recipe).__name__}.")
    return recipe


def recipe_argv(recipe, parser, path):
    """The command-line tokens of a recipe, each key checked against the parser's flags."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    argv = []
    for key, value in recipe.items():
        name = str(key).lstrip("-")
        action = actions.get(name)
        if action is None or name == "config":
            close = difflib.get_close_matches(name, [dest for dest in actions if dest != "config"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise Refusal(f"`--config` {path!r}: {key!r} is not a flag of this trainer{hint}.")
        flag = action.option_strings[0]
        if value is None:  # the flag's default
            continue
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise Refusal(f"`--config` {path!r}: {key!r} is a switch: give true or false, not {value!r}.")
            argv += [flag] if value else []
        elif isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise Refusal(f"`--config` {path!r}: {key!r} takes one value, not a list.")
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def argv_with_recipe(parser, argv):
    """`argv` with the tokens of its --config file (if any) put first, so that the command line wins."""
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--config")
    known, _ = named.parse_known_args(argv)
    if known.config is None:
        return argv
    return [*recipe_argv(read_recipe(known.config), parser, known.config), *argv]


def write_resolved_recipe(args, output_dir):
    """Every setting of this launch as a --config file in `output_dir`: the same run again is
    `--config <output_dir>/training_config.yaml`."""
    settings = {key: value for key, value in sorted(vars(args).items()) if key not in NOT_WRITTEN}
    with replaced_atomically(os.path.join(output_dir, RESOLVED_FILE)) as tmp_path, open(tmp_path, "w") as f:
        yaml.safe_dump(settings, f, sort_keys=False, allow_unicode=True)
