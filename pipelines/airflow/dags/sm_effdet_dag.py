"""sm-effdet on Airflow: check and upload the data, train, gate on validation mAP, then deploy an
endpoint or run a Batch Transform.

Every request is built by sm-effdet's own launcher (`sm_effdet.launch`, boto3 and no torch), so
the DAG sends exactly what `sm-effdet train`, `deploy` and `transform` would; the Amazon
provider's operators create, wait for and log the jobs. Airflow 3.x and 2.10 (Amazon MWAA's)
both run it (pipelines/airflow and pipelines/airflow2 are their locked environments).

One set of credentials: every task, the Python ones included, uses the Airflow connection
`aws_default` (SM_EFFDET_AWS_CONN_ID names another): its keys or role, region and endpoint. When
the connection names no region, the launcher's is used (AWS_REGION, AWS_DEFAULT_REGION, the
profile); `prepare` decides it once and every later task uses that one.

Waiting: with the run's `deferrable` (the default; SM_EFFDET_DEFERRABLE=false changes the
default) the jobs are waited for in Airflow's triggerer, which frees the worker for the hours a
training job runs; turn it off where no triggerer runs. A `train` task retried after a lost
worker re-attaches to the job it had started (same name, same request) instead of failing on
"already exists".

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
import inspect
import io
import math
import os
import sys
from pathlib import Path

# sm_effdet comes from SM_EFFDET_SRC, from the checkout (pipelines/airflow/dags/ -> src/), or
# from a copy of src/sm_effdet beside this file in the dags folder (which Airflow puts on
# sys.path; the .airflowignore beside this file keeps Airflow from parsing the copy as DAGs).
_HERE = Path(__file__).resolve()
_CHECKOUT_SRC = _HERE.parents[3] / "src" if len(_HERE.parents) > 3 else None
for _src in (os.environ.get("SM_EFFDET_SRC"), _CHECKOUT_SRC):
    if _src and (Path(_src) / "sm_effdet" / "launch").is_dir() and str(_src) not in sys.path:
        sys.path.insert(0, str(_src))
        break

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook  # noqa: E402
from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook  # noqa: E402
from airflow.providers.amazon.aws.hooks.s3 import S3Hook  # noqa: E402
from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook  # noqa: E402
from airflow.providers.amazon.aws.operators.sagemaker import (  # noqa: E402
    SageMakerEndpointOperator,
    SageMakerTrainingOperator,
    SageMakerTransformOperator,
)
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

try:  # Airflow 3
    from airflow.sdk import Param, dag, task
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # Airflow 2.10
    from airflow.decorators import dag, task
    from airflow.exceptions import AirflowFailException
    from airflow.models.param import Param

DAG_ID = "sm_effdet_train_gate_deploy"
AWS_CONN_ID = os.environ.get("SM_EFFDET_AWS_CONN_ID", "aws_default")
# Seconds between status checks of a job or endpoint (the operators' own polling).
CHECK_INTERVAL = int(os.environ.get("SM_EFFDET_CHECK_INTERVAL", "60"))
# CloudWatch logs of the training job in the task log: on unless turned off.
PRINT_LOG = os.environ.get("SM_EFFDET_PRINT_LOG", "true").lower() not in ("0", "false", "no")
DEFERRABLE = os.environ.get("SM_EFFDET_DEFERRABLE", "true").lower() not in ("0", "false", "no")
# A deferred wait gives up after max_attempts checks (the provider's default, 60, is an hour at
# one check a minute while a job may run for days): the job's own time limit plus this much for
# provisioning, downloading the data and uploading the model, which it does not count.
START_AND_UPLOAD_S = 3 * 3600
# Batch Transform has no time limit of its own: the longest a deferred wait for one lasts.
TRANSFORM_WAIT_S = 3 * 24 * 3600
# What identifies the job a request starts: a job of the same name that differs in one of these
# was started by something else, and re-attaching to it would gate and deploy the wrong model.
SAME_JOB = {
    "image": lambda d: (d.get("AlgorithmSpecification") or {}).get("TrainingImage"),
    "hyperparameters": lambda d: d.get("HyperParameters") or {},
    "input data": lambda d: sorted(
        (c.get("ChannelName"), (c.get("DataSource") or {}).get("S3DataSource", {}).get("S3Uri"))
        for c in d.get("InputDataConfig") or []
    ),
    "output path": lambda d: (d.get("OutputDataConfig") or {}).get("S3OutputPath"),
    "role": lambda d: d.get("RoleArn"),
}


def _connection_clients(region: str):
    """boto3 clients from the Airflow connection (its keys or role, its endpoint and botocore
    settings) in `region`, with the launcher's retries where the connection sets none."""
    from sm_effdet.launch.aws import retry_config

    def make(service: str):
        hook = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type=service, region_name=region)
        return hook.get_client_type(config=retry_config().merge(hook.config))

    return make


