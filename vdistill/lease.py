"""One exclusive lease per run folder and per cache folder: two submitters never write one folder at once.

A lease is a small JSON object, `<folder>/lease.json` (owner id, host, pid, scope, config hash, heartbeat
time), written atomically through Storage and refreshed by a heartbeat thread while its owner works. It
is free again when released, when its heartbeat is older than STALE_AFTER_S (the owner crashed), when its
owner's process is gone on this host, or when it was held in the same scope (a named coordinator in one
Ray cluster, of which only one can live: the holder was an earlier, killed incarnation of this owner).

Race window, honestly: Storage offers no atomic create-if-absent on S3 (pyarrow has no conditional put,
and the test server's support for one is not something to rely on), so acquiring is write, wait
SETTLE_S, read back: only the owner the object then names holds the lease. Two acquirers that both
found the folder free both write; the later write wins for both read-backs, so exactly one proceeds.
What stays open is a write that becomes visible more than SETTLE_S after it was issued (a stalled
upload); local files and S3 are read-after-write consistent, so this needs a stall of that length.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from vdistill.errors import UserError
from vdistill.storage import Storage, join

LEASE = "lease.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0  # a heartbeat older than this: the owner crashed
SETTLE_S = 0.5

log = logging.getLogger("vdistill.lease")


@dataclass(frozen=True)
class Owner:
    """Who takes leases: one process incarnation. `scope` names what only one live owner can have at a time."""

    scope: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


class LeaseHeld(UserError):
    """The folder is leased by a live owner: the message names the folder, the owner and what to do."""


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """`with Lease(storage, folder, "cache", config_hash, owner):` holds `<folder>/lease.json` exclusively."""

    def __init__(self, storage: Storage, folder: str, what: str, config_hash: str, owner: Owner) -> None:
        self.storage, self.folder, self.what = storage, folder, what
        self.uri = join(folder, LEASE)
        self.config_hash = config_hash
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {**asdict(self.owner), "config_hash": self.config_hash, "heartbeat": time.time()}

    def _is_free(self, holder: dict[str, Any] | None) -> bool:
        if holder is None or holder.get("id") == self.owner.id:
            return True
        if time.time() - float(holder.get("heartbeat", 0)) > STALE_AFTER_S:
            return True
        if holder.get("host") == self.owner.host and _process_gone(int(holder.get("pid", 0))):
            return True
        return bool(self.owner.scope) and holder.get("scope") == self.owner.scope

    def _refuse(self, holder: dict[str, Any]) -> LeaseHeld:
        age = time.time() - float(holder.get("heartbeat", 0))
        who = f"owner {holder.get('id')} on {holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago"
        if holder.get("config_hash") == self.config_hash:
            what = (f"{self.what} {self.folder} is in use by an identical run ({who}); submit to the same Ray "
                    "cluster to attach to it, or run again when it has finished")
        else:
            what = (f"{self.what} {self.folder} is in use by another run with different settings ({who}); "
                    f"use another {'cache.uri' if self.what == 'cache' else 'run.name'}, or wait until it finishes")
        return LeaseHeld(f"{what} (a crashed owner's lease expires after {STALE_AFTER_S:.0f} s)")

    def acquire(self) -> "Lease":
        holder = self.storage.read_json_or(self.uri)
        if not self._is_free(holder):
            raise self._refuse(holder)
        self.storage.write_json(self.uri, self._record())
        time.sleep(SETTLE_S)
        holder = self.storage.read_json_or(self.uri)
        if not holder or holder.get("id") != self.owner.id:
            raise self._refuse(holder or {})
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.what}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self.storage.read_json_or(self.uri)
            if not holder or holder.get("id") != self.owner.id:
                log.warning("lost the %s lease on %s to %s", self.what, self.folder, json.dumps(holder))
                return
            self.storage.write_json(self.uri, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.storage.read_json_or(self.uri)
        if holder and holder.get("id") == self.owner.id:
            self.storage.delete(self.uri)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
