"""Security review, as tests: model loading runs no remote code and unpickles nothing by default; the emulated
gateway's API key cannot be bypassed; the CORS allow-list is honoured; no user text, key or secret reaches a
log; the Lambda's IAM policy in the template is least privilege."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from reliability.helpers import RunningStack, free_ports, request

MARKER_NAME = "pwned-marker"


# ----- model loading ----------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _model_with_traps(tiny_model_dir: Path, root: Path) -> tuple[Path, Path]:
    """A copy of the tiny model plus remote code (auto_map) and a pickle that each leave a marker if run."""
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    marker = root / MARKER_NAME
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilModel", "AutoConfig": "evil_modeling.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil_modeling.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    (model / "training_args.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    return model, marker


def test_the_server_runs_no_remote_code_and_loads_no_pickle_by_default(tmp_path, tiny_model_dir):
    from serve.artifact import load_artifact
    from serve.config import ServeConfig

    model, marker = _model_with_traps(tiny_model_dir, tmp_path)
    config = ServeConfig(model_dir=model)
    assert config.trust_remote_code is False
    loaded = load_artifact(model, config)  # safetensors are there, so it loads, from them
    assert loaded.model is not None
    assert not marker.exists(), "remote code or a pickle ran while loading the model"


def test_a_pickle_only_artifact_is_refused(tmp_path, tiny_model_dir):
    from serve.artifact import ArtifactError, load_artifact
    from serve.config import ServeConfig

    model, marker = _model_with_traps(tiny_model_dir, tmp_path)
    (model / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="pickle"):
        load_artifact(model, ServeConfig(model_dir=model))
    assert not marker.exists()


def test_the_trainer_runs_no_remote_code_by_default(tmp_path, tiny_model_dir):
    from trainer.config import TrainConfig
    from trainer.modeling import BaseModel, load_model, load_tokenizer

    model, marker = _model_with_traps(tiny_model_dir, tmp_path)
    assert TrainConfig.__dataclass_fields__["trust_remote_code"].default is False
    base = BaseModel(path=str(model), name="trap")
    load_tokenizer(base, trust_remote_code=False)
    with contextlib.suppress(Exception):  # refusing is fine too; running the code is not
        load_model(base, trust_remote_code=False)
    assert not marker.exists()


# ----- the gateway: API key, CORS, logs (real processes) ----------------------------------------------

API_KEY = "reliability-key-0123456789abcdef"
SECRET = "user-secret-question-4c1d9e"
PAGE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory, tiny_model_dir):
    running = RunningStack(tmp_path_factory.mktemp("keyed-stack"), free_ports())
    try:
        running.start_serving(tiny_model_dir)
        running.start_front(api_key=API_KEY, allow_origin=PAGE)
        yield running
    finally:
        running.stop()


BYPASS_ATTEMPTS = [
    ("no key", "POST", "/prod/ask", {}),
    ("wrong key", "POST", "/prod/ask", {"x-api-key": API_KEY[:-1] + "X"}),
    ("key with a suffix", "POST", "/prod/ask", {"x-api-key": API_KEY + "0"}),
    ("a prefix of the key", "POST", "/prod/ask", {"x-api-key": API_KEY[:20]}),
    ("key as a query parameter", "POST", f"/prod/ask?x-api-key={API_KEY}", {}),
    ("key as bearer token", "POST", "/prod/ask", {"Authorization": f"Bearer {API_KEY}"}),
    ("empty key", "POST", "/prod/ask", {"x-api-key": ""}),
    ("method override to OPTIONS", "POST", "/prod/ask", {"X-HTTP-Method-Override": "OPTIONS"}),
    ("dot segments", "POST", "/prod/./ask", {}),
    ("encoded dot segments", "POST", "/prod/%2e%2e/prod/ask", {}),
    ("double slash", "POST", "//prod//ask", {}),
    ("no stage", "POST", "/ask", {}),
    ("GET", "GET", "/prod/ask", {}),
    ("HEAD", "HEAD", "/prod/ask", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "method", "path", "headers"), BYPASS_ATTEMPTS, ids=[c[0] for c in BYPASS_ATTEMPTS])
def test_the_api_key_cannot_be_bypassed(keyed_stack, case, method, path, headers):
    body = json.dumps({"question": SECRET}).encode()
    reply = request(
        keyed_stack.ports.apigw, method, path, body, {"Content-Type": "application/json", "Origin": PAGE, **headers}
    )
    assert reply.status == 403, (reply.status, reply.body[:200])
    if method != "HEAD":
        assert json.loads(reply.body) == {"message": "Forbidden"}


@pytest.mark.slow
def test_the_right_key_in_any_header_case_works_and_preflight_needs_none(keyed_stack):
    for name in ("x-api-key", "X-API-Key", "X-Api-Key"):
        reply = keyed_stack.ask("What is SageMaker?", headers={name: API_KEY, "Origin": PAGE})
        assert reply.status == 200, reply.body
    # OPTIONS reaches the function without a key (browsers send none on a preflight), and only ever gets the
    # CORS answer: never a model call.
    reply = request(
        keyed_stack.ports.apigw, "OPTIONS", "/prod/ask", None, {"Origin": PAGE, "Access-Control-Request-Method": "POST"}
    )
    assert reply.status == 204 and reply.body == b""


ORIGINS = [
    ("another site", "https://evil.example"),
    ("allowed origin as a prefix", PAGE + ".evil.example"),
    ("allowed host, other port", "http://127.0.0.1:8001"),
    ("other scheme", "https://127.0.0.1:8000"),
    ("null origin", "null"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "origin"), ORIGINS, ids=[c[0] for c in ORIGINS])
def test_cors_allow_list_is_honoured(keyed_stack, case, origin):
    preflight = request(
        keyed_stack.ports.apigw,
        "OPTIONS",
        "/prod/ask",
        None,
        {"Origin": origin, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status == 403
    assert "access-control-allow-origin" not in preflight.headers
    reply = keyed_stack.ask("q", headers={"x-api-key": API_KEY, "Origin": origin})
    assert reply.headers.get("access-control-allow-origin") in (None, PAGE), reply.headers
    assert reply.headers.get("access-control-allow-credentials") is None
    # The gateway's own answers carry the one configured page origin, never an echo of the caller's.
    forbidden = keyed_stack.ask("q", headers={"Origin": origin})
    assert forbidden.status == 403
    assert forbidden.headers.get("access-control-allow-origin") == PAGE


@pytest.mark.slow
def test_no_user_text_key_or_secret_in_any_log(keyed_stack):
    ok = keyed_stack.ask(SECRET, headers={"x-api-key": API_KEY})
    assert ok.status == 200
    answer = ok.json()["answer"].strip()
    keyed_stack.ask(SECRET, headers={"x-api-key": "wrong-key-0123456789abcdef"})
    keyed_stack.ask(SECRET * 300, headers={"x-api-key": API_KEY})  # refused: too long for the model
    request(
        keyed_stack.ports.apigw,
        "POST",
        "/prod/ask",
        b'{"question": "' + SECRET.encode() + b'" broken',
        {"x-api-key": API_KEY, "Content-Type": "application/json"},
    )
    keyed_stack.invoke({"inputs": SECRET, "parameters": {"temperature": -1}})
    logs = {name: keyed_stack.log(name) for name in ("serve", "runtime-emulator", "lambda", "apigw")}
    for name, text in logs.items():
        assert text, f"{name} wrote no log at all"
        assert SECRET not in text, f"the user's question is in the {name} log"
        assert API_KEY not in text, f"the API key is in the {name} log"
        assert "wrong-key-0123456789abcdef" not in text
        assert "aws_secret_access_key" not in text.lower()
        if len(answer) > 12:
            assert answer not in text, f"the model's answer is in the {name} log"


# The deployment template's IAM policy, API key and throttling: tests/aws/test_infra.py (infra/template.yaml).
