"""The execution role and the default bucket, found the way the SageMaker Python SDK finds them.

- `--role` takes a role ARN (used as it is, no call: the SDK's `expand_role`), a role NAME, or the
  assumed-role ARN of a session (arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION, what a SageMaker
  Studio or notebook session's credentials are); the last two become the role's ARN through IAM
  GetRole, which also gives its path (service-role/...), as `get_execution_role` does.
- No `--role`: the role of these credentials, when they are an assumed role (Studio, notebooks,
  an instance profile), as `get_execution_role` does; a user's keys have no role to give.
- The account of the default bucket and image is the one of these credentials (STS
  GetCallerIdentity), never the role's: a role of another account would name a bucket and an
  ECR repository this account does not own.
- The default bucket sagemaker-REGION-ACCOUNT is created when missing, and an existing one must
  belong to the account (HeadBucket with ExpectedBucketOwner), as the SDK's `default_bucket()`
  does: anyone can create a bucket of that name first and wait for this account's data.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

from ..errors import UserInputError, shorten

ROLE_ARN = re.compile(r"arn:(aws[a-z-]*):iam::(\d{12}):role/(?:[\w+=,.@-]+/)*([\w+=,.@-]+)")
ASSUMED_ROLE_ARN = re.compile(r"arn:(aws[a-z-]*):sts::(\d{12}):assumed-role/([\w+=,.@-]+)/[^/]+")
ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}")
SAGEMAKER_PRINCIPAL = "sagemaker.amazonaws.com"
# Roles the SageMaker console creates live under this path; the SDK assumes it when it cannot
# read the role (no iam:GetRole).
CONSOLE_ROLE_MARK = "AmazonSageMaker-ExecutionRole"

ClientFor = Callable[[str], Any]


def _default_client(service: str):
    from .aws import client

    return client(service)


def caller(client_for: ClientFor | None = None) -> dict[str, str]:
    """STS GetCallerIdentity: {"Account", "Arn", "UserId"} of these credentials."""
    answer = (client_for or _default_client)("sts").get_caller_identity()
    return {k: answer[k] for k in ("Account", "Arn", "UserId") if k in answer}


def _trusts_sagemaker(document: Any) -> bool:
    # boto3 gives the trust policy decoded; the raw API gives it URL-encoded JSON.
    text = json.dumps(document) if not isinstance(document, str) else urllib.parse.unquote(document)
    return SAGEMAKER_PRINCIPAL in text


def get_role(name: str, *, given: str, client_for: ClientFor | None = None) -> str | None:
    """The ARN of the role NAME (IAM GetRole), checked to trust SageMaker; None when these
    credentials may not read roles."""
    from botocore.exceptions import ClientError

    try:
        role = (client_for or _default_client)("iam").get_role(RoleName=name)["Role"]
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchEntity", "NoSuchEntityException"):
            raise UserInputError(
                f"--role {shorten(given, 120)}: there is no IAM role named {shorten(name, 64)} in "
                "the account of these credentials; check the name or pass the role's full ARN."
            ) from None
        if code in ("AccessDenied", "AccessDeniedException"):
            return None
        raise
    if not _trusts_sagemaker(role.get("AssumeRolePolicyDocument", "")):
        raise UserInputError(
            f"the role {role['Arn']} does not let SageMaker assume it (its trust policy does not "
            f"name {SAGEMAKER_PRINCIPAL}), so the job would fail to start; add SageMaker to its "
            "trust relationships or pass another role with --role."
        )
    return role["Arn"]


def role_parts(role: str) -> tuple[str | None, str | None, str] | None:
    """(partition, account, name) of an assumed-role ARN or a role name (no account); None for
    a role ARN; refused with one sentence for anything else, before any call."""
    if ROLE_ARN.fullmatch(role):
        return None
    assumed = ASSUMED_ROLE_ARN.fullmatch(role)
    if assumed:
        return assumed.group(1), assumed.group(2), assumed.group(3)
    if ROLE_NAME.fullmatch(role) and not role.startswith("arn"):
        return None, None, role
    raise UserInputError(
        f"--role '{shorten(role)}' is neither an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME), "
        "a role name, nor a session's assumed-role ARN (arn:aws:sts::ACCOUNT:assumed-role/"
        "NAME/SESSION); give one of these."
    )


def resolve_role(role: str, *, client_for: ClientFor | None = None, out: TextIO = sys.stderr) -> str:
    """The role ARN for a role ARN (as it is), a role name or an assumed-role ARN."""
    parts = role_parts(role)
    if parts is None:
        return role
    partition, account, name = parts
    found = get_role(name, given=role, client_for=client_for)
    if found:
        return found
    # No iam:GetRole: the SDK guesses the ARN, with the console's path for the console's roles.
    if account is None:
        raise UserInputError(
            f"--role {shorten(role, 64)} is a role name and these credentials may not look it up "
            "(iam:GetRole was denied); pass the role's full ARN, arn:aws:iam::ACCOUNT:role/NAME."
        )
    path = "service-role/" if CONSOLE_ROLE_MARK in name else ""
    guessed = f"arn:{partition}:iam::{account}:role/{path}{name}"
    print(f"iam:GetRole was denied, so the role's path is guessed: {guessed}", file=out)
    return guessed


def role_and_account(
    role: str | None,
    *,
    need_account: bool = True,
    dry_run: bool = False,
    client_for: ClientFor | None = None,
    out: TextIO = sys.stderr,
) -> tuple[str, str | None]:
    """The execution role's ARN and the account of these credentials (None when not needed:
    a role ARN with the bucket and image given takes no call at all).

    A dry run without credentials keeps working with a role ARN: the account is then the
    role's, and it says so on `out` (a real run always asks STS)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if role:
        role_parts(role)  # a malformed --role is refused before any call
    matched = ROLE_ARN.fullmatch(role or "")
    if matched and not need_account:
        return role, None
    try:
        identity = caller(client_for)
    except (BotoCoreError, ClientError) as exc:
        if not dry_run or not isinstance(exc, BotoCoreError):
            raise
        if matched:
            print(f"no AWS credentials to ask STS for the account: the dry run names the role's "
                  f"account, {matched.group(2)}.", file=out)
            return role, matched.group(2)
        what = f"resolve --role {shorten(role, 64)}" if role else "find the role of these credentials"
        raise UserInputError(
            f"a dry run without a role ARN needs AWS credentials to {what} (IAM GetRole, STS "
            "GetCallerIdentity); pass --role arn:aws:iam::ACCOUNT:role/NAME, or configure "
            "credentials."
        ) from None
    account = identity["Account"]
    if role:
        return resolve_role(role, client_for=client_for, out=out), account
    # The SDK's get_execution_role: the role behind these credentials.
    assumed = ASSUMED_ROLE_ARN.fullmatch(identity.get("Arn", ""))
    if not assumed:
        raise UserInputError(
            f"no execution role was given and these credentials are {shorten(identity.get('Arn'), 120)}, "
            "not a role session (as in SageMaker Studio); pass --role with the NAME or ARN of a "
            "role SageMaker can assume that reads and writes your bucket."
        )
    resolved = resolve_role(identity["Arn"], client_for=client_for, out=out)
    print(f"execution role: {resolved} (the role of these credentials)", file=out)
    return resolved, account


# ---------------------------------------------------------------- the default bucket


def ensure_default_bucket(s3, bucket: str, *, region: str, account: str, out: TextIO = sys.stdout) -> None:
    """Create sagemaker-REGION-ACCOUNT when missing; refuse one that another account owns."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
        return
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("403", "AccessDenied", "Forbidden"):
            raise UserInputError(
                f"the default bucket {bucket} exists but is not owned by account {account} (or "
                "these credentials may not read it), so nothing is written to it; pass a bucket of "
                "your own with --bucket."
            ) from None
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise  # a bucket in another region and the like: check_bucket says it in one sentence
    params: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # us-east-1 takes no LocationConstraint
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**params)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code == "BucketAlreadyOwnedByYou":
            return
        if code == "OperationAborted" and "conflicting conditional operation" in str(error.get("Message", "")):
            return  # another launch is creating it right now
        if code == "BucketAlreadyExists":
            raise UserInputError(
                f"the default bucket name {bucket} is taken by another account; pass a bucket of "
                "your own with --bucket."
            ) from None
        raise
    print(f"created the default bucket s3://{bucket} (as the SageMaker SDK's default_bucket does)", file=out)
