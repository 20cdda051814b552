import functools
import hashlib
import importlib.util
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures import faq_csv

REPO = Path(__file__).resolve().parents[2]
FAQ = faq_csv.faq_csv_bytes()  # generated with the real file's quirks; the real one is never needed here


def load_script():
    """The script, with the generated file's digest as the known one (the check is the same, the bytes are ours)."""
    spec = importlib.util.spec_from_file_location("fetch_faq_dataset", REPO / "scripts" / "fetch_faq_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SHA256 = hashlib.sha256(FAQ).hexdigest()
    return module


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP mirror holding the file and a corrupted one."""
    (tmp_path / "good.csv").write_bytes(FAQ)
    (tmp_path / "bad.csv").write_bytes(FAQ[:-10])
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_downloads_verifies_and_writes_the_dataset(mirror, tmp_path, capsys):
    output = tmp_path / "out" / "faq.csv"
    assert load_script().main(["--url", f"{mirror}/good.csv", "--output", str(output)]) == 0
    assert output.read_bytes() == FAQ
    assert f"{faq_csv.ROWS} question/answer rows" in capsys.readouterr().out


def test_a_corrupt_download_is_refused_and_nothing_is_left(mirror, tmp_path, capsys):
    output = tmp_path / "out" / "faq.csv"
    assert load_script().main(["--url", f"{mirror}/bad.csv", "--output", str(output)]) == 1
    assert not output.exists() and not list(tmp_path.glob("out/*.part"))
    assert "is not the known" in capsys.readouterr().err


def test_default_sources_are_the_regional_jumpstart_bucket_then_github():
    urls = load_script().sources("eu-west-1", None)
    assert urls[0].startswith("https://jumpstart-cache-prod-eu-west-1.s3.eu-west-1.amazonaws.com/")
    assert urls[1].startswith("https://raw.githubusercontent.com/aws-samples/")
