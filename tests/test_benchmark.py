"""The benchmark's bookkeeping: which runs each figure of the table comes from. The runs themselves
are stood in for here; timings belong in the benchmark's own output, never in tests."""

import json

import benchmark


def scripted_runs(monkeypatch, reports_by_row):
    """Make each child run return the next scripted report of its row; returns the log of runs, with
    "forget" entries where the sample-check records were deleted."""
    log = []
    pending = {row: list(reports) for row, reports in reports_by_row.items()}

    def run_child(row, options):
        log.append(row)
        return {"row": row, **pending[row].pop(0)}

    monkeypatch.setattr(benchmark, "run_child", run_child)
    monkeypatch.setattr(benchmark, "prepare_tiny", lambda options: None)
    monkeypatch.setattr(benchmark, "forget_sample_checks", lambda work_dir: log.append("forget"))
    return log


def tiny_report(seconds_per_step, seconds_to_step_1):
    return {"batch": 8, "seconds_per_step": seconds_per_step, "seconds_to_step_1": seconds_to_step_1,
            "peak_mb": 1000.0, "text_cache_mb": 0.0, "latent_cache_mb": 0.0}


def test_tiny_rows_keep_the_best_step_time_and_first_runs_apart_from_re_runs(monkeypatch, tmp_path, capsys):
    """Even repeats start with the sample checks forgotten (first runs), odd ones keep them
    (re-runs); each step-1 figure is the best of its own kind of run, and s/step the best of all."""
    log = scripted_runs(monkeypatch, {
        "upstream": [tiny_report(1.0, 8.5), tiny_report(0.9, 8.7), tiny_report(1.1, 8.4), tiny_report(0.8, 8.2)],
        "ours": [tiny_report(0.5, 4.8), tiny_report(0.6, 4.3), tiny_report(0.4, 4.7), tiny_report(0.7, 4.5)],
    })
    output = tmp_path / "rows.json"
    benchmark.main(benchmark.parse_args(["--rows", "upstream", "ours", "--repeats", "4", "--work_dir", str(tmp_path),
                                         "--output_json", str(output)]))
    assert log == ["forget", "upstream", "forget", "ours", "ours", "upstream",
                   "forget", "upstream", "forget", "ours", "ours", "upstream"]
    upstream, ours = json.loads(output.read_text())
    assert (upstream["seconds_per_step"], upstream["seconds_to_step_1"], upstream["seconds_to_step_1_again"]) == (0.8, 8.4, 8.2)
    assert (ours["seconds_per_step"], ours["seconds_to_step_1"], ours["seconds_to_step_1_again"]) == (0.4, 4.7, 4.3)
    table = capsys.readouterr().out
    assert "| ours | 8 | 0.4000 | 20.0 | 1000 | 4.70 | 4.30 | 0.00 | 0.00 | 0.50 | 0.56 | 0.52 | 1.00 |" in table


def test_an_sdxl_row_out_of_memory_is_reported_and_not_run_again(monkeypatch, tmp_path, capsys):
    sdxl_report = {"batch": 16, "seconds_per_step": 2.0, "seconds_to_step_1": 9.0, "peak_mb": 70000.0,
                   "text_cache_mb": 0.0, "latent_cache_mb": 0.0, "unet_tflops_per_step": 800.0, "mfu": 0.5}
    log = scripted_runs(monkeypatch, {
        "b16-upstream": [{"batch": 16, "out_of_memory": True}],
        "b16": [sdxl_report, sdxl_report],
        "b16-gc": [sdxl_report, sdxl_report],
    })
    planned = {"b16": 65000.0, "b16-gc": 30000.0}
    monkeypatch.setattr(benchmark, "planned_peak_mb", lambda row, options: planned.get(row))
    benchmark.main(benchmark.parse_args(["--size", "sdxl", "--batch_sizes", "16", "--repeats", "2",
                                         "--work_dir", str(tmp_path)]))
    assert log == ["b16-upstream", "b16", "b16-gc", "b16-gc", "b16"]
    table = capsys.readouterr().out
    assert "| b16-upstream (out of memory) | 16 | — | — | — | — |" in table
    assert "| b16 | 16 | 2.0000 | 8.0 | 70000 | 65000 | 9.00 |" in table and "| 50.0% |" in table
    assert "| b16-gc | 16 | 2.0000 | 8.0 | 70000 | 30000 | 9.00 |" in table


