#!/usr/bin/env python
"""Speed and memory of the trainer, configurations side by side in one run, as one table.

Each row is a short training run in its own process (so peak memory is that row's own); rows are
repeated in alternating order and the best run is kept, because on a shared machine noise only adds time.
Time to step 1 is counted from the call of the script's main(). Tiny rows give it twice, each the best
of its runs: for first runs on the files ("s to step 1", the even repeats: every sample checked) and for
re-runs ("s to step 1 again", the odd repeats, as after a restart: the sample check read back from the
record of the run before).

  --size tiny   (CPU or GPU) runs the real training script, `train_t2i_adapter_sdxl.main`, on the
                tiny SDXL and a fill dataset, with the configurations below.
  --size sdxl   (GPU) builds UNet, VAE and both text encoders from the real SDXL configs with
                random weights (speed and memory do not depend on the weights) and times the
                training step at 1024² for each batch size: as upstream runs it (b<N>-upstream: the
                UNet left trainable, upstream's σ lookup and low-precision noising), ours
                (b<N>), and ours with gradient checkpointing (b<N>-gc); plus the UNet's model FLOPs
                utilisation. Ratios compare each row with the upstream row of its batch size.

Rows of the tiny table:
  upstream      our script run as upstream runs, through its hooks (`RunHooks`, see `upstream_hooks`):
                no sample check, all captions encoded before step 1 in float32 and stored by
                `datasets.map` under a hash of all arguments, the UNet left trainable (its gradients
                computed and kept), σ found per sample with a host sync, noise added in the
                mixed-precision dtype, the VAE run at every step.
  ours          the defaults: every sample checked before training (once per set of files), text
                embeddings on the fly, frozen UNet, one gather for σ.
  ours+cache    ours with --cache_latents, the cache already filled by an earlier run.
  ours+stream   ours with --streaming: the same data read as a `datasets` IterableDataset (not run
                unless named in --rows).

Example: python scripts/benchmark.py --size tiny --num_samples 2048 --steps 20
         python scripts/benchmark.py --rows ours ours+cache --data_flags "--aspect_ratio_buckets --random_crop --random_flip"
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_ROWS = ("upstream", "ours", "ours+cache", "ours+stream")
H100_BF16_DENSE_TFLOPS = 790.0  # measured peak on the lent H100s


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sdxl"], default="tiny")
    parser.add_argument("--rows", nargs="+", choices=TINY_ROWS, default=list(TINY_ROWS[:3]), help="Tiny rows to run.")
    parser.add_argument("--data_format", choices=["imagefolder", "parquet"], default="imagefolder",
                        help="Tiny: the same fill samples as an imagefolder (--train_data_dir) or parquet (--dataset_name).")
    parser.add_argument("--num_samples", type=int, default=2048, help="Tiny: dataset size (time to step 1 grows with it upstream).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="Default: 8 (tiny), 1 4 16 (sdxl).")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 64 (tiny), 1024 (sdxl).")
    parser.add_argument("--data_flags", default="",
                        help="Tiny: trainer flags added to our rows (not upstream's), e.g. "
                             "'--aspect_ratio_buckets --random_crop --random_flip'.")
    parser.add_argument("--steps", type=int, default=20, help="Timed optimisation steps per row.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--repeats", type=int, default=2, help="Times each row runs (alternating order).")
    parser.add_argument("--mixed_precision", default=None, help="Default: no (tiny on CPU), bf16 (sdxl).")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per row (torch and OpenMP); 1 keeps rows comparable on a shared machine.")
    parser.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="For MFU (sdxl).")
    parser.add_argument("--work_dir", default=None, help="Where models, data and caches go (default: a temp dir).")
    parser.add_argument("--output_json", default=None, help="Also write the rows as JSON here.")
    parser.add_argument("--run_row", default=None, help=argparse.SUPPRESS)  # internal: one row, in a child process
    parser.add_argument("--row_json", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_memory_mb(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def row_batch(row, options):
    """The batch size of a row: SDXL-size rows carry it in their name, 'b<batch>[-gc|-upstream]'."""
    return int(row.split("-")[0][1:]) if options.size == "sdxl" else options.batch_sizes[0]


def forget_sample_checks(work_dir):
    """Remove the trainer's records of earlier sample checks, so the next run checks every image."""
    for folder, _, files in os.walk(os.path.join(work_dir, "datasets-cache")):
        for name in files:
            if name.startswith("t2i_sample_check-"):
                os.remove(os.path.join(folder, name))


