"""More than one process or host: relaunch this image's trainer under torchrun, and pass SIGTERM on.

SageMaker's rules (sagemaker-contract.md §1.9): hosts sorted, master = first host, node rank = index of the
current host, port 7777. SageMaker's own toolkit does not forward SIGTERM to the training processes; we do,
to the workers directly, so each saves its part of the checkpoint before the platform's SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .sagemaker import Cluster

log = logging.getLogger(__name__)


def inside_torchrun(environ=os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_RANK" in environ


def processes_per_host(requested: int) -> int:
    if requested > 0:
        return requested
    import torch

    return max(torch.cuda.device_count(), 1)


def torchrun_command(cluster: Cluster, nproc_per_node: int) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    if cluster.num_hosts == 1:
        command += ["--standalone"]
    else:
        command += [
            "--nnodes",
            str(cluster.num_hosts),
            "--node_rank",
            str(cluster.node_rank),
            "--master_addr",
            cluster.master_addr,
            "--master_port",
            str(cluster.master_port),
        ]
    return [*command, "-m", "trainer"]


def worker_environment(cluster: Cluster, environ=os.environ) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Workers run `python -m trainer`; make sure they find this very package, wherever it is installed.
    source_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, environ.get("PYTHONPATH", "")) if p)
    if Path("/sys/class/net", cluster.network_interface).exists():
        # Collectives must use the job network's interface, not whatever the first one is.
        env.setdefault("NCCL_SOCKET_IFNAME", cluster.network_interface)
        env.setdefault("GLOO_SOCKET_IFNAME", cluster.network_interface)
    return env


def run_torchrun(cluster: Cluster, nproc_per_node: int, stop_requested: threading.Event) -> int:
    command = torchrun_command(cluster, nproc_per_node)
    log.info(
        "launching %d process(es) on host %s (%d of %d): %s",
        nproc_per_node,
        cluster.current_host,
        cluster.node_rank + 1,
        cluster.num_hosts,
        " ".join(command),
    )
    process = subprocess.Popen(command, env=worker_environment(cluster), start_new_session=True)

    def forward(signum, _frame):
        stop_requested.set()
        workers = _children_of(process.pid)
        log.warning("signal %d: passing it to %d worker process(es)", signum, len(workers))
        for pid in workers:
            _signal(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _children_of(pid: int) -> list[int]:
    """Direct children (torchrun's workers), from /proc; torchrun itself is left to see them exit."""
    children = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(status.parent.name))
    return children


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        os.kill(pid, signum)
