"""Test helper: run the training script under torchrun and save each rank's final adapter weights
to $RANK_WEIGHTS_DIR/rank<N>.safetensors, so a test can check that all ranks agree, and the dataset
rows each rank trained on, in order, to $RANK_WEIGHTS_DIR/rank<N>-rows.json (with 0 DataLoader
workers, which run in this process).

Usage: ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py <training flags>
"""

import json
import os

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import train_t2i_adapter_sdxl as train  # noqa: E402
from t2i_train import loader

end_training = Accelerator.end_training
get_pair = loader.PlannedPairs.__getitem__
rows_seen = []


def save_rank_weights_then_end_training(accelerator):
    adapter = accelerator.unwrap_model(accelerator._models[0])
    state = {key: value.detach().cpu().contiguous() for key, value in adapter.state_dict().items()}
    folder = os.environ["RANK_WEIGHTS_DIR"]
    save_file(state, os.path.join(folder, f"rank{accelerator.process_index}.safetensors"))
    with open(os.path.join(folder, f"rank{accelerator.process_index}-rows.json"), "w") as f:
        json.dump(rows_seen, f)
    end_training(accelerator)


def record_row_then_get_pair(pairs, key):
    rows_seen.append(key[0])
    return get_pair(pairs, key)


if __name__ == "__main__":
    Accelerator.end_training = save_rank_weights_then_end_training
    loader.PlannedPairs.__getitem__ = record_row_then_get_pair
    train.main(train.parse_args())
