"""The command line: upstream's flags with upstream's names, types and defaults, and the checks
that need no file, each failing with a message that names the flag (and its value)."""

import argparse

import pytest

import train_t2i_adapter_sdxl as train

STORE_TRUE = "store_true"

# Upstream's parser (diffusers examples/t2i_adapter/train_t2i_adapter_sdxl.py), flag by flag:
# dest: (type, default, nargs, choices). STORE_TRUE marks `action="store_true"` flags.
UPSTREAM_FLAGS = {
    # Models
    "pretrained_model_name_or_path": (str, None, None, None),
    "pretrained_vae_model_name_or_path": (str, None, None, None),
    "adapter_model_name_or_path": (str, None, None, None),
    "revision": (str, None, None, None),
    "variant": (str, None, None, None),
    "tokenizer_name": (str, None, None, None),
    "cache_dir": (str, None, None, None),
    # Output and logging
    "output_dir": (str, "t2iadapter-model", None, None),
    "logging_dir": (str, "logs", None, None),
    "seed": (int, None, None, None),
    "report_to": (str, "tensorboard", None, None),
    "tracker_project_name": (str, "sd_xl_train_t2iadapter", None, None),
    # Resolution and micro-conditioning
    "resolution": (int, 1024, None, None),
    "detection_resolution": (int, None, None, None),
    "crops_coords_top_left_h": (int, 0, None, None),
    "crops_coords_top_left_w": (int, 0, None, None),
    # Steps and checkpoints
    "train_batch_size": (int, 4, None, None),
    "num_train_epochs": (int, 1, None, None),
    "max_train_steps": (int, None, None, None),
    "gradient_accumulation_steps": (int, 1, None, None),
    "gradient_checkpointing": STORE_TRUE,
    "checkpointing_steps": (int, 500, None, None),
    "checkpoints_total_limit": (int, 3, None, None),
    "resume_from_checkpoint": (str, None, None, None),
    # Optimiser
    "learning_rate": (float, 5e-6, None, None),
    "scale_lr": STORE_TRUE,
    "lr_scheduler": (str, "constant", None, None),
    "lr_warmup_steps": (int, 500, None, None),
    "lr_num_cycles": (int, 1, None, None),
    "lr_power": (float, 1.0, None, None),
    "use_8bit_adam": STORE_TRUE,
    "adam_beta1": (float, 0.9, None, None),
    "adam_beta2": (float, 0.999, None, None),
    "adam_weight_decay": (float, 1e-2, None, None),
    "adam_epsilon": (float, 1e-08, None, None),
    "max_grad_norm": (float, 1.0, None, None),
    "set_grads_to_none": STORE_TRUE,
    # Precision and kernels
    "mixed_precision": (str, None, None, ["no", "fp16", "bf16"]),
    "allow_tf32": STORE_TRUE,
    "enable_xformers_memory_efficient_attention": STORE_TRUE,
    # Data
    "dataset_name": (str, None, None, None),
    "dataset_config_name": (str, None, None, None),
    "train_data_dir": (str, None, None, None),
    "image_column": (str, "image", None, None),
    "conditioning_image_column": (str, "conditioning_image", None, None),
    "caption_column": (str, "text", None, None),
    "max_train_samples": (int, None, None, None),
    "proportion_empty_prompts": (float, 0, None, None),
    "dataloader_num_workers": (int, 1, None, None),
    # Validation
    "validation_prompt": (str, None, "+", None),
    "validation_image": (str, None, "+", None),
    "num_validation_images": (int, 4, None, None),
    "validation_steps": (int, 100, None, None),
    # Hub
    "push_to_hub": STORE_TRUE,
    "hub_token": (str, None, None, None),
    "hub_model_id": (str, None, None, None),
}

MINIMAL = ["--pretrained_model_name_or_path", "some/model", "--dataset_name", "some/dataset"]


def parser_actions():
    return {action.dest: action for action in train.build_parser()._actions if action.dest != "help"}


