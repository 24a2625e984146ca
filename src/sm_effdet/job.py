"""The training job: data -> model -> Lightning Trainer -> model artifacts."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from . import artifacts, coco
from .artifacts import remove_partial_model
from .backbones import BACKBONES
from .coco import DataReport, ImageRecord
from .distributed import FailureWatchdog, Layout, plan_layout, set_rendezvous
from .environment import (
    PRETRAINED_CHANNEL,
    TRAINING_CHANNEL,
    VALIDATION_CHANNEL,
    Paths,
    TrainingEnvironment,
)
from .errors import JobStopped, UserInputError, failure_reason, write_failure
from .hyperparameters import Hyperparameters
from .transforms import MEAN, STD

log = logging.getLogger(__name__)

REPORT_FILE = "data_report.json"
# How long a collective may wait; a failed rank is caught much sooner by the failure watchdog.
DDP_TIMEOUT = timedelta(minutes=30)


def prepare_data(
    env: TrainingEnvironment, hp: Hyperparameters, report: DataReport
) -> tuple[list[coco.Category], list[ImageRecord], list[ImageRecord]]:
    """Read the training (and validation) channel and split; fail when nothing usable is left."""
    channel = env.channel(TRAINING_CHANNEL)
    if channel is None:
        raise UserInputError(
            f"the job has no '{TRAINING_CHANNEL}' channel ({env.paths.channel(TRAINING_CHANNEL)} "
            "does not exist); give the COCO JSON and its images as a channel named 'training'."
        )
    split_path = None
    if hp.split_file:
        split_path = coco.safe_join(channel, hp.split_file)
        if split_path is None or not split_path.is_file():
            raise UserInputError(
                f"split_file '{hp.split_file}' was not found in the training channel {channel}; "
                "give a path relative to the channel's root or leave split_file out."
            )
    excluded = [hp.split_file] if hp.split_file else []
    annotation_file = coco.find_annotation_file(channel, hp.annotations_file, excluded)
    train_data = coco.load_coco(channel, annotation_file, report)
    coco.check_num_classes(hp.num_classes, train_data.categories)

    val_channel = env.channel(VALIDATION_CHANNEL)
    if split_path is not None:
        train, val = coco.split_records(
            train_data.images, split_file=split_path, val_fraction=0, seed=hp.seed, report=report
        )
    elif val_channel is not None:
        val_file = coco.find_annotation_file(val_channel, None)
        val_data = coco.load_coco(val_channel, val_file, report, categories=train_data.categories)
        train, val = train_data.images, val_data.images
        report.split = {"how": "validation channel", "train": len(train), "val": len(val)}
    else:
        train, val = coco.split_records(
            train_data.images, split_file=None, val_fraction=hp.val_fraction, seed=hp.seed,
            report=report,
        )

    if not any(len(r.labels) for r in train):
        raise UserInputError(
            f"no usable training image with boxes is left in {annotation_file} (see "
            f"output/data/{REPORT_FILE}: {report.summary()}); check file_name paths, boxes and "
            "category ids."
        )
    if (split_path is not None or val_channel is not None) and not val:
        raise UserInputError(
            "the validation set is empty (" + report.split["how"] + "); give validation images "
            "or remove the split file / validation channel to split at random."
        )
    return train_data.categories, train, val


def resolve_precision(precision: str, accelerator: str) -> str:
    import torch

    if precision != "auto":
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32"


def resolve_num_workers(num_workers: int | str, processes: int = 1) -> int:
    if num_workers == "auto":
        return max((os.cpu_count() or 1) // processes, 0)
    return int(num_workers)


def run_job(env: TrainingEnvironment, hp: Hyperparameters) -> list[Path]:
    """Train as the hyperparameters say and write the model; return the files written."""
    import torch

    layout = plan_layout(env, hp.devices, torch.cuda.device_count())
    set_rendezvous(layout, env)
    log.info(layout.describe())
    watchdog = None
    if layout.is_distributed:
        watchdog = FailureWatchdog(layout, functools.partial(_stop_for_peer, env.paths))
    try:
        written = _train(env, hp, layout)
    except BaseException as exc:
        if watchdog is not None:
            watchdog.report_failure(failure_reason(exc, hp)[0])
        raise
    if watchdog is not None:
        watchdog.finish()
    return written


def _stop_for_peer(paths: Paths, reason: str) -> None:
    # Called from the watchdog thread while the main thread may sit in a collective that will
    # never complete: record why and leave at once.
    message = f"training stopped because {reason}"
    log.error(message)
    remove_partial_model(paths.model_dir)
    write_failure(paths.failure_file, message)
    logging.shutdown()
    os._exit(1)


def _train(env: TrainingEnvironment, hp: Hyperparameters, layout: Layout) -> list[Path]:
    started = time.monotonic()
    is_writer = layout.global_rank == 0  # only global rank 0 writes reports and the model
    report = DataReport()
    categories, train_records, val_records = prepare_data(env, hp, report)
    if is_writer:
        report.write(env.paths.output_data_dir / REPORT_FILE)
    log.info(report.summary())
    log.info(
        "classes (%d): %s",
        len(categories), ", ".join(f"{c.name} (id {c.id})" for c in categories[:50]),
    )

    import lightning as L
    import torch

    from . import coco_eval
    from .checkpoints import ResumableCheckpoints, find_resumable
    from .data import DetectionDataset, make_loader
    from .lightning_module import EfficientDetModule
    from .metrics_log import EpochSummary
    from .model import build_model
    from .report import BestEvaluation, TrainingScalars, tensorboard_logger
    from .transforms import eval_transform, train_transform

    L.seed_everything(hp.seed, workers=True, verbose=False)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(hp.precision, accelerator)
    workers = resolve_num_workers(hp.num_workers, layout.processes_per_node)
    pin = accelerator == "gpu"

    checkpoint_dir = env.checkpoint_dir or env.paths.default_checkpoint_dir
    fit_meta = {
        "backbone": hp.backbone,
        "img_size": hp.img_size,
        "classes": [[c.id, c.name] for c in categories],
        "split": report.split.get("how"),
        "train_ids": [r.image_id for r in train_records],
        "val_ids": [r.image_id for r in val_records],
    }
    resume = find_resumable(checkpoint_dir, fit_meta)
    if resume is not None:
        resume_path, resumed = resume
        log.info(
            "resuming from checkpoint %s (epoch %d, step %d)",
            resume_path, resumed["epoch"] + 1, resumed["step"],
        )
        if resumed["split"] == fit_meta["split"] and (
            resumed["train_ids"] != fit_meta["train_ids"] or resumed["val_ids"] != fit_meta["val_ids"]
        ):
            log.warning("the data changed since the checkpoint; its train/validation split is kept")
            train_records, val_records = resplit(
                train_records + val_records, resumed["train_ids"], resumed["val_ids"]
            )
            fit_meta.update(train_ids=resumed["train_ids"], val_ids=resumed["val_ids"])

    train_loader = make_loader(
        DetectionDataset(train_records, train_transform(hp.img_size, hp.augment), hp.img_size),
        hp.batch_size, workers, shuffle=True, pin_memory=pin,
    )
    val_loader = None
    if val_records:
        val_loader = make_loader(
            DetectionDataset(val_records, eval_transform(hp.img_size), hp.img_size),
            hp.batch_size, workers, shuffle=False, pin_memory=pin,
        )

    pretrained_dir = env.channel(PRETRAINED_CHANNEL) if hp.pretrained else None
    # A resumed job takes every weight from its checkpoint.
    use_pretrained = hp.pretrained and resume is None
    bench = build_model(hp.backbone, len(categories), hp.img_size, use_pretrained, pretrained_dir)
    val_gt = coco_eval.ground_truth(val_records, len(categories)) if val_records else None
    module = EfficientDetModule(bench, hp, val_gt, report)

    monitor = hp.monitor if val_records else None
    summary = EpochSummary(monitor, hp.epochs)
    checkpoints = ResumableCheckpoints(
        checkpoint_dir, env.current_host, hp.checkpoint_every_minutes, fit_meta
    )
    # Order matters at epoch end: the summary picks the best epoch, BestEvaluation keeps its
    # detections, then the checkpoint is written with both.
    best_evaluation = BestEvaluation(summary)
    callbacks: list[Any] = [summary, best_evaluation, checkpoints]
    # On every rank (Lightning writes on global rank 0 only; ranks must agree on the logger)
    logger = tensorboard_logger(env.paths.tensorboard_dir) if hp.tensorboard else False
    if logger:
        callbacks.append(TrainingScalars())
    if monitor and hp.early_stopping_patience > 0:
        callbacks.append(
            L.pytorch.callbacks.EarlyStopping(
                monitor=monitor, mode=summary.mode, patience=hp.early_stopping_patience,
                check_on_train_epoch_end=True,
            )
        )
    log.info(
        "training %s at %d px: %d train / %d validation images, batch %d per process (%d in "
        "all), %d epochs, %s precision on %s, %d loader workers per process; best model by %s; "
        "checkpoints in %s",
        hp.backbone, hp.img_size, len(train_records), len(val_records), hp.batch_size,
        hp.batch_size * layout.world_size, hp.epochs, precision, accelerator, workers,
        monitor or "last epoch (no validation set)", checkpoint_dir,
    )
    strategy: Any = "auto"
    if layout.is_distributed:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=layout.backend, timeout=DDP_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="sm-effdet-") as scratch:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=layout.processes_per_node,
            num_nodes=layout.num_nodes,
            strategy=strategy,
            max_epochs=hp.epochs,
            precision=precision,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=sys.stdout.isatty(),
            enable_model_summary=False,
            callbacks=callbacks,
            gradient_clip_val=10.0,
            limit_val_batches=1.0 if val_loader is not None else 0,
            num_sanity_val_steps=0,
            benchmark=accelerator == "gpu",
            log_every_n_steps=50,
            default_root_dir=scratch,
        )
        # Lightning's own SIGTERM handler (finish the step, then stop) takes over from here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            trainer.fit(
                module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                ckpt_path=resume[0] if resume else None, weights_only=True,
            )
        except SystemExit:  # SIGTERMException, or Lightning's exit after Ctrl-C
            raise stopped_error(trainer, checkpoints.saved_on_stop) from None
        finally:
            if is_writer:
                report.write(env.paths.output_data_dir / REPORT_FILE)
            if report.counts["image_skipped_at_load"]:
                log.info(report.summary())

    if summary.best_state is None:
        raise UserInputError("training finished without a completed epoch; check the log above.")
    if not is_writer:
        return []
    metadata = model_metadata(
        hp, categories, summary, report, time.monotonic() - started, layout.world_size
    )
    outcome = _summarise_best(best_evaluation, val_gt, categories, metadata)
    written = artifacts.write_model(env.paths.model_dir, summary.best_state, metadata)
    log.info(
        "model written to %s (best epoch %s of %d%s)",
        env.paths.model_dir, summary.best_epoch, trainer.current_epoch,
        f", {monitor}={summary.best_score:.4f}" if monitor and summary.best_score is not None else "",
    )
    from .report import REPORT_DIR, write_report

    write_report(
        env.paths.output_data_dir / REPORT_DIR, outcome, categories, train_records, val_records,
        report, hp.to_dict(), summary.history, summary.best_epoch, logger or None,
    )
    return written


def _summarise_best(best_evaluation: Any, val_gt: Any, categories: Any, metadata: dict) -> Any:
    """The best epoch's per-class table (logged) and numbers (into model.json); an error here
    is logged and leaves them out rather than failing a job that trained."""
    from . import report as report_module

    try:
        outcome = report_module.summarise_best(best_evaluation, val_gt, categories)
    except Exception:
        log.exception("could not evaluate the best epoch's detections for the report")
        return None
    report_module.add_to_model_card(metadata, outcome)
    if outcome is not None:
        log.info("best epoch %d per class (validation, IoU 0.5:0.95 and 0.5):\n%s\nrecommended "
                 "score threshold %.4f (best F1 %.3f at IoU 0.5)", outcome.epoch,
                 report_module.per_class_table(outcome), outcome.threshold, outcome.f1)
    return outcome


def resplit(
    records: list[ImageRecord], train_ids: list[Any], val_ids: list[Any]
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    by_id = {r.image_id: r for r in records}
    return [by_id[i] for i in train_ids if i in by_id], [by_id[i] for i in val_ids if i in by_id]


def stopped_error(trainer: Any, checkpoint: Path | None) -> JobStopped:
    by, code = ("SIGTERM", 143) if trainer.received_sigterm else ("SIGINT (Ctrl-C)", 130)
    where = f"in epoch {trainer.current_epoch + 1} at step {trainer.global_step}"
    if checkpoint is None:
        return JobStopped(
            f"training was stopped by {by} {where} before a checkpoint could be written.", code
        )
    return JobStopped(
        f"training was stopped by {by} {where}; checkpoint {checkpoint.name} was written to "
        f"{checkpoint.parent}: run the job again with the same checkpoint location to resume.",
        code,
    )


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("sm-effdet", "torch", "effdet", "icevision", "lightning", "timm"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def model_metadata(
    hp: Hyperparameters, categories: list[coco.Category], summary: Any, report: DataReport,
    seconds: float, world_size: int,
) -> dict[str, Any]:
    return {
        "format_version": 1,
        "framework": "effdet",
        "effdet_model_name": BACKBONES[hp.backbone],
        "backbone": hp.backbone,
        "img_size": hp.img_size,
        "num_classes": len(categories),
        "weights_file": artifacts.WEIGHTS_FILE,
        "weights_of": "effdet.EfficientDet (bench.model); load with effdet.create_model("
        "effdet_model_name, bench_task='predict', num_classes, image_size=(img_size, img_size))",
        "classes": [
            {"label": i + 1, "id": c.id, "name": c.name} for i, c in enumerate(categories)
        ],
        "normalization": {
            "mean": list(MEAN),
            "std": list(STD),
            "input": "RGB scaled to [0, 1], then (x - mean) / std",
        },
        "preprocessing": "resize the longest side to img_size keeping the aspect ratio, then pad "
        "bottom and right with zeros to img_size x img_size",
        "output": "per image up to 100 rows [x1, y1, x2, y2, score, label] in the input image's "
        "pixels when img_scale = max(width, height) / img_size is passed; label is "
        "classes[].label",
        "monitor": summary.monitor,
        "best_epoch": summary.best_epoch,
        "metrics": summary.best_metrics,
        "history": summary.history,
        "hyperparameters": hp.to_dict(),
        "data": report.split,
        "world_size": world_size,
        "training_seconds": round(seconds, 1),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
