"""infra/template.yaml: linted (cfn-lint, checkov), and its security-relevant pieces checked one by one.

The Lambda/IAM/CORS checks read the template as data; the CORS and routing checks then run the real function
(lambda/src) with the environment the template gives it, on the path CloudFront forwards (/prod/api/ask).
"""

from __future__ import annotations

import fnmatch
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
        "SageMakerTrainingRoleArn",
        "SageMakerHostingRoleArn",
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

    params = {name: p.get("Default") for name, p in template["Parameters"].items()}
    params.update({"EndpointName": "faq-assistant", "AllowedOrigins": "https://chat.example.com"})
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


def test_target_variant_is_off_unless_the_deployer_turns_it_on(template, function_as_deployed):
    """Anyone with the page's key could otherwise steer answers away from the traffic split."""
    parameter = template["Parameters"]["AllowTargetVariant"]
    assert parameter["Default"] == "false" and set(parameter["AllowedValues"]) == {"true", "false"}
    env = template["Resources"]["QaFunction"]["Properties"]["Environment"]["Variables"]
    assert env["ALLOW_TARGET_VARIANT"] == {"Ref": "AllowTargetVariant"}
    event = _event(
        "rest_v1_ask.json", "/api/ask", "https://chat.example.com", {"question": "q", "target_variant": "base"}
    )
    result = function_as_deployed.handler(event, None)
    assert result["statusCode"] == 400 and "disabled" in json.loads(result["body"])["error"]


# --- the SageMaker roles: what each may do to which object, read as IAM would ---------------------------

ARTIFACTS = "arn:aws:s3:::llmft-artifacts"
DATA = "arn:aws:s3:::llmft-data"
WEB = "arn:aws:s3:::llmft-web"
FAKE_ARNS = {"ArtifactsBucket": ARTIFACTS, "DataBucket": DATA, "WebBucket": WEB}
# Pseudo parameters, and the REST API's id (what !Ref Api gives)
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "Api": "abc123"}


def _resolve(value) -> str:
    """A policy Resource as a string: !GetAtt X.Arn and !Sub with ${X.Arn} / pseudo parameters filled in."""
    if isinstance(value, str):
        return value
    if "Fn::GetAtt" in value:
        name, attribute = value["Fn::GetAtt"]
        assert attribute == "Arn"
        return FAKE_ARNS[name]
    text = value["Fn::Sub"]
    for name, arn in FAKE_ARNS.items():
        text = text.replace("${" + name + ".Arn}", arn)
    for name, real in PSEUDO.items():
        text = text.replace("${" + name + "}", real)
    assert "${" not in text, text
    return text


