"""The house: the trainer at upstream's scale over the t2i_train package, which never imports it; nothing
loads a file by path or edits sys.path; the import graph has no cycle; imports sit at the top."""

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

import train_t2i_adapter_sdxl as train
from helpers import training_argv
from t2i_train import memory

ROOT = Path(__file__).resolve().parent.parent
TRAINER = ROOT / "train_t2i_adapter_sdxl.py"
PACKAGE = sorted((ROOT / "t2i_train").glob("*.py"))
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
OPTIONAL_PACKAGES = {"bitsandbytes", "wandb", "tomllib"}  # imported where used, each with its reason (tomllib: 3.11+)


def module_name(path):
    if path.parent.name == "t2i_train":
        return "t2i_train" if path.stem == "__init__" else f"t2i_train.{path.stem}"
    return path.stem


def imported_modules(path):
    """Every project module `path` imports, at any level (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "t2i_train" if node.level else node.module
            if node.level and node.module:
                base = f"t2i_train.{node.module}"
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_trainer_stays_near_upstreams_size():
    assert len(TRAINER.read_text().splitlines()) <= 1800


def test_the_package_never_imports_the_trainer_and_nothing_loads_by_path_or_edits_sys_path():
    for path in PACKAGE:
        assert "train_t2i_adapter_sdxl" not in imported_modules(path), path
    for path in [TRAINER, *PACKAGE, *SCRIPTS, *sorted((ROOT / "tests").glob("*.py"))]:
        if path.name == "test_layout.py":
            continue
        text = path.read_text()
        for forbidden in ("sys.path", "spec_from_file_location", "exec_module"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"


def test_the_import_graph_has_no_cycle():
    files = [TRAINER, *PACKAGE, *SCRIPTS]
    project = {module_name(path): path for path in files}
    graph = {name: sorted(imported_modules(path) & set(project) - {name}) for name, path in project.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*trail, name])
        state[name] = "open"
        for imported in graph[name]:
            visit(imported, [*trail, name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
    assert graph["t2i_train.lifecycle"] and "train_t2i_adapter_sdxl" in graph["plan_memory"]  # the graph is read


def test_imports_are_at_the_top_but_for_optional_packages():
    for path in [TRAINER, *PACKAGE]:
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        assert module.split(".")[0] in OPTIONAL_PACKAGES, f"{path.name}:{node.lineno} imports {module}"


def test_the_memory_preflight_runs_the_trainer_once_and_leaves_sys_path_alone(tiny_sdxl, fill_data, tmp_path,
                                                                              monkeypatch):
    """The preflight hands this trainer to the planner: no second copy of it is executed as another module,
    and scripts/ is not put on sys.path (where scripts/evaluate.py would shadow Hugging Face's evaluate)."""
    import logging

    args = train.parse_args(training_argv(tiny_sdxl, fill_data, tmp_path))
    monkeypatch.setattr(memory, "logger", logging.getLogger("preflight test"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    path_before, modules_before = list(sys.path), set(sys.modules)
    memory.check_memory_fits(args, types.SimpleNamespace(device=torch.device("cuda")), train)
    assert sys.path == path_before
    new_modules = set(sys.modules) - modules_before
    assert not any("plan_memory" in name or "train_t2i" in name for name in new_modules), new_modules


def test_without_its_package_the_trainer_stops_with_one_line(tmp_path):
    """Copied without t2i_train/ (simulated: the package made unimportable), the script says what to copy."""
    code = ("import sys, runpy; sys.modules['t2i_train'] = None; sys.argv = ['train_t2i_adapter_sdxl.py', '--help'];"
            f" runpy.run_path({str(TRAINER)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "train_t2i_adapter_sdxl.py needs the t2i_train/ package beside it: copy it with the script."
    ]


def test_each_rule_has_one_home():
    """A sample's target size is decided in loader.target_size alone (loaded data and streams alike), the
    latent cache's conflicts in loader.latent_cache_conflicts alone (the trainer's check and the planner's
    suggestions), and the global RNGs' states in stopping.global_rng_states alone (the trainer's guard around
    validation and the rollback of an abandoned step both use it)."""
    sources = {path: path.read_text() for path in [TRAINER, *PACKAGE]}
    calls = {name: [path.name for path, text in sources.items() for _ in range(text.count(name))]
             for name in ("nearest_bucket(", "latent_cache_conflicts(", "getstate()", "fork_rng(")}
    assert sorted(calls["nearest_bucket("]) == ["loader.py", "loader.py"]  # its definition and target_size
    assert sorted(calls["latent_cache_conflicts("]) == ["loader.py", "memory.py", "train_t2i_adapter_sdxl.py"]
    assert calls["getstate()"] == ["stopping.py"] and calls["fork_rng("] == []


def test_a_run_builds_the_sigma_table_once_and_names_its_models_and_data_mode(tiny_sdxl, fill_data, tmp_path,
                                                                               monkeypatch):
    """The σ table is built once per run (Models.sigmas_by_timestep), not again at each validation; the models
    come in a typed container and the training data names its mode."""
    from helpers import run_training

    built, seen = [], {}
    sigma_table = train.sigma_table
    monkeypatch.setattr(train, "sigma_table", lambda scheduler: built.append(1) or sigma_table(scheduler))

    class Watch(train.RunHooks):
        def models_ready(self, components, train_data, args):
            seen.update(models=type(components).__name__, streamed=train_data.streamed)

    argv = training_argv(tiny_sdxl, fill_data, tmp_path, "--max_train_steps", 2, "--validation_steps", 1,
                         "--validation_pairs", 4)
    assert run_training(argv, Watch()) == 2
    assert built == [1]  # the gain was measured at steps 0, 1 and 2, and the loop ran: one table
    assert seen == {"models": "Models", "streamed": False}