def test_every_upstream_flag_is_present_under_its_upstream_name():
    """All 56 upstream flags exist, spelled `--<dest>` as upstream spells them; extra flags are allowed."""
    actions = parser_actions()
    missing = sorted(set(UPSTREAM_FLAGS) - set(actions))
    assert not missing, f"upstream flags missing: {missing}"
    for dest in UPSTREAM_FLAGS:
        assert f"--{dest}" in actions[dest].option_strings, (dest, actions[dest].option_strings)


@pytest.mark.parametrize("dest", sorted(UPSTREAM_FLAGS))
def test_flag_has_upstream_type_default_nargs_and_choices(dest):
    """Each upstream flag keeps upstream's type, default, nargs and choices (store_true flags: default False)."""
    action = parser_actions()[dest]
    expected = UPSTREAM_FLAGS[dest]
    if expected == STORE_TRUE:
        assert isinstance(action, argparse._StoreTrueAction), type(action)
        assert action.default is False
        return
    type_, default, nargs, choices = expected
    assert isinstance(action, argparse._StoreAction), type(action)
    assert action.type is type_
    if default is None:
        assert action.default is None, action.default
    else:
        assert action.default == default, (action.default, default)
    assert action.nargs == nargs
    assert (list(action.choices) if action.choices is not None else None) == choices


def test_only_the_base_model_is_required():
    """Upstream requires --pretrained_model_name_or_path only; no other flag (upstream or new) is required."""
    required = sorted(action.dest for action in train.build_parser()._actions if action.required)
    assert required == ["pretrained_model_name_or_path"]


def test_help_renders():
    """`--help` works: every help string survives argparse's %-formatting with defaults."""
    text = train.build_parser().format_help()
    for dest in UPSTREAM_FLAGS:
        assert f"--{dest}" in text


def test_help_shows_every_flag_in_a_named_group():
    """`--help` lists the flags under named groups (Models, Data, ...), none under argparse's catch-all."""
    parser = train.build_parser()
    catch_all = {group.title for group in parser._action_groups[:2]}  # positionals and plain options
    grouped = {action.dest: group.title for group in parser._action_groups if group.title not in catch_all
               for action in group._group_actions}
    assert set(UPSTREAM_FLAGS) <= set(grouped)
    assert {"Models", "Data", "Validation", "Hub"} <= set(grouped.values())
    text = parser.format_help()
    options = text[text.index("\nModels:"):]  # below the usage line
    assert options.index("--pretrained_model_name_or_path") < options.index("Hub:") < options.index("--push_to_hub")


@pytest.mark.parametrize("extra", [[], ["--aspect_ratio_buckets"], ["--scale_lr", "--streaming", "--max_train_steps", "5"],
                                   ["--validation_prompt", "a", "b", "--validation_image", "x.png"]])
def test_check_args_checks_and_changes_nothing(extra):
    argv = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *extra]
    assert vars(train.parse_args(argv)) == vars(train.build_parser().parse_args(argv))


def test_the_script_reads_top_to_bottom():
    """As its docstring says: no module-level name is used above its definition (only `main`, last, ties
    everything together)."""
    import ast

    tree = ast.parse(open(train.__file__).read())
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
        defined.update({name: node.lineno for name in names})
    early = sorted({(used.id, node.lineno) for node in tree.body for used in ast.walk(node)
                    if isinstance(used, ast.Name) and defined.get(used.id, 0) > node.lineno})
    assert early == []


def test_minimal_upstream_command_line_parses_with_upstream_defaults():
    """parse_args(input_args=...) accepts upstream's minimal command line and fills in the defaults."""
    args = train.parse_args(input_args=list(MINIMAL))
    assert args.pretrained_model_name_or_path == "some/model"
    assert args.dataset_name == "some/dataset"
    for dest, expected in UPSTREAM_FLAGS.items():
        if dest in ("pretrained_model_name_or_path", "dataset_name"):
            continue
        default = False if expected == STORE_TRUE else expected[1]
        assert getattr(args, dest) == default, dest


def test_missing_base_model_is_an_argparse_error(capsys):
    """Without --pretrained_model_name_or_path argparse exits, naming the flag."""
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset_name", "x"])
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err


