"""The training job's commands: train, logs, fetch, stop."""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

from ..errors import JobError, UserInputError
from .follow import DEFAULT_POLL_SECONDS, artifact_uris, console_url, follow
from .request import add_job_arguments, prepare_training_request


def add_commands(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="check, upload, create and follow a SageMaker training job",
        description="Build the CreateTrainingJob request, check it and the data on this machine, "
        "upload local folders (skipping files already there), create the job and follow it.",
    )
    add_train_arguments(train)
    train.set_defaults(run=run_train)

    logs = subparsers.add_parser("logs", help="follow a training job: status, every host's log, summary")
    logs.add_argument("job", metavar="JOB")
    _poll_argument(logs)
    logs.set_defaults(run=run_logs)

    fetch = subparsers.add_parser("fetch", help="download and extract a job's model and output")
    fetch.add_argument("job", metavar="JOB")
    fetch.add_argument("dir", metavar="DIR", nargs="?", type=Path, help="where (default ./JOB)")
    fetch.set_defaults(run=run_fetch)

    stop = subparsers.add_parser("stop", help="stop a training job (it saves a checkpoint first)")
    stop.add_argument("job", metavar="JOB")
    stop.set_defaults(run=run_stop)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--no-wait", action="store_true", help="create the job and return")
    _poll_argument(parser)
    parser.add_argument(
        "--resume-from", metavar="JOB",
        help="a new job that goes on from JOB's checkpoints (JOB Stopped or Failed), with "
        "JOB's hyperparameters, channels, image, role and resources unless flags here say "
        "otherwise (--set and --env add to JOB's)")


def _poll_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_SECONDS, metavar="SECONDS",
                        help=f"how often to look at the job (default {DEFAULT_POLL_SECONDS:g})")


def run_train(args: argparse.Namespace) -> int:
    from .aws import client

    resume = None
    if getattr(args, "resume_from", None):
        if args.local:
            raise UserInputError("--resume-from starts a SageMaker job from the old job's "
                                 "checkpoints in S3; run it without --local.")
        from . import resume as resuming

        # A dry run reads the old job too (DescribeTrainingJob, ListTags, its checkpoint
        # listing) and creates nothing.
        resume = resuming.load(args.resume_from, sagemaker=client("sagemaker"), s3=client("s3"))
        resume.fill(args, resuming.given_flags(args, add_train_arguments))
    if args.dry_run:
        # stdout holds only the request, so that it can be piped; the data summary goes to stderr.
        request = prepare_training_request(args, s3=None, out=sys.stderr)
        if resume:
            request = resume.apply(request)
            print(resume.describe(request), file=sys.stderr)
        print(json.dumps(request, indent=2))
        return 0
    if args.local:
        return run_train_local(args)
    s3 = client("s3")
    request = prepare_training_request(args, s3=s3, ecr=lambda region: client("ecr", region),
                                       out=sys.stdout)
    if resume:
        request = resume.apply(request)
        print(resume.describe(request), flush=True)
    sagemaker = client("sagemaker")
    sagemaker.create_training_job(**request)
    job = request["TrainingJobName"]
    print(f"created training job {job}: {console_url(sagemaker.meta.region_name, job)}", flush=True)
    if args.no_wait:
        print(f"follow it with `sm-effdet logs {job}`, stop it with `sm-effdet stop {job}`")
        return 0
    return follow(job, sagemaker=sagemaker, logs=client("logs"), s3=s3, poll=args.poll)


def run_train_local(args: argparse.Namespace) -> int:
    try:
        from .local import run_local
    except ImportError:
        raise UserInputError("--local is not available in this checkout (launch/local.py is "
                             "missing); run without --local.") from None
    from .aws import client

    request = prepare_training_request(args, s3=None, out=sys.stdout)
    uses_s3 = "s3://" in json.dumps(request)
    return run_local(request, s3=client("s3") if uses_s3 else None,
                     image=args.image if args.image else None)


