"""The endpoint lifecycle: `predict`, `endpoints`, `delete`, deploy's updates and smoke test,
payload limits, dry runs, the content types serve takes (launch/endpoints.py, predict.py,
deploy.py, transform.py, hosting.py). Roles, buckets and not-found answers:
tests/test_launch_identity.py.

What is real and what is emulated:
- Requests are checked against botocore's own service models (offline, real).
- Tests named `test_emulated_*` run against moto's server on 127.0.0.1 (the `aws` fixture). moto's
  IAM, STS and S3 are faithful enough for roles, assumed-role sessions and buckets; its S3 ignores
  ExpectedBucketOwner. Its SageMaker has no UpdateEndpoint (it answers 500): the cleanup after an
  update runs on moto's record moved to the new config as UpdateEndpoint leaves it. Its
  InvokeEndpoint returns canned answers (a queue set through moto's API) and decodes bodies as
  UTF-8 (a binary image makes it answer 500): predict's answer is set to what serve's own
  renderer (serving/formats.py) writes, and the drawing is tested on a real image directly.
- Real AWS's own wordings and refusals moto does not give (not-found messages, 403 on
  ExpectedBucketOwner, ModelError) come from botocore's Stubber: botocore's parser and error
  shapes, no network.
Nothing here asserts a value moto makes up.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.stub import Stubber
from test_launch_hosting import (
    BUCKET,
    IMAGE,
    ROLE,
    completed_job,
    moto_record,
    one_sentence,
    text_sample,
)

from sm_effdet.errors import JobError, UserInputError
from sm_effdet.launch import deploy, endpoints, hosting, predict, transform
from sm_effdet.launch.cli import main
from sm_effdet.launch.validation import check_request, service_model

JOB = "sm-effdet-tf-lite0-20261203-074500"
ACCOUNT = "123456789012"  # moto's account
SAGEMAKER_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


@pytest.fixture
def clients(aws):
    # One attempt: a refusal the test provokes is not retried for seconds.
    config = Config(retries={"mode": "standard", "total_max_attempts": 1})
    made = {name: boto3.client(name, config=config)
            for name in ("sagemaker", "s3", "sagemaker-runtime", "iam", "sts")}
    made["s3"].create_bucket(Bucket=BUCKET)
    return made


def parsed(*argv: str) -> argparse.Namespace:
    from sm_effdet.launch.cli import build_parser

    return build_parser().parse_args(argv)


def run(clients, *argv: str, out: io.StringIO | None = None) -> int:
    args = parsed(*argv)
    given = {"sagemaker": clients["sagemaker"]}
    if args.command in ("deploy", "transform"):
        given["s3"] = clients["s3"]
    if args.command in ("deploy", "predict"):
        given["runtime"] = clients["sagemaker-runtime"]
    return args.run(args, **given, out=out if out is not None else io.StringIO())


def stubbed(service: str, region: str = "eu-west-1"):
    """A client whose answers are botocore's Stubber's (no network, fake credentials)."""
    made = boto3.client(service, region_name=region, aws_access_key_id="k",
                        aws_secret_access_key="s")
    return made, Stubber(made)


def nothing_created(clients) -> None:
    sm = clients["sagemaker"]
    assert sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_transform_jobs()["TransformJobSummaries"] == []


# --- 11: payload limits -------------------------------------------------------------------


def test_emulated_a_sample_over_invoke_endpoints_limit_is_refused_before_anything_is_created(clients, tmp_path):
    completed_job(clients)
    limit = service_model("sagemaker-runtime").shape_for("BodyBlob").metadata["max"]
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (7 * 10**6))
    assert big.stat().st_size > limit
    with pytest.raises(UserInputError) as exc:
        run(clients, "deploy", JOB, "--sample", str(big))
    text = one_sentence(exc)
    assert str(big) in text and f"limit of {limit / 2**20:g} MiB" in text
    nothing_created(clients)


def put_images(clients, sizes: dict[str, int]) -> None:
    for key, size in sizes.items():
        clients["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"i" * size)


def test_emulated_transform_sets_max_payload_from_the_largest_object_listed(clients):
    completed_job(clients)
    sizes = {"images/a.jpg": 10, "images/b.jpg": 2_500_000, "images/c.png": 40_000}
    put_images(clients, sizes)
    out = io.StringIO()
    assert run(clients, "transform", JOB, "--input", f"s3://{BUCKET}/images/", "--name", "tj", out=out) == 0
    job = clients["sagemaker"].describe_transform_job(TransformJobName="tj")
    # Rounded up in units of 10^6 bytes: large enough whether SageMaker's MB is 10^6 or 2^20.
    assert job["MaxPayloadInMB"] == math.ceil(max(sizes.values()) / 10**6) == 3
    assert job["MaxConcurrentTransforms"] * job["MaxPayloadInMB"] <= 100
    assert "3 objects under" in out.getvalue() and "MaxPayloadInMB 3" in out.getvalue()


def test_emulated_transform_lists_every_page_of_objects(clients):
    completed_job(clients)
    sizes = {f"many/{k}.jpg": 1 for k in range(6)} | {"many/z-last.jpg": 1_500_000}
    put_images(clients, sizes)
    pages = []
    clients["s3"].meta.events.register("before-send.s3.ListObjectsV2", lambda **_: pages.append(1))
    # Pages of 2 keys (S3's own MaxKeys): the largest object is on the last page.
    count, largest = transform.input_objects(clients["s3"], f"s3://{BUCKET}/many/", "image/jpeg", page_size=2)
    assert (count, largest) == (len(sizes), max(sizes.values()))
    assert len(pages) == math.ceil(len(sizes) / 2)


def test_emulated_transform_refuses_objects_over_100_mb_and_empty_ones(clients):
    completed_job(clients)
    put_images(clients, {"big/a.jpg": 10, "big/huge.jpg": 100 * 10**6 + 1})
    with pytest.raises(UserInputError) as exc:
        run(clients, "transform", JOB, "--input", f"s3://{BUCKET}/big/")
    assert f"s3://{BUCKET}/big/huge.jpg is 100.0 MB, over Batch Transform's 100 MB" in one_sentence(exc)
    put_images(clients, {"folder/": 0, "folder/a.jpg": 10})
    with pytest.raises(UserInputError) as exc:
        run(clients, "transform", JOB, "--input", f"s3://{BUCKET}/folder")
    assert f"the first: s3://{BUCKET}/folder/" in one_sentence(exc)
    nothing_created(clients)


def test_json_lines_keep_the_default_batch_and_payload_rules_hold():
    assert hosting.transform_payload_mb(80 * 10**6, "application/jsonlines") == 6
    for largest in (1, 999_999, 1_000_001, 33 * 10**6, 100 * 10**6):
        payload = hosting.transform_payload_mb(largest, "image/jpeg")
        assert payload * 10**6 >= largest and payload * 2**20 >= largest
        request = hosting.transform_request("tj", model_name="m", input_uri="s3://b/i/",
                                            output_uri="s3://b/o/", max_payload_mb=payload)
        check_request("CreateTransformJob", request)
        assert 1 <= request["MaxConcurrentTransforms"] and (
            request["MaxConcurrentTransforms"] * request["MaxPayloadInMB"] <= 100)


# --- 14: dry runs; content types serve takes ---------------------------------------------


def test_emulated_deploy_and_transform_dry_runs_print_valid_requests_and_create_nothing(clients, capsys):
    completed_job(clients)
    put_images(clients, {"images/a.jpg": 1_200_000})
    assert main(["deploy", JOB, "--dry-run", "--env", "SERVE_SCORE_THRESHOLD=0.4"]) == 0
    sent = json.loads(capsys.readouterr().out)  # stdout is the requests alone
    assert list(sent) == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]
    for operation, request in sent.items():
        check_request(operation, request)
    assert sent["CreateModel"]["PrimaryContainer"]["Environment"] == {"SERVE_SCORE_THRESHOLD": "0.4"}
    assert sent["CreateEndpoint"]["EndpointName"] == JOB
    assert main(["transform", JOB, "--input", f"s3://{BUCKET}/images/", "--dry-run"]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert list(sent) == ["CreateModel", "CreateTransformJob"]
    for operation, request in sent.items():
        check_request(operation, request)
    assert sent["CreateTransformJob"]["MaxPayloadInMB"] == 2
    nothing_created(clients)


def test_emulated_deploy_dry_run_of_an_existing_endpoint_shows_the_update(clients, capsys, tmp_path):
    completed_job(clients)
    assert run(clients, "deploy", JOB, "--endpoint-name", "ep", "--no-wait") == 0
    assert main(["deploy", JOB, "--endpoint-name", "ep", "--dry-run"]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert list(sent) == ["CreateModel", "CreateEndpointConfig", "UpdateEndpoint"]
    check_request("UpdateEndpoint", sent["UpdateEndpoint"])
    assert len(clients["sagemaker"].list_models()["Models"]) == 1  # the first deploy's only


def test_the_content_types_are_the_ones_serve_decodes():
    from sm_effdet.serving import decoding

    assert hosting.SERVE_CONTENT_TYPES == decoding.RAW_IMAGE_TYPES + decoding.JSON_TYPES + decoding.JSONLINES_TYPES


def test_emulated_transform_content_type_text_csv_is_refused(clients, capsys):
    completed_job(clients)
    put_images(clients, {"rows/a.csv": 10})
    assert main(["transform", JOB, "--input", f"s3://{BUCKET}/rows/", "--content-type", "text/csv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--content-type 'text/csv' is not a type serve decodes" in err
    nothing_created(clients)


# --- 15: a failed smoke test names the command that removes it all ------------------------


def test_emulated_a_failed_smoke_test_names_sm_effdet_delete_which_removes_it_all(clients, tmp_path, capsys):
    completed_job(clients)
    binary = tmp_path / "photo.jpg"
    binary.write_bytes(b"\xff\xd8\xff\xe0 a JPEG's first bytes")  # moto answers a binary body with 500
    with pytest.raises(Exception):
        run(clients, "deploy", JOB, "--endpoint-name", "smoke", "--sample", str(binary))
    err = capsys.readouterr().err
    assert "sm-effdet: the endpoint smoke keeps running (and billing); delete it with its config and " \
           "model: sm-effdet delete smoke" in err
    sm = clients["sagemaker"]
    config = sm.describe_endpoint(EndpointName="smoke")["EndpointConfigName"]
    model = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"][0]["ModelName"]
    assert main(["delete", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "DeleteEndpoint smoke (it was InService; billing stops once it is gone)",
        f"  DeleteEndpointConfig {config}", f"  DeleteModel {model}"]
    nothing_created(clients)


def test_emulated_after_a_failed_endpoint_the_hint_or_the_rolled_back_update_cleanup(clients, capsys):
    completed_job(clients)
    sm = clients["sagemaker"]
    assert run(clients, "deploy", JOB, "--endpoint-name", "ep", "--no-wait") == 0
    old = sm.describe_endpoint(EndpointName="ep")["EndpointConfigName"]
    # A new endpoint that ended Failed: left as it is, with the command that removes it all.
    moto_record("endpoints", "ep").endpoint_status = "Failed"
    deploy._after_failure(sm, "ep", old, None, io.StringIO())
    assert capsys.readouterr().err == ("sm-effdet: the endpoint ep is left as it is; delete it with its "
                                       "config and model: sm-effdet delete ep\n")
    # An update SageMaker rolled back (InService on the old config): the new config and model go.
    moto_record("endpoints", "ep").endpoint_status = "InService"
    new = hosting.resource_name("ep", "20991231-235959")
    model_data = sm.describe_training_job(TrainingJobName=JOB)["ModelArtifacts"]["S3ModelArtifacts"]
    sm.create_model(**hosting.model_request(new, image=IMAGE, role=ROLE, model_data=model_data))
    sm.create_endpoint_config(**hosting.endpoint_config_request(new, model_name=new, instance_type="ml.m5.xlarge",
                                                                instance_count=1))
    out = io.StringIO()
    deploy._after_failure(sm, "ep", new, {"EndpointConfigName": old}, out)
    assert out.getvalue().splitlines() == [
        "Deleting the new config and model that ep does not serve:",
        f"  DeleteEndpointConfig {new}", f"  DeleteModel {new}"]
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [old]


def test_a_model_error_in_the_smoke_test_gives_the_hint_and_exit_1(tmp_path, capsys):
    runtime, stub = stubbed("sagemaker-runtime")
    refusal = '{"error": "the image could not be decoded; send a JPEG or PNG."}'
    stub.add_client_error(
        "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
        service_message=f"Received client error (400) from primary with message \"{refusal}\".",
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": refusal})
    with stub:
        answered = deploy.invoke(runtime, "ep", b"x", "image/jpeg", "x", io.StringIO())
    assert answered is False
    assert "endpoint ep is InService but answered 400" in capsys.readouterr().err


# --- 19: endpoints, delete, updates, predict --------------------------------------------


def test_emulated_endpoints_lists_status_instances_and_the_training_job(clients, tmp_path, capsys):
    uri = completed_job(clients)
    assert run(clients, "deploy", JOB, "--endpoint-name", "from-job", "--no-wait") == 0
    copy = f"s3://{BUCKET}/models/model.tar.gz"  # not where a training job writes
    clients["s3"].copy_object(Bucket=BUCKET, Key="models/model.tar.gz", CopySource=uri[len("s3://"):])
    assert run(clients, "deploy", copy, "--image", IMAGE, "--role", ROLE, "--endpoint-name", "from-uri",
               "--instance-type", "ml.c5.xlarge", "--instance-count", "2", "--no-wait") == 0
    assert main(["endpoints"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "INSTANCES", "TRAINING", "JOB", "LAST", "MODIFIED"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"from-job", "from-uri"}
    assert rows["from-job"].split()[1:6] == ["InService", "1", "x", "ml.m5.xlarge", JOB]
    assert rows["from-uri"].split()[1:6] == ["InService", "2", "x", "ml.c5.xlarge", "-"]
    assert main(["endpoints", "--name-contains", "nothing-like-it"]) == 0
    assert capsys.readouterr().out == "No endpoints whose name contains 'nothing-like-it' in us-east-1.\n"


def test_training_job_of_a_model_follows_sagemakers_output_layout():
    assert endpoints.training_job_of(f"s3://b/sm-effdet/jobs/{JOB}/output/model.tar.gz") == JOB
    assert endpoints.training_job_of(f"s3://b/{JOB}/output/model.tar.gz") == JOB
    assert endpoints.training_job_of("s3://b/models/model.tar.gz") is None


def test_emulated_after_an_update_the_old_config_and_model_are_deleted_and_others_kept(clients):
    completed_job(clients)
    sm = clients["sagemaker"]
    assert run(clients, "deploy", JOB, "--endpoint-name", "ep", "--no-wait") == 0
    old = sm.describe_endpoint(EndpointName="ep")["EndpointConfigName"]
    old_model = sm.describe_endpoint_config(EndpointConfigName=old)["ProductionVariants"][0]["ModelName"]
    new = hosting.resource_name("ep", "20991231-235959")
    job = sm.describe_training_job(TrainingJobName=JOB)
    sm.create_model(**hosting.model_request(new, image=IMAGE, role=ROLE,
                                            model_data=job["ModelArtifacts"]["S3ModelArtifacts"]))
    sm.create_endpoint_config(**hosting.endpoint_config_request(new, model_name=new, instance_type="ml.m5.xlarge",
                                                                instance_count=1))
    check_request("UpdateEndpoint", hosting.update_endpoint_request("ep", new))
    moto_record("endpoints", "ep").endpoint_config_name = new  # where UpdateEndpoint leaves it
    out = io.StringIO()
    endpoints.replace_old_config(sm, "ep", old, new, out=out)
    assert out.getvalue().splitlines() == [
        "Deleting what ep served before:", f"  DeleteEndpointConfig {old}", f"  DeleteModel {old_model}"]
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [new]
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [new]
    # A config sm-effdet did not make for this endpoint may serve others: kept.
    out = io.StringIO()
    endpoints.replace_old_config(sm, "ep", "shared-config", new, out=out)
    assert out.getvalue().startswith("Kept the previous endpoint config shared-config")


def test_the_update_is_waited_for_until_the_new_config_serves():
    base = {"EndpointName": "ep", "EndpointStatus": "InService", "EndpointConfigName": "ep-1"}
    answers = iter([base, {**base, "EndpointStatus": "Updating"}, {**base, "EndpointConfigName": "ep-2"}])
    view = deploy._update_view(lambda: next(answers), "ep-1", "ep-2")
    assert [view()["EndpointStatus"] for _ in range(3)] == ["Updating", "Updating", "InService"]
    failed = deploy._update_view(lambda: {**base, "FailureReason": "ping health check failed."}, "ep-1", "ep-2")()
    assert failed["EndpointStatus"] == "Failed"
    assert failed["FailureReason"] == "the update failed and it serves ep-1 again: ping health check failed"


def set_endpoint_answers(endpoint_url: str, bodies: list[bytes]) -> None:
    """moto's InvokeEndpoint answers, in order (moto's API for canned results)."""
    results = [{"Body": body.decode(), "ContentType": "application/jsonlines",
                "InvokedProductionVariant": "AllTraffic", "CustomAttributes": ""} for body in bodies]
    requests.post(f"{endpoint_url}/moto-api/static/sagemaker/endpoint-results",
                  json={"account_id": ACCOUNT, "region": "us-east-1", "results": results}, timeout=10).raise_for_status()


def detections() -> list[dict]:
    """Two detections in serve's shape (model/preprocessing.py), for a 640x480 image."""
    def one(box, score, name, label):
        x1, y1, x2, y2 = box
        return {"box": list(box), "box_normalized": [x1 / 640, y1 / 480, x2 / 640, y2 / 480],
                "score": score, "class_name": name, "category_id": label, "label": label}

    return [one((32, 48, 320, 240), 0.912, "raccoon", 1), one((400, 100, 600, 460), 0.4375, "dog", 2)]