def _region() -> str:
    """The connection's region, else the launcher's (AWS_REGION, AWS_DEFAULT_REGION, profile)."""
    from sm_effdet.launch.aws import region_name

    hook = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type="sagemaker")
    region = hook.region_name or region_name(required=False)
    if not region:
        raise AirflowFailException(
            f"no AWS region: set region_name in the extra of the Airflow connection "
            f"'{AWS_CONN_ID}', or AWS_REGION (or AWS_DEFAULT_REGION) on the workers."
        )
    return region


def _trigger_finds_region(operator) -> bool:
    """Whether the provider's trigger waits in the run's region. The Amazon provider for Airflow
    2.10 builds its SageMakerTrigger without a region: the triggerer then uses the connection's,
    else boto3's default, which ignores AWS_REGION."""
    if "region_name" in inspect.signature(SageMakerTrigger.__init__).parameters:
        return True
    import botocore.session

    hook = AwsBaseHook(aws_conn_id=operator.aws_conn_id, client_type="sagemaker")
    default = botocore.session.Session().get_config_variable("region")  # boto3's, as the trigger's
    if (hook.region_name or default) == operator.region_name:
        return True
    operator.log.warning(
        "waiting in the worker, not deferred: this Amazon provider's trigger takes no region and "
        "the connection '%s' names none (%s came from AWS_REGION); set region_name in the "
        "connection's extra to free the worker.", operator.aws_conn_id, operator.region_name,
    )
    return False


