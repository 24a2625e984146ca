"""boto3 clients the boto3 way, and AWS errors as one sentence each."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import JobError, UserInputError, shorten

# Throttling and transient errors are retried by botocore's standard mode (exponential backoff
# with jitter, a retry quota); this many attempts in all before the error reaches the user.
MAX_ATTEMPTS = 8

THROTTLING = {
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "SlowDown", "RequestThrottled",
}


# A caller that owns the credentials (an Airflow task: its AWS connection, with a role, region
# and endpoint of its own) makes every client the launcher asks for, so that nothing the launcher
# does falls back to boto3's default chain behind the caller's back.
_SOURCE: contextvars.ContextVar[tuple[Callable[[str], Any], str] | None] = contextvars.ContextVar(
    "sm_effdet_client_source", default=None
)


@contextlib.contextmanager
def clients_from(make_client: Callable[[str], Any], region: str) -> Iterator[None]:
    """Inside: `client(service)` is `make_client(service)` and the launcher's region is `region`."""
    token = _SOURCE.set((make_client, region))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def scoped_region() -> str | None:
    """The region of the enclosing `clients_from`, if any."""
    source = _SOURCE.get()
    return source[1] if source else None


# An unknown name, as each service words it. Real SageMaker answers DescribeTrainingJob with
# "ValidationException: Requested resource not found." and DescribeEndpoint (and DeleteEndpoint,
# DescribeModel, ...) with 'Could not find endpoint "arn:..."'; SageMaker Runtime with
# "ValidationError: Endpoint X of account N not found."; moto says "Could not find training job
# 'arn:...'". A ValidationException is only a missing name when its message says so.
NOT_FOUND_CODES = {
    "ResourceNotFound", "ResourceNotFoundException", "NoSuchEntity", "NoSuchEntityException",
    "NoSuchKey", "NoSuchBucket", "NotFound", "404", "RepositoryNotFoundException",
    "ImageNotFoundException",
}
NOT_FOUND_MESSAGE = re.compile(
    r"requested resource not found|could not find|can(no|')t find|not found|does not exist",
    re.IGNORECASE,
)


def is_not_found(exc: BaseException) -> bool:
    """Whether `exc` is AWS saying that the named resource does not exist."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in NOT_FOUND_CODES:
        return True
    return code in ("ValidationException", "ValidationError") and bool(
        NOT_FOUND_MESSAGE.search(str(error.get("Message") or ""))
    )


def not_found_sentence(what: str, name: str, region: str | None, listing: str | None = None) -> str:
    where = f"region {region}" if region else "this region"
    hint = f", or list them with `{listing}`" if listing else ""
    return (f"there is no {what} named {shorten(name, 120)} in {where}; check the name and the "
            f"region (AWS_REGION, or your profile's region){hint}.")


@contextlib.contextmanager
def named(what: str, name: str, region: str | None, listing: str | None = None):
    """Around a call that names one resource (Describe*, Delete*, Stop*): AWS's not-found answer,
    whatever its wording, becomes one sentence naming the resource and the region. Only there:
    elsewhere "Could not find" may name another thing (CreateModel's missing model data)."""
    try:
        yield
    except Exception as exc:
        if is_not_found(exc):
            raise JobError(not_found_sentence(what, name, region, listing)) from None
        raise


def region_name(required: bool = True) -> str | None:
    """The region the boto3 way (AWS_REGION, AWS_DEFAULT_REGION, the profile), or the caller's
    (clients_from: an Airflow connection's); no AWS call."""
    import botocore.session

    region = (scoped_region() or os.environ.get("AWS_REGION")
              or botocore.session.Session().get_config_variable("region"))
    if not region and required:
        raise UserInputError("no AWS region is set; set AWS_REGION (or AWS_DEFAULT_REGION) or "
                             "a region in your AWS profile.")
    return region


def client(service: str, region: str | None = None):
    """A client with standard retries; region and credentials from the environment or profile,
    AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_<SERVICE>) honoured by botocore itself; inside
    `clients_from`, the caller's client."""
    source = _SOURCE.get()
    if source is not None and region in (None, source[1]):
        return source[0](service)
    import boto3

    return boto3.session.Session().client(
        service, region_name=region or region_name(), config=retry_config()
    )


def retry_config():
    from botocore.config import Config

    return Config(retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS})


def explain(exc: BaseException) -> str:
    """One sentence for an error from boto3 or botocore: what AWS said and what to do."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ("no AWS credentials were found; configure them with `aws configure`, AWS_PROFILE "
                "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
    if isinstance(exc, NoRegionError):
        return "no AWS region is set; set AWS_REGION (or AWS_DEFAULT_REGION) or a profile's region."
    if isinstance(exc, EndpointConnectionError):
        return (f"cannot reach AWS at {exc.kwargs.get('endpoint_url')}; check the network, the "
                "region and AWS_ENDPOINT_URL.")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = shorten(str(error.get("Message") or "").strip().rstrip("."), 600)
        operation = exc.operation_name
        if code in ("AccessDenied", "AccessDeniedException", "403", "UnauthorizedOperation"):
            return (f"AWS denied {operation} to these credentials ({message or code}); give "
                    "your user or role the permission it names, or use other credentials.")
        if code == "ResourceLimitExceeded":
            return (f"SageMaker refused {operation} for a quota ({message}); request a higher "
                    "quota for this instance type in Service Quotas (Amazon SageMaker), or choose "
                    "another --instance-type or a lower --instance-count.")
        if code in THROTTLING:
            return (f"AWS kept throttling {operation} after {MAX_ATTEMPTS} attempts with backoff "
                    "(botocore's standard retry mode); wait a minute and run the command again.")
        if code in ("ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId",
                    "UnrecognizedClientException", "SignatureDoesNotMatch"):
            return (f"AWS did not accept these credentials for {operation} ({message or code}); "
                    "refresh them (aws sso login, or new keys) and run the command again.")
        if is_not_found(exc):
            region = region_name(required=False) or "the configured region"
            return (f"{operation}: {message or code}; check the name and the region ({region}, "
                    "from AWS_REGION or your profile).")
        if code == "ValidationException":
            return f"SageMaker refused {operation}: {message}."
        return f"{operation} failed with {code}: {message or 'no message'}."
    return f"the AWS call failed: {shorten(str(exc), 600)}."
