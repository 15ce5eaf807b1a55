"""Images to the trackers: validation images and the training-sample grid, for each tracker that takes images
(tensorboard, wandb), in one place."""

import numpy as np
from accelerate.logging import get_logger

logger = get_logger(__name__)


def log_validation_images(image_logs, trackers, step, prefix="validation"):
    """Send each (condition, samples) set to every tracker (the raw weights' of an EMA run under `prefix`)."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            for log in image_logs:
                stack = np.stack([np.asarray(image) for image in [log["validation_image"], *log["images"]]])
                tag = log["validation_prompt"] if prefix == "validation" else f"{prefix}/{log['validation_prompt']}"
                tracker.writer.add_images(tag, stack, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb  # here: an optional tracker, slow to import, needed only with --report_to wandb

            formatted = []
            for log in image_logs:
                formatted.append(wandb.Image(log["validation_image"], caption="adapter conditioning"))
                formatted += [wandb.Image(image, caption=log["validation_prompt"]) for image in log["images"]]
            tracker.log({prefix: formatted}, step=step)
        else:
            logger.warning(f"Image logging is not implemented for {tracker.name}.")


def log_sample_grid(grid, trackers):
    """The grid of training samples (sample_grid) to every tracker that takes images, at step 0."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("training_samples", np.asarray(grid), 0, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb  # optional: only --report_to wandb needs it

            tracker.log({"training_samples": wandb.Image(grid)}, step=0)
