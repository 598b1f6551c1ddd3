"""One exclusive lease per run and per cache folder, on local files and on S3; a crashed owner's lease expires."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from vdistill import lease as leases
from vdistill.config import DemoConfig, load_config
from vdistill.pipeline import Pipeline, run_identity
from vdistill.data.ingest import run_ingest
from vdistill.data.synthetic import write_demo_dataset
from vdistill.lease import LEASE, Lease, LeaseHeld, Owner
from vdistill.storage import Storage, join


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(Storage, folder URI) on the local disk or in a bucket on the S3 test server."""
    if request.param == "local":
        return Storage(), str(tmp_path / "folder")
    storage, bucket = request.getfixturevalue("s3_storage")
    return storage, f"{bucket}/folder"


def test_a_live_lease_refuses_a_second_owner_naming_the_folder_and_the_owner(where):
    storage, folder = where
    first = Owner()
    with Lease(storage, folder, "cache", "hash-a", first):
        with pytest.raises(LeaseHeld, match=rf"cache {folder} is in use by another run with different settings "
                                            rf"\(owner {first.id} on .*pid \d+"):
            Lease(storage, folder, "cache", "hash-b", Owner()).acquire()


def test_an_identical_run_is_told_how_to_attach(where):
    storage, folder = where
    with Lease(storage, folder, "run", "same", Owner()):
        with pytest.raises(LeaseHeld, match="in use by an identical run .* submit to the same Ray cluster"):
            Lease(storage, folder, "run", "same", Owner()).acquire()


def test_release_frees_the_folder(where):
    storage, folder = where
    with Lease(storage, folder, "run", "a", Owner()):
        assert storage.is_file(join(folder, LEASE))
    assert not storage.exists(join(folder, LEASE))
    with Lease(storage, folder, "run", "b", Owner()):
        pass


def _crashed(storage: Storage, folder: str, **fields) -> None:
    """The lease object a crashed owner leaves behind (it never released it)."""
    record = {"id": "crashed", "host": "another-node", "pid": 1, "scope": "", "config_hash": "x",
              "heartbeat": time.time(), **fields}
    storage.write_json(join(folder, LEASE), record)


def test_a_stale_heartbeat_is_taken_over(where):
    storage, folder = where
    _crashed(storage, folder, heartbeat=time.time() - leases.STALE_AFTER_S - 1)
    with Lease(storage, folder, "run", "y", Owner()) as held:
        assert storage.read_json(join(folder, LEASE))["id"] == held.owner.id


def test_a_dead_process_on_this_host_loses_its_lease_at_once(tmp_path):
    storage, folder = Storage(), str(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _crashed(storage, folder, host=Owner().host, pid=int(dead.stdout))
    with Lease(storage, folder, "run", "x", Owner()):
        pass


def test_an_earlier_incarnation_in_the_same_scope_is_taken_over(tmp_path):
    storage, folder = Storage(), str(tmp_path)
    _crashed(storage, folder, scope="cluster/actor")
    with pytest.raises(LeaseHeld):
        Lease(storage, folder, "run", "x", Owner(scope="cluster/other")).acquire()
    with Lease(storage, folder, "run", "x", Owner(scope="cluster/actor")):
        pass


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.2)
    storage, folder = Storage(), str(tmp_path)
    with Lease(storage, folder, "run", "x", Owner()):
        first = storage.read_json(join(folder, LEASE))["heartbeat"]
        time.sleep(0.7)
        assert storage.read_json(join(folder, LEASE))["heartbeat"] > first


def test_two_owners_racing_for_a_free_folder_leave_exactly_one_holder(where):
    storage, folder = where
    held: list[Lease] = []
    refused: list[LeaseHeld] = []

    def take() -> None:
        try:
            held.append(Lease(storage, folder, "run", "x", Owner()).acquire())
        except LeaseHeld as exc:
            refused.append(exc)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(held), len(refused)) == (1, 1)
    held[0].release()


# ---- the leases in use ------------------------------------------------------------------------------------
def _dataset(storage: Storage, root: str, classes: int) -> str:
    return write_demo_dataset(storage, root, DemoConfig(classes=classes, train_per_class=1, test_per_class=1,
                                                        size=16, frames=4))


def test_a_second_ingest_with_other_input_into_a_leased_cache_is_refused(where):
    storage, folder = where
    cache = join(folder, "cache")
    cfg = load_config(None, [f"data.root={folder}/b", f"data.annotations={_dataset(storage, folder + '/b', 3)}",
                             f"cache.uri={cache}", "decode.frames=4", "decode.size=16"])
    first = Owner()
    with Lease(storage, cache, "cache", "the-first-ingest", first):
        with pytest.raises(LeaseHeld, match=rf"cache {cache} is in use by another run .*owner {first.id}"):
            run_ingest(cfg, storage, progress=False)
        assert storage.list_files(cache) == [join(cache, LEASE)]


def test_a_second_identical_run_is_refused_before_it_writes_anything(tmp_path):
    storage = Storage()
    cfg = load_config(None, [f"run.root={tmp_path}", "tracking.enabled=false"])
    with Lease(storage, cfg.run_uri, "run", run_identity(cfg), Owner()):
        with pytest.raises(LeaseHeld, match=f"run {cfg.run_uri} is in use by an identical run"):
            Pipeline(cfg, storage).run("ingest")
        assert storage.list_files(cfg.run_uri) == [join(cfg.run_uri, LEASE)]
