"""A lease on a run directory, so two runs never write into one.

`RunLock(dir)` writes `{dir}/.lock` (pid, host, start time, heartbeat) and refreshes the
heartbeat from a daemon thread every HEARTBEAT_S seconds. A second run on the same directory
gets `LockHeld` (the CLI exits 2 naming the holder). A lock whose holder is gone (same host
and the pid is not running, or no heartbeat for STALE_S seconds from any host) is taken over
with a warning. Creation is atomic (`O_EXCL` locally, a conditional PUT on S3:
`storage.create_exclusive`), so two runs starting at once cannot both win; the lock works
the same on a remote run_dir.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from deliberate_ray import storage
from deliberate_ray.config import ConfigError

log = logging.getLogger(__name__)
HEARTBEAT_S = 10.0
STALE_S = 120.0
LOCK_NAME = ".lock"


class LockHeld(ConfigError):
    """Another live run holds the directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_dead(info: dict[str, Any], now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
        return True
    return now - float(info.get("heartbeat", 0)) > STALE_S


class RunLock:
    def __init__(self, directory: str | Path, what: str = "run"):
        self.dir = str(directory)
        self.path = storage.join(self.dir, LOCK_NAME)
        self.what = what
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self) -> dict[str, Any]:
        now = time.time()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": getattr(self, "_started", now),
            "heartbeat": now,
            "token": self.token,
            "what": self.what,
        }

    def _create(self) -> bool:
        return storage.create_exclusive(self.path, json.dumps(self._info()).encode())

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # half-written by a process that died at that moment

    def acquire(self) -> RunLock:
        storage.makedirs(self.dir)
        self._started = time.time()
        for _ in range(3):
            if self._create():
                break
            info = self._read()
            if info is None:
                continue
            if info and not holder_is_dead(info):
                age = time.time() - float(info.get("heartbeat", 0))
                raise LockHeld(
                    str(self.dir),
                    [
                        f"another {info.get('what', 'run')} holds this directory: pid "
                        f"{info.get('pid')} on {info.get('host')}, last heartbeat {age:.0f} s "
                        f"ago ({self.path}); wait for it, stop it, or use another directory",
                    ],
                )
            log.warning(
                "%s: taking over the lock of a run that is gone (pid %s on %s)",
                self.dir,
                info.get("pid"),
                info.get("host"),
            )
            storage.remove(self.path)
        else:
            raise LockHeld(str(self.dir), [f"could not take {self.path}; another run races us"])
        self._thread = threading.Thread(target=self._beat, name="runlock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            info = self._read()
            if not info or info.get("token") != self.token:
                log.error("%s: the run lock was taken by another run", self.dir)
                return
            storage.write_text(self.path, json.dumps(self._info()))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self._read()
        if info and info.get("token") == self.token:
            storage.remove(self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
