"""See what you train on (--dump_samples N): the first N training pairs of the run's plan, transformed
exactly as the loop will take them (image, condition, caption, target size, crop), drawn as one grid
and listed as JSON in the output folder before any model loads, and logged to the trackers before
step 1. A wrong column, a misaligned condition or a crop that cuts the subject shows before a run is
paid for."""

import os
import textwrap

from accelerate.logging import get_logger
from PIL import Image, ImageDraw, ImageFont

from .files import write_json_atomically
from .loader import PlannedBatchSampler, PlannedPairs, row_targets, undecoded_images

logger = get_logger(__name__)

GRID_FILE, LIST_FILE = "training_samples.png", "training_samples.json"
CELL = 160  # the long side of each image in the grid, in pixels
COLUMNS = 4  # pairs per row of the grid
TEXT_LINES, TEXT_WIDTH = 4, 44  # lines and characters of each pair's caption band


def first_planned_keys(targets, total_batch, seed, count):
    """The (row, target size, seed) of the first `count` samples of the run's first epoch, in the order
    its optimisation steps take them (on any number of processes: the plan is of total batches)."""
    plan = PlannedBatchSampler(targets, total_batch, total_batch, seed).epoch_plan(0)
    return [key for batch in plan for key in batch][:count]


def planned_pairs(train_data, transform, args, seed, total_batch, multiple, count):
    """[(key, pair)] of the first `count` planned samples, through the training transform."""
    pairs = PlannedPairs(undecoded_images(train_data.dataset, args), transform)
    keys = first_planned_keys(row_targets(train_data.sizes, args, multiple), total_batch, seed, count)
    return [(key, pairs[key]) for key in keys]


def to_image(tensor, low):
    """A CHW tensor in [low, 1] as an RGB image."""
    array = ((tensor.float().clamp(low, 1) - low) / (1 - low) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def describe(key, pair):
    """What the grid and the list say of a pair."""
    (row, (height, width), _), original = key, pair["original_sizes"].tolist()
    top, left = pair["crop_top_lefts"].tolist()
    return {"row": row, "caption": pair["captions"], "target_size": [height, width], "original_size": original,
            "crop_top_left": [top, left]}


def draw_grid(samples):
    """One image of `samples` ([(key, pair)]): for each pair, its image and condition side by side above
    its caption, row, target size and crop."""
    font = ImageFont.load_default()
    band = 12 * (TEXT_LINES + 1)
    tile_width, tile_height = 2 * CELL + 12, CELL + band + 8
    rows = -(-len(samples) // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * tile_width, rows * tile_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, (key, pair) in enumerate(samples):
        x, y = (index % COLUMNS) * tile_width + 4, (index // COLUMNS) * tile_height + 4
        for offset, picture in ((0, to_image(pair["pixel_values"], -1)), (CELL + 4, to_image(pair["conditioning_pixel_values"], 0))):
            picture.thumbnail((CELL, CELL))
            grid.paste(picture, (x + offset, y))
        facts = describe(key, pair)
        caption = textwrap.wrap(facts["caption"] or "(empty prompt)", TEXT_WIDTH)
        if len(caption) > TEXT_LINES - 1:
            caption = [*caption[: TEXT_LINES - 2], caption[TEXT_LINES - 2][: TEXT_WIDTH - 1] + "…"]
        where = (f"row {facts['row']}: {facts['target_size'][0]}x{facts['target_size'][1]}, crop"
                 f" {tuple(facts['crop_top_left'])} of {facts['original_size'][0]}x{facts['original_size'][1]}")
        for line, text in enumerate([where, *caption]):
            draw.text((x, y + CELL + 4 + 12 * line), text, fill="black", font=font)
    return grid


def write_sample_grid(train_data, transform, args, seed, total_batch, multiple, count, output_dir):
    """Draw and list the first `count` pairs in `output_dir`; returns the grid, for the trackers."""
    samples = planned_pairs(train_data, transform, args, seed, total_batch, multiple, count)
    grid = draw_grid(samples)
    grid.save(os.path.join(output_dir, GRID_FILE))
    write_json_atomically(os.path.join(output_dir, LIST_FILE), [describe(key, pair) for key, pair in samples])
    logger.info(f"Wrote the first {len(samples)} training pairs to {os.path.join(output_dir, GRID_FILE)} (and"
                f" {LIST_FILE}): look at them before the run goes far.")
    return grid