def folder_mb(path):
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return total / 2**20


# ----------------------------------------------------------------------------------------------
# Tiny rows: the real training script, timed from the inside
# ----------------------------------------------------------------------------------------------


def upstream_training_loss(scheduler):
    """Upstream's step maths: noise added in the low-precision dtype by the scheduler, σ found with a
    per-sample search and host sync. Same signature as the script's adapter_training_loss."""
    import torch

    import train_t2i_adapter_sdxl as train

    def loss(unet, adapter, latents, conditions, prompt_embeds, added_cond_kwargs, sigmas_by_timestep,
             prediction_type, weight_dtype, noise=None, timesteps=None, snr_gamma=None):
        latents = latents.to(weight_dtype)
        noise = torch.randn_like(latents)
        timesteps = train.sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        schedule = scheduler.timesteps.to(latents.device)
        indices = [(schedule == t).nonzero().item() for t in timesteps]
        sigmas = scheduler.sigmas.to(latents.device, weight_dtype)[indices].reshape(-1, 1, 1, 1)
        residuals = [feature.to(weight_dtype) for feature in adapter(conditions)]
        pred = unet(noisy / (sigmas**2 + 1) ** 0.5, timesteps, encoder_hidden_states=prompt_embeds.to(weight_dtype),
                    added_cond_kwargs={k: v.to(weight_dtype) for k, v in added_cond_kwargs.items()},
                    down_intrablock_additional_residuals=residuals).sample
        return train.weighted_denoising_loss(pred * (-sigmas) + noisy, latents, sigmas)

    return loss


def timed_hooks(train):
    """The trainer's own behaviour, with each optimisation step's end time noted (`hooks.step_times`)."""

    class TimedHooks(train.RunHooks):
        def __init__(self):
            self.start, self.step_times = time.perf_counter(), []

        def step_done(self, step, step_loss):
            self.step_times.append(time.perf_counter())

        def seconds_per_step(self, warmup):
            gaps = [b - a for a, b in zip(self.step_times[warmup:], self.step_times[warmup + 1 :])]
            return statistics.median(gaps)

    return TimedHooks


def upstream_hooks(train, work_dir):
    """Hooks that run the trainer as upstream runs (see the module docstring); `hooks.report` gets the
    size of the text-embedding cache."""

    class UpstreamHooks(timed_hooks(train)):
        def __init__(self):
            super().__init__()
            self.report, self.embeddings, self.loss = {}, {}, None

        def check_samples(self, dataset, args, accelerator, tokenizer=None):
            return [], [None] * len(dataset)  # upstream checks no sample; sizes matter only to buckets

        def models_ready(self, components, train_data, args):
            import torch
            from datasets.fingerprint import Hasher

            components.unet.requires_grad_(True)  # upstream never freezes the UNet
            self.loss = upstream_training_loss(components.noise_scheduler)

            # Every caption, before step 1, stored in float32 by datasets.map under a hash of all arguments.
            def embed(batch):
                prompt_embeds, pooled = train.encode_prompt(list(batch[args.caption_column]),
                                                            components.text_encoders, components.tokenizers)
                return {"prompt_embeds": prompt_embeds.float().cpu().numpy(), "text_embeds": pooled.float().cpu().numpy()}

            # A fresh folder each run: upstream pays this precompute again whenever any argument changes.
            cache_file = os.path.join(tempfile.mkdtemp(dir=work_dir), f"{Hasher.hash(vars(args))}.arrow")
            embedded = train_data[0].map(embed, batched=True, batch_size=64, cache_file_name=cache_file,
                                         new_fingerprint=Hasher.hash(vars(args)))
            self.report["text_cache_mb"] = os.path.getsize(cache_file) / 2**20
            for caption, prompt_embeds, pooled in zip(embedded[args.caption_column], embedded["prompt_embeds"],
                                                      embedded["text_embeds"]):
                self.embeddings[caption] = (torch.tensor(prompt_embeds), torch.tensor(pooled))

        def encode_prompt(self, captions, components):
            import torch

            device = components.text_encoders[0].device
            return (torch.stack([self.embeddings[c][0] for c in captions]).to(device),
                    torch.stack([self.embeddings[c][1] for c in captions]).to(device))

        def training_loss(self, *loss_arguments):
            return self.loss(*loss_arguments)

    return UpstreamHooks()


