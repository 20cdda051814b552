"""infra/template.yaml: linted (cfn-lint, checkov), and its security-relevant pieces checked one by one.

The Lambda/IAM/CORS checks read the template as data; the CORS and routing checks then run the real function
(lambda/src) with the environment the template gives it, on the path CloudFront forwards (/prod/api/ask).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "infra" / "template.yaml"
EVENTS = REPO / "tests" / "lambda_fn" / "events"


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsics (!Ref, !Sub, ...) read as their long form."""


def _intrinsic(loader, tag_suffix, node):
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)


def resources_of(template: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def statements(role: dict) -> list[dict]:
    return [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]


@pytest.mark.slow
def test_template_passes_cfn_lint_and_checkov():
    proc = subprocess.run([str(REPO / "infra" / "lint.sh")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Failed checks: 0" in proc.stdout


def test_lambda_role_may_invoke_only_the_one_endpoint(template):
    role = template["Resources"]["QaFunctionRole"]
    sagemaker = [s for s in statements(role) if any(a.startswith("sagemaker:") for a in _list(s["Action"]))]
    assert len(sagemaker) == 1
    assert _list(sagemaker[0]["Action"]) == ["sagemaker:InvokeEndpoint"]
    arn = sagemaker[0]["Resource"]["Fn::Sub"]
    assert arn.endswith(":endpoint/${EndpointName}") and "*" not in arn
    for statement in statements(role):
        assert statement["Effect"] == "Allow"
        assert "*" not in json.dumps(statement["Resource"]).replace(":*", ""), statement  # no wildcard resources
    assert template["Resources"]["QaFunction"]["Properties"]["Role"] == {"Fn::GetAtt": ["QaFunctionRole", "Arn"]}


def test_endpoint_name_must_be_lower_case_because_the_arn_is(template):
    pattern = re.compile(template["Parameters"]["EndpointName"]["AllowedPattern"])
    assert pattern.match("faq-assistant") and pattern.match("faq2")
    for bad in ("FAQ-Assistant", "faq_assistant", "-faq", "faq-"):
        assert not pattern.match(bad), bad


def test_api_needs_a_key_and_has_a_throttled_usage_plan(template):
    methods = {
        r["Properties"]["HttpMethod"]: r["Properties"]
        for r in resources_of(template, "AWS::ApiGateway::Method").values()
    }
    assert methods["POST"]["ApiKeyRequired"] is True
    assert methods["OPTIONS"]["ApiKeyRequired"] is False  # a CORS preflight carries no key
    for method in methods.values():
        assert method["Integration"]["Type"] == "AWS_PROXY"
    plan = template["Resources"]["UsagePlan"]["Properties"]
    assert plan["Throttle"] == {"RateLimit": {"Ref": "ThrottleRateLimit"}, "BurstLimit": {"Ref": "ThrottleBurstLimit"}}
    assert plan["Quota"]["Period"] == "DAY"
    key = template["Resources"]["UsagePlanKey"]["Properties"]
    assert key["KeyId"] == {"Ref": "ApiKey"} and key["UsagePlanId"] == {"Ref": "UsagePlan"}
    assert template["Resources"]["Api"]["Properties"]["ApiKeySourceType"] == "HEADER"


def test_gateway_errors_carry_cors_headers_when_other_origins_are_allowed(template):
    responses = resources_of(template, "AWS::ApiGateway::GatewayResponse")
    assert {r["Properties"]["ResponseType"] for r in responses.values()} == {"DEFAULT_4XX", "DEFAULT_5XX"}
    for response in responses.values():
        assert response["Condition"] == "HasCorsOrigins"
        assert "gatewayresponse.header.Access-Control-Allow-Origin" in response["Properties"]["ResponseParameters"]
    env = template["Resources"]["QaFunction"]["Properties"]["Environment"]["Variables"]
    assert env["CORS_ALLOW_ORIGINS"] == {"Ref": "AllowedOrigins"}
    assert env["ENDPOINT_NAME"] == {"Ref": "EndpointName"}


def test_buckets_are_private_encrypted_and_tls_only(template):
    buckets = resources_of(template, "AWS::S3::Bucket")
    assert {"DataBucket", "ArtifactsBucket", "WebBucket"} <= set(buckets)
    policies = {
        p["Properties"]["Bucket"]["Ref"]: p["Properties"]["PolicyDocument"]["Statement"]
        for p in resources_of(template, "AWS::S3::BucketPolicy").values()
    }
    for name, bucket in buckets.items():
        props = bucket["Properties"]
        assert all(props["PublicAccessBlockConfiguration"].values()), name
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], name
        deny = [s for s in policies[name] if s["Effect"] == "Deny"]
        assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}, name


def test_cloudfront_serves_the_page_through_oac_and_the_api_under_the_same_origin(template):
    config = template["Resources"]["Distribution"]["Properties"]["DistributionConfig"]
    origins = {o["Id"]: o for o in config["Origins"]}
    assert origins["web"]["OriginAccessControlId"] == {"Fn::GetAtt": ["WebOriginAccessControl", "Id"]}
    assert origins["api"]["OriginPath"] == {"Fn::Sub": "/${StageName}"}
    api_behaviour = next(b for b in config["CacheBehaviors"] if b["PathPattern"] == "/api/*")
    assert api_behaviour["TargetOriginId"] == "api" and "POST" in api_behaviour["AllowedMethods"]
    assert config["DefaultCacheBehavior"]["ViewerProtocolPolicy"] == "redirect-to-https"
    web_policy = next(
        p
        for p in resources_of(template, "AWS::S3::BucketPolicy").values()
        if p["Properties"]["Bucket"] == {"Ref": "WebBucket"}
    )
    allow = next(s for s in web_policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow")
    assert allow["Principal"] == {"Service": "cloudfront.amazonaws.com"} and allow["Action"] == "s3:GetObject"
    assert "distribution/${Distribution}" in allow["Condition"]["StringEquals"]["AWS:SourceArn"]["Fn::Sub"]


def test_outputs_give_the_page_and_the_commands_what_they_need(template):
    outputs = template["Outputs"]
    assert outputs["ApiBaseUrl"]["Value"] == "/api"  # the page's config.js: same origin, through CloudFront
    for name in (
        "WebUrl",
        "ApiKeyId",
        "DataBucketName",
        "ArtifactsBucketName",
        "SageMakerExecutionRoleArn",
        "WebBucketName",
        "DistributionId",
        "DirectApiBaseUrl",
        "LogsBucketName",
    ):
        assert name in outputs


@pytest.fixture
def function_as_deployed(template, monkeypatch):
    """The real handler with the environment the template sets (parameters filled in), cold each time."""
    from qa_function import handler

    params = {"EndpointName": "faq-assistant", "AllowedOrigins": "https://chat.example.com"}
    for key, value in template["Resources"]["QaFunction"]["Properties"]["Environment"]["Variables"].items():
        monkeypatch.setenv(key, params[value["Ref"]] if isinstance(value, dict) else value)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    }.items():
        monkeypatch.setenv(key, value)
    handler.reset_cold_start()
    yield handler
    handler.reset_cold_start()


def _event(name: str, path: str, origin: str, body: dict | None = None) -> dict:
    event = json.loads((EVENTS / name).read_text())
    event["path"] = path
    event["requestContext"]["path"] = "/prod" + path
    event["headers"]["Origin"] = origin
    event["multiValueHeaders"]["Origin"] = [origin]
    if body is not None:
        event["body"] = json.dumps(body)
    return event


def test_function_answers_the_preflight_for_the_allowed_origin_only(function_as_deployed):
    ok = function_as_deployed.handler(_event("rest_v1_preflight.json", "/api/ask", "https://chat.example.com"), None)
    assert ok["statusCode"] in (200, 204)
    assert ok["headers"]["Access-Control-Allow-Origin"] == "https://chat.example.com"
    assert "x-api-key" in ok["headers"]["Access-Control-Allow-Headers"].lower()
    other = function_as_deployed.handler(_event("rest_v1_preflight.json", "/api/ask", "https://evil.example"), None)
    assert "Access-Control-Allow-Origin" not in other.get("headers", {})


def test_function_routes_the_cloudfront_path_to_the_templates_endpoint(function_as_deployed):
    from botocore.response import StreamingBody
    from botocore.stub import ANY, Stubber

    runtime = function_as_deployed.get_runtime(None)
    answer = json.dumps({"generated_text": "A managed ML service."}).encode()
    with Stubber(runtime.client) as stub:
        stub.add_response(
            "invoke_endpoint",
            {
                "Body": StreamingBody(io.BytesIO(answer), len(answer)),
                "ContentType": "application/json",
                "InvokedProductionVariant": "tuned",
            },
            {"EndpointName": "faq-assistant", "Body": ANY, "ContentType": ANY, "Accept": ANY},
        )
        result = function_as_deployed.handler(
            _event("rest_v1_ask.json", "/api/ask", "https://chat.example.com", {"question": "What is SageMaker?"}), None
        )
        stub.assert_no_pending_responses()
    assert result["statusCode"] == 200, result["body"]
    assert json.loads(result["body"])["answer"] == "A managed ML service."


def _list(value) -> list:
    return value if isinstance(value, list) else [value]
