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

from .errors import UserInputError

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
    """Logs the epoch line on global rank 0 and keeps a copy of the best weights so far.

    `on_train_epoch_end` runs after the epoch's validation in Lightning 2, so both the train
    and the validation metrics are there.
    """

    def __init__(self, monitor: str | None, epochs: int) -> None:
        self.monitor = monitor
        self.epochs = epochs
        self.mode = "min" if monitor == "valid_loss" else "max"
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
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
            [pl_module.images_seen, pl_module.images_skipped], dtype=torch.float64,
            device=pl_module.device,
        )
        seen, skipped = (int(v) for v in trainer.strategy.reduce(local, reduce_op="sum").tolist())
        values["images_skipped"] = skipped
        if trainer.world_size > 1:
            log.info("rank %d trained on %d images in epoch %d (%d on all %d ranks)",
                     trainer.global_rank, pl_module.images_seen, epoch, seen, trainer.world_size)
        if seen == 0:
            raise UserInputError(
                f"no training image could be read in epoch {epoch} (every one failed to load; "
                "the log names them); check that the image files are valid."
            )
        self.history.append({"epoch": epoch, **{k: v for k, v in values.items() if v is not None}})
        if trainer.is_global_zero:
            log.info(epoch_line(epoch, self.epochs, values))
        score = values.get(self.monitor) if self.monitor else None
        if self.monitor is None or self._improved(score):
            self.best_score, self.best_epoch = score, epoch
            self.best_metrics = {k: v for k, v in values.items() if v is not None}
            # A CPU copy: the weights of the best epoch so far, written as the model at the end.
            net = pl_module.bench.model
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}

    # Saved in checkpoints, so that a resumed job keeps its history and its best epoch.
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "best_state": self.best_state,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def _improved(self, score: float | None) -> bool:
        if score is None or not math.isfinite(score):
            return self.best_state is None
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