def test_mixed_precision_choices_are_enforced(capsys):
    """--mixed_precision accepts no/fp16/bf16 and nothing else."""
    for value in ("no", "fp16", "bf16"):
        assert train.parse_args(MINIMAL + ["--mixed_precision", value]).mixed_precision == value
    with pytest.raises(SystemExit):
        train.parse_args(MINIMAL + ["--mixed_precision", "fp8"])
    assert "fp8" in capsys.readouterr().err


def test_nargs_plus_validation_flags_collect_lists():
    """--validation_prompt/--validation_image take several values each."""
    args = train.parse_args(MINIMAL + ["--validation_prompt", "a", "b", "--validation_image", "x.png", "y.png"])
    assert args.validation_prompt == ["a", "b"]
    assert args.validation_image == ["x.png", "y.png"]


# ------------------------------------------------------------------------------------------
# Checks on the flags alone
# ------------------------------------------------------------------------------------------


def check_error(argv, *fragments):
    with pytest.raises(ValueError) as error:
        train.parse_args(argv)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_neither_dataset_flag_is_refused():
    """Neither --dataset_name nor --train_data_dir: the error names both."""
    check_error(["--pretrained_model_name_or_path", "m"], "--dataset_name", "--train_data_dir")


def test_both_dataset_flags_are_refused():
    """Both --dataset_name and --train_data_dir: the error names both flags and both values."""
    check_error(
        ["--pretrained_model_name_or_path", "m", "--dataset_name", "hubdata", "--train_data_dir", "localdir"],
        "--dataset_name", "--train_data_dir", "hubdata", "localdir",
    )


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_proportion_empty_prompts_outside_unit_interval_is_refused(value):
    """--proportion_empty_prompts outside [0, 1] is refused, naming flag and value."""
    check_error(MINIMAL + ["--proportion_empty_prompts", value], "--proportion_empty_prompts", value)


@pytest.mark.parametrize("value", ["0", "1", "0.5"])
def test_proportion_empty_prompts_inside_unit_interval_is_accepted(value):
    """The bounds 0 and 1 are allowed."""
    assert train.parse_args(MINIMAL + ["--proportion_empty_prompts", value]).proportion_empty_prompts == float(value)


def test_validation_prompt_without_image_is_refused():
    """A validation prompt needs a validation image."""
    check_error(MINIMAL + ["--validation_prompt", "a cat"], "--validation_image", "--validation_prompt")


def test_validation_image_without_prompt_is_refused():
    """A validation image needs a validation prompt."""
    check_error(MINIMAL + ["--validation_image", "cond.png"], "--validation_prompt", "--validation_image")


def test_mismatched_validation_counts_are_refused():
    """2 prompts and 3 images cannot be paired: the error names both flags and both counts."""
    message = check_error(
        MINIMAL + ["--validation_prompt", "a", "b", "--validation_image", "1.png", "2.png", "3.png"],
        "--validation_prompt", "--validation_image",
    )
    assert "2" in message and "3" in message


@pytest.mark.parametrize("num_prompts,num_images", [(1, 3), (3, 1), (2, 2), (1, 1)])
def test_pairable_validation_counts_are_accepted(num_prompts, num_images):
    """Equal counts, or a single prompt or a single image, are accepted."""
    prompts = [f"prompt {i}" for i in range(num_prompts)]
    images = [f"{i}.png" for i in range(num_images)]
    args = train.parse_args(MINIMAL + ["--validation_prompt", *prompts, "--validation_image", *images])
    assert args.validation_prompt == prompts and args.validation_image == images


@pytest.mark.parametrize("value", ["1020", "100", "7"])
def test_resolution_not_divisible_by_8_is_refused(value):
    """--resolution must be divisible by 8; the error names the flag and the value."""
    check_error(MINIMAL + ["--resolution", value], "--resolution", value)


def test_resolution_divisible_by_8_is_accepted():
    """A multiple of 8 passes the flag check (the adapter's own downscale is checked later, against the model)."""
    assert train.parse_args(MINIMAL + ["--resolution", "520"]).resolution == 520


