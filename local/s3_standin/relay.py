"""A TCP relay in front of the S3 gateway, for a stand-in other hosts must reach (compose: `--host 0.0.0.0`).

SeaweedFS binds the S3 gateway's gRPC port to the S3 port's address, and that gRPC service reconfigures the
S3 identities without asking for any; its master, volume server and filer have no authentication either (the
filer serves every object, unsigned). So `weed` listens on loopback only, and this relay is the one thing on
the outside address: bytes in, bytes out, to the S3 port. SigV4 still works, since the Host header the client
signed passes through unchanged.

`run()` starts `weed` as a child (it dies with this process), forwards SIGTERM/SIGINT to it, relays until it
exits, and returns its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from functools import partial

LOOPBACK = "127.0.0.1"
READ_BYTES = 1 << 16


def run(command: list[str], env: dict[str, str], host: str, port: int, target_port: int) -> int:
    proc = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        asyncio.run(_serve(proc, host, port, target_port))
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
    return proc.returncode


async def _serve(proc: subprocess.Popen, host: str, port: int, target_port: int) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proc.send_signal, sig)
    server = await asyncio.start_server(partial(_relay, target_port), host, port)
    async with server:
        await loop.run_in_executor(None, proc.wait)


async def _relay(target_port: int, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, target_port)
    except OSError:  # weed not listening yet (starting) or any more (stopping): the client sees a reset
        client_writer.close()
        return
    writers = (client_writer, upstream_writer)
    try:
        await asyncio.gather(
            _pipe(client_reader, upstream_writer, writers),
            _pipe(upstream_reader, client_writer, writers),
        )
    finally:
        for writer in writers:
            writer.close()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, writers: tuple[asyncio.StreamWriter, ...]
) -> None:
    """Copy until end of stream, then pass the half-close on; a failure on either side closes both."""
    try:
        while data := await reader.read(READ_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        for each in writers:
            each.close()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the relay's process dies, so weed never outlives it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
