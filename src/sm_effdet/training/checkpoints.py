"""Resumable checkpoints: written atomically, pruned, found again and checked at start.

A checkpoint is Lightning's full training state (model, optimiser, scheduler, loop progress,
callbacks) plus this job's own: random generator states and what the model was built for
(backbone, image size, classes, data split). It is written at the end of every epoch, every
`checkpoint_every_minutes`, and when the job is stopped (SIGTERM from StopTrainingJob, spot
interruption or MaxRuntime; SIGINT locally). SageMaker syncs the folder to S3.
"""

from __future__ import annotations

import functools
import io
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .. import stops
from ..errors import UserInputError
from ..model.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
SUFFIX = ".ckpt"
KEEP = 2  # the newest and the one before, in case the newest cannot be read
NAME = re.compile(rf"^{PREFIX}(?P<host>.+)-epoch(?P<epoch>\d+)-step(?P<step>\d+){SUFFIX}$")
META_KEY = "sm_effdet"
RNG_KEY = "sm_effdet_rng"
FIT_KEYS = ("backbone", "img_size", "classes")
# Hyperparameters a resumed job may change: they say how and where it runs, not what it trains.
# precision too, because `auto` resolves by instance type and a spot restart may land elsewhere;
# weights and optimiser state are float32 in every mode. `epochs` may grow (not shrink), to
# extend a run. Any other difference means the checkpoint belongs to another training run.
RESUME_MAY_CHANGE = frozenset(
    {"num_workers", "devices", "checkpoint_every_minutes", "early_stopping_patience",
     "precision", "num_classes", "tensorboard", "export_onnx"}
)

# Hyperparameters added after checkpoints began to record them, with the value that reproduces a
# job from before: a checkpoint without the key resumes when the job has that value.
PREDATES = {"bn_momentum": 0.01, "bn_stats_images": 0, "recipe": "short"}


def checkpoint_name(host: str, epoch: int, step: int) -> str:
    safe_host = re.sub(r"[^A-Za-z0-9_.-]", "_", host)
    return f"{PREFIX}{safe_host}-epoch{epoch:04d}-step{step:09d}{SUFFIX}"


def list_checkpoints(folder: Path) -> list[Path]:
    """This job's checkpoint files, newest (by step, then time) first."""
    if not folder.is_dir():
        return []
    found = [(p, NAME.match(p.name)) for p in folder.iterdir() if p.is_file()]

    def key(item: tuple[Path, re.Match]) -> tuple[int, float]:
        path, match = item
        return int(match["step"]), path.stat().st_mtime

    return [p for p, _ in sorted(((p, m) for p, m in found if m), key=key, reverse=True)]


def rng_states() -> dict[str, Any]:
    # Only tensors and plain values, so that the file loads with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class CheckpointScan:
    """What the checkpoint folder held at start: the checkpoint to resume (if any), the files
    that could not be read, and the older ones never opened (superseded by the resumed one)."""

    resume: tuple[Path, dict[str, Any]] | None = None
    unreadable: list[Path] = field(default_factory=list)
    older: list[Path] = field(default_factory=list)

    @property
    def resumed_from(self) -> Path | None:
        return self.resume[0] if self.resume else None


def scan_checkpoints(folder: Path, expected: dict[str, Any]) -> CheckpointScan:
    """The newest readable checkpoint that fits this job (an unfit one is refused, not loaded),
    and the files that cannot be read, which retention leaves alone."""
    scan = CheckpointScan()
    found = list_checkpoints(folder)
    for index, path in enumerate(found):
        stops.pause_for_test("checkpoint-load")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            meta = checkpoint[META_KEY]
            epoch, step = checkpoint["epoch"], checkpoint["global_step"]
        except Exception as exc:
            log.warning("checkpoint %s cannot be read (%s: %s); trying an older one",
                        path.name, type(exc).__name__, " ".join(str(exc).split())[:120])
            scan.unreadable.append(path)
            continue
        for key in FIT_KEYS:
            if meta.get(key) != expected[key]:
                raise UserInputError(
                    f"checkpoint {path} was made for {key} {meta.get(key)!r:.200} but this job "
                    f"has {expected[key]!r:.200}; remove it from the checkpoint location, give the "
                    "job another CheckpointConfig S3 location, or use the same settings."
                )
        check_hyperparameters(path, meta.get("hyperparameters"), expected.get("hyperparameters"))
        scan.resume = path, {"epoch": epoch, "step": step, **meta}
        scan.older = found[index + 1 :]
        break
    if scan.unreadable:
        log.warning("%d checkpoint files cannot be read and are left alone (neither resumed nor "
                    "deleted): %s", len(scan.unreadable), _names(scan.unreadable))
    return scan


