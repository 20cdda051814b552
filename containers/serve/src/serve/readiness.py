"""Whether every worker of the server is ready, for GET /ping, which any worker may answer.

gunicorn's master makes a directory at start-up (and removes it at exit). Each worker keeps the file of its slot
(`slot-<i>`) up to date with its own health: its pid, its model's state and, unless it serves, why not; any worker
reads them all. No file means loading. When a worker exits the master deletes its file, so its slot reads
`loading` until the replacement worker, which takes over the slot, has loaded the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("serve.readiness")

# How often a worker looks at its own health to publish a change (a new worker's `ready` reaches /ping this late).
PUBLISH_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Problem:
    """Why the server as a whole is not ready: the /ping error's `error_type` and message."""

    error_type: str
    message: str


class ReadyBoard:
    def __init__(self, directory: Path, slots: int):
        self.directory = Path(directory)
        self.slots = slots

    @classmethod
    def create(cls, slots: int) -> ReadyBoard:
        """The master's: a fresh directory, private to this server."""
        return cls(Path(tempfile.mkdtemp(prefix="serve-ready-")), slots)

    def mark(self, slot: int, state: str, problem: str | None) -> None:
        """A worker's: its model's state (`loading`, `ready`, `failed`) and why it does not serve (None: it does).
        Written whole (rename), so a reader never sees half a file."""
        path = self._path(slot)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps({"pid": os.getpid(), "state": state, "problem": problem}))
        os.replace(scratch, path)

    def clear(self, slot: int, pid: int) -> None:
        """The master's, when worker `pid` has exited: its slot is loading again (unless another worker already
        wrote it, as when a reload runs two workers on one slot)."""
        entry = self._read(slot)
        if entry is not None and entry.get("pid") == pid:
            self._path(slot).unlink(missing_ok=True)

    def problem(self) -> Problem | None:
        """None when every slot's worker serves; else the first broken one, or how many are still loading."""
        loading = 0
        for slot in range(self.slots):
            entry = self._read(slot) or {"state": "loading", "problem": "no worker has reported"}
            if entry.get("problem") is None:
                continue
            if entry.get("state") == "loading":
                loading += 1
            else:
                return Problem("unhealthy", f"worker {slot + 1} of {self.slots}: {entry['problem']}")
        if loading:
            return Problem("not_ready", f"the model is loading in {loading} of {self.slots} workers")
        return None

    def publish(self, slot: int, health: Callable[[], tuple[str, str | None]]) -> threading.Thread:
        """A worker's: a daemon thread that writes `health()` ((state, problem), see mark) to its slot whenever
        it changes."""

        def run() -> None:
            published, failing = None, False
            while True:
                try:
                    current = health()
                    if current != published:
                        self.mark(slot, *current)
                        published, failing = current, False
                except Exception:  # the other workers' /ping waits for this slot: say why (once), try again
                    if not failing:
                        log.exception("could not publish this worker's health for /ping; retrying")
                    failing = True
                time.sleep(PUBLISH_INTERVAL_S)

        thread = threading.Thread(target=run, name="serve-ready-board", daemon=True)
        thread.start()
        return thread

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _path(self, slot: int) -> Path:
        return self.directory / f"slot-{slot}"

    def _read(self, slot: int) -> dict | None:
        try:
            entry = json.loads(self._path(slot).read_text())
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None