def test_sdxl_rows_are_planned_with_their_own_flags(monkeypatch):
    """The planned column: the planner run with each row's batch, precision and checkpointing."""
    import plan_memory

    planned = []
    monkeypatch.setattr(plan_memory, "plan_memory", lambda options: planned.append(options) or {"peak": 3 * 2**20})
    options = benchmark.parse_args(["--size", "sdxl", "--batch_sizes", "4", "--resolution", "512",
                                    "--mixed_precision", "fp16"])
    assert benchmark.planned_peak_mb("b4-upstream", options) is None
    assert benchmark.planned_peak_mb("b4-gc", options) == 3.0
    assert benchmark.planned_peak_mb("b4", options) == 3.0
    gc, plain = planned
    assert (gc.size, gc.resolution, gc.train_batch_size, gc.mixed_precision) == ("sdxl", 512, 4, "fp16")
    assert gc.gradient_checkpointing and not plain.gradient_checkpointing and gc.set_grads_to_none


def test_the_upstream_row_runs_the_trainer_as_upstream_does(tiny_sdxl, fill_data, tmp_path, monkeypatch):
    """The benchmark drives the real trainer through its hooks. The upstream row checks no sample, embeds every
    caption before step 1 (a cache file on disk) and reads them back at each step, computes σ upstream's way
    and leaves the UNet trainable, so the UNet gets gradients; the ours row checks the samples, encodes the
    captions at every step with the trainer's own loss, and the UNet gets none. Both rows time every step."""
    import os

    import train_t2i_adapter_sdxl as train

    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tiny_sdxl, work / "tiny-sdxl")
    os.symlink(os.path.dirname(fill_data["imagefolder"]), work / "fill")
    options = benchmark.parse_args(["--work_dir", str(work), "--steps", "2", "--warmup", "1", "--batch_sizes", "4",
                                    "--resolution", "64", "--mixed_precision", "no"])
    calls, loaded = {}, []

    def counted(module, name):
        function = getattr(module, name)

        def count_then_call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return function(*args, **kwargs)
        monkeypatch.setattr(module, name, count_then_call)

    for module, name in ((train.data, "recorded_scan_samples"), (train, "encode_prompt"), (train, "adapter_training_loss")):
        counted(module, name)
    load_models = train.load_models
    monkeypatch.setattr(train, "load_models", lambda *a: loaded.append(load_models(*a)) or loaded[-1])

    steps = options.warmup + options.steps + 1
    reports = {}
    for row in ("upstream", "ours"):
        calls.clear()
        reports[row] = benchmark.run_tiny_row(row, options)
        unet_has_gradients = any(p.grad is not None for p in loaded[-1].unet.parameters())
        if row == "upstream":
            assert calls == {"encode_prompt": 1}  # one batched precompute of all 32 captions, nothing after
            assert reports[row]["text_cache_mb"] > 0 and unet_has_gradients
        else:
            assert calls == {"recorded_scan_samples": 1, "encode_prompt": steps, "adapter_training_loss": steps}
            assert reports[row]["text_cache_mb"] == 0 and not unet_has_gradients
        assert reports[row]["seconds_per_step"] > 0 and 0 < reports[row]["seconds_to_step_1"]


def test_the_checkpoint_benchmark_saves_through_the_trainers_code_and_verifies_it(tmp_path, capsys):
    """scripts/benchmark_checkpoint_io.py at an eighth of the adapter's channels: it saves a checkpoint with the
    trainer's save_checkpoint (the manifest included), which verifies, and prints its table."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import benchmark_checkpoint_io
    from t2i_train import lifecycle, manifest

    try:
        benchmark_checkpoint_io.main(benchmark_checkpoint_io.parse_args(
            ["--folder", str(tmp_path), "--channels_divisor", "8", "--repeats", "1"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()
    checkpoint = tmp_path / "run-0" / "checkpoint-1"
    assert lifecycle.checkpoint_problems(str(checkpoint), 0, read=True) == []
    assert manifest.manifest_problems(checkpoint) == [] and (checkpoint / manifest.MANIFEST_FILE).is_file()
    table = capsys.readouterr().out
    assert "| save_checkpoint (measured, page cache) |" in table and "| resume: verifying the manifest |" in table