def allows(role: dict, action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """Whether one of the role's Allow statements grants `action` on `resource` (IAM's * and ? wildcards;
    StringLike conditions checked against `context`, a missing key failing them). The roles use no Deny."""
    for statement in statements(role):
        assert statement["Effect"] == "Allow"
        if not any(fnmatch.fnmatchcase(action, a) for a in _list(statement["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, _resolve(r)) for r in _list(statement["Resource"])):
            continue
        condition = statement.get("Condition", {})
        assert set(condition) <= {"StringLike"}, condition
        wanted = condition.get("StringLike", {})
        if all(
            key in (context or {}) and any(fnmatch.fnmatchcase(context[key], v) for v in _list(values))
            for key, values in wanted.items()
        ):
            return True
    return False


def test_training_and_hosting_assume_separate_roles(template):
    trusted_by_sagemaker = {
        name
        for name, role in resources_of(template, "AWS::IAM::Role").items()
        if any(
            s["Principal"].get("Service") == "sagemaker.amazonaws.com"
            for s in role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        )
    }
    assert trusted_by_sagemaker == {"SageMakerTrainingRole", "SageMakerHostingRole"}
    outputs = template["Outputs"]
    assert outputs["SageMakerTrainingRoleArn"]["Value"] == {"Fn::GetAtt": ["SageMakerTrainingRole", "Arn"]}
    assert outputs["SageMakerHostingRoleArn"]["Value"] == {"Fn::GetAtt": ["SageMakerHostingRole", "Arn"]}


@pytest.mark.parametrize(
    ("action", "resource", "allowed"),
    [
        ("s3:GetObject", f"{ARTIFACTS}/jobs/llmft-2026-12-01/output/model.tar.gz", True),  # a tuned model
        ("s3:GetObject", f"{ARTIFACTS}/base/model.tar.gz", True),  # the A/B base variant (package-base)
        ("s3:GetObject", f"{ARTIFACTS}/checkpoints/faq/checkpoint-200/optimizer.pt", False),
        ("s3:GetObject", f"{ARTIFACTS}/jobs/llmft-2026-12-01/output/output.tar.gz", False),
        ("s3:GetObject", f"{DATA}/datasets/faq/train/faq.csv", False),
        ("s3:PutObject", f"{ARTIFACTS}/jobs/llmft-2026-12-01/output/model.tar.gz", False),  # no model swapping
        ("s3:PutObject", f"{ARTIFACTS}/base/model.tar.gz", False),
        ("s3:PutObject", f"{ARTIFACTS}/checkpoints/faq/checkpoint-200/adapter_model.safetensors", False),
        ("s3:DeleteObject", f"{ARTIFACTS}/jobs/llmft-2026-12-01/output/model.tar.gz", False),
        ("s3:ListBucket", ARTIFACTS, False),
        ("s3:GetObject", f"{WEB}/index.html", False),
        ("ecr:BatchGetImage", "arn:aws:ecr:us-east-1:123456789012:repository/sagemaker-llm-finetune-serve", True),
        ("ecr:BatchGetImage", "arn:aws:ecr:us-east-1:123456789012:repository/sagemaker-llm-finetune-train", False),
    ],
)
def test_hosting_role_reads_model_archives_and_writes_nothing(template, action, resource, allowed):
    assert allows(template["Resources"]["SageMakerHostingRole"], action, resource) is allowed


@pytest.mark.parametrize(
    ("action", "resource", "context", "allowed"),
    [
        ("s3:GetObject", f"{DATA}/datasets/faq/train/faq.csv", None, True),
        ("s3:ListBucket", DATA, None, True),
        ("s3:PutObject", f"{DATA}/datasets/faq/train/faq.csv", None, False),  # data is read-only
        ("s3:PutObject", f"{ARTIFACTS}/jobs/llmft-2026-12-01/output/model.tar.gz", None, True),
        ("s3:GetObject", f"{ARTIFACTS}/jobs/llmft-2026-11-01/output/model.tar.gz", None, False),
        ("s3:DeleteObject", f"{ARTIFACTS}/jobs/llmft-2026-11-01/output/model.tar.gz", None, False),
        ("s3:PutObject", f"{ARTIFACTS}/base/model.tar.gz", None, False),  # cannot replace the base variant
        ("s3:GetObject", f"{ARTIFACTS}/checkpoints/faq/checkpoint-200/trainer_state.json", None, True),  # resume
        ("s3:PutObject", f"{ARTIFACTS}/checkpoints/faq/checkpoint-200/trainer_state.json", None, True),
        ("s3:ListBucket", ARTIFACTS, {"s3:prefix": "checkpoints/faq/"}, True),
        ("s3:ListBucket", ARTIFACTS, {"s3:prefix": "base/"}, False),
        ("s3:ListBucket", ARTIFACTS, None, False),
        ("s3:PutObject", f"{WEB}/index.html", None, False),
        ("ecr:BatchGetImage", "arn:aws:ecr:us-east-1:123456789012:repository/sagemaker-llm-finetune-train", None, True),
        (
            "ecr:BatchGetImage",
            "arn:aws:ecr:us-east-1:123456789012:repository/sagemaker-llm-finetune-serve",
            None,
            False,
        ),
    ],
)
def test_training_role_writes_only_its_output_and_checkpoints(template, action, resource, context, allowed):
    assert allows(template["Resources"]["SageMakerTrainingRole"], action, resource, context) is allowed


def test_sagemaker_roles_have_no_wildcard_resources_but_the_ones_iam_requires(template):
    for name in ("SageMakerTrainingRole", "SageMakerHostingRole"):
        for statement in statements(template["Resources"][name]):
            if _list(statement["Resource"]) == ["*"]:  # actions that take no resource
                assert _list(statement["Action"]) in (["ecr:GetAuthorizationToken"], ["cloudwatch:PutMetricData"])


# --- what CloudFront tells the browser ------------------------------------------------------------------


def _csp(policy: dict) -> dict[str, list[str]]:
    text = policy["Properties"]["ResponseHeadersPolicyConfig"]["SecurityHeadersConfig"]["ContentSecurityPolicy"]
    text = _resolve(text["ContentSecurityPolicy"])
    return {d.split()[0]: d.split()[1:] for d in (part.strip() for part in text.split(";")) if d}


def test_cloudfront_sends_a_csp_whose_connect_src_is_the_api_only(template):
    config = template["Resources"]["Distribution"]["Properties"]["DistributionConfig"]
    behaviours = [config["DefaultCacheBehavior"], *config["CacheBehaviors"]]
    for behaviour in behaviours:
        assert behaviour["ResponseHeadersPolicyId"] == {"Ref": "WebResponseHeadersPolicy"}
    policy = template["Resources"]["WebResponseHeadersPolicy"]
    csp = _csp(policy)
    assert csp["connect-src"] == ["'self'", "https://abc123.execute-api.us-east-1.amazonaws.com"]
    assert csp["script-src"] == ["'self'"] and csp["default-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert not any("unsafe" in s or "*" in s or s in ("http:", "https:") for sources in csp.values() for s in sources)
    headers = policy["Properties"]["ResponseHeadersPolicyConfig"]["SecurityHeadersConfig"]
    assert headers["ContentSecurityPolicy"]["Override"] is True
    assert headers["StrictTransportSecurity"]["AccessControlMaxAgeSec"] >= 31536000
    assert headers["ContentTypeOptions"]["Override"] is True
    assert headers["FrameOptions"]["FrameOption"] == "DENY"
    assert headers["ReferrerPolicy"]["ReferrerPolicy"] == "no-referrer"


def test_the_local_cloudfront_stand_in_sends_the_same_csp(template):
    """local/static_site is what the browser tests run against: its policy must be the one production sends."""
    from static_site.app import create_app

    api = "https://abc123.execute-api.us-east-1.amazonaws.com"
    local = create_app(REPO / "web", api_base_url=f"{api}/prod/api").test_client().get("/")
    parsed = {
        d.split()[0]: d.split()[1:]
        for d in (part.strip() for part in local.headers["Content-Security-Policy"].split(";"))
        if d
    }
    assert parsed == _csp(template["Resources"]["WebResponseHeadersPolicy"])


def _list(value) -> list:
    return value if isinstance(value, list) else [value]
