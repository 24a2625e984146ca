"""One plain log line per epoch, and the SageMaker MetricDefinitions whose regexes match it.

SageMaker reads metrics from the log with regular expressions; progress bars that redraw with
carriage returns cannot be matched, so every epoch ends with one line of name=value pairs.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch

from ..errors import UserInputError

log = logging.getLogger("sm_effdet.metrics")

NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

# (SageMaker metric name, key in the epoch line)
METRICS = (
    ("train:loss", "train_loss"),
    ("validation:loss", "valid_loss"),
    ("validation:mAP", "valid_map"),
    ("validation:mAP_50", "valid_map_50"),
    # COCO's AP for small (< 32x32 px), medium and large boxes; left out when there are none.
    ("validation:mAP_small", "valid_map_small"),
    ("validation:mAP_medium", "valid_map_medium"),
    ("validation:mAP_large", "valid_map_large"),
    ("validation:images", "valid_images"),
    ("train:learning_rate", "lr"),
    ("train:epoch_time_seconds", "epoch_time"),
    ("train:images_skipped", "images_skipped"),
)


def metric_definitions() -> list[dict[str, str]]:
    """MetricDefinitions for CreateTrainingJob (Name, Regex), matching `epoch_line`."""
    return [{"Name": name, "Regex": rf"\bepoch=\d+/\d+ .*\b{key}={NUMBER}"} for name, key in METRICS]


def epoch_line(epoch: int, epochs: int, values: dict[str, float]) -> str:
    parts = [f"epoch={epoch}/{epochs}"]
    for _, key in METRICS:
        if key in values and values[key] is not None and math.isfinite(values[key]):
            parts.append(f"{key}={values[key]:.6g}")
    return " ".join(parts)


def _value(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None else None


class EpochSummary(L.Callback):
    """Logs the epoch line on global rank 0 and keeps the history of every epoch's values.

    `on_train_epoch_end` runs after the epoch's validation in Lightning 2, so both the train
    and the validation metrics are there. The best epoch is best_model.BestModel's.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.history: list[dict[str, float]] = []
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        values = {key: _value(metrics, key) for _, key in METRICS if key in metrics}
        values["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        values["epoch_time"] = time.monotonic() - self._start
        epoch = trainer.current_epoch + 1
        # Summed over every rank (each saw its shard); a collective, so every rank runs it.
        local = torch.tensor(
            [pl_module.images_seen, pl_module.images_skipped, pl_module.batches_attempted],
            dtype=torch.float64, device=pl_module.device,
        )
        totals = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        seen, skipped, attempted = (int(v) for v in totals)
        values["images_skipped"] = skipped
        if trainer.world_size > 1:
            log.info("rank %d trained on %d images in epoch %d (%d on all %d ranks)",
                     trainer.global_rank, pl_module.images_seen, epoch, seen, trainer.world_size)
        # Only batches tried in this run count: an epoch resumed after its last training step
        # (stopped in validation) has none left, which says nothing about the images.
        if seen == 0 and attempted > 0:
            raise UserInputError(
                f"no training image could be read in epoch {epoch} (every one failed to load; "
                "the log names them); check that the image files are valid."
            )
        self.history.append({"epoch": epoch, **{k: v for k, v in values.items() if v is not None}})
        if trainer.is_global_zero:
            log.info(epoch_line(epoch, self.epochs, values))

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Epoch 0: the starting weights, validated before the first step when the job turns
        Lightning's sanity check into a full validation (a warm start, see job.py), so that the
        start is in the history and can be the best epoch."""
        metrics = trainer.callback_metrics
        values = {key: _value(metrics, key) for _, key in METRICS
                  if key.startswith("valid_") and key in metrics}
        self.history.append({"epoch": 0, **{k: v for k, v in values.items() if v is not None}})
        if trainer.is_global_zero:
            log.info("%s (the starting weights, before training)", epoch_line(0, self.epochs, values))

    # Saved in checkpoints, so that a resumed job keeps its history.
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state.get("history", [])
