"""Fast, in-process checks of the endpoint emulator's pieces: framing, config, routing, CLI errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from botocore.eventstream import EventStreamBuffer
from runtime_emulator import eventstream
from runtime_emulator.__main__ import main
from runtime_emulator.config import (
    DEFAULT_VARIANT_NAME,
    ConfigError,
    load_config_file,
    parse_config,
    parse_endpoint_shorthand,
)
from runtime_emulator.errors import RuntimeApiError
from runtime_emulator.routing import pick_variant

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "local" / "runtime_emulator" / "endpoints.example.yaml"


def _decode(raw: bytes, piece: int) -> list:
    """Feed botocore's own event-stream parser `piece` bytes at a time (it validates both CRCs)."""
    buffer = EventStreamBuffer()
    messages = []
    for i in range(0, len(raw), piece):
        buffer.add_data(raw[i : i + piece])
        messages.extend(buffer)
    return messages


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_payload_parts_parse_with_botocore_in_any_chunking(piece):
    parts = [b'data:{"token"', b"", "héllo ✓\n\n".encode(), bytes(range(256))]
    raw = b"".join(eventstream.payload_part(p) for p in parts)

    messages = _decode(raw, piece)

    assert [m.payload for m in messages] == parts
    for message in messages:
        assert message.headers == {
            ":event-type": "PayloadPart",
            ":content-type": "application/octet-stream",
            ":message-type": "event",
        }


def test_large_chunk_is_split_into_parts_below_the_per_message_limit():
    data = bytes(range(256)) * ((3 * eventstream.MAX_PART_BYTES) // 256 + 1)

    messages = _decode(eventstream.payload_part(data), 65536)

    assert len(messages) == 4
    assert all(len(m.payload) <= eventstream.MAX_PART_BYTES for m in messages)
    assert b"".join(m.payload for m in messages) == data


def test_stream_exception_is_a_modeled_exception_message():
    raw = eventstream.stream_exception("ModelStreamError", "too slow", "ModelInvocationTimeExceeded")

    (message,) = _decode(raw, 5)

    assert message.headers[":message-type"] == "exception"
    assert message.headers[":exception-type"] == "ModelStreamError"
    assert json.loads(message.payload) == {"Message": "too slow", "ErrorCode": "ModelInvocationTimeExceeded"}


def test_example_config_parses_into_an_80_20_ab_endpoint():
    config = parse_config(load_config_file(EXAMPLE_CONFIG))

    chat = config.endpoints["chat"]
    assert [(v.name, v.weight) for v in chat.variants] == [("tuned", 0.8), ("base", 0.2)]
    assert chat.variants[0].invocations_url == "http://127.0.0.1:8080/invocations"
    assert config.invocation_timeout_s == 60


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"endpoints": {}, "timeout": 3}, "unknown key(s) ['timeout']"),
        ({"endpoints": {"chat": {"variants": [{"url": "http://x", "wieght": 1}]}}}, "wieght"),
        ({"endpoints": {"chat": {"variants": []}}}, "at least one variant"),
        ({"endpoints": {"chat": {"variants": [{"url": "ftp://x"}]}}}, "http(s) URL"),
        ({"endpoints": {"chat": {"variants": [{"url": "http://x", "weight": 0}]}}}, "weight > 0"),
        ({"endpoints": {"chat": {"variants": [{"url": "http://x", "weight": -1}]}}}, "number >= 0"),
        ({"endpoints": {"bad_name": {"variants": [{"url": "http://x"}]}}}, "endpoint name"),
        (
            {"endpoints": {"c": {"variants": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}}},
            "unique",
        ),
        ({"endpoints": {}, "invocation_timeout_s": 0}, "invocation_timeout_s"),
    ],
)
def test_invalid_config_fails_loudly_naming_the_key(data, fragment):
    with pytest.raises(ConfigError, match=None) as excinfo:
        parse_config(data)
    assert fragment in str(excinfo.value)


def test_endpoint_shorthand_gives_one_alltraffic_variant():
    name, data = parse_endpoint_shorthand("chat=http://127.0.0.1:8080/")
    config = parse_config({"endpoints": {name: data}})

    (variant,) = config.endpoints["chat"].variants
    assert (variant.name, variant.url) == (DEFAULT_VARIANT_NAME, "http://127.0.0.1:8080")
    with pytest.raises(ConfigError, match="NAME=URL"):
        parse_endpoint_shorthand("chat")


def _ab_endpoint():
    return parse_config(
        {
            "endpoints": {
                "chat": {
                    "variants": [
                        {"name": "tuned", "url": "http://a", "weight": 80},
                        {"name": "base", "url": "http://b", "weight": 20},
                        {"name": "shadow", "url": "http://c", "weight": 0},
                    ]
                }
            }
        }
    ).endpoints["chat"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_80_20_weights_split_1000_requests_within_5_points(seed):
    endpoint, rng = _ab_endpoint(), random.Random(seed)

    counts = Counter(pick_variant(endpoint, rng).name for _ in range(1000))

    assert 750 <= counts["tuned"] <= 850
    assert counts["tuned"] + counts["base"] == 1000  # weight 0 gets no random traffic


def test_target_variant_overrides_weights_even_at_weight_zero():
    endpoint, rng = _ab_endpoint(), random.Random(0)

    assert {pick_variant(endpoint, rng, "shadow").name for _ in range(20)} == {"shadow"}
    with pytest.raises(RuntimeApiError) as excinfo:
        pick_variant(endpoint, rng, "nope")
    assert (excinfo.value.code, excinfo.value.status) == ("ValidationError", 400)
    assert "tuned, base, shadow" in excinfo.value.message


def test_cli_rejects_bad_config_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "endpoints.yaml"
    bad.write_text("endpoints:\n  chat:\n    variants:\n      - {url: 'http://x', wieght: 1}\n")

    assert main(["--config", str(bad)]) == 2
    assert "wieght" in capsys.readouterr().err
    assert main([]) == 2  # no endpoints at all
    assert "--endpoint NAME=URL" in capsys.readouterr().err


def test_env_vars_configure_endpoints_and_flags_win(tmp_path):
    from runtime_emulator.__main__ import build_config, make_parser

    env = {
        "RUNTIME_EMULATOR_ENDPOINTS": "chat=http://serve:8080, base=http://serve-base:8080",
        "RUNTIME_EMULATOR_INVOCATION_TIMEOUT_S": "5",
        "RUNTIME_EMULATOR_ROUTING_SEED": "3",
    }
    config = build_config(make_parser(env).parse_args([]), env)
    assert sorted(config.endpoints) == ["base", "chat"]
    assert config.endpoints["base"].variants[0].url == "http://serve-base:8080"
    assert (config.invocation_timeout_s, config.routing_seed) == (5.0, 3)

    args = make_parser(env).parse_args(["--config", str(EXAMPLE_CONFIG), "--endpoint", "solo=http://x:1"])
    config = build_config(args, env)
    assert sorted(config.endpoints) == ["chat", "solo"]  # --endpoint replaces the env list, adds to the file
    with pytest.raises(ConfigError, match="defined twice"):
        build_config(make_parser(env).parse_args(["--config", str(EXAMPLE_CONFIG), "--endpoint", "chat=http://x"]), env)
