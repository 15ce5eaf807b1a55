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


def run_training(argv):
    """Run the training script's main() in this process (much faster than a subprocess).

    accelerate keeps process-wide singletons; they are reset so each run starts clean.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_t2i_adapter_sdxl as train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    try:
        return train.main(train.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def load_adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def max_weight_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)