def find_resumable(folder: Path, expected: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    return scan_checkpoints(folder, expected).resume


def _names(paths: list[Path], limit: int = 10) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_hyperparameters(path: Path, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
    """Refuse to resume a checkpoint made with other training-defining hyperparameters."""
    if old is None or new is None:  # written before checkpoints recorded them: resume as before
        return
    differ = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key, PREDATES.get(key)), new.get(key)
        if key in RESUME_MAY_CHANGE or before == now:
            continue
        if key == "epochs" and isinstance(before, int) and isinstance(now, int) and now > before:
            continue
        differ.append(f"{key} {_short(before)} (now {_short(now)})")
    if differ:
        raise UserInputError(
            f"checkpoint {path.name} in {_short(str(path.parent))} was made with other "
            f"hyperparameters: {'; '.join(differ[:8])}{'; ...' if len(differ) > 8 else ''}; to "
            "resume, restore those values; to start a new training run, give the job a new "
            "checkpoint location (CheckpointConfig)."
        )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) or "/" not in value else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ResumableCheckpoints(L.Callback):
    """Writes this job's checkpoints and keeps the KEEP newest of those it knows it can read.

    Retention goes by what this job wrote (and the checkpoint it resumed from), never by the
    step numbers in the folder: a file it cannot read (a partial upload, another run's garbage)
    may carry a higher step, and keeping "the newest" by name would delete the good ones. Files
    it could not read are left alone; older ones it never opened, superseded by the one it
    resumed from, are deleted once a newer checkpoint is written.
    """

    def __init__(
        self, folder: Path, host: str, every_minutes: float, meta: dict[str, Any],
        scan: CheckpointScan | None = None,
    ) -> None:
        self.folder = folder
        self.host = host
        self.every_seconds = every_minutes * 60
        self.meta = meta
        self.last_saved = time.monotonic()
        self.saved_on_stop: Path | None = None
        scan = scan or CheckpointScan()
        self.readable: list[Path] = [scan.resumed_from] if scan.resumed_from else []  # oldest first
        self.superseded = list(scan.older)
        self.unreadable = list(scan.unreadable)

    def save(self, trainer: L.Trainer, why: str) -> Path:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        checkpoint[META_KEY] = self.meta
        checkpoint[RNG_KEY] = rng_states()
        # Lightning counts a checkpoint from the end of an epoch as belonging to the next one.
        path = self.folder / checkpoint_name(self.host, trainer.current_epoch, trainer.global_step)
        if trainer.is_global_zero:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            atomic_write_bytes(path, buffer.getvalue())
            log.info("checkpoint (%s): %s (epoch %d, step %d)", why, path,
                     trainer.current_epoch + 1, trainer.global_step)
            self.prune(path)
        self.last_saved = time.monotonic()
        return path

    def prune(self, written: Path) -> None:
        """Keep the KEEP newest checkpoints this job wrote or resumed from; delete its older
        ones and those it never opened; leave the ones it could not read."""
        self.readable = [p for p in self.readable if p != written] + [written]
        self.unreadable = [p for p in self.unreadable if p != written]  # replaced by ours
        delete = self.readable[:-KEEP] + self.superseded
        self.readable, self.superseded = self.readable[-KEEP:], []
        delete = [p for p in delete if p not in self.readable]  # a name written again is kept
        for old in delete:
            old.unlink(missing_ok=True)
        if delete:
            log.info("checkpoints kept: %s; deleted: %s", _names(self.readable[::-1]), _names(delete))
        if self.unreadable:  # once: they were named at start too
            log.info("left alone %d checkpoint files this job cannot read: %s",
                     len(self.unreadable), _names(self.unreadable))
            self.unreadable = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.every_seconds and time.monotonic() - self.last_saved >= self.every_seconds:
            self.save(trainer, f"every {self.every_seconds / 60:g} minutes")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, "end of epoch")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own SIGTERM handler is installed by now (it calls stops' handler too):
        # from here a stop, SIGINT included, finishes the step and ends here, in on_exception.
        stops.training(functools.partial(_stop_after_step, trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exc: BaseException) -> None:
        # Lightning raises SIGTERMException after the step in progress has finished, so the
        # state written here is consistent.
        if isinstance(exc, SIGTERMException) and stops.requested() and self.saved_on_stop is None:
            self.saved_on_stop = self.save(trainer, f"stopped by {stops.NAMES[stops.requested()]}")
            stops.pause_for_test("after-stop-checkpoint")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        stops.pause_for_test("restoring")
        if RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])


def _stop_after_step(trainer: L.Trainer) -> None:
    # The flag Lightning's SIGTERM handler sets: the loops raise SIGTERMException after the step
    # in progress. Set here for SIGINT as well (Lightning handles SIGTERM only), and for a stop
    # that arrived before Lightning installed its handler.
    trainer._signal_connector.received_sigterm = True