@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_hub_token_with_wandb_is_refused(report_to):
    """--report_to wandb/all with --hub_token would leak the token: refused, naming both flags and the tracker."""
    check_error(
        MINIMAL + ["--report_to", report_to, "--hub_token", "hf_secret"], "--report_to", report_to, "--hub_token"
    )


def test_hub_token_with_tensorboard_is_accepted():
    """With tensorboard the token is simply kept out of the tracker config (see test_validation_and_card)."""
    args = train.parse_args(MINIMAL + ["--report_to", "tensorboard", "--hub_token", "hf_secret"])
    assert args.hub_token == "hf_secret"


def test_unknown_lr_scheduler_is_refused():
    """An unknown --lr_scheduler is refused, naming flag and value."""
    check_error(MINIMAL + ["--lr_scheduler", "exponential_decay"], "--lr_scheduler", "exponential_decay")


@pytest.mark.parametrize(
    "name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
)
def test_upstream_lr_schedulers_are_accepted(name):
    """Every schedule upstream documents is accepted."""
    assert train.parse_args(MINIMAL + ["--lr_scheduler", name]).lr_scheduler == name


@pytest.mark.parametrize(
    "flag,value",
    [
        ("train_batch_size", "0"),
        ("train_batch_size", "-2"),
        ("gradient_accumulation_steps", "0"),
        ("checkpointing_steps", "0"),
        ("validation_steps", "0"),
        ("num_validation_images", "0"),
        ("max_train_steps", "0"),
        ("max_train_samples", "0"),
        ("checkpoints_total_limit", "0"),
        ("dataloader_num_workers", "-1"),
        ("detection_resolution", "0"),
    ],
)
def test_non_positive_counts_are_refused(flag, value):
    """Counts that must be positive (workers: non-negative) are refused, naming flag and value."""
    check_error(MINIMAL + [f"--{flag}", value], f"--{flag}", value)


def test_zero_dataloader_workers_is_accepted():
    """0 workers means loading in the main process: allowed."""
    assert train.parse_args(MINIMAL + ["--dataloader_num_workers", "0"]).dataloader_num_workers == 0


@pytest.mark.parametrize("value", ["1", "0", "-3"])
def test_fewer_than_two_validation_pairs_are_refused(value):
    """The gain compares each pair's condition with another pair's: one pair cannot be compared."""
    check_error(MINIMAL + ["--validation_pairs", value], "--validation_pairs", value, "at least 2")


def test_both_validation_set_flags_are_refused():
    check_error(MINIMAL + ["--validation_data_dir", "a", "--validation_dataset_name", "b"],
                "--validation_data_dir", "--validation_dataset_name")


def test_validation_pairs_held_out_of_a_stream_are_refused_naming_the_alternative():
    check_error(MINIMAL + ["--streaming", "--max_train_steps", "5", "--validation_pairs", "8"],
                "--validation_pairs", "--streaming", "--validation_data_dir")
    args = train.parse_args(MINIMAL + ["--streaming", "--max_train_steps", "5", "--validation_pairs", "8",
                                       "--validation_data_dir", "pairs"])
    assert args.validation_pairs == 8


def test_a_control_metric_without_validation_images_is_refused():
    check_error(MINIMAL + ["--control_metric", "canny"], "--control_metric canny", "--validation_prompt")
    assert train.parse_args(MINIMAL + ["--control_metric", "none"]).control_metric == "none"


@pytest.mark.parametrize("conditioning_type,given,expected", [
    ("canny", None, "canny"), ("image", None, "none"), ("image", "ssim", "ssim"), ("canny", "none", "none"),
])
def test_the_control_metric_defaults_to_canny_for_canny_adapters(conditioning_type, given, expected):
    extra = ["--validation_prompt", "p", "--validation_image", "c.png", "--conditioning_type", conditioning_type]
    args = train.parse_args(MINIMAL + extra + (["--control_metric", given] if given else []))
    assert train.control_metric(args) == expected
