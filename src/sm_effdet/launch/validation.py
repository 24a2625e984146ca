"""Every request the launcher builds is checked here before any AWS call.

botocore validates a request against SageMaker's service model when it is sent (required keys,
unknown keys, types, minimums) but not the model's patterns, enums and maximums: a job name
with an underscore or an instance type SageMaker does not know would only fail at the API, after
the data was uploaded. `check_request` runs botocore's own validation offline and then walks
the same model for what it leaves out, plus the rules its documentation states in words: those
of training jobs here (spot, run times, warm pools, volume keys, reserved tags), those of
tuning strategies and scaling types in search_space.py.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from ..errors import UserInputError, shorten

SERVICE = "sagemaker"
# StoppingCondition.MaxRuntimeInSeconds: "The maximum value is 28 days" (the model's docs; its
# shape has no maximum, so botocore lets a larger one through).
MAX_RUN_SECONDS = 28 * 24 * 3600
MAX_WARM_POOL_SECONDS = 21600  # ResourceConfig.KeepAlivePeriodInSeconds's maximum in the model
RESERVED_TAG_PREFIX = "aws:"
# Instance families with local NVMe instance storage (EC2's "Instance store volumes" table),
# which SageMaker encrypts with the instance's own hardware key: ResourceConfig.VolumeKmsKeyId
# is refused with them ("You can't request a VolumeKmsKeyId when using an instance type with
# local storage"). A family missing here is sent and left to SageMaker.
LOCAL_STORAGE_FAMILIES = (
    "c5d", "m5d", "r5d", "g4dn", "g5", "g6", "g6e", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en",
    "p6-b200", "trn1", "trn1n", "trn2",
)


def service_model(service: str = SERVICE):
    import botocore.session

    return botocore.session.get_session().get_service_model(service)


def check_request(operation: str, params: Mapping[str, Any], service: str = SERVICE) -> None:
    """Fail with one sentence when `params` is not a valid `operation` request."""
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    shape = service_model(service).operation_model(operation).input_shape
    try:
        validate_parameters(params, shape)
    except ParamValidationError as exc:
        # botocore's message: a header line, then one line per problem; the first one is named.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        problem = (lines[1:] or lines or ["unknown problem"])[0].rstrip(".")
        raise UserInputError(f"the {operation} request is not valid: {problem}.") from None
    problem = _walk(params, shape, operation)
    if problem:
        raise UserInputError(f"the {operation} request is not valid: {problem}.")
    if operation in ("CreateTrainingJob", "CreateHyperParameterTuningJob"):
        check_tags(params.get("Tags") or [])
    if operation == "CreateTrainingJob":
        check_training_job_rules(params)
    elif operation == "CreateHyperParameterTuningJob":
        from .search_space import check_tuning_job_rules

        for definition in [params.get("TrainingJobDefinition")] + list(
            params.get("TrainingJobDefinitions") or []
        ):
            if definition:
                check_training_job_rules(definition)
        check_tuning_job_rules(params)


def check_tags(tags: list[Mapping[str, str]]) -> None:
    for tag in tags:
        if str(tag.get("Key", "")).lower().startswith(RESERVED_TAG_PREFIX):
            raise UserInputError(
                f"the tag key {shorten(tag['Key'], 60)!r} starts with '{RESERVED_TAG_PREFIX}', "
                "which AWS reserves for its own tags; choose another key."
            )


def _walk(value: Any, shape, where: str) -> str | None:
    """The first pattern, enum or maximum that `value` breaks, as a phrase naming the field."""
    kind = shape.type_name
    meta = shape.metadata
    if kind == "structure":
        for name, member in shape.members.items():
            if isinstance(value, Mapping) and name in value:
                problem = _walk(value[name], member, f"{where}.{name}")
                if problem:
                    return problem
        return None
    if kind == "list":
        if "max" in meta and len(value) > meta["max"]:
            return f"{where} has {len(value)} entries, at most {meta['max']} are allowed"
        for k, item in enumerate(value):
            problem = _walk(item, shape.member, f"{where}[{k}]")
            if problem:
                return problem
        return None
    if kind == "map":
        if "max" in meta and len(value) > meta["max"]:
            return f"{where} has {len(value)} entries, at most {meta['max']} are allowed"
        for key, item in value.items():
            problem = _walk(key, shape.key, f"{where} key {shorten(key, 40)!r}") or _walk(
                item, shape.value, f"{where}[{shorten(key, 40)!r}]"
            )
            if problem:
                return problem
        return None
    if kind == "string":
        if shape.enum and value not in shape.enum:
            allowed = ", ".join(shape.enum) if len(shape.enum) <= 12 else (
                ", ".join(shape.enum[:8]) + f" and {len(shape.enum) - 8} more"
            )
            return f"{where} is {shorten(value, 60)!r}, which is not one of {allowed}"
        if "max" in meta and len(value) > meta["max"]:
            return f"{where} is {len(value)} characters long, at most {meta['max']} are allowed"
        pattern = meta.get("pattern")
        compiled = _compiled(pattern) if pattern else None
        if compiled is not None and not compiled.fullmatch(value):
            return f"{where} is {shorten(value, 60)!r}, which does not match {shorten(pattern, 120)}"
        return None
    if kind in ("integer", "long", "float", "double"):
        if "max" in meta and value > meta["max"]:
            return f"{where} is {value}, at most {meta['max']} is allowed"
    return None


# Java's Unicode classes in the model's patterns (tag keys and values, say), which Python's re
# lacks, as the nearest classes it has; each is as wide or wider, so nothing valid is refused.
UNICODE_CLASSES = {
    r"\p{L}": r"\w", r"\p{M}": r"\w", r"\p{N}": r"\d", r"\p{Alnum}": r"\w", r"\p{Z}": r"\s",
    r"\p{P}": r"\W", r"\p{S}": r"\W",
}


@functools.cache
def _compiled(pattern: str) -> re.Pattern | None:
    """The pattern for Python's re; None for the few that only Java can read (surrogate ranges
    of Athena names, a quantified `$` in customer metadata), which are then not checked here."""
    for java, python in UNICODE_CLASSES.items():
        pattern = pattern.replace(java, python)
    try:
        return re.compile(pattern, flags=re.DOTALL)
    except re.error:
        return None


def check_training_job_rules(params: Mapping[str, Any]) -> None:
    """What SageMaker refuses across fields, and what this project requires of a spot job."""
    stopping = params.get("StoppingCondition") or {}
    max_run = stopping.get("MaxRuntimeInSeconds")
    max_wait = stopping.get("MaxWaitTimeInSeconds")
    spot = params.get("EnableManagedSpotTraining", False)
    if max_run is not None and max_run > MAX_RUN_SECONDS:
        raise UserInputError(
            f"MaxRuntimeInSeconds (--max-run) is {max_run}, over the 28 days ({MAX_RUN_SECONDS} s) "
            "SageMaker lets a training job run; lower it (a later job can resume from the "
            "checkpoints)."
        )
    resources = params.get("ResourceConfig") or {}
    if resources.get("KeepAlivePeriodInSeconds") and spot:
        raise UserInputError(
            "a warm pool (KeepAlivePeriodInSeconds, --keep-alive-period) cannot be used with "
            "managed spot training; add --no-spot or leave the warm pool out."
        )
    family = str(resources.get("InstanceType", "")).split(".")[1:2]
    if resources.get("VolumeKmsKeyId") and family and family[0] in LOCAL_STORAGE_FAMILIES:
        raise UserInputError(
            f"{resources['InstanceType']} keeps its data on local NVMe storage, which SageMaker "
            "encrypts with the instance's own key, so it takes no VolumeKmsKeyId (--volume-kms-key); "
            "leave the key out or choose an instance type with EBS storage (ml.m5, ml.p3, ...)."
        )
    if spot:
        if max_wait is None:
            raise UserInputError(
                "a managed spot training job needs StoppingCondition.MaxWaitTimeInSeconds; set "
                "it at least as long as MaxRuntimeInSeconds."
            )
        if max_run is not None and max_wait < max_run:
            raise UserInputError(
                f"MaxWaitTimeInSeconds ({max_wait}) is below MaxRuntimeInSeconds ({max_run}); a "
                "spot job must be allowed to wait at least as long as it may run: raise the "
                "maximum wait or lower the maximum run time."
            )
        if not (params.get("CheckpointConfig") or {}).get("S3Uri"):
            raise UserInputError(
                "a managed spot training job without CheckpointConfig restarts from scratch after "
                "every interruption; give it a checkpoint S3 location or train on demand."
            )
    elif max_wait is not None:
        raise UserInputError(
            "MaxWaitTimeInSeconds is only for managed spot training; remove it or turn spot on."
        )
