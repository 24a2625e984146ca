"""Entry point of `train`: read the environment, run the job, turn any error into output/failure."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

from . import stops
from .environment import check_writable, paths_from_env, read_environment
from .errors import JobError, JobStopped, failure_reason, write_failure
from .hyperparameters import parse_hyperparameters
from .model.artifacts import remove_partial_model

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


def main(argv: list[str] | None = None) -> int:
    # First of all: from here on every stop has a defined answer (see stops.py), never a silent kill.
    stops.install()
    hp = None
    try:
        argv = sys.argv[1:] if argv is None else argv
        # SageMaker runs `docker run <image> train`; with an ENTRYPOINT "train" arrives as argument.
        if argv and argv[0] == "train":
            argv = argv[1:]
        configure_logging()
        paths = paths_from_env()
        if "LOCAL_RANK" not in os.environ:  # the job's first process; not a DDP worker it started
            paths.failure_file.unlink(missing_ok=True)
        stops.start_up("reading the configuration")
        env = read_environment(paths)
        hp = parse_hyperparameters(env.hyperparameters)
        check_writable(env.paths, env.checkpoint_dir)
        from .training.job import (
            run_job,  # torch, Lightning and Icevision load only past these checks
        )

        run_job(env, hp)
    except (Exception, KeyboardInterrupt, JobStopped) as exc:
        stops.finishing()  # a stop now must not cut the failure reason short
        return report_failure(exc, hp)
    if stops.requested():
        log.warning("the stop arrived after training had ended; the model was written whole")
    return 0


def report_failure(exc: BaseException, hp: object) -> int:
    """Log the reason (and the traceback of an unexpected error), write output/failure."""
    paths = paths_from_env()
    reason, code = failure_reason(exc, hp)
    log.error("training failed: %s", reason)
    if not isinstance(exc, (JobError, JobStopped)) or exc.__cause__ is not None:
        log.error("%s", "".join(traceback.format_exception(exc)))
    remove_partial_model(paths.model_dir)
    write_failure(paths.failure_file, reason)
    return code
