"""Helpers the tests import: small training command lines and in-process runs of the script."""

import os

RESOLUTION = 64


def training_argv(model, data, output_dir, *extra):
    """A small, fast training command line on the tiny model."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data["imagefolder"]),
        "--output_dir", str(output_dir),
        "--resolution", str(RESOLUTION),
        "--train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--seed", "0",
        "--dataloader_num_workers", "0",
        "--report_to", "none",
        *map(str, extra),
    ]


def run_training(argv, hooks=None):
    """Run the training script's main() (with `hooks`, a RunHooks) in this process (much faster than a subprocess).

    accelerate keeps process-wide singletons; they are reset so each run starts clean.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_t2i_adapter_sdxl as train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    try:
        return train.main(train.parse_args(argv), hooks)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def load_adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def max_weight_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def make_shapes_sample(rng, resolution):
    """(image, caption): one or two ellipses, rectangles or triangles in a colour, each with a
    striped texture, on a softly shaded background of another colour. Images with real structure
    for canny adapters (edges of shapes and of their textures), not fill circles."""
    from PIL import Image, ImageDraw

    from make_fill_dataset import COLORS

    def shade(colour, amount):
        return tuple(int(min(255, max(0, channel + amount))) for channel in colour)

    names = list(COLORS)
    fill, background = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    image = Image.new("RGB", (resolution, resolution), COLORS[background])
    draw = ImageDraw.Draw(image)
    for y in range(resolution):  # a soft vertical shading of the background: texture without edges
        draw.line([(0, y), (resolution, y)], fill=shade(COLORS[background], 40 * y / resolution - 20))
    kinds = []
    for _ in range(int(rng.integers(1, 3))):
        kind = ["ellipse", "rectangle", "triangle"][int(rng.integers(3))]
        kinds.append(kind)
        width, height = (int(rng.integers(resolution // 4, resolution // 2)) for _ in range(2))
        left, top = int(rng.integers(0, resolution - width)), int(rng.integers(0, resolution - height))
        box = (left, top, left + width, top + height)
        mask = Image.new("L", image.size, 0)
        mask_draw = ImageDraw.Draw(mask)
        if kind == "ellipse":
            mask_draw.ellipse(box, fill=255)
        elif kind == "rectangle":
            mask_draw.rectangle(box, fill=255)
        else:
            mask_draw.polygon([(left, top + height), (left + width // 2, top), (left + width, top + height)], fill=255)
        texture = Image.new("RGB", image.size, COLORS[fill])
        texture_draw = ImageDraw.Draw(texture)
        for y in range(top + 4, top + height, 8):  # broad stripes inside the shape
            texture_draw.line([(left, y), (left + width, y)], fill=shade(COLORS[fill], -90), width=3)
        image.paste(texture, (0, 0), mask)
    caption = f"{fill} {' and '.join(kinds)} with {background} background"
    return image, caption


def build_shapes_dataset(folder, num_samples, num_validation, resolution=RESOLUTION, seed=0):
    """An imagefolder of textured shapes (images and captions, no conditions: canny makes them),
    with `train/` and `validation/` splits. Returns {"imagefolder", "validation_prompts",
    "validation_images"}: the validation images are the canny edge maps (at the thresholds the
    control metric uses) of the validation split's images."""
    import json

    import numpy as np

    from t2i_train import control, images

    rng = np.random.default_rng([seed, 7])
    prompts, edge_maps = [], []
    for split, count in (("train", num_samples), ("validation", num_validation)):
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        with open(os.path.join(folder, split, "metadata.jsonl"), "w") as metadata:
            for index in range(count):
                image, caption = make_shapes_sample(rng, resolution)
                image.save(os.path.join(folder, split, f"{index:05d}.png"))
                metadata.write(json.dumps({"file_name": f"{index:05d}.png", "text": caption}) + "\n")
                if split == "validation":
                    edge_map = os.path.join(folder, f"edges_{index}.png")
                    images.canny_condition(image, *control.CONTROL_CANNY_THRESHOLDS).save(edge_map)
                    prompts.append(caption)
                    edge_maps.append(edge_map)
    return {"imagefolder": str(folder), "validation_prompts": prompts, "validation_images": edge_maps}


def wandb_offline_history(run_file):
    """[{key: value}, ...]: what an offline wandb run logged, read back from its run-*.wandb file
    (a LevelDB-style log of 32 KiB blocks, each record a protobuf `Record`, after a 7-byte header)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{run_file} is not a wandb run file"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a record header is padding
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        if length == 0 and kind == 0:
            position += room
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
    history = []
    for payload in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history
