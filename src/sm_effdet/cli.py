"""Entry point of `train`: read the environment, run the job, turn any error into output/failure."""

from __future__ import annotations

import logging
import signal
import sys
import traceback
import warnings

from .artifacts import remove_partial_model
from .environment import paths_from_env, read_environment
from .errors import JobError, JobStopped, write_failure
from .hyperparameters import parse_hyperparameters

log = logging.getLogger("sm_effdet")


def configure_logging() -> None:
    # effdet scripts a few helpers at import; the deprecation notice says nothing to a user.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )


def failure_reason(exc: BaseException, hp: object | None) -> tuple[str, int]:
    """The one sentence the user sees as the job's FailureReason, and the exit code."""
    if isinstance(exc, JobError):
        return str(exc), getattr(exc, "exit_code", 1)
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        sizes = f" at batch_size={hp.batch_size} and img_size={hp.img_size}" if hp else ""
        return (
            f"the GPU ran out of memory{sizes}; lower batch_size or img_size, or use an "
            "instance type with more GPU memory.",
            1,
        )
    if isinstance(exc, KeyboardInterrupt):
        return "training was interrupted before it finished.", 130
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"training failed with an unexpected {name}: {first}; the traceback is in the job's log.",
        1,
    )


def _stopped_before_training(signum: int, frame: object) -> None:
    # Until Lightning installs its own handler (which finishes the step and checkpoints), a stop
    # ends the job at once, with a failure reason rather than a silent kill.
    raise JobStopped(
        f"the job was stopped by {signal.Signals(signum).name} before training began; nothing "
        "was trained or written.",
        exit_code=128 + signum,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # SageMaker runs `docker run <image> train`; with an ENTRYPOINT "train" arrives as argument.
    if argv and argv[0] == "train":
        argv = argv[1:]
    configure_logging()
    signal.signal(signal.SIGTERM, _stopped_before_training)
    paths = paths_from_env()
    hp = None
    try:
        env = read_environment(paths)
        hp = parse_hyperparameters(env.hyperparameters)
        from .job import run_job  # torch, Lightning and Icevision load only past these checks

        run_job(env, hp)
    except (Exception, KeyboardInterrupt) as exc:
        reason, code = failure_reason(exc, hp)
        log.error("training failed: %s", reason)
        if not isinstance(exc, JobError) or exc.__cause__ is not None:
            log.error("%s", "".join(traceback.format_exception(exc)))
        remove_partial_model(paths.model_dir)
        write_failure(paths.failure_file, reason)
        return code
    return 0
