#!/usr/bin/env python
"""Plot the control curve of a training run from its tensorboard logs: the conditioning gain that
validation logs (overall and per quarter of the timesteps), and the validation loss with the true
condition and with another pair's condition, against the step. Drawn with PIL, so nothing beyond
the trainer's own requirements is needed.

Example (after `bash scripts/demo.sh`):

    python scripts/plot_control_curve.py --logdir demo/adapter/logs --output assets/control_curve.png
"""

import argparse
import glob
import math
import os

from PIL import Image, ImageDraw, ImageFont

GAIN = "validation/conditioning_gain"
LOSSES = {"validation/loss_true_condition": "true condition", "validation/loss_shuffled_condition": "another pair's"}
RANGE_COLOURS = [(150, 190, 235), (110, 160, 220), (70, 125, 200), (35, 85, 170)]
MAIN_COLOUR, SECOND_COLOUR = (200, 60, 30), (30, 30, 30)
PANEL = (560, 360)  # width, height of each panel
MARGIN = (70, 30, 20, 50)  # left, top, right, bottom


def tensorboard_scalars(logdir):
    """{tag: [(step, value), ...]} of every scalar logged under `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


def nice_ticks(low, high, count=5):
    """Round tick values (steps of 1, 2 or 5 × a power of ten) from below `low` to above `high`."""
    raw = max(high - low, 1e-9) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step) + 1)]


def draw_panel(title, series, y_label, include_zero=True):
    """A line chart: `series` is [(name, colour, width, [(step, value), ...]), ...]."""
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], PANEL[0] - MARGIN[2], PANEL[1] - MARGIN[3]
    steps = [step for *_, points in series for step, _ in points]
    values = [value for *_, points in series for _, value in points]
    y_ticks = nice_ticks(min(values + [0.0] * include_zero), max(values))
    x_low, x_high = min(steps), max(steps)
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def at(step, value):
        x = left + (step - x_low) / max(x_high - x_low, 1) * (right - left)
        y = bottom - (value - y_low) / max(y_high - y_low, 1e-9) * (bottom - top)
        return x, y

    for tick in y_ticks:
        _, y = at(x_low, tick)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick:g}", fill="black", font=font, anchor="rm")
    for tick in nice_ticks(x_low, x_high):
        if x_low <= tick <= x_high:
            x, _ = at(tick, y_low)
            draw.text((x, bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, 8), title, fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, PANEL[1] - 16), "optimisation step", fill="black", font=font, anchor="mt")
    draw.text((6, top - 18), y_label, fill="black", font=font)
    for index, (name, colour, width, points) in enumerate(series):
        draw.line([at(step, value) for step, value in points], fill=colour, width=width)
        for step, value in points:
            x, y = at(step, value)
            draw.ellipse([x - width, y - width, x + width, y + width], fill=colour)
        draw.line([(left + 10, top + 12 + 14 * index), (left + 30, top + 12 + 14 * index)], fill=colour, width=width)
        draw.text((left + 36, top + 12 + 14 * index), name, fill="black", font=font, anchor="lm")
    return image


def plot_control_curve(logdir, output):
    scalars = tensorboard_scalars(logdir)
    if GAIN not in scalars:
        raise SystemExit(f"No {GAIN} under {logdir}: was the run given --validation_pairs or a validation set?")
    ranges = sorted((tag for tag in scalars if tag.startswith(GAIN + "_t")), key=lambda tag: int(tag.split("_t")[-1].split("_")[0]))
    gain_series = [
        (f"t in [{tag.split('_t')[-1].replace('_', ', ')})", RANGE_COLOURS[i % len(RANGE_COLOURS)], 1, scalars[tag])
        for i, tag in enumerate(ranges)
    ]
    gain_series.append(("all timesteps", MAIN_COLOUR, 3, scalars[GAIN]))
    loss_series = [(name, colour, 2, scalars[tag])
                   for (tag, name), colour in zip(LOSSES.items(), (MAIN_COLOUR, SECOND_COLOUR))]
    panels = [draw_panel("conditioning gain on held-out pairs", gain_series, "1 - loss(true) / loss(other)"),
              draw_panel("validation loss", loss_series, "loss", include_zero=False)]
    figure = Image.new("RGB", (PANEL[0] * len(panels), PANEL[1]), "white")
    for index, panel in enumerate(panels):
        figure.paste(panel, (index * PANEL[0], 0))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.save(output)
    return scalars[GAIN]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot the conditioning gain and validation losses of a run.")
    parser.add_argument("--logdir", required=True, help="The run's tensorboard folder (--output_dir/logs).")
    parser.add_argument("--output", required=True, help="The PNG to write.")
    args = parser.parse_args(argv)
    curve = plot_control_curve(args.logdir, args.output)
    print("step  conditioning gain")
    for step, gain in curve:
        print(f"{step:>5}  {gain:.4f}")
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
