"""The `sm-effdet` command: subcommands from COMMAND_MODULES, errors as one sentence.

A user error (bad flag value, data, hyperparameter, request) exits 2 before anything is
created; an AWS error exits 1 with one sentence (`aws.explain`). Nothing here imports boto3 or
the data reader at module level, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import JobError, UserInputError

# Each module has add_commands(subparsers); each subparser sets run=callable(args) -> int.
COMMAND_MODULES = (
    "sm_effdet.launch.jobs",
    "sm_effdet.launch.tuning",
    "sm_effdet.launch.tuning_status",
    "sm_effdet.launch.deploy",
    "sm_effdet.launch.transform",
    "sm_effdet.launch.endpoints",
    "sm_effdet.launch.predict",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sm-effdet",
        description="Launch, follow and fetch this container's SageMaker jobs (boto3). Region "
        "and credentials the boto3 way (AWS_REGION, AWS_PROFILE, ...); AWS_ENDPOINT_URL honoured.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


# `tune` takes every flag of a job and no positional, so `tune status NAME` and the like are
# given their own parsers (registered as tune-status, ...) before argparse sees them.
TUNE_ACTIONS = ("status", "results", "stop")


def route(argv: list[str]) -> list[str]:
    if len(argv) >= 2 and argv[0] == "tune" and argv[1] in TUNE_ACTIONS:
        return [f"tune-{argv[1]}", *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = route(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except UserInputError as exc:
        print(f"sm-effdet: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"sm-effdet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # An upload's interrupt says what is up and that a rerun resumes (upload.py).
        print(f"sm-effdet: {exc or 'interrupted.'}", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
            from .aws import explain

            print(f"sm-effdet: {explain(exc)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
