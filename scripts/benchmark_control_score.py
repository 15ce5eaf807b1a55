#!/usr/bin/env python
"""What the conditioning gain costs a run: one measurement of it (forward passes only: each pair
with its true and with another pair's condition, once per quarter of the timesteps) against one
training step (VAE encode, text encoders, adapter and UNet forward and backward, optimiser step),
timed alternately in one process on the trainer's own functions, and the overhead that follows for a
run that validates every --validation_steps steps. Prints a table.

Example: python scripts/benchmark_control_score.py --pairs 16 32 --train_batch_size 8
"""

import argparse
import os
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 32], help="Validation pair counts to time.")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--validation_steps", type=int, default=100, help="For the overhead column.")
    parser.add_argument("--repeats", type=int, default=5, help="Timings of each (median kept).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work_dir", default=None, help="Where the tiny model and data go (default: a temp dir).")
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_args(argv)
    import torch
    from accelerate import PartialState

    import train_t2i_adapter_sdxl as train
    from make_fill_dataset import build_fill_dataset
    from make_tiny_sdxl import build_tiny_sdxl

    torch.set_num_threads(options.threads)
    PartialState()  # the trainer's functions log through accelerate's logger
    work_dir = options.work_dir or tempfile.mkdtemp(prefix="control-score-bench-")
    model = build_tiny_sdxl(os.path.join(work_dir, "tiny-sdxl"), seed=0,
                            pretrained_base=os.path.join(ROOT, "assets", "tiny-fill-base"))
    fill = build_fill_dataset(os.path.join(work_dir, "fill"), num_samples=256, resolution=options.resolution,
                              seed=0, num_validation=0)
    args = train.parse_args([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", fill["imagefolder"],
        "--resolution", str(options.resolution), "--train_batch_size", str(options.train_batch_size),
        "--validation_pairs", str(max(options.pairs)), "--seed", "0",
    ])
    components = train.load_models(args, train.check_inputs(args))
    adapter = components.adapter
    data_config = train.data.DataConfig.from_args(args)
    training_data = train.data.load_training_data(data_config, 0, train.data.recorded_scan_samples)
    device, weight_dtype = torch.device("cpu"), torch.float32
    pairs = train.prepare_control_pairs(train.control_pair_batch(training_data.control_pairs, data_config),
                                        components, args, device)
    batch = train.control_pair_batch(training_data.dataset.select(range(options.train_batch_size)), data_config)
    scheduler = components.noise_scheduler
    sigmas = train.sigma_table(scheduler)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)

    def training_step():
        loss = train.batch_loss(batch, components, adapter, sigmas, args, weight_dtype, device, train.RunHooks())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def gain(count):
        subset = train.control.ControlPairs(*(tensor[:count] for tensor in pairs))
        loss = train.pair_loss(components.unet, adapter, sigmas, scheduler.config.prediction_type, weight_dtype)
        return lambda: train.control.conditioning_gain(loss, subset, len(sigmas), args.train_batch_size)

    timed = {"training step": training_step, **{f"gain, {count} pairs": gain(count) for count in options.pairs}}
    times = {name: [] for name in timed}
    for work in timed.values():  # warm-up
        work()
    for _ in range(options.repeats):
        for name, work in timed.items():
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    step = statistics.median(times["training step"])
    print(f"Tiny SDXL at {options.resolution}², batch {options.train_batch_size}, {options.threads} thread(s),"
          f" median of {options.repeats}:")
    print()
    print(f"| measured | s | × a training step | overhead at --validation_steps {options.validation_steps} |")
    print("| --- | --- | --- | --- |")
    for name in timed:
        median = statistics.median(times[name])
        overhead = "" if name == "training step" else f"{100 * median / step / options.validation_steps:.1f} %"
        print(f"| {name} | {median:.3f} | {median / step:.2f} | {overhead} |")


if __name__ == "__main__":
    main()