def run_logs(args: argparse.Namespace) -> int:
    from .aws import client

    return follow(args.job, sagemaker=client("sagemaker"), logs=client("logs"), s3=client("s3"),
                  poll=args.poll)


def run_fetch(args: argparse.Namespace) -> int:
    from .aws import client

    fetch(args.job, args.dir or Path(args.job), sagemaker=client("sagemaker"), s3=client("s3"))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from .aws import client

    stop(args.job, sagemaker=client("sagemaker"))
    return 0


def stop(job: str, *, sagemaker, out=sys.stdout) -> None:
    from .resume import checkpoint_uri

    description = sagemaker.describe_training_job(TrainingJobName=job)
    status = description["TrainingJobStatus"]
    if status != "InProgress":
        print(f"training job {job} is already {status}; nothing to stop.", file=out)
        return
    sagemaker.stop_training_job(TrainingJobName=job)
    uri = checkpoint_uri(description)
    later = (f"; once it is Stopped, resume it with `sm-effdet train --resume-from {job}` (its "
             f"checkpoints go to {uri})") if uri else ""
    print(f"stopping {job}: it gets SIGTERM, saves a checkpoint and uploads what it has; follow "
          f"it with `sm-effdet logs {job}`{later}.", file=out)


def fetch(job: str, directory: Path, *, sagemaker, s3, out=sys.stdout) -> Path:
    """Download and extract model.tar.gz into DIR/model and output.tar.gz into DIR/output; print
    the best metrics from model.json and where the HTML report is."""
    from botocore.exceptions import ClientError

    from .folders import check_output_folder
    from .upload import Progress, split_s3

    # Before anything is downloaded: a DIR that is a file would fail after the download.
    check_output_folder(directory, "the fetch folder")
    for name in ("model", "output"):
        check_output_folder(directory / name, "the fetch folder")
        if (directory / f"{name}.tar.gz").is_dir():
            raise UserInputError(f"{directory / f'{name}.tar.gz'} is a folder, where fetch "
                                 "downloads the archive; move it away or fetch into another DIR.")
    description = sagemaker.describe_training_job(TrainingJobName=job)
    status = description["TrainingJobStatus"]
    if status == "InProgress":
        raise JobError(f"training job {job} is still InProgress; follow it with `sm-effdet logs "
                       f"{job}` and fetch it when it has ended.")
    found = 0
    for uri, folder in zip(artifact_uris(description), ("model", "output")):
        bucket, key = split_s3(uri)
        try:
            size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                print(f"{uri} does not exist (the job is {status}); skipped", file=out)
                continue
            raise
        directory.mkdir(parents=True, exist_ok=True)
        archive = directory / uri.rsplit("/", 1)[1]
        progress = Progress(f"download {archive.name}", size)
        s3.download_file(bucket, key, str(archive), Callback=progress)
        progress.close()
        target = directory / folder
        target.mkdir(exist_ok=True)
        try:
            with tarfile.open(archive) as tar:
                # The data filter refuses absolute paths, links out of the folder and devices.
                tar.extractall(target, filter="data")
        except tarfile.TarError as exc:
            raise JobError(f"{uri} cannot be extracted safely ({exc}); it is not an archive "
                           "this project's job wrote.") from None
        print(f"{uri} -> {target}", file=out)
        found += 1
    if not found:
        raise JobError(f"training job {job} ({status}) left neither model.tar.gz nor "
                       f"output.tar.gz at {artifact_uris(description)[0].rsplit('/', 1)[0]}/.")
    card = directory / "model" / "model.json"
    if card.is_file():
        data = json.loads(card.read_text())
        metrics = data.get("metrics") or {}
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        print(f"best epoch {data.get('best_epoch')}: {shown or '(no metrics)'}", file=out)
    reports = sorted((directory / "output").glob("**/report/index.html"))
    if reports:
        print(f"report: {reports[0].resolve()}", file=out)
    return directory