class _RegionalSageMakerHook(SageMakerHook):
    """The provider's SageMakerHook makes its S3 hook (the inputs checked before a job) and its
    CloudWatch Logs hook (the job's log) without its region: with the region set on the
    operator alone (from AWS_REGION) they fail with NoRegionError or look in another region."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.s3_hook = S3Hook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)
        self.logs_hook = AwsLogsHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)


class _RunSettings:
    """The operators in the run's region (their hooks too), waiting as the run's `deferrable`
    Param says (the operators read `deferrable` when they execute; it is no template field)."""

    aws_hook_class = _RegionalSageMakerHook

    # On this mixin only, with **kwargs passed on: Airflow hands the task's execute a keyword
    # that the provider's execute checks; an execute defined on an operator class below would
    # be wrapped by Airflow and keep that keyword, and Airflow 2.10 would then warn that the
    # provider's execute was "called outside TaskInstance".
    def execute(self, context, **kwargs):
        wanted = bool(context["params"].get("deferrable", DEFERRABLE))
        self.deferrable = wanted and _trigger_finds_region(self)
        self.before_wait()
        return super().execute(context, **kwargs)

    def before_wait(self) -> None:
        pass


class _ReattachingSageMakerHook(_RegionalSageMakerHook):
    """create_training_job that re-attaches to a job of that name started by this same request
    (the task retried after its worker was lost) and waits for it as the provider waits for a
    job it created, instead of failing on "already exists"."""

    def create_training_job(self, config: dict, wait_for_completion: bool = True,
                            print_log: bool = True, check_interval: int = 30,
                            max_ingestion_time: int | None = None):
        name = config["TrainingJobName"]
        try:
            existing = self.describe_training_job(name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ValidationException":
                raise
            # SageMaker answers a name it does not know with ValidationException.
            return super().create_training_job(config, wait_for_completion, print_log,
                                               check_interval, max_ingestion_time)
        differing = [what for what, of in SAME_JOB.items() if of(existing) != of(config)]
        if differing:
            raise AirflowFailException(
                f"a SageMaker training job named {name} already exists and differs from this "
                f"run's request in its {', '.join(differing)}; give another --name in "
                "train_args (or none, for a fresh one)."
            )
        self.log.info("re-attaching to the training job %s (%s) this request started earlier",
                      name, existing["TrainingJobStatus"])
        if print_log:
            self.check_training_status_with_log(
                name, self.non_terminal_states, self.training_failed_states, wait_for_completion,
                check_interval, max_ingestion_time,
            )
        elif wait_for_completion:
            self.check_status(name, "TrainingJobStatus", self.describe_training_job,
                              check_interval, max_ingestion_time)
        return {"TrainingJobArn": existing["TrainingJobArn"],
                "ResponseMetadata": {"HTTPStatusCode": 200}}


class SmEffdetTrainingOperator(_RunSettings, SageMakerTrainingOperator):
    """The provider's training operator that re-attaches on a retry (above), and whose deferred
    wait lasts as long as the job may."""

    aws_hook_class = _ReattachingSageMakerHook

    def before_wait(self) -> None:
        stop = self.config.get("StoppingCondition") or {}
        limit = int(stop.get("MaxWaitTimeInSeconds") or stop.get("MaxRuntimeInSeconds") or 86400)
        self.max_attempts = math.ceil((limit + START_AND_UPLOAD_S) / max(self.check_interval, 1))


class SmEffdetEndpointOperator(_RunSettings, SageMakerEndpointOperator):
    pass


class SmEffdetTransformOperator(_RunSettings, SageMakerTransformOperator):
    pass


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
        "deferrable": Param(DEFERRABLE, type="boolean",
                            description="wait for the jobs in the triggerer (frees the worker; "
                                        "needs a triggerer running), else in the worker"),
    },
)
def sm_effdet_train_gate_deploy():
    @task(multiple_outputs=True)
    def prepare(params=None) -> dict:
        """The CreateTrainingJob request, checked, with local data uploaded (sm-effdet train),
        and the region every later task uses."""
        from sm_effdet.errors import UserInputError
        from sm_effdet.launch.aws import client, clients_from
        from sm_effdet.launch.request import add_job_arguments, prepare_training_request

        parser = argparse.ArgumentParser(prog="sm-effdet train", exit_on_error=False)
        add_job_arguments(parser)
        args = parser.parse_args([str(a) for a in params["train_args"]])
        region = _region()
        log = io.StringIO()
        try:
            with clients_from(_connection_clients(region), region):
                # The image is looked up in ECR with the connection's credentials too.
                request = prepare_training_request(args, s3=client("s3"),
                                                   ecr=lambda r: client("ecr", r), out=log)
        except UserInputError as exc:  # bad input: one sentence, and no retry can mend it
            print(log.getvalue())
            raise AirflowFailException(str(exc)) from None
        print(log.getvalue())
        return {"request": request, "region": region}

    prepared = prepare()
    training = SmEffdetTrainingOperator(
        task_id="train",
        config=prepared["request"],
        aws_conn_id=AWS_CONN_ID,
        region_name=prepared["region"],
        wait_for_completion=True,
        print_log=PRINT_LOG,
        check_interval=CHECK_INTERVAL,
        # The job of this name is looked up by the operator's hook (re-attach above); the name
        # sm-effdet chose is where the checkpoints and outputs are: never renamed.
        check_if_job_exists=False,
    )

    @task.short_circuit
    def quality_gate(training: dict, region: str, params=None) -> bool:
        """Go on only with a model at or above the threshold (and the deployed model)."""
        from sm_effdet.launch import gate

        make = _connection_clients(region)
        sagemaker, s3 = make("sagemaker"), make("s3")
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
    deploy = SmEffdetEndpointOperator(
        task_id="deploy",
        config=endpoint_config,
        aws_conn_id=AWS_CONN_ID,
        region_name=prepared["region"],
        operation="create",  # the provider updates the endpoint when it already exists
        wait_for_completion=True,
        check_interval=CHECK_INTERVAL,
    )
    transform = SmEffdetTransformOperator(
        task_id="transform",
        config=transform_config,
        aws_conn_id=AWS_CONN_ID,
        region_name=prepared["region"],
        wait_for_completion=True,
        check_interval=CHECK_INTERVAL,
        max_attempts=math.ceil(TRANSFORM_WAIT_S / max(CHECK_INTERVAL, 1)),
        action_if_job_exists="fail",
    )
    routes = choose()
    quality_gate(training.output, prepared["region"]) >> routes >> [endpoint_config,
                                                                   transform_config]
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
