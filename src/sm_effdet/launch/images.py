"""The training image: the URI `make push` prints, its shape, and whether ECR holds it.

SageMaker pulls the image only when the job starts, after the data was uploaded and the
instance was paid for; the default tag (the checkout's commit) is one that may never have been
pushed. ECR's DescribeImages answers in a second, so it is asked before anything is uploaded.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import UserInputError, shorten

REPOSITORY = "sm-effdet"
ECR_URI = re.compile(
    r"(?P<account>\d{12})\.dkr\.ecr(-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/"
    r"(?P<repository>[a-z0-9._/-]+)(?::(?P<tag>[\w.-]{1,128})|@(?P<digest>sha256:[0-9a-f]{64}))"
)
REPO_ROOT = Path(__file__).resolve().parents[3]


def git_tag() -> str | None:
    """`make`'s TAG: the checkout's short commit ("dev" without git); None when installed from a
    wheel, where no checkout says which image was pushed."""
    if not (REPO_ROOT / "Makefile").is_file() or not (REPO_ROOT / "src" / "sm_effdet").is_dir():
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "dev"
    except (OSError, subprocess.SubprocessError):
        return "dev"


def default_image(account: str, region: str, tag: str | None = None) -> str:
    """The URI `make push` prints: ACCOUNT.dkr.ecr.REGION.DOMAIN/REPOSITORY:TAG."""
    tag = tag or git_tag()
    if not tag:
        raise UserInputError("no image was given and there is no checkout to take `make push`'s "
                             "tag from; pass --image URI (or --image-tag TAG).")
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{REPOSITORY}:{tag}"


def check_image(image: str) -> None:
    if not ECR_URI.fullmatch(image):
        raise UserInputError(
            f"the image '{shorten(image)}' is not an ECR image URI; SageMaker trains only from "
            "ECR: run `make push` and pass the URI it prints (ACCOUNT.dkr.ecr.REGION."
            "amazonaws.com/REPOSITORY:TAG) as --image."
        )


def check_image_pushed(image: str, ecr_for: Callable[[str], Any] | None, out=sys.stderr) -> bool:
    """Refuse an image ECR says it does not hold; True when ECR showed it, False (with a note
    saying so) when it could not be asked. `ecr_for(region)` makes the client of the image's
    region; None: not asked."""
    match = ECR_URI.fullmatch(image)
    if match is None:  # check_image refused it before; a local image never gets here
        return False
    if ecr_for is None:
        print(f"note: the image {image} was not checked in ECR (no ECR client here); a tag that "
              "was never pushed fails the job only when it starts.", file=out)
        return False
    from botocore.exceptions import BotoCoreError, ClientError

    account, region, repository = match["account"], match["region"], match["repository"]
    wanted = {"imageTag": match["tag"]} if match["tag"] else {"imageDigest": match["digest"]}
    try:
        found = ecr_for(region).describe_images(
            registryId=account, repositoryName=repository, imageIds=[wanted])["imageDetails"]
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "ImageNotFoundException":
            raise UserInputError(
                f"the image {image} was never pushed: ECR repository {repository} of account "
                f"{account} in {region} has no image {match['tag'] or match['digest']}; push it "
                "with `make push` (it tags the checkout's commit) or pass --image-tag or --image "
                "of an image that is there."
            ) from None
        if code == "RepositoryNotFoundException":
            raise UserInputError(
                f"the image {image} cannot be pulled: account {account} has no ECR repository "
                f"'{repository}' in {region}; create and push it with `make push`, or pass "
                "--image of an image that exists."
            ) from None
        why = f"{code}: {shorten(str(exc.response.get('Error', {}).get('Message', '')), 200)}"
    except BotoCoreError as exc:
        why = shorten(str(exc), 200)
    else:
        pushed = found[0].get("imagePushedAt") if found else None
        when = f", pushed {pushed.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if isinstance(pushed, datetime) else ""
        print(f"image {image}: in ECR{when}", file=out)
        return True
    print(f"note: the image {image} was not checked in ECR ({why}); a tag that was never pushed "
          "fails the job only when it starts.", file=out)
    return False
