"""Following a training job: status transitions, every host's log lines merged, a summary.

SageMaker writes one CloudWatch Logs stream per host and attempt, named `<job>/algo-N-<epoch>`,
in the group /aws/sagemaker/TrainingJobs. The follower reads each stream from its own next
token (so a line is printed once), merges a round's lines by time and tags them by host, and
reads once more after the job ends, so the job's last lines are not lost.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")
DEFAULT_POLL_SECONDS = 10.0


def host_of(stream: str, job: str) -> str:
    """algo-1 from `<job>/algo-1-1700000000` (the suffix is the attempt's start time)."""
    rest = stream[len(job) + 1:] if stream.startswith(job + "/") else stream
    return re.sub(r"-\d{9,}$", "", rest)


class LogReader:
    """The new lines of every stream of one job, since the last read."""

    def __init__(self, logs, job: str) -> None:
        self.logs, self.job = logs, job
        self.tokens: dict[str, str] = {}

    def streams(self) -> list[str]:
        names: list[str] = []
        kwargs = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": self.job + "/"}
        # Paged to the end: a large multi-host job with restarts has more than one page.
        while True:
            page = self.logs.describe_log_streams(**kwargs)
            names += [s["logStreamName"] for s in page.get("logStreams", [])]
            if not page.get("nextToken"):
                return names
            kwargs["nextToken"] = page["nextToken"]

    def read(self) -> list[tuple[int, str, str]]:
        from botocore.exceptions import ClientError

        try:
            streams = self.streams()
        except ClientError as exc:
            # The group appears with the first job of the account and region: no log yet.
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                return []
            raise
        events: list[tuple[int, str, str]] = []
        for stream in streams:
            host = host_of(stream, self.job)
            while True:
                kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": stream,
                                          "startFromHead": True}
                if stream in self.tokens:
                    kwargs["nextToken"] = self.tokens[stream]
                page = self.logs.get_log_events(**kwargs)
                events += [(e["timestamp"], host, e["message"].rstrip("\n")) for e in page["events"]]
                token = page.get("nextForwardToken")
                done = not page["events"] or token == self.tokens.get(stream)
                if token:
                    self.tokens[stream] = token
                if done:
                    break
        return sorted(events, key=lambda e: (e[0], e[1]))


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value or "")


def console_url(region: str, job: str) -> str:
    domain = "console.amazonaws.cn" if region.startswith("cn-") else "console.aws.amazon.com"
    return f"https://{region}.{domain}/sagemaker/home?region={region}#/jobs/{job}"


def artifact_uris(description: dict[str, Any]) -> tuple[str, str]:
    """model.tar.gz (as DescribeTrainingJob names it) and output.tar.gz beside it."""
    job = description["TrainingJobName"]
    base = description["OutputDataConfig"]["S3OutputPath"].rstrip("/") + f"/{job}/output"
    model = (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts") or f"{base}/model.tar.gz"
    return model, model.rsplit("/", 1)[0] + "/output.tar.gz"


def summary(description: dict[str, Any], region: str, out=sys.stdout) -> None:
    job = description["TrainingJobName"]
    status = description["TrainingJobStatus"]
    print(f"training job {job}: {status} ({description.get('SecondaryStatus', '')})", file=out)
    metrics = description.get("FinalMetricDataList") or []
    if metrics:
        print("final metrics: " + ", ".join(
            f"{m['MetricName']}={m['Value']:.6g}" for m in metrics), file=out)
    training = description.get("TrainingTimeInSeconds")
    billable = description.get("BillableTimeInSeconds")
    if training is not None:
        line = f"training time: {training} s"
        if billable is not None:
            line += f", billable: {billable} s"
            if description.get("EnableManagedSpotTraining") and training:
                line += f" (spot savings {1 - billable / training:.0%})"
        print(line, file=out)
    model, output = artifact_uris(description)
    print(f"model: {model}", file=out)
    print(f"output: {output}", file=out)
    print(f"console: {console_url(region, job)}", file=out)


def follow(job: str, *, sagemaker, logs, s3=None, out=sys.stdout, err=sys.stderr,
           poll: float = DEFAULT_POLL_SECONDS) -> int:
    """Print the job's transitions and logs until it ends; 0 when Completed. Ctrl-C stops
    following only: the job goes on. A job that ends Stopped or Failed with checkpoints (looked
    for with `s3`) is named with the command that resumes it."""
    reader = LogReader(logs, job)
    shown = 0
    try:
        while True:
            description = sagemaker.describe_training_job(TrainingJobName=job)
            transitions = description.get("SecondaryStatusTransitions") or []
            for t in transitions[shown:]:
                print(f"{_when(t.get('StartTime'))} {t['Status']}: {t.get('StatusMessage', '')}",
                      file=out, flush=True)
            shown = len(transitions)
            for _, host, message in reader.read():
                print(f"[{host}] {message}", file=out, flush=True)
            if description["TrainingJobStatus"] in TERMINAL:
                for _, host, message in reader.read():
                    print(f"[{host}] {message}", file=out, flush=True)
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        print(f"\nstopped following {job}; the job goes on. Follow it again with `sm-effdet logs "
              f"{job}`, stop it with `sm-effdet stop {job}`.", file=err, flush=True)
        return 130
    summary(description, sagemaker.meta.region_name, out=out)
    status = description["TrainingJobStatus"]
    if status == "Completed":
        return 0
    from .resume import resume_hint

    reason = (description.get("FailureReason") or (
        "it was stopped before it finished" if status == "Stopped" else "SageMaker gave no reason"
    )).strip().rstrip(".")
    print(f"sm-effdet: training job {job} {status}: {reason}{resume_hint(description, s3)}.",
          file=err)
    return 1
