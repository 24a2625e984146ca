"""`sm-effdet endpoints` and `sm-effdet delete`: the account's endpoints in this region with what
they serve, and deleting one with its endpoint config and model, as the SageMaker SDK's
`delete_endpoint` + `delete_endpoint_config` + `delete_model` do.

Also what `deploy` uses after an update: the configs and models it made before, deleted once the
endpoint serves the new ones, so that updates do not pile them up.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from ..errors import shorten
from .aws import is_not_found, named

# SageMaker writes a training job's model at S3OutputPath/<job>/output/model.tar.gz.
MODEL_OF_JOB = re.compile(r"s3://[^/]+/(?:.*/)?([a-zA-Z0-9](?:-*[a-zA-Z0-9]){0,62})/output/model\.tar\.gz")
# deploy names a config and its model `<endpoint>-YYYYmmdd-HHMMSS` (hosting.resource_name).
STAMP = re.compile(r"\d{8}-\d{6}")
LISTING = "sm-effdet endpoints"


def training_job_of(model_data_url: str | None) -> str | None:
    match = MODEL_OF_JOB.fullmatch(model_data_url or "")
    return match.group(1) if match else None


def made_by_deploy(endpoint: str, config_name: str) -> bool:
    """Whether `config_name` is one that `sm-effdet deploy` made for `endpoint` (and so used by
    no other endpoint): its name is the endpoint's, shortened as resource_name does, and a stamp."""
    from .hosting import resource_name

    stamp = config_name[-15:]
    return bool(STAMP.fullmatch(stamp)) and resource_name(endpoint, stamp) == config_name


def _describe_or_none(call, **kwargs) -> dict | None:
    try:
        return call(**kwargs)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise


def config_models(sagemaker, config_name: str) -> tuple[dict | None, list[str]]:
    """The endpoint config (None when it was deleted) and the models its variants serve."""
    config = _describe_or_none(sagemaker.describe_endpoint_config, EndpointConfigName=config_name)
    if config is None:
        return None, []
    variants = list(config.get("ProductionVariants") or []) + list(
        config.get("ShadowProductionVariants") or []
    )
    models = [v["ModelName"] for v in variants if v.get("ModelName")]
    return config, list(dict.fromkeys(models))


def delete_config_and_models(sagemaker, config_name: str, *, keep_models: tuple[str, ...] = (),
                             out: TextIO = sys.stdout) -> None:
    """Delete an endpoint config and the models it names (but `keep_models`); what is already
    gone is said and skipped."""
    config, models = config_models(sagemaker, config_name)
    if config is None:
        print(f"  endpoint config {config_name}: already deleted", file=out)
        return
    sagemaker.delete_endpoint_config(EndpointConfigName=config_name)
    print(f"  DeleteEndpointConfig {config_name}", file=out)
    for model in models:
        if model in keep_models:
            continue
        try:
            sagemaker.delete_model(ModelName=model)
        except Exception as exc:
            if not is_not_found(exc):
                raise
            print(f"  model {model}: already deleted", file=out)
            continue
        print(f"  DeleteModel {model}", file=out)


