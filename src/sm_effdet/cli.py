"""Entry point of `train`: read the environment, run the job, turn any error into output/failure."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings

from .artifacts import remove_partial_model
from .environment import check_writable, paths_from_env, read_environment
from .errors import JobError, JobStopped, failure_reason, write_failure
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
    if "LOCAL_RANK" not in os.environ:  # the job's first process; not a DDP worker it started
        paths.failure_file.unlink(missing_ok=True)
    hp = None
    try:
        env = read_environment(paths)
        hp = parse_hyperparameters(env.hyperparameters)
        check_writable(env.paths, env.checkpoint_dir)
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
