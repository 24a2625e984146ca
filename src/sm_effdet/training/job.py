"""The training job: data -> model -> Lightning Trainer -> model artifacts."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .. import stops
from ..backbones import BACKBONES
from ..data.formats import REPORT_FILE, Category, DataReport, ImageRecord, read_dataset
from ..data.formats.pipe import cache_pipe_channels
from ..environment import (
    PRETRAINED_CHANNEL,
    Paths,
    TrainingEnvironment,
)
from ..errors import JobStopped, UserInputError, failure_reason, write_failure
from ..hyperparameters import RECIPES, Hyperparameters
from ..model import artifacts, model_card
from ..model.artifacts import remove_partial_model
from ..model.preprocessing import backbone_normalization
from .distributed import FailureWatchdog, Layout, plan_layout, set_rendezvous

log = logging.getLogger(__name__)

# How long a collective may wait; a failed rank is caught much sooner by the failure watchdog.
DDP_TIMEOUT = timedelta(minutes=30)


def prepare_data(
    env: TrainingEnvironment, hp: Hyperparameters, report: DataReport
) -> tuple[list[Category], list[ImageRecord], list[ImageRecord]]:
    """Read the training (and validation) channel, in whichever annotation format, and split;
    fail when nothing usable is left (read_dataset names a missing channel). Pipe channels
    (augmented manifests) are first cached to disk from their epoch-0 stream."""
    channels = cache_pipe_channels(env.paths.input_data, env.input_data_config, env.channels,
                                   hp.label_attribute)
    dataset = read_dataset(channels, hp, report)
    return dataset.categories, dataset.train, dataset.val


def trial_checkpoint_dir(env: TrainingEnvironment) -> Path:
    """Where this job's checkpoints go: a tuning trial gets a folder of its own (named by its
    training job), because every trial of a tuning job has the same CheckpointConfig and a trial
    must neither resume nor delete another's checkpoints. SageMaker marks a trial by adding
    `_tuning_objective_metric` to its hyperparameters and names the job in TRAINING_JOB_NAME."""
    checkpoint_dir = env.checkpoint_dir or env.paths.default_checkpoint_dir
    job = os.environ.get("TRAINING_JOB_NAME", "")
    if "_tuning_objective_metric" in env.hyperparameters and job and "/" not in job:
        return checkpoint_dir / job
    return checkpoint_dir


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
    """The job as a story of phases: data, resume, loaders, model, trainer, fit, artifacts."""
    started = time.monotonic()
    stops.start_up("reading the data")
    report = DataReport()
    try:
        categories, train_records, val_records = prepare_data(env, hp, report)
    except UserInputError:
        if report.counts:  # the counts behind a refusal, in the log and where its message says
            _report_data(env, report, [], layout)
        raise
    _report_data(env, report, categories, layout)
    batch_size, why = hp.chosen_batch_size(len(train_records), layout.world_size)
    log.info("batch size %d per process (%s)", batch_size, why)
    hp = dataclasses.replace(hp, batch_size=batch_size)

    import lightning as L

    from .warm_start import MODEL_CHANNEL, choose_starting_point, weights_origin

    L.seed_everything(hp.seed, workers=True, verbose=False)
    settings = _run_settings(hp, layout)
    checkpoint_dir = trial_checkpoint_dir(env)
    fit_meta = _fit_meta(hp, categories, report, train_records, val_records)
    stops.start_up("looking for a checkpoint to resume")
    scan, train_records, val_records = _resume(checkpoint_dir, fit_meta, train_records, val_records)
    resume_path = scan.resumed_from
    train_loader, val_loader = _loaders(hp, settings, train_records, val_records)
    stops.start_up("building the model")
    start = choose_starting_point(hp.pretrained, env.channel(MODEL_CHANNEL), resume_path is not None)
    origin = weights_origin(hp.pretrained, env.channel(MODEL_CHANNEL))  # a resumed run's too
    module = _model(env, hp, categories, val_records, report, start, origin)
    stats_loader = None
    if hp.bn_stats_images > 0:
        from .precise_bn import stats_loader as make_stats_loader

        stats_loader = make_stats_loader(hp, settings, layout.global_rank, layout.world_size,
                                         train_records)
    run = _callbacks(env, hp, checkpoint_dir, fit_meta, bool(val_records), scan, stats_loader,
                     len(train_records))
    log.info(
        "training %s at %d px: %d train / %d validation images, batch %d per process (%d in "
        "all), %d epochs, %s precision on %s, %d loader workers per process; best model by %s; "
        "checkpoints in %s",
        hp.backbone, hp.img_size, len(train_records), len(val_records), hp.batch_size,
        hp.batch_size * layout.world_size, hp.epochs, settings["precision"],
        settings["accelerator"], settings["workers"],
        run.best.monitor or "last epoch (no validation set)", checkpoint_dir,
    )
    log.info(hp.describe_recipe())
    with tempfile.TemporaryDirectory(prefix="sm-effdet-") as scratch:
        # A warm start validates its starting weights first (epoch 0; a later epoch must beat
        # them to become the model): a previous model is already good, and the first epochs at
        # the peak learning rate can move it away before they bring it back.
        validate_start = start == "warm" and val_loader is not None
        trainer = _trainer(settings, hp, layout, run, val_loader is not None, validate_start, scratch)
        try:
            _fit(trainer, module, train_loader, val_loader, resume_path, run.checkpoints)
        finally:  # images skipped while training are counted, even when training failed
            if layout.global_rank == 0:
                report.write(env.paths.output_data_dir / REPORT_FILE)
            if report.counts["image_skipped_at_load"]:
                log.info(report.summary())
    # Training is over: a stop from here on lets the model be written whole (stops.py).
    stops.finishing()
    written, outcome = _write_artifacts(
        env, hp, categories, run, module.val_gt, report, trainer, layout, started
    )
    if layout.global_rank == 0:
        _write_report(env, hp, categories, train_records, val_records, report, run, outcome)
    return written


def _report_data(
    env: TrainingEnvironment, report: DataReport, categories: list[Category], layout: Layout
) -> None:
    if layout.global_rank == 0:  # only global rank 0 writes reports and the model
        report.write(env.paths.output_data_dir / REPORT_FILE)
    log.info(report.summary())
    if categories:
        log.info(
            "classes (%d): %s",
            len(categories), ", ".join(f"{c.name} (id {c.id})" for c in categories[:50]),
        )


def _run_settings(hp: Hyperparameters, layout: Layout) -> dict[str, Any]:
    import torch

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return {
        "accelerator": accelerator,
        "precision": resolve_precision(hp.precision, accelerator),
        "workers": resolve_num_workers(hp.num_workers, layout.processes_per_node),
        "pin": accelerator == "gpu",
    }


def _fit_meta(
    hp: Hyperparameters, categories: list[Category], report: DataReport,
    train_records: list[ImageRecord], val_records: list[ImageRecord],
) -> dict[str, Any]:
    """What a checkpoint was made for; a resumed job must match it (checkpoints.find_resumable)."""
    return {
        "backbone": hp.backbone,
        "img_size": hp.img_size,
        "classes": [[c.id, c.name] for c in categories],
        "split": report.split.get("how"),
        "train_ids": [r.image_id for r in train_records],
        "val_ids": [r.image_id for r in val_records],
        # What auto chose, so that a resumed job compares what the checkpoint trained with.
        "hyperparameters": hp.to_dict() | {"ema_decay": hp.moving_average_decay()},
    }


def _resume(
    checkpoint_dir: Path, fit_meta: dict[str, Any], train_records: list[ImageRecord],
    val_records: list[ImageRecord],
) -> tuple[Any, list[ImageRecord], list[ImageRecord]]:
    """What the checkpoint folder holds (the checkpoint to resume from, if any: a
    checkpoints.CheckpointScan) and the split to train on (the checkpoint's)."""
    from .checkpoints import scan_checkpoints

    scan = scan_checkpoints(checkpoint_dir, fit_meta)
    if scan.resume is None:
        return scan, train_records, val_records
    resume_path, resumed = scan.resume
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
    return scan, train_records, val_records


def _loaders(
    hp: Hyperparameters, settings: dict[str, Any], train_records: list[ImageRecord],
    val_records: list[ImageRecord],
) -> tuple[Any, Any]:
    from ..data.dataset import DetectionDataset, make_loader
    from ..data.transforms import eval_transform, train_transform

    workers, pin = settings["workers"], settings["pin"]
    fill = backbone_normalization(BACKBONES[hp.backbone])["fill"]
    recipe = RECIPES[hp.recipe]
    transform = train_transform(hp.img_size, hp.augment, fill, recipe["scale"], recipe["scale_p"])
    train_loader = make_loader(
        DetectionDataset(train_records, transform, hp.img_size),
        hp.batch_size, workers, shuffle=True, pin_memory=pin,
    )
    val_loader = None
    if val_records:
        val_loader = make_loader(
            DetectionDataset(val_records, eval_transform(hp.img_size, fill), hp.img_size),
            hp.batch_size, workers, shuffle=False, pin_memory=pin,
        )
    return train_loader, val_loader


def _model(
    env: TrainingEnvironment, hp: Hyperparameters, categories: list[Category],
    val_records: list[ImageRecord], report: DataReport, start: str, origin: str,
) -> Any:
    from ..evaluation import coco_eval
    from ..model.efficientdet import build_model
    from .lightning_module import EfficientDetModule
    from .precise_bn import set_norm_momentum
    from .warm_start import MODEL_CHANNEL, load_backbone_weights, warm_start

    pretrained_dir = env.channel(PRETRAINED_CHANNEL) if hp.pretrained else None
    # `start` (warm_start.choose_starting_point): a resumed job takes every weight from its
    # checkpoint; else a previous model (the `model` channel), the COCO detector or the ImageNet
    # backbone.
    bench = build_model(hp.backbone, len(categories), hp.img_size, start == "coco", pretrained_dir)
    if start == "warm":
        warm_start(bench.model, env.channel(MODEL_CHANNEL), hp.backbone, [c.name for c in categories])
    elif start == "backbone":
        load_backbone_weights(bench.model, hp.backbone, pretrained_dir)
    set_norm_momentum(bench.model, hp.bn_momentum)
    val_gt = coco_eval.ground_truth(val_records, len(categories)) if val_records else None
    return EfficientDetModule(bench, hp, val_gt, report, origin)


@dataclass
class TrainingCallbacks:
    """What watches the training: the Trainer's callbacks and logger, and the ones read after."""

    best: Any  # best_model.BestModel: the best epoch and its weights
    best_evaluation: Any  # callbacks.BestEvaluation: the best epoch's validation detections
    checkpoints: Any  # checkpoints.ResumableCheckpoints
    logger: Any  # Lightning's TensorBoardLogger, or False
    all: list[Any]


def _callbacks(
    env: TrainingEnvironment, hp: Hyperparameters, checkpoint_dir: Path, fit_meta: dict[str, Any],
    has_validation: bool, scan: Any = None, stats_loader: Any = None, train_images: int = 0,
) -> TrainingCallbacks:
    """The epoch line, the batch-norm statistics, the choice of the best weights, checkpoints,
    TensorBoard, early stopping."""
    import lightning as L

    from ..evaluation.callbacks import BestEvaluation, TrainingScalars, tensorboard_logger
    from .best_model import BestModel
    from .checkpoints import ResumableCheckpoints
    from .metrics_log import EpochSummary

    monitor = hp.monitor if has_validation else None
    summary = EpochSummary(hp.epochs)
    best = BestModel(monitor, summary)
    checkpoints = ResumableCheckpoints(
        checkpoint_dir, env.current_host, hp.checkpoint_every_minutes, fit_meta, scan
    )
    # Order matters at epoch end: the epoch line, the batch-norm statistics of an epoch without
    # validation, the choice of the best weights, the best epoch's detections (for the report),
    # then the checkpoint that holds them all.
    best_evaluation = BestEvaluation(best)
    statistics = []
    if stats_loader is not None:
        from .precise_bn import BatchNormStatistics

        statistics = [BatchNormStatistics(stats_loader, min(hp.bn_stats_images, train_images))]
    callbacks: list[Any] = [summary, *statistics, best, best_evaluation, checkpoints]
    # On every rank (Lightning writes on global rank 0 only; ranks must agree on the logger).
    logger = tensorboard_logger(env.paths.tensorboard_dir) if hp.tensorboard else False
    if logger:
        callbacks.append(TrainingScalars())
    if monitor and hp.early_stopping_patience > 0:
        callbacks.append(
            L.pytorch.callbacks.EarlyStopping(
                monitor=monitor, mode=best.mode, patience=hp.early_stopping_patience,
                check_on_train_epoch_end=True,
            )
        )
    return TrainingCallbacks(best, best_evaluation, checkpoints, logger, callbacks)


def _trainer(
    settings: dict[str, Any], hp: Hyperparameters, layout: Layout, run: TrainingCallbacks,
    has_validation: bool, validate_start: bool, scratch: str,
) -> Any:
    import lightning as L

    strategy: Any = "auto"
    if layout.is_distributed:
        from lightning.pytorch.strategies import DDPStrategy

        # A frozen backbone has no gradients (requires_grad off); DDP, which fixes the parameters
        # it reduces when it wraps the model, must then look for the unused ones every step.
        strategy = DDPStrategy(process_group_backend=layout.backend, timeout=DDP_TIMEOUT,
                               find_unused_parameters=hp.freeze_backbone_epochs > 0)
    return L.Trainer(
        accelerator=settings["accelerator"],
        devices=layout.processes_per_node,
        num_nodes=layout.num_nodes,
        strategy=strategy,
        max_epochs=hp.epochs,
        precision=settings["precision"],
        logger=run.logger,
        enable_checkpointing=False,
        enable_progress_bar=sys.stdout.isatty(),
        enable_model_summary=False,
        callbacks=run.all,
        gradient_clip_val=hp.gradient_clip,
        limit_val_batches=1.0 if has_validation else 0,
        # -1: the whole validation set, recorded as epoch 0 (metrics_log.EpochSummary).
        num_sanity_val_steps=-1 if validate_start else 0,
        benchmark=settings["accelerator"] == "gpu",
        log_every_n_steps=50,
        default_root_dir=scratch,
    )


def _fit(
    trainer: Any, module: Any, train_loader: Any, val_loader: Any, resume_path: Path | None,
    checkpoints: Any,
) -> None:
    # Until the first step a stop ends the job at once (JobStopped, raised through Lightning's
    # set-up and restore); from then on ResumableCheckpoints hands stops to Lightning, which
    # finishes the step, and the checkpoint is written (stops.py).
    stops.start_up(f"restoring checkpoint {resume_path.name}" if resume_path else "starting the trainer")
    try:
        trainer.fit(
            module, train_dataloaders=train_loader, val_dataloaders=val_loader,
            ckpt_path=resume_path, weights_only=True,
        )
    except SystemExit:  # Lightning's SIGTERMException, raised once the step has finished
        if not stops.requested():
            raise
        stops.finishing()
        raise stopped_error(trainer, checkpoints.saved_on_stop) from None


def _write_artifacts(
    env: TrainingEnvironment, hp: Hyperparameters, categories: list[Category],
    run: TrainingCallbacks, val_gt: Any, report: DataReport, trainer: Any, layout: Layout,
    started: float,
) -> tuple[list[Path], Any]:
    """model/ (weights, model.json, inference files, model.onnx) and the best epoch's numbers."""
    best = run.best
    if best.best_state is None:
        raise UserInputError("training finished without a completed epoch; check the log above.")
    if layout.global_rank != 0:
        return [], None
    bad = artifacts.non_finite_tensors(best.best_state)
    if bad:
        rate = hp.peak_learning_rate(trainer.lightning_module.start)
        raise UserInputError(
            f"the weights of epoch {best.best_epoch} hold non-finite values (NaN or infinity, "
            f"in {len(bad)} tensors such as {bad[0]}): training diverged, so no model was "
            f"written; lower learning_rate (now {rate:g}) and use a new checkpoint "
            "location."
        )
    metadata = model_card.model_metadata(
        hp, categories, best, report, time.monotonic() - started, layout.world_size,
        backbone_normalization(BACKBONES[hp.backbone]), BACKBONES[hp.backbone], artifacts.WEIGHTS_FILE,
    )
    outcome = _summarise_best(run.best_evaluation, val_gt, categories, metadata)
    if hp.export_onnx:
        written = write_model_with_onnx(env.paths.model_dir, best.best_state, metadata, hp)
    else:
        written = artifacts.write_model(
            env.paths.model_dir, best.best_state, {**metadata, "onnx": None}
        )
    monitor = best.monitor
    log.info(
        "model written to %s (best epoch %s of %d%s)",
        env.paths.model_dir, best.best_epoch, trainer.current_epoch,
        f", {monitor}={best.best_score:.4f}" if monitor and best.best_score is not None else "",
    )
    return written, outcome


def _write_report(
    env: TrainingEnvironment, hp: Hyperparameters, categories: list[Category],
    train_records: list[ImageRecord], val_records: list[ImageRecord], report: DataReport,
    run: TrainingCallbacks, outcome: Any,
) -> None:
    """output/data/report/ and the TensorBoard mosaic; report.write_report never raises."""
    from ..evaluation.report import REPORT_DIR, write_report

    write_report(
        env.paths.output_data_dir / REPORT_DIR, outcome, categories, train_records, val_records,
        report, hp.to_dict(), run.best.history, run.best.best_epoch, run.logger or None,
    )


def write_model_with_onnx(
    model_dir: Path, state: dict[str, Any], metadata: dict[str, Any], hp: Hyperparameters
) -> list[Path]:
    """model/ as artifacts.write_model writes it, plus model.onnx when the export works."""
    from ..model.export import export_for_job

    model_dir.mkdir(parents=True, exist_ok=True)
    # Exported inside model/ under the staging prefix: a kill leaves nothing a retry keeps.
    with tempfile.TemporaryDirectory(prefix=artifacts.STAGING_PREFIX, dir=model_dir) as scratch:
        extra, entries = export_for_job(
            BACKBONES[hp.backbone], metadata["num_classes"], hp.img_size, state, Path(scratch)
        )
        return artifacts.write_model(model_dir, state, {**metadata, **entries}, extra)


def _summarise_best(best_evaluation: Any, val_gt: Any, categories: Any, metadata: dict) -> Any:
    """The best epoch's per-class table (logged) and numbers (into model.json); an error here
    is logged and leaves them out rather than failing a job that trained."""
    from ..evaluation.best_epoch import add_to_model_card, per_class_table, summarise_best

    try:
        outcome = summarise_best(best_evaluation, val_gt, categories)
    except Exception:
        log.exception("could not evaluate the best epoch's detections for the report")
        return None
    add_to_model_card(metadata, outcome)
    if outcome is not None:
        log.info("best epoch %d per class (validation, IoU 0.5:0.95 and 0.5):\n%s\nrecommended "
                 "score threshold %.4f (best F1 %.3f at IoU 0.5)", outcome.epoch,
                 per_class_table(outcome), outcome.threshold, outcome.f1)
    return outcome


def resplit(
    records: list[ImageRecord], train_ids: list[Any], val_ids: list[Any]
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    by_id = {r.image_id: r for r in records}
    return [by_id[i] for i in train_ids if i in by_id], [by_id[i] for i in val_ids if i in by_id]


def stopped_error(trainer: Any, checkpoint: Path | None) -> JobStopped:
    by, code = stops.NAMES[stops.requested()], stops.exit_code()
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