def timed_noise_draws(train):
    """Time each call of the trainer's per-sample draws (`draw_sample_noise`, once per micro-batch) from
    here on; returns the list the seconds go to."""
    seconds, draw = [], train.draw_sample_noise

    def timed(*arguments):
        start = time.perf_counter()
        drawn = draw(*arguments)
        seconds.append(time.perf_counter() - start)
        return drawn

    train.draw_sample_noise = timed
    return seconds


def run_tiny_row(row, options):
    """One tiny row in this process; returns its measurements."""
    import torch

    import train_t2i_adapter_sdxl as train

    report = {"row": row, "text_cache_mb": 0.0, "latent_cache_mb": 0.0}
    work = options.work_dir
    output_dir = os.path.join(work, f"out-{row}")
    shutil.rmtree(output_dir, ignore_errors=True)  # each run a fresh one: a finished run's folder is refused
    latent_dir = os.path.join(work, "latents")
    batch = row_batch(row, options)
    argv = [
        "--pretrained_model_name_or_path", os.path.join(work, "tiny-sdxl"),
        *(["--train_data_dir", os.path.join(work, "fill", "imagefolder")] if options.data_format == "imagefolder"
          else ["--dataset_name", os.path.join(work, "fill", "parquet")]),
        "--output_dir", output_dir, "--cache_dir", os.path.join(work, "datasets-cache"),
        "--resolution", str(options.resolution), "--train_batch_size", str(batch),
        "--max_train_steps", str(options.warmup + options.steps + 1), "--checkpointing_steps", "100000",
        "--learning_rate", "1e-4", "--seed", "0", "--report_to", "none", "--dataloader_num_workers", "1",
        "--mixed_precision", options.mixed_precision,
    ]
    if row != "upstream":
        argv += shlex.split(options.data_flags)
    if row == "ours+cache":
        argv += ["--cache_latents", "--latent_cache_dir", latent_dir]
    if row == "ours+stream":
        argv += ["--streaming"]
    hooks = upstream_hooks(train, work) if row == "upstream" else timed_hooks(train)()
    draw_seconds = timed_noise_draws(train)
    train.main(train.parse_args(argv), hooks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report.update(getattr(hooks, "report", {}))
    report.update(
        seconds_per_step=hooks.seconds_per_step(options.warmup),
        seconds_to_step_1=hooks.step_times[0] - hooks.start,
        peak_mb=peak_memory_mb(device),
        batch=batch,
    )
    if row != "upstream":  # each sample's noise and timestep drawn from its seed, in the same steps
        report["draw_share"] = statistics.median(draw_seconds[options.warmup:]) / report["seconds_per_step"]
    if row == "ours+cache":
        report["latent_cache_mb"] = folder_mb(latent_dir)
    return report


def prepare_tiny(options):
    from make_fill_dataset import build_fill_dataset
    from make_tiny_sdxl import build_tiny_sdxl

    if not os.path.exists(os.path.join(options.work_dir, "tiny-sdxl", "model_index.json")):
        build_tiny_sdxl(os.path.join(options.work_dir, "tiny-sdxl"))
    build_fill_dataset(os.path.join(options.work_dir, "fill"), num_samples=options.num_samples,
                       resolution=options.resolution, seed=0, num_validation=1)
    if "ours+cache" in options.rows:  # fill the latent cache once, outside the timed rows
        run_child("ours+cache", options)


# ----------------------------------------------------------------------------------------------
# SDXL-size rows: the real SDXL architecture with random weights, on a GPU
# ----------------------------------------------------------------------------------------------



def run_sdxl_row(row, options):
    """Row name 'b<batch>[-gc|-upstream]': one SDXL-size training step timed; returns measurements."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, T2IAdapter, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import train_t2i_adapter_sdxl as train
    from t2i_train.configs import SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_UNET, SDXL_VAE

    batch, checkpointing, upstream = row_batch(row, options), row.endswith("-gc"), row.endswith("-upstream")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = train.weight_dtype_for(options.mixed_precision)
    with torch.device(device):  # random weights drawn where they live: far faster than on the CPU
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype).requires_grad_(upstream)  # upstream never freezes it
        vae = AutoencoderKL(**SDXL_VAE).requires_grad_(False)
        text_encoders = [
            CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)),
            CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
        ]
    text_encoders = [encoder.to(device, dtype).requires_grad_(False) for encoder in text_encoders]
    if checkpointing:
        unet.enable_gradient_checkpointing()
    adapter = T2IAdapter(**train.configs.derive_adapter_config(SDXL_UNET, SDXL_VAE)).to(device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5, fused=device == "cuda")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    sigmas = train.sigma_table(scheduler).to(device)
    resolution = options.resolution
    pixels = torch.randn(batch, 3, resolution, resolution, device=device)
    conditions = torch.rand(batch, 3, resolution, resolution, device=device)
    input_ids = torch.randint(0, 49408, (batch, 77), device=device)
    time_ids = train.compute_time_ids((resolution,) * 2, (0, 0), (resolution,) * 2, batch, device=device)
    if dtype != torch.float32:  # as accelerate's prepare does in the trainer: autocast for the adapter only
        from accelerate.utils import convert_outputs_to_fp32

        adapter.forward = convert_outputs_to_fp32(torch.autocast(device, dtype=dtype)(adapter.forward))
    training_loss = upstream_training_loss(scheduler) if upstream else train.adapter_training_loss

    @torch.no_grad()
    def encode_text():
        outputs = [encoder(input_ids, output_hidden_states=True) for encoder in text_encoders]
        return torch.cat([o.hidden_states[-2] for o in outputs], dim=-1), outputs[1][0]

    precomputed_text = encode_text() if upstream else None  # upstream encodes every caption before training

    def step():
        mean, std = train.encode_latent_distribution(vae, pixels)
        if upstream:  # noise, timesteps and the latent sample from the global RNG, in the loss and here
            noise = timesteps = None
            posterior_noise = torch.randn_like(mean)
        else:  # each sample's own draws, from its seed
            timesteps, posterior_noise, noise = train.draw_sample_noise(range(batch), mean.shape[1:], len(sigmas))
            timesteps, noise = timesteps.to(device), noise.to(device)
        latents = train.sample_latents(mean, std, posterior_noise, vae.config.scaling_factor)
        prompt_embeds, pooled = precomputed_text or encode_text()
        loss = training_loss(unet, adapter, latents, conditions, prompt_embeds,
                             {"text_embeds": pooled, "time_ids": time_ids}, sigmas, "epsilon", dtype, noise, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # training's peak, not the float32 weights drawn above
    start = time.perf_counter()
    step()
    synchronize()
    first = time.perf_counter() - start
    for _ in range(options.warmup):
        step()
    synchronize()
    times = []
    for _ in range(options.steps):
        tick = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - tick)

    # Model FLOPs of the UNet (+adapter) forward and backward with our frozen UNet, the same for every
    # row: no recomputation (gradient checkpointing) and no unused UNet weight gradients (upstream).
    unet.disable_gradient_checkpointing()
    unet.requires_grad_(False)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)
    prompt_embeds = torch.randn(batch, 77, 2048, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(batch, 1280, device=device), "time_ids": time_ids}
    with FlopCounterMode(display=False) as counter:
        train.adapter_training_loss(unet, adapter, latents, conditions, prompt_embeds, added, sigmas,
                                    "epsilon", dtype).backward()
    optimizer.zero_grad(set_to_none=True)
    seconds = statistics.median(times)
    return {
        "row": row, "batch": batch, "seconds_per_step": seconds, "seconds_to_step_1": first,
        "peak_mb": peak_memory_mb(device), "text_cache_mb": 0.0, "latent_cache_mb": 0.0,
        "unet_tflops_per_step": counter.get_total_flops() / 1e12,
        "mfu": counter.get_total_flops() / seconds / (options.peak_tflops * 1e12),
    }


def planned_peak_mb(row, options):
    """scripts/plan_memory.py's planned peak for an SDXL-size row of ours, in MB (None for upstream rows:
    the planner plans this trainer, whose UNet is frozen). Planned on the CPU, in seconds."""
    if row.endswith("-upstream"):
        return None
    import plan_memory

    argv = ["--size", "sdxl", "--resolution", str(options.resolution), "--train_batch_size", str(row_batch(row, options)),
            "--mixed_precision", options.mixed_precision, "--set_grads_to_none"]  # the rows free their gradients
    if row.endswith("-gc"):
        argv.append("--gradient_checkpointing")
    return plan_memory.plan_memory(plan_memory.parse_args(argv))["peak"] / 2**20


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def run_child(row, options):
    """Run one row in a fresh process; its JSON report comes back through a file."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report_path = handle.name
    command = [sys.executable, os.path.abspath(__file__), "--run_row", row, "--row_json", report_path,
               "--size", options.size, "--steps", str(options.steps), "--warmup", str(options.warmup),
               "--resolution", str(options.resolution), "--mixed_precision", options.mixed_precision,
               "--work_dir", options.work_dir, "--peak_tflops", str(options.peak_tflops),
               "--threads", str(options.threads), "--data_format", options.data_format,
               f"--data_flags={options.data_flags}", "--batch_sizes", *map(str, options.batch_sizes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(options.threads), "MKL_NUM_THREADS": str(options.threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{result.stderr[-4000:]}")
    with open(report_path) as f:
        report = json.load(f)
    os.remove(report_path)
    return report


def table(reports, baseline_of):
    """One line per row with the ratio of each to its baseline row (`baseline_of(row name)`)."""
    by_name = {r["row"]: r for r in reports}

    def value(key, digits):
        return lambda r: f"{r[key]:.{digits}f}" if key in r else "—"

    def ratio(key):
        def cell(r):
            baseline = by_name.get(baseline_of(r["row"]), reports[0])
            return f"{r[key] / baseline[key]:.2f}" if key in r and key in baseline else "—"
        return cell

    has_again = any("seconds_to_step_1_again" in r for r in reports)  # tiny rows run more than once
    has_mfu = any("mfu" in r for r in reports)  # SDXL-size rows
    columns = [
        ("row", lambda r: r["row"] + (" (out of memory)" if r.get("out_of_memory") else "")),
        ("batch", lambda r: str(r["batch"])), ("s/step", value("seconds_per_step", 4)),
        ("img/s", lambda r: f"{r['batch'] / r['seconds_per_step']:.1f}" if "seconds_per_step" in r else "—"),
        ("peak MB", value("peak_mb", 0)),
        *([("planned peak MB", value("planned_mb", 0))] if any("planned_mb" in r for r in reports) else []),
        ("s to step 1", value("seconds_to_step_1", 2)),
        *([("s to step 1 again", value("seconds_to_step_1_again", 2))] if has_again else []),
        ("text cache MB", value("text_cache_mb", 2)), ("latent cache MB", value("latent_cache_mb", 2)),
        ("s/step ratio", ratio("seconds_per_step")), ("step-1 ratio", ratio("seconds_to_step_1")),
        *([("again ratio", ratio("seconds_to_step_1_again"))] if has_again else []),
        ("memory ratio", ratio("peak_mb")),
        *([("noise draws", lambda r: f"{100 * r['draw_share']:.2f}% of a step" if "draw_share" in r else "—")]
          if any("draw_share" in r for r in reports) else []),
        *([("UNet TFLOP/step", value("unet_tflops_per_step", 1)),
           ("MFU", lambda r: f"{100 * r['mfu']:.1f}%" if "mfu" in r else "—")] if has_mfu else []),
    ]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in reports]
    return "\n".join(lines)


def run_summary(report):
    """One run's figures on one line."""
    if report.get("out_of_memory"):
        return "out of memory"
    summary = (f"{report['seconds_per_step']:.4f} s/step, {report['peak_mb']:.0f} MB peak,"
               f" {report['seconds_to_step_1']:.2f} s to step 1")
    return summary + (f", MFU {100 * report['mfu']:.1f}%" if "mfu" in report else "")


def main(options):
    tiny = options.size == "tiny"
    options.resolution = options.resolution or (64 if tiny else 1024)
    options.batch_sizes = options.batch_sizes or ([8] if tiny else [1, 4, 16])
    options.mixed_precision = options.mixed_precision or ("no" if tiny else "bf16")
    if options.run_row:  # child
        import torch

        torch.set_num_threads(options.threads)
        try:
            report = (run_tiny_row if tiny else run_sdxl_row)(options.run_row, options)
        except torch.cuda.OutOfMemoryError:  # a row that does not fit is a result, not a failure
            report = {"row": options.run_row, "batch": row_batch(options.run_row, options), "out_of_memory": True}
        with open(options.row_json, "w") as f:
            json.dump(report, f)
        return

    options.work_dir = options.work_dir or tempfile.mkdtemp(prefix="t2i-benchmark-")
    if tiny:
        prepare_tiny(options)
        rows = list(options.rows)
    else:
        rows = [f"b{b}{suffix}" for b in options.batch_sizes for suffix in ("-upstream", "", "-gc")]
    runs = {row: [] for row in rows}
    for repeat in range(options.repeats):
        for row in rows if repeat % 2 == 0 else reversed(rows):
            if any(r.get("out_of_memory") for r in runs[row]):
                continue
            if tiny and repeat % 2 == 0:  # even repeats are first runs on these files, odd ones re-runs
                forget_sample_checks(options.work_dir)
            report = run_child(row, options)
            runs[row].append(report)
            # Each run's figures as they come: a run cut short still leaves them in the log.
            print(f"  {row} (run {repeat + 1}): {run_summary(report)}", file=sys.stderr, flush=True)
    reports = []
    for row in rows:
        out_of_memory = [r for r in runs[row] if r.get("out_of_memory")]
        if out_of_memory:
            reports.append(out_of_memory[0])
            continue
        # Best of the repeats: on a shared machine noise only ever adds time.
        best = dict(min(runs[row], key=lambda r: r["seconds_per_step"]))
        to_step_1 = [r["seconds_to_step_1"] for r in runs[row]]
        if tiny:
            best["seconds_to_step_1"] = min(to_step_1[0::2])
            if len(to_step_1) > 1:  # re-runs on the same files, as after a restart
                best["seconds_to_step_1_again"] = min(to_step_1[1::2])
        else:
            best["seconds_to_step_1"] = min(to_step_1)
        reports.append(best)
    if not tiny:  # next to torch.cuda.max_memory_allocated: what scripts/plan_memory.py planned for the row
        for report in reports:
            planned = planned_peak_mb(report["row"], options)
            if planned is not None:
                report["planned_mb"] = planned
    print(f"size={options.size} resolution={options.resolution} mixed_precision={options.mixed_precision}"
          f" steps={options.steps} (best of {options.repeats}) threads={options.threads}" + (f" samples={options.num_samples} data={options.data_format}" if tiny else "")
          + (f" our rows with: {options.data_flags}" if tiny and options.data_flags else ""))
    print(table(reports, (lambda row: "upstream") if tiny else (lambda row: row.split("-")[0] + "-upstream")))
    if options.output_json:
        with open(options.output_json, "w") as f:
            json.dump(reports, f, indent=2)


if __name__ == "__main__":
    main(parse_args())
