"""Test helper: run the training script under torchrun and save each rank's final adapter weights
to $RANK_WEIGHTS_DIR/rank<N>.safetensors, so a test can check that all ranks agree, the dataset
rows each rank trained on, in order, to $RANK_WEIGHTS_DIR/rank<N>-rows.json (with 0 DataLoader
workers, which run in this process), and the rows its share of the sample check inspected to
rank<N>-checked.json.

Usage: ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py <training flags>
"""

import json
import os

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import train_t2i_adapter_sdxl as train  # noqa: E402
from t2i_train import data, loader

end_training = Accelerator.end_training
get_pair = loader.PlannedPairs.__getitem__
inspect_rows = data.inspect_rows
rows_seen, rows_checked = [], []


def save_rank_weights_then_end_training(accelerator):
    adapter = accelerator.unwrap_model(accelerator._models[0])
    state = {key: value.detach().cpu().contiguous() for key, value in adapter.state_dict().items()}
    folder = os.environ["RANK_WEIGHTS_DIR"]
    save_file(state, os.path.join(folder, f"rank{accelerator.process_index}.safetensors"))
    with open(os.path.join(folder, f"rank{accelerator.process_index}-rows.json"), "w") as f:
        json.dump(rows_seen, f)
    with open(os.path.join(folder, f"rank{accelerator.process_index}-checked.json"), "w") as f:
        json.dump(rows_checked, f)
    end_training(accelerator)


def record_rows_then_inspect(dataset, args, rows, *more, **named):
    rows_checked.extend(rows)
    return inspect_rows(dataset, args, rows, *more, **named)


def record_row_then_get_pair(pairs, key):
    rows_seen.append(key[0])
    return get_pair(pairs, key)


if __name__ == "__main__":
    Accelerator.end_training = save_rank_weights_then_end_training
    loader.PlannedPairs.__getitem__ = record_row_then_get_pair
    data.inspect_rows = record_rows_then_inspect
    train.main(train.parse_args())
