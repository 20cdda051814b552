"""The S3 stand-in as a real server process (SeaweedFS via `python -m s3_standin serve`) on loopback,
with the dataset and a model.tar.gz moved through it by plain boto3 found via AWS_ENDPOINT_URL_S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from s3_standin import transfer
from s3_standin.server import S3ServerConfig, WeedNotFound, find_weed, weed_command

pytestmark = pytest.mark.slow

try:
    find_weed()
except WeedNotFound as exc:
    if sys.platform == "linux":  # local/requirements.txt installs it there: its absence is a real failure
        raise
    pytest.skip(f"{exc} (PyPI has Linux builds only)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
BUCKET = "sagemaker-local"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(endpoint: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env.pop("AWS_PROFILE", None)
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    return env


def _cli(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s3_standin", *args],
        env=_env(endpoint),
        capture_output=True,
        text=True,
        timeout=120,
    )


class S3Server:
    def __init__(self, data_dir: Path, log: Path, host: str | None = None):
        self.data_dir, self.log, self.port, self.host = data_dir, log, _free_port(), host
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "s3_standin",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                *(["--host", self.host] if self.host else []),
            ],
            env=_env(),
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        waited = _cli(self.url, "wait", "--timeout", "60", "--data-dir", str(self.data_dir))
        if waited.returncode != 0:
            self.stop()
            raise RuntimeError(f"S3 stand-in did not start: {waited.stderr}\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL: weed's graceful stop takes ~20 s, and finished writes must survive a crash anyway
        (test_objects_survive_a_restart relies on exactly that)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3-standin")
    server = S3Server(tmp / "data", tmp / "weed.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    for key, value in _env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = transfer.make_client()
    transfer.ensure_bucket(client, BUCKET)
    return client


def _model_dir(root: Path) -> Path:
    """A model directory like a training job's output, with one file past boto3's 8 MiB multipart cut."""
    model = root / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (model / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "model.safetensors").write_bytes(os.urandom(9 * 1024 * 1024))
    return model


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_weed_never_phones_home_and_binds_only_where_told(tmp_path):
    command = weed_command(S3ServerConfig(data_dir=tmp_path, port=9999), find_weed())

    assert "-master.telemetry=false" in command
    assert "-ip.bind=127.0.0.1" in command and "-s3.port=9999" in command


def test_weed_binds_to_loopback_even_when_the_s3_port_is_public(tmp_path):
    """In a container (--host 0.0.0.0) weed's own ports stay on loopback; the S3 port is the relay's."""
    config = S3ServerConfig(data_dir=tmp_path, port=8333, host="0.0.0.0")
    command = weed_command(config, find_weed(), s3_port=45678)

    assert "-ip.bind=127.0.0.1" in command and "-s3.port=45678" in command
    assert not any("0.0.0.0" in arg for arg in command)


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="inet") if c.status == "LISTEN"}


def test_on_a_public_address_only_the_s3_port_listens_beyond_loopback(tmp_path, monkeypatch):
    """compose runs the stand-in with --host 0.0.0.0. The master, volume server and filer (whose HTTP port serves
    every object unsigned) and the S3 gateway's gRPC port (which reconfigures its identities) listened there
    too, open to every container on the network; now they listen on loopback and a relay serves the S3 port."""
    server = S3Server(tmp_path / "data", tmp_path / "weed.log", host="0.0.0.0")
    server.start()
    try:
        listening = _listening(server.proc.pid)
        public = {(ip, port) for ip, port in listening if ip not in ("127.0.0.1", "::1")}
        assert public == {("0.0.0.0", server.port)}, listening
        assert len(listening) >= 8  # weed's seven internal ports and its S3 port, all on loopback, and the relay

        # S3 through the relay: signed requests, a multipart upload, a ranged read.
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
        for key, value in _env().items():
            if key.startswith("AWS_"):
                monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        client = transfer.make_client()
        transfer.ensure_bucket(client, BUCKET)
        data = os.urandom(9 * 1024 * 1024)
        client.upload_fileobj(io.BytesIO(data), BUCKET, "relayed/blob")
        got = client.get_object(Bucket=BUCKET, Key="relayed/blob", Range="bytes=100-199")["Body"].read()
        assert got == data[100:200]
    finally:
        server.stop()
    assert server.proc.poll() is not None


def test_dataset_round_trip_through_the_seed_cli(s3_server, s3, tmp_path):
    dataset = tmp_path / "faq.csv"
    dataset.write_text("question,answer\nWhat is SageMaker?,A managed ML service.\n" * 200)

    seeded = _cli(
        s3_server.url,
        "seed",
        "--bucket",
        BUCKET,
        "--dataset",
        str(dataset),
        "--dataset-prefix",
        "datasets/faq",
    )

    assert seeded.returncode == 0, seeded.stderr
    summary = json.loads(seeded.stdout)
    assert summary["datasets"] == [f"s3://{BUCKET}/datasets/faq/faq.csv"]
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="datasets/faq/")
    assert [o["Key"] for o in listed["Contents"]] == ["datasets/faq/faq.csv"]
    back = transfer.download_file(s3, summary["datasets"][0], tmp_path / "back.csv")
    assert back.read_bytes() == dataset.read_bytes()


def test_model_tar_gz_round_trip_like_training_then_serving(s3_server, s3, tmp_path):
    model = _model_dir(tmp_path)
    uri = f"s3://{BUCKET}/jobs/tiny-1/output/model.tar.gz"

    uploaded = _cli(s3_server.url, "upload-model", str(model), uri)
    assert uploaded.returncode == 0, uploaded.stderr
    fetched = _cli(s3_server.url, "fetch-model", uri, str(tmp_path / "opt-ml-model"))
    assert fetched.returncode == 0, fetched.stderr

    assert _tree_digest(tmp_path / "opt-ml-model") == _tree_digest(model)
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=BUCKET, Key=uri.split("/", 3)[3])["Body"].read())) as tar:
        # SageMaker's layout: model files at the archive root, no leading directory.
        assert sorted(tar.getnames())[:2] == ["config.json", "model.safetensors"]


def test_fetch_model_refuses_an_archive_that_escapes_its_directory(s3, tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        payload = b"pwned"
        info = tarfile.TarInfo("../outside.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    transfer.upload_file(s3, evil, f"s3://{BUCKET}/evil/model.tar.gz")

    with pytest.raises(transfer.TransferError, match="refusing to unpack"):
        transfer.fetch_model(s3, f"s3://{BUCKET}/evil/model.tar.gz", tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_a_truncated_archive_is_a_clear_error_and_leaves_no_partial_files(tmp_path):
    """Issue 20, item 9: unpacked into a staging folder, moved in place only when whole."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(1 << 20))
    archive = transfer.pack_model(model, tmp_path / "model.tar.gz")
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) * 2 // 3])

    dest = tmp_path / "opt-ml-model"
    with pytest.raises(transfer.TransferError, match="truncated or corrupt"):
        transfer.extract_model(archive, dest)
    assert not dest.exists() or not any(dest.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind

    archive.write_bytes(whole)
    assert sorted(p.name for p in transfer.extract_model(archive, dest).iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert dest.stat().st_mode & 0o777 == 0o755  # readable by the serving container's unprivileged user


def test_missing_object_is_a_clear_error_with_exit_code_1(s3_server, s3, tmp_path):
    result = _cli(s3_server.url, "download", f"s3://{BUCKET}/no/such/key", str(tmp_path / "x"))

    assert result.returncode == 1
    assert f"s3://{BUCKET}/no/such/key does not exist" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_requests_signed_with_the_wrong_key_are_refused(s3_server, tmp_path):
    env_secret = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = subprocess.run(
        [sys.executable, "-m", "s3_standin", "seed", "--bucket", "refused-bucket"],
        env={**_env(s3_server.url), **env_secret},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "403" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr


def test_objects_survive_a_crash_and_restart(tmp_path):
    server = S3Server(tmp_path / "data", tmp_path / "weed.log")
    server.start()
    try:
        assert _cli(server.url, "seed", "--bucket", BUCKET).returncode == 0
        put = _cli(server.url, "upload", __file__, f"s3://{BUCKET}/kept/test.py")
        assert put.returncode == 0, put.stderr
    finally:
        server.stop()
    assert server.proc.poll() is not None

    server.start()
    try:
        got = _cli(server.url, "download", f"s3://{BUCKET}/kept/test.py", str(tmp_path / "kept.py"))
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "kept.py").read_bytes() == Path(__file__).read_bytes()
    finally:
        server.stop()


def test_wait_fails_fast_when_nothing_listens():
    started = time.monotonic()
    result = _cli(f"http://127.0.0.1:{_free_port()}", "wait", "--timeout", "0.5")

    assert result.returncode == 1 and "no S3 endpoint answered" in result.stderr
    assert time.monotonic() - started < 10
