"""The llmft-aws CLI in-process: usage errors exit 2 before any AWS call, --dry-run prints the requests.

The environment is scrubbed of the machine's AWS settings and AWS_ENDPOINT_URL points at a closed port, so a
call that slipped through would fail loudly rather than reach AWS. The requests a dry run prints are the ones a
real run sends: the same functions build both, and the tests below hold each path to them.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROLE = "arn:aws:iam::123456789012:role/llmft-sagemaker"
COMMANDS = [
    "push-images",
    "upload-data",
    "train",
    "package-base",
    "deploy",
    "shift-traffic",
    "delete",
    "evaluate",
    "publish-web",
]


def dry_run_call(out: str, operation: str) -> dict:
    """The one request `operation` (e.g. "sagemaker.create_training_job") the dry run printed."""
    requests = [request for op, request in dry_run_calls(out) if op == operation]
    assert len(requests) == 1, out
    return requests[0]


def dry_run_calls(out: str) -> list[tuple[str, dict]]:
    calls = []
    for line in out.splitlines():
        if line.startswith("[dry-run] ") and line.count(" ") >= 2 and line.split()[1].count(".") == 1:
            _, op, payload = line.split(" ", 2)
            try:
                calls.append((op, json.loads(payload)))
            except ValueError:
                continue
    return calls


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0
    assert "--dry-run" in out and "--region" in out


def test_no_region_is_a_usage_error(cli, monkeypatch):
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    code, out, err = cli("delete", "--endpoint", "faq")
    assert code == 2, err
    assert "no AWS region" in err and "--region" in err
    assert out == ""


def test_no_credentials_is_a_usage_error(cli, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key)
    code, _, err = cli("delete", "--endpoint", "faq")
    assert code == 2, err
    assert "no AWS credentials" in err and "nothing was sent to AWS" in err


def test_unknown_profile_is_a_usage_error(cli):
    code, _, err = cli("delete", "--endpoint", "faq", "--profile", "no-such-profile")
    assert code == 2
    assert "no-such-profile" in err


TRAIN_ARGS = ("train", "--image", "img", "--train", "s3://b/t/", "--output", "s3://b/o/")
DEPLOY_ARGS = ("deploy", "--endpoint", "faq", "--image", "img", "--model-data", "s3://b/m.tar.gz")


def test_train_and_deploy_need_a_role(cli):
    code, _, err = cli(*TRAIN_ARGS)
    assert code == 2 and "no SageMaker training role" in err and "SAGEMAKER_TRAINING_ROLE_ARN" in err
    code, _, err = cli(*DEPLOY_ARGS)
    assert code == 2 and "no SageMaker hosting role" in err and "SAGEMAKER_HOSTING_ROLE_ARN" in err
    for args in (TRAIN_ARGS, DEPLOY_ARGS):
        code, _, err = cli(*args, "--role", "admin")
        assert code == 2 and "is not an IAM role ARN" in err


def test_training_jobs_and_endpoints_assume_their_own_roles(cli, monkeypatch):
    """infra/template.yaml makes two roles: training writes its output, hosting only reads model archives."""
    training, hosting = f"{ROLE}-training", f"{ROLE}-hosting"
    monkeypatch.setenv("SAGEMAKER_TRAINING_ROLE_ARN", training)
    monkeypatch.setenv("SAGEMAKER_HOSTING_ROLE_ARN", hosting)
    monkeypatch.setenv("SAGEMAKER_ROLE_ARN", f"{ROLE}-both")  # an older one-role set-up: not used when split
    code, out, err = cli(*TRAIN_ARGS, "--dry-run")
    assert code == 0, err
    assert dry_run_call(out, "sagemaker.create_training_job")["RoleArn"] == training
    code, out, err = cli(*DEPLOY_ARGS, "--dry-run")
    assert code == 0, err
    models = [request for op, request in dry_run_calls(out) if op == "sagemaker.create_model"]
    assert models and all(m["ExecutionRoleArn"] == hosting for m in models)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-wait", "100"], "--max-wait applies to managed spot training only"),
        (["--spot", "--max-run", "100", "--max-wait", "50"], "must be >= --max-run"),
        (["--instance-type", "g5.xlarge"], "not a SageMaker instance type"),
        (["--instance-count", "0"], "--instance-count must be >= 1"),
        (["--hyperparameter", "max_steps"], "use KEY=VALUE"),
        (["--checkpoint", "/tmp/ckpt"], "must be an s3:// URI"),
    ],
)
def test_train_argument_errors(cli, args, message):
    code, _, err = cli(
        "train", "--role", ROLE, "--image", "img", "--train", "s3://b/t/", "--output", "s3://b/o/", *args
    )
    assert code == 2, err
    assert message in err


def test_train_local_takes_local_directories(cli, tmp_path):
    code, _, err = cli("train", "--local", "--image", "img", "--train", "s3://b/t/", "--output", f"file://{tmp_path}")
    assert code == 2 and "--local takes local directories" in err
    code, _, err = cli("train", "--local", "--image", "img", "--train", str(tmp_path), "--output", str(tmp_path))
    assert code == 2 and "file:// URI" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--endpoint", "FAQ_Assistant"], "lower-case letters"),
        (["--variant", "base"], "use NAME=s3://"),
        (["--variant", "base=s3://b/base.tar.gz", "--weights", "1"], "--weights has 1 values for 2 variants"),
        (["--weights", "0"], "weight above 0"),
        (["--variant", "tuned=s3://b/x.tar.gz"], "variant names must differ"),
        (["--min-instances", "3", "--max-instances", "2"], "--min-instances"),
    ],
)
def test_deploy_argument_errors(cli, args, message):
    base = {"--endpoint": "faq", "--image": "img", "--model-data": "s3://b/m.tar.gz", "--role": ROLE}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    flat = [x for kv in base.items() for x in kv]
    code, _, err = cli("deploy", *flat, *args)
    assert code == 2, err
    assert message in err


def test_deploy_dry_run_prints_two_variants_and_autoscaling(cli):
    code, out, err = cli(
        "deploy",
        "--dry-run",
        "--role",
        ROLE,
        "--endpoint",
        "faq-assistant",
        "--image",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm-finetune-serve:abc",
        "--model-data",
        "s3://b/tuned/model.tar.gz",
        "--variant",
        "base=s3://b/base/model.tar.gz",
        "--weights",
        "80",
        "20",
        "--max-instances",
        "4",
        "--invocations-per-instance",
        "30",
    )
    assert code == 0, err
    calls = dry_run_calls(out)
    ops = [op for op, _ in calls]
    assert (
        ops
        == [
            "sagemaker.create_model",
            "sagemaker.create_model",
            "sagemaker.create_endpoint_config",
            "sagemaker.create_endpoint",
        ]
        + ["application-autoscaling.register_scalable_target", "application-autoscaling.put_scaling_policy"] * 2
    )
    config = calls[2][1]
    variants = {v["VariantName"]: v for v in config["ProductionVariants"]}
    assert variants["tuned"]["InitialVariantWeight"] == 80 and variants["base"]["InitialVariantWeight"] == 20
    assert all(60 <= v["ContainerStartupHealthCheckTimeoutInSeconds"] <= 3600 for v in variants.values())
    policy = calls[5][1]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    assert tracking["TargetValue"] == 30
    assert calls[4][1]["MaxCapacity"] == 4
    assert out.strip().splitlines()[-1] == "arn:aws:sagemaker:us-east-1:123456789012:endpoint/faq-assistant"


def test_train_dry_run_prints_the_create_training_job_request(cli):
    code, out, err = cli(
        "train",
        "--dry-run",
        "--role",
        ROLE,
        "--image",
        "img:1",
        "--train",
        "s3://b/d/train/",
        "--validation",
        "s3://b/d/validation/",
        "--output",
        "s3://b/jobs/",
        "--instance-count",
        "2",
        "--spot",
        "--max-run",
        "3600",
        "--checkpoint",
        "s3://b/ckpt/",
        "-H",
        "max_steps=10",
        "--tag",
        "team=ml",
        "--job-name",
        "faq-1",
    )
    assert code == 0, err
    request = dry_run_call(out, "sagemaker.create_training_job")
    metrics = json.loads((REPO / "containers/train/metric_definitions.json").read_text())
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == metrics
    assert request["ResourceConfig"]["InstanceCount"] == 2
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["CheckpointConfig"]["S3Uri"] == "s3://b/ckpt/"
    assert {c["ChannelName"] for c in request["InputDataConfig"]} == {"train", "validation"}
    assert request["HyperParameters"] == {"max_steps": "10"}
    job_name = request["TrainingJobName"]
    assert job_name.startswith("faq-1-") and len(job_name) == len("faq-1-20260101120000")
    assert out.strip().splitlines()[-1] == f"s3://b/jobs/{job_name}/output/model.tar.gz"


def test_startup_timeout_grows_with_model_size():
    from llmft_aws.endpoint import startup_timeout_s

    assert startup_timeout_s(50_000_000) == 900
    assert startup_timeout_s(3_000_000_000) == 1500
    assert startup_timeout_s(40_000_000_000) == 3600
    assert startup_timeout_s(None) == 3600


def test_upload_split_is_seeded_and_keeps_the_csv_header(tmp_path):
    from llmft_aws.data import split_dataset

    data = tmp_path / "faq.csv"
    data.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(20)))
    first, again = split_dataset(data, 0.1, 42), split_dataset(data, 0.1, 42)
    assert first == again
    assert (first.train_rows, first.validation_rows) == (18, 2)
    assert first.train.startswith(b"question,answer\n") and first.validation.startswith(b"question,answer\n")
    assert split_dataset(data, 0.1, 7).validation != first.validation


def test_upload_rejects_what_the_trainer_cannot_read(cli, tmp_path):
    bad = tmp_path / "faq.txt"
    bad.write_text("x")
    code, _, err = cli("upload-data", "--data", str(bad), "--s3-uri", "s3://b/p", "--dry-run")
    assert code == 2 and "unsupported file type" in err
    one = tmp_path / "one.jsonl"
    one.write_text('{"question": "q", "answer": "a"}\n')
    code, _, err = cli("upload-data", "--data", str(one), "--s3-uri", "s3://b/p", "--dry-run")
    assert code == 2 and "at least 2" in err
    code, _, err = cli("upload-data", "--data", str(one), "--s3-uri", "b/p", "--dry-run")
    assert code == 2 and "not an S3 URI" in err


def test_deploy_over_a_running_endpoint_swaps_to_a_new_config_in_place(fake_aws, monkeypatch):
    # moto has no UpdateEndpoint, so this path runs against botocore's Stubber: the exact calls, in order.
    import boto3
    from botocore.stub import ANY, Stubber
    from llmft_aws import context, endpoint

    ctx = context.resolve(region="us-east-1")
    session = boto3.Session(region_name="us-east-1")
    clients = {name: session.client(name) for name in ("sagemaker", "application-autoscaling", "s3", "sts")}
    monkeypatch.setattr(context.AwsContext, "client", lambda self, service, **kw: clients[service])
    spec = endpoint.DeploySpec(
        endpoint="faq", image="img", role=ROLE, variants=(endpoint.Variant("tuned", "s3://b/v2/model.tar.gz", 1.0),)
    )
    not_found = {"service_error_code": "ValidationException", "service_message": "Could not find model"}
    running = {
        "EndpointName": "faq",
        "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/faq",
        "EndpointConfigName": "faq-old",
        "EndpointStatus": "InService",
        "CreationTime": "2026-01-01T00:00:00Z",
        "LastModifiedTime": "2026-01-01T00:00:00Z",
        "ProductionVariants": [{"VariantName": "tuned"}],
    }
    with (
        Stubber(clients["sagemaker"]) as sm,
        Stubber(clients["application-autoscaling"]) as scaling,
        Stubber(clients["s3"]) as s3,
        Stubber(clients["sts"]) as sts,
    ):
        sm.add_client_error("describe_model", **not_found)
        sm.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/m"})
        sm.add_client_error(
            "describe_endpoint_config",
            service_error_code="ValidationException",
            service_message="Could not find endpoint configuration",
        )
        s3.add_response("head_object", {"ContentLength": 5_000_000_000}, {"Bucket": "b", "Key": "v2/model.tar.gz"})
        sm.add_response(
            "create_endpoint_config",
            {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:ec/x"},
            {
                "EndpointConfigName": spec.config_name,
                "Tags": ANY,
                "ProductionVariants": [
                    {
                        "VariantName": "tuned",
                        "ModelName": spec.model_name(spec.variants[0]),
                        "InitialInstanceCount": 1,
                        "InstanceType": "ml.g5.xlarge",
                        "InitialVariantWeight": 1.0,
                        # 5 GB of model.tar.gz: 600 s + 5 x 300 s to download, unpack and load before /ping must answer
                        "ContainerStartupHealthCheckTimeoutInSeconds": 2100,
                        "ModelDataDownloadTimeoutInSeconds": 2100,
                    }
                ],
            },
        )
        sm.add_response("describe_endpoint", running, {"EndpointName": "faq"})
        scaling.add_response(
            "deregister_scalable_target",
            {},
            {"ServiceNamespace": "sagemaker", "ResourceId": "endpoint/faq/variant/tuned", "ScalableDimension": ANY},
        )
        sm.add_response(
            "update_endpoint",
            {"EndpointArn": running["EndpointArn"]},
            {"EndpointName": "faq", "EndpointConfigName": spec.config_name},
        )
        sm.add_response("describe_endpoint", running, {"EndpointName": "faq"})
        scaling.add_response("register_scalable_target", {}, None)
        scaling.add_response("put_scaling_policy", {"PolicyARN": "arn:p", "Alarms": []}, None)
        sts.add_response(
            "get_caller_identity", {"Account": "123456789012", "Arn": "arn:aws:iam::123456789012:user/x", "UserId": "x"}
        )
        arn = endpoint.deploy(ctx, spec)
        for stub in (sm, scaling, s3, sts):
            stub.assert_no_pending_responses()
    assert arn == running["EndpointArn"]


def test_evaluate_reads_the_faq_file_as_it_is_published(tmp_path):
    # The public FAQ CSV has a byte-order mark, no header row and CRLF line ends.
    from llmft_aws.evaluate import read_pairs

    path = tmp_path / "faq.csv"
    path.write_bytes('\ufeffWhat is SageMaker?,"A service, managed."\r\nWhat is a channel?,An input.\r\n'.encode())
    assert read_pairs(path) == [("What is SageMaker?", "A service, managed."), ("What is a channel?", "An input.")]
    path.write_text("answer,question\nA1,Q1\n")  # a header in any order
    assert read_pairs(path) == [("Q1", "A1")]


# ------------------------------------------------------------------- the wrapper runs in the main venv


def test_the_wrapper_runs_the_commands_in_the_main_venv(run_cli):
    wrapper = (REPO / "scripts" / "llmft-aws").read_text()
    assert '"$ROOT/.venv/bin/python" -m llmft_aws' in wrapper and "venv-aws" not in wrapper
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "deploy" in result.stdout and result.stderr == ""  # .venv exists: nothing is installed


# ------------------------------------------- one request per API call: dry run, real run and local mode


def _stubbed_clients(monkeypatch, *services: str) -> dict:
    """Real boto3 clients for AwsContext.client to hand out, ready for botocore's Stubber."""
    import boto3
    from llmft_aws import context

    session = boto3.Session(region_name="us-east-1")
    clients = {name: session.client(name) for name in services}
    monkeypatch.setattr(context.AwsContext, "client", lambda self, service, **kw: clients[service])
    return clients