def delete(sagemaker, endpoint: str, *, out: TextIO = sys.stdout) -> None:
    """The endpoint, its config(s) and their models. During an update the endpoint names two
    configs (the one it serves and the pending one): both go."""
    region = sagemaker.meta.region_name
    with named("endpoint", endpoint, region, LISTING):
        description = sagemaker.describe_endpoint(EndpointName=endpoint)
    configs = [description.get("EndpointConfigName")]
    pending = (description.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
    configs += [pending] if pending else []
    with named("endpoint", endpoint, region, LISTING):
        sagemaker.delete_endpoint(EndpointName=endpoint)
    print(f"DeleteEndpoint {endpoint} (it was {description.get('EndpointStatus')}; billing stops "
          "once it is gone)", file=out)
    for config_name in dict.fromkeys(c for c in configs if c):
        delete_config_and_models(sagemaker, config_name, out=out)


def replace_old_config(sagemaker, endpoint: str, old_config: str, new_config: str,
                       out: TextIO = sys.stdout) -> None:
    """After an update to `new_config` is InService: delete `old_config` and its models when
    deploy made them for this endpoint; a config made otherwise may serve other endpoints and
    is kept (said)."""
    if old_config == new_config:
        return
    if not made_by_deploy(endpoint, old_config):
        print(f"Kept the previous endpoint config {old_config}: sm-effdet did not make it for "
              f"{endpoint}, so other endpoints may use it (aws sagemaker delete-endpoint-config "
              f"--endpoint-config-name {old_config} when none does).", file=out)
        return
    _, new_models = config_models(sagemaker, new_config)
    print(f"Deleting what {endpoint} served before:", file=out)
    delete_config_and_models(sagemaker, old_config, keep_models=tuple(new_models), out=out)


# --- sm-effdet endpoints ----------------------------------------------------------------


def _instances(config: dict | None) -> str:
    if config is None:
        return "(config deleted)"
    parts = []
    for variant in config.get("ProductionVariants") or []:
        if variant.get("ServerlessConfig"):
            parts.append("serverless")
        else:
            parts.append(f"{variant.get('InitialInstanceCount', '?')} x {variant.get('InstanceType', '?')}")
    return ", ".join(parts) or "-"


def endpoint_rows(sagemaker, name_contains: str | None = None) -> list[dict[str, str]]:
    """One row per endpoint, newest first: name, status, instances, the training job of its
    (first) model, when it last changed."""
    summaries: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"SortBy": "CreationTime", "SortOrder": "Descending", "MaxResults": 100}
    if name_contains:
        kwargs["NameContains"] = name_contains
    while True:
        page = sagemaker.list_endpoints(**kwargs)
        summaries += page.get("Endpoints", [])
        if not page.get("NextToken"):
            break
        kwargs["NextToken"] = page["NextToken"]
    rows = []
    for summary in summaries:
        name = summary["EndpointName"]
        description = _describe_or_none(sagemaker.describe_endpoint, EndpointName=name)
        if description is None:  # deleted between the listing and now
            continue
        config, models = config_models(sagemaker, description["EndpointConfigName"])
        job = "-"
        if models:
            model = _describe_or_none(sagemaker.describe_model, ModelName=models[0])
            container = (model or {}).get("PrimaryContainer") or ((model or {}).get("Containers") or [{}])[0]
            job = training_job_of(container.get("ModelDataUrl")) or (
                "(model deleted)" if model is None else "-")
        modified = summary.get("LastModifiedTime") or summary.get("CreationTime")
        rows.append({
            "NAME": name,
            "STATUS": description.get("EndpointStatus", "?"),
            "INSTANCES": _instances(config),
            "TRAINING JOB": job,
            "LAST MODIFIED": modified.strftime("%Y-%m-%d %H:%M UTC") if hasattr(modified, "strftime") else str(modified or "-"),
        })
    return rows


def print_table(rows: list[dict[str, str]], out: TextIO) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip(), file=out)
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip(), file=out)


# --- The commands -----------------------------------------------------------------------


def add_commands(subparsers) -> None:
    listing = subparsers.add_parser(
        "endpoints",
        help="list this region's endpoints: status, instances, the training job of the model",
        description="ListEndpoints, then each endpoint's config and model (newest first).",
    )
    listing.add_argument("--name-contains", metavar="TEXT", help="only endpoints whose name has TEXT")
    listing.set_defaults(run=run_endpoints)

    remove = subparsers.add_parser(
        "delete",
        help="delete an endpoint with its endpoint config and model",
        description="DeleteEndpoint, DeleteEndpointConfig and DeleteModel (the SDK's "
        "delete_endpoint and delete_model): nothing of it is left to bill or to clean up.",
    )
    remove.add_argument("endpoint", metavar="ENDPOINT")
    remove.set_defaults(run=run_delete)


def run_endpoints(args, *, sagemaker=None, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # at call time: tests capture it
    if sagemaker is None:
        from .aws import client

        sagemaker = client("sagemaker")
    rows = endpoint_rows(sagemaker, args.name_contains)
    region = sagemaker.meta.region_name
    if not rows:
        which = f" whose name contains {shorten(args.name_contains, 60)!r}" if args.name_contains else ""
        print(f"No endpoints{which} in {region}.", file=out)
        return 0
    print_table(rows, out)
    return 0


def run_delete(args, *, sagemaker=None, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    if sagemaker is None:
        from .aws import client

        sagemaker = client("sagemaker")
    delete(sagemaker, args.endpoint, out=out)
    return 0