def test_emulated_predict_prints_serves_detections_and_sends_what_serve_reads(clients, moto_endpoint, tmp_path, capsys):
    from sm_effdet.serving.formats import JSONLINES, render

    completed_job(clients)
    assert run(clients, "deploy", JOB, "--endpoint-name", "ep", "--no-wait") == 0
    set_endpoint_answers(moto_endpoint, [render(JSONLINES, [((640, 480), detections())])])
    sent = []
    runtime = clients["sagemaker-runtime"]
    runtime.meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint",
                                 lambda request, **_: sent.append(dict(request.headers)))
    image = text_sample(tmp_path, "photo.jpg")
    out = io.StringIO()
    assert run(clients, "predict", "ep", str(image), "--threshold", "0.4", "--max-detections", "5", out=out) == 0
    assert out.getvalue().splitlines() == [
        f"{image}: 640x480, 2 detections",
        "  raccoon              0.912  [32, 48, 320, 240]",
        "  dog                  0.438  [400, 100, 600, 460]",
    ]
    headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in sent[0].items()}
    assert headers["content-type"] == "image/jpeg" and headers["accept"] == "application/jsonlines"
    assert headers["x-amzn-sagemaker-custom-attributes"] == "score_threshold=0.4,max_detections=5"
    # serve's own reader takes those attributes.
    from sm_effdet.serving.decoding import custom_attributes

    options = custom_attributes(headers["x-amzn-sagemaker-custom-attributes"])
    assert (options.score_threshold, options.max_detections) == (0.4, 5)


