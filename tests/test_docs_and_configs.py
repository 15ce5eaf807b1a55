"""The README documents every flag, and the shipped accelerate/DeepSpeed configs load."""

import json
import os

import train_t2i_adapter_sdxl as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_lists_every_flag_with_its_default():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for action in train.build_parser()._actions:
        if action.dest == "help":
            continue
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{action.option_strings[0]}` |")), None)
        assert row is not None, f"{action.option_strings[0]} is missing from the README's flag table"
        if action.default not in (None, False):
            assert f"`{action.default}`" in row, f"{action.option_strings[0]}: default {action.default!r} not shown"


def test_accelerate_configs_load_and_name_their_distributed_type():
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {"accelerate_multi_gpu.yaml": "MULTI_GPU", "accelerate_deepspeed_zero2.yaml": "DEEPSPEED"}
    for name, distributed_type in expected.items():
        config = ClusterConfig.from_yaml_file(os.path.join(ROOT, "configs", name))
        assert config.distributed_type == distributed_type
    deepspeed = json.load(open(os.path.join(ROOT, "configs", "deepspeed_zero2.json")))
    assert deepspeed["zero_optimization"]["stage"] == 2
    zero2 = ClusterConfig.from_yaml_file(os.path.join(ROOT, "configs", "accelerate_deepspeed_zero2.yaml"))
    assert zero2.deepspeed_config["deepspeed_config_file"] == "configs/deepspeed_zero2.json"


def test_minimum_versions_pin_every_lower_bound():
    """requirements-min.txt, which CI's minimum run installs as constraints, pins each package of
    requirements.txt exactly at its lower bound: a bound raised or added without it is caught here.
    (It may pin a dependency's dependency too: pyarrow, which the minimum numpy needs old.)"""
    import re

    def versions(name, operator):
        pattern = re.compile(rf"([A-Za-z0-9_.-]+){re.escape(operator)}(\S+)$")
        lines = open(os.path.join(ROOT, name)).read().splitlines()
        found = [pattern.match(line) for line in lines if line and not line.startswith("#")]
        assert all(found), f"{name}: every package line reads name{operator}version"
        return {match[1].lower().replace("_", "-"): match[2] for match in found}

    pinned, bounds = versions("requirements-min.txt", "=="), versions("requirements.txt", ">=")
    assert {name: pinned.get(name) for name in bounds} == bounds
