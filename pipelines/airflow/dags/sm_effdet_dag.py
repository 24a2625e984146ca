"""sm-effdet on Airflow: check and upload the data, train, gate on validation mAP, then deploy an
endpoint or run a Batch Transform.

Every request is built by sm-effdet's own launcher (`sm_effdet.launch`, boto3 and no torch), so
the DAG sends exactly what `sm-effdet train`, `deploy` and `transform` would; the Amazon
provider's operators create, wait for and log the jobs.

Trigger it with a configuration (the Params below), e.g.
    {"train_args": ["--data", "s3://bucket/shapes/data/training/", "--role", "arn:...",
                    "--image", "ACCOUNT.dkr.ecr.REGION.amazonaws.com/sm-effdet:TAG",
                    "--set", "epochs=30"],
     "min_map": 0.3, "beat_deployed": true, "endpoint": "sm-effdet-shapes"}
`train_args` are the flags of `sm-effdet train` (docs/launching.md); a local
folder in them is checked and uploaded by the first task, on the Airflow worker.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
from pathlib import Path

# sm_effdet comes from the checkout (pipelines/airflow/dags/ -> src/), from SM_EFFDET_SRC, or from
# a copy of src/sm_effdet beside this file in the dags folder (which Airflow puts on sys.path).
for _src in (os.environ.get("SM_EFFDET_SRC"), Path(__file__).resolve().parents[3] / "src"):
    if _src and (Path(_src) / "sm_effdet" / "launch").is_dir() and str(_src) not in sys.path:
        sys.path.insert(0, str(_src))
        break

from airflow.providers.amazon.aws.operators.sagemaker import (  # noqa: E402
    SageMakerEndpointOperator,
    SageMakerTrainingOperator,
    SageMakerTransformOperator,
)
from airflow.sdk import Param, dag, task  # noqa: E402

DAG_ID = "sm_effdet_train_gate_deploy"
# Seconds between status checks of a job or endpoint (the operators' own polling).
CHECK_INTERVAL = int(os.environ.get("SM_EFFDET_CHECK_INTERVAL", "60"))
# CloudWatch logs of the training job in the task log: on unless turned off.
PRINT_LOG = os.environ.get("SM_EFFDET_PRINT_LOG", "true").lower() not in ("0", "false", "no")


def _clients(*services: str):
    from sm_effdet.launch.aws import client

    return [client(service) for service in services]


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    tags=["sagemaker", "sm-effdet"],
    params={
        "train_args": Param([], type="array", description="the flags of `sm-effdet train`"),
        "min_map": Param(0.0, type="number", minimum=0, maximum=1,
                         description="the least validation mAP (model.json metrics.valid_map)"),
        "beat_deployed": Param(True, type="boolean",
                               description="also require the endpoint's current model's mAP"),
        "endpoint": Param("", type="string", description="endpoint to create or update"),
        "transform_input": Param("", type="string",
                                 description="s3:// prefix of images for a Batch Transform"),
        "transform_output": Param("", type="string", description="s3:// output prefix"),
        "instance_type": Param("ml.m5.xlarge", type="string",
                               description="instance type of the endpoint or transform"),
        "serve_env": Param({}, type="object", description="container environment of serve"),
    },
)
def sm_effdet_train_gate_deploy():
    @task
    def prepare(params=None) -> dict:
        """The CreateTrainingJob request, checked, with local data uploaded (sm-effdet train)."""
        from sm_effdet.launch.request import add_job_arguments, prepare_training_request

        parser = argparse.ArgumentParser(prog="sm-effdet train", exit_on_error=False)
        add_job_arguments(parser)
        args = parser.parse_args([str(a) for a in params["train_args"]])
        (s3,) = _clients("s3")
        log = io.StringIO()
        request = prepare_training_request(args, s3=s3, out=log)
        print(log.getvalue())
        return request

    request = prepare()
    training = SageMakerTrainingOperator(
        task_id="train",
        config=request,
        wait_for_completion=True,
        print_log=PRINT_LOG,
        check_interval=CHECK_INTERVAL,
        # The name sm-effdet chose is where the checkpoints and outputs are: never rename it.
        action_if_job_exists="fail",
    )

    @task.short_circuit
    def quality_gate(training: dict, params=None) -> bool:
        """Go on only with a model at or above the threshold (and the deployed model)."""
        from sm_effdet.launch import gate

        sagemaker, s3 = _clients("sagemaker", "s3")
        model_data = training["Training"]["ModelArtifacts"]["S3ModelArtifacts"]
        candidate = gate.validation_map(gate.model_card_at(s3, model_data), model_data)
        deployed = None
        if params["beat_deployed"] and params["endpoint"]:
            current = gate.deployed_model_data(sagemaker, params["endpoint"])
            if current:
                deployed = gate.validation_map(gate.model_card_at(s3, current), current)
        ok, why = gate.passes(candidate, float(params["min_map"]), deployed)
        print(f"quality gate: {why}")
        return ok

    @task.branch
    def choose(params=None) -> list[str]:
        chosen = []
        if params["endpoint"]:
            chosen.append("endpoint_requests")
        if params["transform_input"]:
            chosen.append("transform_requests")
        return chosen

    def _model(training: dict, params: dict, name: str) -> dict:
        from sm_effdet.launch.hosting import model_request

        job = training["Training"]
        return model_request(
            name,
            image=job["AlgorithmSpecification"]["TrainingImage"],
            model_data=job["ModelArtifacts"]["S3ModelArtifacts"],
            role=job["RoleArn"],
            environment={str(k): str(v) for k, v in params["serve_env"].items()},
        )

    @task
    def endpoint_requests(training: dict, params=None) -> dict:
        from sm_effdet.launch.hosting import endpoint_config_request, endpoint_request

        name = f"{params['endpoint'][:40]}-{_stamp()}"
        model = _model(training, params, name)
        config = endpoint_config_request(
            name, model_name=name, instance_type=params["instance_type"], instance_count=1
        )
        return {"Model": model, "EndpointConfig": config,
                "Endpoint": endpoint_request(params["endpoint"], name)}

    @task
    def transform_requests(training: dict, params=None) -> dict:
        from sm_effdet.launch.hosting import transform_request

        name = f"{training['Training']['TrainingJobName'][:40]}-tr-{_stamp()}"
        output = params["transform_output"] or (
            params["transform_input"].rstrip("/") + f"-detections/{name}/"
        )
        return {
            "Model": _model(training, params, name),
            "Transform": transform_request(
                name, model_name=name, input_uri=params["transform_input"], output_uri=output,
                instance_type=params["instance_type"],
            ),
        }

    endpoint_config = endpoint_requests(training.output)
    transform_config = transform_requests(training.output)
    deploy = SageMakerEndpointOperator(
        task_id="deploy",
        config=endpoint_config,
        operation="create",  # the provider updates the endpoint when it already exists
        wait_for_completion=True,
        check_interval=CHECK_INTERVAL,
    )
    transform = SageMakerTransformOperator(
        task_id="transform",
        config=transform_config,
        wait_for_completion=True,
        check_interval=CHECK_INTERVAL,
        action_if_job_exists="fail",
    )
    routes = choose()
    quality_gate(training.output) >> routes >> [endpoint_config, transform_config]
    endpoint_config >> deploy
    transform_config >> transform


dag_object = sm_effdet_train_gate_deploy()


if __name__ == "__main__":
    # `python sm_effdet_dag.py CONF.json`: one run in this process (Airflow's dag.test()).
    import json

    conf = json.loads(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else {}
    run = dag_object.test(run_conf=conf)
    state = getattr(run, "state", None)
    print(f"DAG run state: {state}")
    sys.exit(0 if str(state).endswith("success") else 1)
