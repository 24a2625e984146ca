"""Choosing and keeping the best epoch's weights: the EMA's when it is on.

Runs after EpochSummary in the callback list, so the epoch's line (train and validation
metrics; `on_train_epoch_end` follows the epoch's validation in Lightning 2) is in its history.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from .metrics_log import EpochSummary


class BestModel(L.Callback):
    def __init__(self, monitor: str | None, summary: EpochSummary) -> None:
        self.monitor = monitor
        self.summary = summary
        self.mode = "min" if monitor == "valid_loss" else "max"
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def history(self) -> list[dict[str, float]]:
        return self.summary.history

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consider_last_epoch(pl_module)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch 0, the starting weights of a warm start (EpochSummary): a later epoch must beat
        # them to become the model, so a warm start never ends worse than it began.
        self._consider_last_epoch(pl_module)

    def _consider_last_epoch(self, pl_module: L.LightningModule) -> None:
        values = dict(self.summary.history[-1])
        epoch = int(values.pop("epoch"))
        score = values.get(self.monitor) if self.monitor else None
        if self.monitor is None or self._improved(score):
            self.best_score, self.best_epoch, self.best_metrics = score, epoch, values
            # A CPU copy of the weights that were validated, written as the model at the end.
            net = pl_module.eval_net()
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}

    # Saved in checkpoints, so that a resumed job keeps its best epoch.
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("best_score", "best_epoch", "best_metrics", "best_state"):
            if key in state:
                setattr(self, key, state[key])

    def _improved(self, score: float | None) -> bool:
        if score is None or not math.isfinite(score):
            return self.best_state is None
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score
