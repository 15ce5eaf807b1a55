#!/usr/bin/env python
"""Which lever makes the adapter learn its control: the demo's run (tiny SDXL pretrained on fill images,
1,024 circle pairs at 64², batch 8, lr 1e-3, 1,200 steps, 32 pairs held out) once per lever and seed, each
scored by the conditioning gain the trainer logs on its held-out pairs (every 100 steps). Prints one
table (the last gain, and the mean over the second half of the run, which is steadier) and draws the
gain curves, each the mean over the seeds, as one plot.

The levers: upstream's cubic timesteps (the default), uniform, cubic restricted to [500, 1000),
logit-normal, min-SNR-γ 5 and an EMA of decay 0.999; then the best combination: the best timestep
sampling of those that beat the default, with min-SNR and the EMA where each beat it too (the default
again when none did). The runs are seeded, so their numbers repeat on any machine; `--jobs 2` runs two
at once (the scores do not depend on it, only the time).

Example: python scripts/compare_levers.py --work_dir /tmp/levers --jobs 2 --output assets/levers.png
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys

from PIL import Image

from plot_control_curve import GAIN, PANEL, draw_panel, tensorboard_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = "cubic (default)"
TIMESTEP_LEVERS = {
    "uniform": ["--timestep_sampling", "uniform"],
    "cubic, t in [500, 1000)": ["--min_timestep", 500],
    "logit-normal (0, 1)": ["--timestep_sampling", "logit_normal"],
}
OTHER_LEVERS = {"min-SNR-γ 5": ["--snr_gamma", 5], "EMA 0.999": ["--use_ema", "--ema_decay", 0.999]}
COLOURS = [(30, 30, 30), (200, 60, 30), (40, 120, 200), (60, 160, 80), (150, 80, 180), (220, 150, 30), (0, 150, 150)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="Models, data and one folder per run (kept: a run done is not run again).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1200, help="The demo's budget.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs at once (one thread each).")
    parser.add_argument("--output", default=None, help="Where to draw the curves (PNG).")
    parser.add_argument("--output_json", default=None, help="Also write every run's curve here.")
    return parser.parse_args(argv)


def build_inputs(work_dir):
    """The demo's tiny SDXL and fill dataset, built as scripts/demo.sh builds them."""
    model, data = os.path.join(work_dir, "tiny-sdxl"), os.path.join(work_dir, "fill-data")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_sdxl.py"), "--output_dir", model,
                        "--pretrained_base", os.path.join(ROOT, "assets", "tiny-fill-base")], check=True,
                       stdout=subprocess.DEVNULL)
    if not os.path.exists(os.path.join(data, "fill_dataset.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_fill_dataset.py"), "--output_dir", data,
                        "--num_samples", "1024", "--resolution", "64", "--num_validation", "4"], check=True,
                       stdout=subprocess.DEVNULL)
    return model, os.path.join(data, "imagefolder")


def run(name, flags, seed, model, data, args):
    """One training run; its logged gain curve [(step, gain)]."""
    output_dir = os.path.join(args.work_dir, "runs", f"{name}-seed{seed}".replace(" ", "_").replace(",", ""))
    if not os.path.exists(os.path.join(output_dir, "training_finished.json")):
        command = [
            sys.executable, os.path.join(ROOT, "train_t2i_adapter_sdxl.py"),
            "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "8", "--learning_rate", "1e-3",
            "--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.steps),
            "--validation_steps", "100", "--validation_pairs", "32", "--dataloader_num_workers", "0",
            "--report_to", "tensorboard", "--seed", str(seed), "--resume_from_checkpoint", "latest",
            *map(str, flags),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        os.makedirs(os.path.dirname(output_dir), exist_ok=True)
        with open(output_dir + ".log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return tensorboard_scalars(os.path.join(output_dir, "logs"))[GAIN]


def run_all(levers, model, data, args):
    """{lever: {seed: curve}} for each lever and seed, `args.jobs` at once."""
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {(name, seed): pool.submit(run, name, flags, seed, model, data, args)
                   for name, flags in levers.items() for seed in args.seeds}
        return {name: {seed: futures[name, seed].result() for seed in args.seeds} for name in levers}


def late_mean(curve):
    """The mean gain over the second half of the run's validations."""
    return statistics.mean(gain for step, gain in curve if step >= curve[-1][0] / 2)


def score(curves):
    """(mean over seeds of the last gain, of the late mean)."""
    return (statistics.mean(curve[-1][1] for curve in curves.values()),
            statistics.mean(late_mean(curve) for curve in curves.values()))


def best_combination(results):
    """(name, flags) of the best combination: the best timestep lever that beat the default by the late
    mean, with each other lever that beat it too; None when nothing did."""
    baseline = score(results[DEFAULT])[1]
    better = [name for name in [*TIMESTEP_LEVERS, *OTHER_LEVERS] if score(results[name])[1] > baseline]
    timestep = max((name for name in better if name in TIMESTEP_LEVERS), key=lambda n: score(results[n])[1], default=None)
    chosen = ([timestep] if timestep else []) + [name for name in better if name in OTHER_LEVERS]
    if len(chosen) < 2:  # a single lever is its own row already
        return None
    flags = [flag for name in chosen for flag in {**TIMESTEP_LEVERS, **OTHER_LEVERS}[name]]
    return " + ".join(chosen), flags


def table(results, seeds):
    lines = ["| lever | " + " | ".join(f"seed {seed}: last, late mean" for seed in seeds) + " | mean last | mean late |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for name, curves in results.items():
        last, late = score(curves)
        cells = " | ".join(f"{curves[seed][-1][1]:.3f}, {late_mean(curves[seed]):.3f}" for seed in seeds)
        lines.append(f"| {name} | {cells} | {last:.3f} | {late:.3f} |")
    return "\n".join(lines)


def mean_curve(curves):
    runs = list(curves.values())
    return [(step, statistics.mean(curve[index][1] for curve in runs)) for index, (step, _) in enumerate(runs[0])]


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    model, data = build_inputs(args.work_dir)
    results = run_all({DEFAULT: [], **TIMESTEP_LEVERS, **OTHER_LEVERS}, model, data, args)
    combination = best_combination(results)
    if combination is not None:
        results.update(run_all(dict([combination]), model, data, args))
    else:
        print("No two levers beat the default: there is no combination to run.")
    print(f"Conditioning gain on 32 held-out pairs, {args.steps} steps of the demo's run (late mean: steps"
          f" {args.steps // 2}..{args.steps})")
    print(table(results, args.seeds))
    if args.output:
        series = [(name.replace("γ", "gamma"), COLOURS[index % len(COLOURS)], 3 if name == DEFAULT else 2,
                   mean_curve(curves))  # PIL's default font has no γ
                  for index, (name, curves) in enumerate(results.items())]
        panel = draw_panel(f"conditioning gain, mean of seeds {', '.join(map(str, args.seeds))}", series,
                           "1 - loss(true) / loss(other)")
        figure = Image.new("RGB", PANEL, "white")
        figure.paste(panel, (0, 0))
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        figure.save(args.output)
        print(f"Wrote {args.output}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({name: {str(seed): curve for seed, curve in curves.items()} for name, curves in results.items()}, f)


if __name__ == "__main__":
    main()