def test_train_sends_the_request_the_dry_run_prints(fake_aws, monkeypatch, capsys):
    from botocore.stub import Stubber
    from llmft_aws import context, training

    spec = training.TrainSpec(
        image="img:1",
        role=ROLE,
        channels={"train": "s3://b/d/train/", "validation": "s3://b/d/validation/"},
        output="s3://b/jobs/",
        spot=True,
        checkpoint_s3_uri="s3://b/ckpt/",
        hyperparameters={"max_steps": "10"},
        tags={"team": "ml"},
    )
    artifact = f"s3://b/jobs/{spec.name}/output/model.tar.gz"
    assert training.train(context.resolve(region="us-east-1", dry_run=True), spec) == artifact
    printed = dry_run_call(capsys.readouterr().out, "sagemaker.create_training_job")
    assert printed == training.training_job_request(spec)

    clients = _stubbed_clients(monkeypatch, "sagemaker", "logs")
    with Stubber(clients["sagemaker"]) as sm, Stubber(clients["logs"]) as logs:
        sm.add_response(
            "create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/x"}, printed
        )
        sm.add_response(
            "describe_training_job",
            {
                "TrainingJobName": spec.name,
                "TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/x",
                "ModelArtifacts": {"S3ModelArtifacts": artifact},
                "TrainingJobStatus": "Completed",
                "SecondaryStatus": "Completed",
                "AlgorithmSpecification": {"TrainingInputMode": "File"},
                "ResourceConfig": {"InstanceCount": 1, "VolumeSizeInGB": 100},
                "StoppingCondition": {},
                "CreationTime": "2026-01-01T00:00:00Z",
            },
            {"TrainingJobName": spec.name},
        )
        logs.add_response(
            "filter_log_events",
            {
                "events": [
                    {
                        "logStreamName": f"{spec.name}/algo-1",
                        "timestamp": 5,
                        "message": "step 2 loss=1.5\n",
                        "eventId": "1",
                    }
                ]
            },
            {"logGroupName": "/aws/sagemaker/TrainingJobs", "logStreamNamePrefix": f"{spec.name}/", "startTime": 0},
        )
        assert training.train(context.resolve(region="us-east-1"), spec) == artifact
        sm.assert_no_pending_responses()
    err = capsys.readouterr().err
    assert "step 2 loss=1.5" in err and "Completed" in err