def test_emulated_predict_refuses_before_any_call(clients, tmp_path, capsys):
    image = text_sample(tmp_path, "photo.jpg")
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * (6 * 2**20 + 1))
    cases = [
        (["predict", "ep", str(image), str(image), "--draw", str(tmp_path / "o.jpg")], "--draw writes one image"),
        (["predict", "ep", str(image), "--draw", str(tmp_path / "o.gif")], "must end in .jpg"),
        (["predict", "ep", str(big)], "over InvokeEndpoint's limit of 6 MiB"),
        (["predict", "ep", str(tmp_path / "missing.jpg")], "cannot read the image"),
        (["predict", "ep", str(image), "--threshold", "1.5"], "--threshold 1.5 is not between 0 and 1"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_emulated_predict_on_an_endpoint_that_is_not_up_is_one_sentence(clients, tmp_path):
    completed_job(clients)
    assert run(clients, "deploy", JOB, "--endpoint-name", "ep", "--no-wait") == 0
    moto_record("endpoints", "ep").endpoint_status = "Creating"
    with pytest.raises(JobError) as exc:
        run(clients, "predict", "ep", str(text_sample(tmp_path)))
    assert "endpoint ep is Creating, so it answers nothing" in one_sentence(exc)


def test_predict_draw_without_pillow_is_one_sentence(tmp_path):
    import subprocess

    image = text_sample(tmp_path, "photo.jpg")
    # The launch group's environment: Pillow cannot be imported.
    code = ("import sys; sys.modules['PIL'] = None; from sm_effdet.launch.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "predict", "ep", str(image), "--draw",
                           str(tmp_path / "out.jpg")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("sm-effdet: --draw needs Pillow") and done.stderr.count("\n") == 1


def test_draw_puts_each_box_on_the_upright_image(tmp_path):
    from PIL import Image

    from sm_effdet.serving.formats import JSONLINES, render

    # Stored 480 wide and 640 high, EXIF orientation 6: upright it is 640x480, as serve sees it.
    stored = Image.new("RGB", (480, 640), (128, 128, 128))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    answer = predict.parse_answer(render(JSONLINES, [((640, 480), detections())]).decode(), "x")
    target = tmp_path / "drawn.png"
    predict.draw_detections(path, answer, target)
    drawn = Image.open(target).convert("RGB")
    assert drawn.size == (640, 480)
    grey = (128, 128, 128)
    # On the raccoon box's bottom and right edges (away from its caption), and far from boxes.
    bottom, right = drawn.getpixel((200, 239)), drawn.getpixel((319, 150))
    assert bottom == right and max(abs(a - b) for a, b in zip(bottom, grey)) > 40
    assert max(abs(a - b) for a, b in zip(drawn.getpixel((350, 30)), grey)) <= 6


@pytest.mark.parametrize("code, message, deployed", [
    ("ValidationException", 'Could not find endpoint "arn:aws:sagemaker:eu-west-1:1:endpoint/e".', None),
    ("ValidationException", "1 validation error detected: Value 'e' failed to satisfy constraint", "raises"),
    ("AccessDeniedException", "not authorized to perform: sagemaker:DescribeEndpoint", "raises"),
], ids=["missing endpoint", "other validation error", "access denied"])
def test_the_quality_gate_takes_only_a_missing_endpoint_for_nothing_deployed(code, message, deployed):
    from botocore.exceptions import ClientError

    from sm_effdet.launch.gate import deployed_model_data

    sagemaker, stub = stubbed("sagemaker")
    stub.add_client_error("describe_endpoint", service_error_code=code, service_message=message,
                          http_status_code=400, expected_params={"EndpointName": "e"})
    with stub:
        if deployed == "raises":
            with pytest.raises(ClientError):
                deployed_model_data(sagemaker, "e")
        else:
            assert deployed_model_data(sagemaker, "e") is None
