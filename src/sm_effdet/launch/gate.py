"""The quality gate of a pipeline: is a trained model good enough to replace what is deployed?

The measure is the model's own record of its best epoch (model.json's `metrics.valid_map`, COCO
mAP on the job's validation set), read from the job's model.tar.gz without downloading the
weights: model.json is a small member and the archive is read as a stream up to it.
"""

from __future__ import annotations

import json
import math
import tarfile
from typing import Any

from ..errors import UserInputError, shorten
from .upload import split_s3

METRIC = "valid_map"
# model.json is a few hundred kB at most (its history grows with the epochs); a larger member is
# not a model card this project wrote.
MAX_CARD_BYTES = 16 * 1024 * 1024


def model_card_at(s3, model_data: str) -> dict[str, Any]:
    """model.json from the model.tar.gz at `model_data` (s3://...)."""
    bucket, key = split_s3(model_data) if str(model_data).startswith("s3://") else ("", "")
    if not bucket or not key:
        raise UserInputError(
            f"{shorten(model_data)} is not an s3://bucket/key URI of a model.tar.gz."
        )
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        with tarfile.open(fileobj=body, mode="r|*") as archive:
            for member in archive:
                if member.name.lstrip("./") != "model.json":
                    continue
                if not member.isfile() or member.size > MAX_CARD_BYTES:
                    break
                return json.loads(archive.extractfile(member).read())
    except (tarfile.TarError, EOFError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserInputError(
            f"{model_data} is not a readable model.tar.gz ({shorten(reason, 120)}); give the "
            "model.tar.gz a training job of this project wrote."
        ) from None
    raise UserInputError(
        f"{model_data} holds no model.json at its root; give the model.tar.gz a training job of "
        "this project wrote."
    )


def validation_map(card: dict[str, Any], where: str) -> float:
    value = (card.get("metrics") or {}).get(METRIC)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserInputError(
            f"the model at {where} records no validation mAP (metrics.{METRIC} in model.json); "
            "train it with a validation set (a validation channel, a split file or val_fraction "
            "above 0) to gate on its quality."
        )
    return float(value)


def deployed_model_data(sagemaker, endpoint: str) -> str | None:
    """The model.tar.gz the endpoint serves now, or None when there is no such endpoint."""
    from .aws import is_not_found

    try:
        config_name = sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except Exception as exc:
        # Only a missing endpoint is "nothing deployed": any other refusal (throttling,
        # permissions, a malformed name) must not let the gate deploy over what is there.
        if is_not_found(exc):
            return None
        raise
    config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
    model_name = config["ProductionVariants"][0]["ModelName"]
    model = sagemaker.describe_model(ModelName=model_name)
    container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
    return container.get("ModelDataUrl")


def passes(candidate: float, min_map: float, deployed: float | None = None) -> tuple[bool, str]:
    """Whether the candidate goes on, and one sentence saying why."""
    if candidate < min_map:
        return False, (
            f"validation mAP {candidate:.4f} is below the threshold {min_map:.4f}: not deployed."
        )
    if deployed is not None and candidate < deployed:
        return False, (
            f"validation mAP {candidate:.4f} is below the deployed model's {deployed:.4f}: not "
            "deployed."
        )
    against = f" and the deployed model's {deployed:.4f}" if deployed is not None else ""
    return True, f"validation mAP {candidate:.4f} reaches the threshold {min_map:.4f}{against}."
