"""Reading JSON out of a request body: UTF-8 only, and every hostile body a 400 naming what is wrong."""

from __future__ import annotations

import json
import re

from serve.errors import BadRequest

# `\ud800`-style escapes decode to lone UTF-16 surrogates: valid JSON, but not text a tokenizer accepts.
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def decode_utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"body is not UTF-8: {e}") from None


def load_json(text: str, *, where: str) -> object:
    """The JSON value in `text`; `where` (`body`, `line 3`) starts the error messages."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"{where} is not valid JSON: {e}") from None
    except RecursionError:  # json.loads recurses per nesting level; a request is never this deep
        raise BadRequest(f"{where}: JSON is nested too deeply") from None
    except ValueError:  # an integer over Python's 4300-digit conversion limit
        raise BadRequest(f"{where}: a number in the JSON has too many digits") from None
    if _LONE_SURROGATE_ESCAPE.search(text):
        _reject_lone_surrogates(value, where)
    return value


def _reject_lone_surrogates(value: object, where: str) -> None:
    """Escaped surrogate *pairs* decode to one character and pass; a lone one cannot be encoded as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{where} holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its pair); send valid Unicode text"
        ) from None