def test_train_local_hands_the_same_request_to_sagemaker_cores_local_client(fake_aws, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from llmft_aws import sagemaker_local, training

    data = tmp_path / "train"
    data.mkdir()
    sent = []

    class LocalClient:  # stands in for LocalSession().sagemaker_client, which runs docker compose
        def create_training_job(self, **request):
            sent.append(request)
            out = Path(request["OutputDataConfig"]["S3OutputPath"].removeprefix("file://"))
            out.mkdir(parents=True)
            (out / "model.tar.gz").write_bytes(b"")

    monkeypatch.setattr(
        sagemaker_local, "local_session", lambda root, *a: SimpleNamespace(sagemaker_client=LocalClient())
    )
    spec = training.TrainSpec(
        image="img:local",
        role=ROLE,
        channels={"train": str(data)},
        output=(tmp_path / "jobs").as_uri(),
        local=True,
        instance_type="local_cpu",
    )
    uri = training.train(None, spec)
    assert sent == [training.training_job_request(spec)]
    request = sent[0]
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == data.as_uri()
    assert request["ResourceConfig"]["InstanceType"] == "local"
    assert uri == (tmp_path / "jobs" / spec.name / "output" / "model.tar.gz").as_uri()


def test_train_local_reports_the_failure_file_local_mode_packed(fake_aws, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from llmft_aws import sagemaker_local, training

    class FailingClient:  # local mode tars /opt/ml/output next to model.tar.gz, then raises
        def create_training_job(self, **request):
            out = Path(request["OutputDataConfig"]["S3OutputPath"].removeprefix("file://"))
            out.mkdir(parents=True)
            (tmp_path / "failure").write_text("unknown hyperparameter 'no_such_knob'\n")
            with tarfile.open(out / "output.tar.gz", "w:gz") as tar:
                tar.add(tmp_path / "failure", arcname="failure")
            raise RuntimeError("Failed to run: docker compose ... exited with code 1")

    monkeypatch.setattr(
        sagemaker_local, "local_session", lambda root, *a: SimpleNamespace(sagemaker_client=FailingClient())
    )
    spec = training.TrainSpec(
        image="img",
        role=ROLE,
        channels={"train": str(tmp_path)},
        output=(tmp_path / "jobs").as_uri(),
        local=True,
        instance_type="local_cpu",
    )
    with pytest.raises(Exception, match="unknown hyperparameter 'no_such_knob'"):
        training.train(None, spec)


def test_train_local_goes_through_sagemaker_cores_local_client(cli, tmp_path, monkeypatch):
    """No Docker engine (DOCKER_HOST points nowhere, so this holds where one runs too; test_sdk_local_mode runs
    real local jobs there): the real LocalSession takes the request and gets as far as docker compose."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    data = tmp_path / "train"
    data.mkdir()
    output = (tmp_path / "jobs").as_uri()
    code, _, err = cli(
        "train", "--local", "--image", "img", "--train", str(data), "--output", output, "--job-name", "nd"
    )
    assert code == 1, err
    if "Docker Compose is not installed" in err:
        return
    assert "Failed to run: ['docker', 'compose'" in err
    compose = next((tmp_path / "jobs").glob("nd-*/sagemaker-local/*/docker-compose.yaml")).read_text()
    assert "command: train" in compose and f"{data}:/opt/ml/input/data/train" in compose


def test_deploy_sends_the_requests_the_dry_run_prints(fake_aws, monkeypatch, capsys):
    from botocore.stub import Stubber
    from llmft_aws import context, endpoint

    spec = endpoint.DeploySpec(
        endpoint="faq-tgi",
        image="763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-tgi-inference:x",
        role=ROLE,
        variants=(endpoint.Variant("tuned", "s3://b/tuned/model/", 1.0),),
        environment=endpoint.engine_environment("tgi", 1, 2048, 4096),
        engine="tgi",
    )
    endpoint.deploy(context.resolve(region="us-east-1", dry_run=True), spec, wait=False)
    printed = dict(dry_run_calls(capsys.readouterr().out))
    assert printed["sagemaker.create_model"] == endpoint.model_request(spec, spec.variants[0])
    assert printed["sagemaker.create_endpoint"] == endpoint.endpoint_request(spec)

    clients = _stubbed_clients(monkeypatch, "sagemaker", "s3", "sts")
    missing = {"service_error_code": "ValidationException", "service_message": "Could not find it"}
    with Stubber(clients["sagemaker"]) as sm, Stubber(clients["s3"]) as s3, Stubber(clients["sts"]) as sts:
        sm.add_client_error("describe_model", **missing)
        sm.add_response(
            "create_model",
            {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/m"},
            printed["sagemaker.create_model"],
        )
        sm.add_client_error("describe_endpoint_config", **missing)
        s3.add_client_error("list_objects_v2", "AccessDenied")  # size unknown, as in the dry run: longest timeout
        sm.add_response(
            "create_endpoint_config",
            {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/c"},
            printed["sagemaker.create_endpoint_config"],
        )
        sm.add_client_error("describe_endpoint", **missing)
        sm.add_response(
            "create_endpoint",
            {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/faq-tgi"},
            printed["sagemaker.create_endpoint"],
        )
        sts.add_response("get_caller_identity", {"Account": "123456789012"})
        endpoint.deploy(context.resolve(region="us-east-1"), spec, wait=False)
        sm.assert_no_pending_responses()


# ------------------------------------------------------------- deploy --engine: AWS's TGI and LMI images


def test_deploy_on_tgi_uses_the_regions_image_its_env_and_an_uncompressed_prefix(cli):
    code, out, err = cli(
        "deploy", "--dry-run", "--role", ROLE, "--endpoint", "faq-tgi", "--engine", "tgi",
        "--model-data", "s3://b/tuned/model/", "--instance-type", "ml.g5.12xlarge",
        "--max-input-tokens", "1024", "--max-total-tokens", "2048",
    )  # fmt: skip
    assert code == 0, err
    container = dry_run_call(out, "sagemaker.create_model")["PrimaryContainer"]
    # sagemaker-core's image_uris table: the DLC account's huggingface-pytorch-tgi-inference, TGI 3.3.6
    assert container["Image"].startswith(
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-tgi-inference:"
    )
    assert "-tgi3.3.6-" in container["Image"]
    assert container["Environment"] == {
        "HF_MODEL_ID": "/opt/ml/model",
        "SM_NUM_GPUS": "4",  # ml.g5.12xlarge has 4 GPUs: one TGI shard each
        "MAX_INPUT_TOKENS": "1024",
        "MAX_TOTAL_TOKENS": "2048",
    }
    assert "ModelDataUrl" not in container
    assert container["ModelDataSource"] == {
        "S3DataSource": {"S3Uri": "s3://b/tuned/model/", "S3DataType": "S3Prefix", "CompressionType": "None"}
    }


def test_deploy_on_lmi_takes_the_tar_and_lets_env_flags_win(cli):
    code, out, err = cli(
        "deploy", "--dry-run", "--role", ROLE, "--region", "eu-west-1", "--endpoint", "faq-lmi", "--engine", "lmi",
        "--model-data", "s3://b/tuned/model.tar.gz", "--env", "OPTION_ROLLING_BATCH=disable",
    )  # fmt: skip
    assert code == 0, err
    container = dry_run_call(out, "sagemaker.create_model")["PrimaryContainer"]
    assert container["Image"].startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/djl-inference:0.38.0-lmi")
    assert container["ModelDataUrl"] == "s3://b/tuned/model.tar.gz"
    assert container["Environment"] == {
        "HF_MODEL_ID": "/opt/ml/model",
        "TENSOR_PARALLEL_DEGREE": "1",
        "OPTION_MAX_MODEL_LEN": "4096",
        "OPTION_ROLLING_BATCH": "disable",
    }


def test_deploy_engine_image_can_be_overridden_and_ours_needs_one(cli):
    args = ("deploy", "--dry-run", "--role", ROLE, "--endpoint", "faq", "--model-data", "s3://b/m.tar.gz")
    code, out, err = cli(*args, "--engine", "tgi", "--image", "123456789012.dkr.ecr.us-east-1.amazonaws.com/tgi:1")
    assert code == 0, err
    assert dry_run_call(out, "sagemaker.create_model")["PrimaryContainer"]["Image"].endswith("/tgi:1")
    code, _, err = cli(*args)
    assert code == 2 and "--image is required" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--local", "--model-data", "file:///tmp/model.tar.gz"], "--local serves our image"),
        (["--model-data", "file:///tmp/model.tar.gz"], "runs on SageMaker only"),
        (["--model-data", "s3://b/m.tar.gz", "--engine", "vllm"], "invalid choice"),
    ],
)
def test_deploy_engine_errors(cli, args, message):
    code, _, err = cli("deploy", "--role", ROLE, "--endpoint", "faq", "--engine", "tgi", *args)
    assert code == 2, err
    assert message in err
