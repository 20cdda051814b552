"""upload-data, deploy (two variants), shift-traffic and delete through the real CLI against moto's S3,
SageMaker and Application Auto Scaling APIs on loopback: the requests are the ones AWS would get."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

ROLE = "arn:aws:iam::123456789012:role/llmft-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm-finetune-serve:abc"


@pytest.fixture(scope="module")
def bucket(moto) -> str:
    name = "llmft-test-data"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def test_upload_data_splits_uploads_and_skips_unchanged_files(run_cli, moto, bucket, tmp_path):
    data = tmp_path / "faq.csv"
    data.write_text("".join(f'"What is thing {i}?","Thing {i} is a thing."\n' for i in range(30)))
    first = run_cli("upload-data", "--data", str(data), "--s3-uri", f"s3://{bucket}/datasets/faq", env=moto.env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [
        f"train=s3://{bucket}/datasets/faq/train/",
        f"validation=s3://{bucket}/datasets/faq/validation/",
    ]
    s3 = moto.client("s3")
    train = s3.get_object(Bucket=bucket, Key="datasets/faq/train/faq.csv")
    validation = s3.get_object(Bucket=bucket, Key="datasets/faq/validation/faq.csv")
    train_rows = train["Body"].read().decode().splitlines()
    validation_rows = validation["Body"].read().decode().splitlines()
    assert (len(train_rows), len(validation_rows)) == (27, 3)
    assert not set(train_rows) & set(validation_rows)

    again = run_cli("upload-data", "--data", str(data), "--s3-uri", f"s3://{bucket}/datasets/faq", env=moto.env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("unchanged: not uploaded again") == 2


def test_deploy_shift_and_delete_an_ab_endpoint(run_cli, moto, bucket):
    s3 = moto.client("s3")
    for name, size in (("tuned", 2_000_000), ("base", 1_000)):
        s3.put_object(Bucket=bucket, Key=f"models/{name}/model.tar.gz", Body=b"\0" * size)
    deploy_args = (
        "deploy",
        "--endpoint",
        "faq-ab",
        "--role",
        ROLE,
        "--image",
        IMAGE,
        "--model-data",
        f"s3://{bucket}/models/tuned/model.tar.gz",
        "--variant",
        f"base=s3://{bucket}/models/base/model.tar.gz",
        "--weights",
        "80",
        "20",
        "--max-instances",
        "3",
        "--instance-type",
        "ml.g4dn.xlarge",
    )  # moto knows older types
    deployed = run_cli(*deploy_args, env=moto.env)
    assert deployed.returncode == 0, deployed.stderr
    assert deployed.stdout.strip() == "arn:aws:sagemaker:us-east-1:123456789012:endpoint/faq-ab"

    sm = moto.client("sagemaker")
    endpoint = sm.describe_endpoint(EndpointName="faq-ab")
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variants = {v["VariantName"]: v for v in config["ProductionVariants"]}
    assert {k: v["InitialVariantWeight"] for k, v in variants.items()} == {"tuned": 80, "base": 20}
    assert variants["tuned"]["ContainerStartupHealthCheckTimeoutInSeconds"] == 900  # 600 s + 300 s per GB
    model = sm.describe_model(ModelName=variants["base"]["ModelName"])
    assert model["PrimaryContainer"]["Image"] == IMAGE and model["ExecutionRoleArn"] == ROLE

    scaling = moto.client("application-autoscaling")
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert {t["ResourceId"]: t["MaxCapacity"] for t in targets} == {
        "endpoint/faq-ab/variant/tuned": 3,
        "endpoint/faq-ab/variant/base": 3,
    }
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert {p["PolicyType"] for p in policies} == {"TargetTrackingScaling"}

    again = run_cli(*deploy_args, env=moto.env)  # same spec: nothing new is created
    assert again.returncode == 0, again.stderr
    assert "already runs" in again.stderr and "creating" not in again.stderr

    shifted = run_cli(
        "shift-traffic", "--endpoint", "faq-ab", "--weight", "tuned=50", "--weight", "base=50", env=moto.env
    )
    assert shifted.returncode == 0, shifted.stderr
    current = {
        v["VariantName"]: v.get("CurrentWeight", v.get("DesiredWeight"))
        for v in sm.describe_endpoint(EndpointName="faq-ab")["ProductionVariants"]
    }
    assert current == {"tuned": 50, "base": 50}

    unknown = run_cli("shift-traffic", "--endpoint", "faq-ab", "--weight", "canary=10", env=moto.env)
    assert unknown.returncode == 2 and "canary" in unknown.stderr

    deleted = run_cli("delete", "--endpoint", "faq-ab", env=moto.env)
    assert deleted.returncode == 0, deleted.stderr
    assert sorted(line.split("/")[0] for line in deleted.stdout.split()) == [
        "endpoint",
        "endpoint-config",
        "model",
        "model",
    ]
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_models()["Models"] == []
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []

    nothing_left = run_cli("delete", "--endpoint", "faq-ab", env=moto.env)  # safe to re-run
    assert nothing_left.returncode == 0 and nothing_left.stdout == ""


def test_publish_web_uploads_the_page_with_config_from_the_api_url_and_invalidates(run_cli, moto):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="llmft-test-web")
    cloudfront = moto.client("cloudfront")
    distribution = cloudfront.create_distribution(
        DistributionConfig={
            "CallerReference": "test",
            "Comment": "",
            "Enabled": True,
            "Origins": {
                "Quantity": 1,
                "Items": [
                    {
                        "Id": "web",
                        "DomainName": "llmft-test-web.s3.amazonaws.com",
                        "S3OriginConfig": {"OriginAccessIdentity": ""},
                    }
                ],
            },
            "DefaultCacheBehavior": {
                "TargetOriginId": "web",
                "ViewerProtocolPolicy": "redirect-to-https",
                "MinTTL": 0,
                "ForwardedValues": {"QueryString": False, "Cookies": {"Forward": "none"}},
                "TrustedSigners": {"Enabled": False, "Quantity": 0},
            },
        }
    )["Distribution"]
    result = run_cli(
        "publish-web", "--web-bucket", "llmft-test-web", "--distribution-id", distribution["Id"], env=moto.env
    )
    assert result.returncode == 0, result.stderr
    index = s3.get_object(Bucket="llmft-test-web", Key="index.html")
    assert index["ContentType"] == "text/html; charset=utf-8" and index["CacheControl"] == "no-cache"
    config = s3.get_object(Bucket="llmft-test-web", Key="config.js")["Body"].read().decode()
    assert 'apiBaseUrl: "/api"' in config
    assert s3.get_object(Bucket="llmft-test-web", Key="app.js")["ContentType"].startswith("text/javascript")
    invalidations = cloudfront.list_invalidations(DistributionId=distribution["Id"])["InvalidationList"]
    assert invalidations["Quantity"] == 1

    again = run_cli("publish-web", "--web-bucket", "llmft-test-web", env=moto.env)
    assert again.returncode == 0 and again.stderr.count("unchanged: not uploaded again") >= 4


def test_train_starts_the_job_with_our_image_metrics_spot_and_checkpoints(run_cli, moto):
    # CreateTrainingJob with boto3 against moto's SageMaker API, then DescribeTrainingJob until it ends (moto's
    # jobs complete at once) and the job's CloudWatch log (moto has none: the command still watches the status).
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm-finetune-train:abc"
    result = run_cli(
        "train",
        "--role",
        ROLE,
        "--image",
        image,
        "--train",
        "s3://llmft-test-data/datasets/faq/train/",
        "--validation",
        "s3://llmft-test-data/datasets/faq/validation/",
        "--output",
        "s3://llmft-test-data/jobs/",
        "--instance-type",
        "ml.g5.2xlarge",
        "--instance-count",
        "2",
        "--spot",
        "--max-run",
        "3600",
        "--checkpoint",
        "s3://llmft-test-data/checkpoints/faq/",
        "-H",
        "epochs=3",
        "--tag",
        "team=ml",
        "--job-name",
        "faq-moto",
        env=moto.env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model_uri = result.stdout.strip().splitlines()[-1]
    job_name = model_uri.split("/")[-3]
    assert model_uri == f"s3://llmft-test-data/jobs/{job_name}/output/model.tar.gz" and job_name.startswith("faq-moto")

    job = moto.client("sagemaker").describe_training_job(TrainingJobName=job_name)
    assert job["AlgorithmSpecification"]["TrainingImage"] == image
    assert job["ResourceConfig"]["InstanceCount"] == 2 and job["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    assert job["HyperParameters"]["epochs"] == "3"
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] == 7200
    assert job["CheckpointConfig"]["S3Uri"] == "s3://llmft-test-data/checkpoints/faq/"
    assert {c["ChannelName"] for c in job["InputDataConfig"]} == {"train", "validation"}
    # (moto answers MetricDefinitions with canned ones; the request's are checked by the dry-run test)


def test_deploy_on_aws_tgi_image_from_an_uncompressed_prefix(run_cli, moto, bucket):
    s3 = moto.client("s3")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        s3.put_object(Bucket=bucket, Key=f"models/tuned-dir/{name}", Body=b"\0" * 1000)
    deployed = run_cli(
        "deploy", "--endpoint", "faq-tgi", "--role", ROLE, "--engine", "tgi",
        "--model-data", f"s3://{bucket}/models/tuned-dir/", "--instance-type", "ml.g4dn.12xlarge",
        env=moto.env,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    sm = moto.client("sagemaker")
    config_name = sm.describe_endpoint(EndpointName="faq-tgi")["EndpointConfigName"]
    variant = sm.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"][0]
    container = sm.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]
    assert "/huggingface-pytorch-tgi-inference:" in container["Image"]
    assert container["Environment"]["HF_MODEL_ID"] == "/opt/ml/model"
    assert container["Environment"]["SM_NUM_GPUS"] == "4"  # ml.g4dn.12xlarge
    assert container["ModelDataSource"]["S3DataSource"]["S3Uri"] == f"s3://{bucket}/models/tuned-dir/"
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900  # the prefix holds 3 kB: 600 s + 300 s
    deleted = run_cli("delete", "--endpoint", "faq-tgi", env=moto.env)
    assert deleted.returncode == 0, deleted.stderr
