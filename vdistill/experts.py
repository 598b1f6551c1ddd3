"""Expert trajectories for trajectory matching: N independent networks trained on the real clips, one file each.

MTT needs, per iteration, two snapshots of one expert (`epoch_s` and `epoch_{s+expert_epochs}`).
Each expert therefore lives in its own safetensors file `<run>/experts/<kind>/expert_<k:03d>.safetensors`
with one flat float32 tensor `(P,)` per epoch (`epoch_000` = the initial weights), so a reader fetches
only the byte ranges it needs (METHOD.md W-18) and nothing is unpickled (METHOD.md W-22). Snapshots are copies
of the weights, never views (METHOD.md W-23). Every expert is written (no `save_interval` drop, METHOD.md W-21).

Experts are independent, not data-parallel: one Ray Train run of `experts.num_workers` workers trains every
pending expert of every kind a run needs (video and frame experts together: one start-up, not one per kind).
Workers take experts from a shared queue, the video experts (the longest) first, so none idles while
experts are left; each expert streams its epochs from the Parquet cache (`vdistill.data.stream`), so a worker
holds a shuffle buffer, never a split, and several workers fit on one node or GPU whatever the cache size.
There is no gradient all-reduce (no DDP). Fractional `experts.gpus_per_worker` lets several small experts
share one GPU.

Resume (METHOD.md W-16): after every epoch a worker writes the new snapshot plus the expert's optimizer and RNG
state (`vdistill.checkpoint`, the format the distillation loops use) under `partial/`; an epoch's batches are a
pure function of (expert seed, epoch), so a crashed worker restarted by Ray Train (FailureConfig) or a
re-submitted run continues from the last finished epoch, bit for bit. Finished experts are never retrained,
and a run whose experts are all complete returns without starting Ray Train.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vdistill.checkpoint import load_state, save_state
from vdistill.config import Config, ExpertsConfig, ModelConfig, TrainConfig
from vdistill.data.stream import SplitStream
from vdistill.errors import UserError
from vdistill.storage import Storage, join

KINDS = ("video", "frame")
FORMAT = "vdistill.trajectory/1"
_EXPERT_FILE = re.compile(r"expert_\d{3}\.safetensors$")
_PARTIAL_SNAPSHOT = re.compile(r"/expert_(\d{3})/epoch_\d{3}\.safetensors$")

log = logging.getLogger("vdistill.experts")


@dataclass(frozen=True)
class ExpertJob:
    """One expert to train or resume: the config sections it reads plus what is its own; picklable for Ray."""

    kind: str
    index: int
    seed: int
    epochs: int
    experts: ExpertsConfig
    model: ModelConfig
    train: TrainConfig
    classes: tuple[str, ...]
    frames: int
    size: int
    out_uri: str
    cache_uri: str
    train_split: str
    test_split: str
    manifest_hash: str

    @property
    def uri(self) -> str:
        return join(self.out_uri, f"expert_{self.index:03d}.safetensors")

    @property
    def partial_uri(self) -> str:
        return join(self.out_uri, "partial", f"expert_{self.index:03d}")

    @property
    def failure_uri(self) -> str:
        """Where a worker records why this expert could not be finished (read by the driver)."""
        return join(self.out_uri, "failed", f"expert_{self.index:03d}.json")

    @property
    def model_name(self) -> str:
        return "convnet2d" if self.kind == "frame" else self.model.name

    @property
    def model_spec(self) -> dict[str, Any]:
        """The model settings this kind uses (a 2-D setting never invalidates video experts, and back)."""
        m = self.model
        if self.kind == "frame":
            return {"name": self.model_name, "width": m.width_2d, "depth": m.depth_2d}
        return {"name": self.model_name, "width": m.width, "head": m.head, "dropout": m.dropout}

    @property
    def input_hash(self) -> str:
        """Identity of the trajectory: a finished file with another hash was made with other settings.

        Exactly the settings the weights depend on (not index, folder or test_every), under the keys
        earlier versions hashed, so experts finished by them keep their hash.
        """
        e, t = self.experts, self.train
        fields = {
            "kind": self.kind, "seed": self.seed, "epochs": self.epochs, "lr": e.lr, "momentum": e.momentum,
            "batch_size": e.batch_size, "model_name": self.model_name, "model_cfg": self.model_spec,
            "classes": self.classes, "frames": self.frames, "size": self.size, "standardize": t.standardize,
            "augment": t.augment, "cache_uri": self.cache_uri, "train_split": self.train_split,
            "test_split": self.test_split, "manifest_hash": self.manifest_hash,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def build_model(self) -> nn.Module:
        from vdistill.models import build_model

        return build_model(self.model_name, len(self.classes), self.frames, self.size, self.model)


# `hook(job, epoch)`, called before each epoch is trained; it must pickle, as it travels to the Ray workers.
EpochHook = Callable[[ExpertJob, int], None]


def snapshot_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def trajectory_dir(run_uri: str, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"expert kind must be one of {KINDS}, got {kind!r}")
    return join(run_uri, "experts", kind)


def expert_seed(run_seed: int, kind: str, index: int) -> int:
    """Independent, reproducible seed per (run seed, kind, expert): init, dropout, shuffling, frame choice."""
    return int(np.random.SeedSequence([run_seed, KINDS.index(kind), index]).generate_state(1)[0])


def plan_experts(cfg: Config, storage: Storage, kind: str) -> list[ExpertJob]:
    """One job per expert from the config and the clip cache manifest (classes, clip shape, hash)."""
    from vdistill.data.clips import read_manifest

    manifest = read_manifest(storage, cfg.cache_uri)
    manifest_hash = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = trajectory_dir(cfg.run_uri, kind)
    # Copies: a planned job is frozen, so a later change to cfg must not change its hash.
    experts, model, train = cfg.experts.model_copy(), cfg.model.model_copy(), cfg.train.model_copy()
    return [
        ExpertJob(
            kind=kind, index=k, seed=expert_seed(cfg.run.seed, kind, k), epochs=cfg.expert_epochs_to_train,
            experts=experts, model=model, train=train, classes=tuple(manifest["classes"]),
            frames=int(manifest["frames"]), size=int(manifest["size"]), out_uri=out, cache_uri=cfg.cache_uri,
            train_split=cfg.data.train_split, test_split=cfg.data.test_split, manifest_hash=manifest_hash,
        )
        for k in range(experts.num_experts)
    ]


# ---- reading ----------------------------------------------------------------------------------------------
class TrajectoryReader:
    """One expert's trajectory; `snapshot(e)` reads only that tensor's bytes (local or s3://)."""

    def __init__(self, storage: Storage, uri: str) -> None:
        self.storage = storage
        self.uri = uri
        self.meta: dict[str, Any] = json.loads(storage.read_tensor_metadata(uri)["meta"])
        self.num_snapshots: int = int(self.meta["epochs"]) + 1

    def snapshot(self, epoch: int) -> torch.Tensor:
        """Flat float32 parameters `(P,)` after `epoch` epochs (0 = initial weights)."""
        if not 0 <= epoch < self.num_snapshots:
            raise IndexError(f"{self.uri} has snapshots 0..{self.num_snapshots - 1}, asked for {epoch}")
        name = snapshot_name(epoch)
        return self.storage.read_tensors(self.uri, [name])[name]


def list_trajectories(storage: Storage, run_uri: str, kind: str) -> list[str]:
    """Finished expert files of one kind, sorted by expert index (partial files are never listed)."""
    files = storage.list_files(trajectory_dir(run_uri, kind), recursive=False)
    return [uri for uri in files if _EXPERT_FILE.search(uri)]


def _finished_hash(storage: Storage, job: ExpertJob) -> str | None:
    """Input hash of the expert's finished file, or None when it has none yet."""
    if not storage.is_file(job.uri):
        return None
    return json.loads(storage.read_tensor_metadata(job.uri)["meta"]).get("input_hash")


def is_complete(storage: Storage, job: ExpertJob) -> bool:
    """True when the final file exists for these settings; a file from other settings is an error."""
    found = _finished_hash(storage, job)
    if found is not None and found != job.input_hash:
        raise ValueError(
            f"{job.uri} was trained with other settings (input hash {found} != {job.input_hash}); "
            "use another run.name or delete the experts folder"
        )
    return found is not None


class ExpertDiverged(FloatingPointError):
    """An expert's loss or weights became non-finite: it is never written as finished."""

    def __init__(self, job: ExpertJob, epoch: int, loss: float) -> None:
        lr = job.experts.lr
        super().__init__(
            f"{job.kind} expert {job.index} diverged in epoch {epoch}/{job.epochs} (training loss {loss:.4g}, "
            f"non-finite loss or weights) with experts.lr={lr:g}; lower experts.lr (e.g. "
            f"experts.lr={lr / 10:g}) and run the same command again")


# ---- training one expert ----------------------------------------------------------------------------------
@dataclass
class _Progress:
    """What survives a crash besides the snapshots: per-epoch metrics and where each attempt started."""

    history: list[dict[str, Any]]
    attempts: list[int]

    @property
    def epoch(self) -> int:
        return len(self.history)


def _metadata(job: ExpertJob, model: nn.Module, progress: _Progress) -> dict[str, str]:
    e, t = job.experts, job.train
    meta = {
        "format": FORMAT, "kind": job.kind, "index": job.index, "seed": job.seed, "epochs": job.epochs,
        "lr": e.lr, "momentum": e.momentum, "batch_size": e.batch_size, "standardize": t.standardize,
        "augment": t.augment,
        "model": {**job.model_spec, "num_classes": len(job.classes), "frames": job.frames, "size": job.size},
        "classes": list(job.classes), "clip_shape": [job.frames, job.size, job.size, 3],
        "param_names": [n for n, _ in model.named_parameters()],
        "param_shapes": [list(p.shape) for p in model.parameters()],
        "cache_uri": job.cache_uri, "manifest_hash": job.manifest_hash, "input_hash": job.input_hash,
        "history": progress.history, "attempts": progress.attempts, "resumed_from_epoch": progress.attempts[-1],
    }
    return {"meta": json.dumps(meta)}


def _partial_snapshot_uri(job: ExpertJob, epoch: int) -> str:
    return join(job.partial_uri, f"{snapshot_name(epoch)}.safetensors")


def _partial_state_uri(job: ExpertJob) -> str:
    return join(job.partial_uri, "state.safetensors")


def _write_partial(storage: Storage, job: ExpertJob, snapshot: torch.Tensor, optimizer: torch.optim.Optimizer,
                   generator: torch.Generator, device: torch.device, progress: _Progress) -> None:
    """Snapshot first, then the state that points at it: a crash in between leaves the previous epoch valid.

    The RNG states are the expert's augmentation generator and the global streams (init, dropout) it forked;
    the data order needs none (it is drawn from the seed and the epoch).
    """
    storage.write_tensors(_partial_snapshot_uri(job, progress.epoch), {"params": snapshot})
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_state(storage, _partial_state_uri(job), {
        "input_hash": job.input_hash, "optimizer": optimizer.state_dict(), "rng": rng,
        "history": progress.history, "attempts": progress.attempts,
    })


def _resume(storage: Storage, job: ExpertJob, model: nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, device: torch.device) -> tuple[list[torch.Tensor], _Progress] | None:
    """Load a partial expert into model, optimizer and RNGs -> (snapshots 0..e, progress); None if absent or
    from other settings (then it is deleted)."""
    from vdistill.models import load_flat_

    state = load_state(storage, _partial_state_uri(job))
    if state is None:
        return None
    if state["input_hash"] != job.input_hash:
        storage.delete(job.partial_uri)
        return None
    progress = _Progress(history=state["history"], attempts=state["attempts"])
    snapshots = [storage.read_tensors(_partial_snapshot_uri(job, e))["params"] for e in range(progress.epoch + 1)]
    load_flat_(model, snapshots[-1])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"]["generator"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return snapshots, progress


def _build_augment(enabled: bool) -> Callable | None:
    if not enabled:
        return None
    from vdistill.augment import ClipAugment

    return ClipAugment()


def train_expert(job: ExpertJob, storage: Storage, train: SplitStream, test: SplitStream, device: torch.device,
                 on_epoch: EpochHook | None = None) -> str:
    """Train (or finish) one expert on the `train` stream, test on `test`, write its trajectory; -> file URI.

    Epoch e trains on `train.epoch(job.seed, e)`, a pure function of the two; frame experts see one fixed frame
    per clip, chosen from the seed. Init, dropout and augmentation draw from streams seeded by `job.seed`
    inside a forked global RNG, and their states are saved every epoch, so a resumed expert continues exactly
    where it stopped.
    """
    from vdistill.models import flat_params
    from vdistill.train import accuracy, train_batches

    if is_complete(storage, job):
        return job.uri
    e, t = job.experts, job.train
    frame_seed = job.seed if job.kind == "frame" else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(job.seed)
        generator = torch.Generator().manual_seed(job.seed)
        model = job.build_model().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=e.lr, momentum=e.momentum)
        augment = _build_augment(t.augment)
        resumed = _resume(storage, job, model, optimizer, generator, device)
        if resumed is None:
            snapshots, progress = [flat_params(model).cpu()], _Progress(history=[], attempts=[0])
            _write_partial(storage, job, snapshots[0], optimizer, generator, device, progress)
        else:
            snapshots, progress = resumed
            progress.attempts.append(progress.epoch)
            log.info("expert %s/%03d resumes after epoch %d", job.kind, job.index, progress.epoch)
        for epoch in range(progress.epoch + 1, job.epochs + 1):
            if on_epoch is not None:
                on_epoch(job, epoch)
            start = time.perf_counter()
            batches = train.epoch(job.seed, epoch, e.batch_size, frame_seed=frame_seed)
            record: dict[str, Any] = {"epoch": epoch, **train_batches(
                model, batches, optimizer, device=device, generator=generator, standardize=t.standardize,
                augment=augment)}
            record["train_seconds"] = time.perf_counter() - start
            snapshot = flat_params(model).cpu()
            if not (math.isfinite(record["loss"]) and bool(torch.isfinite(snapshot).all())):
                raise ExpertDiverged(job, epoch, record["loss"])
            if epoch == job.epochs or (e.test_every and epoch % e.test_every == 0):
                record.update(accuracy(model, test.in_order(e.batch_size, frame_seed=frame_seed), device=device,
                                       standardize=t.standardize))
            record["finished_at"] = time.time()  # wall clock: lets benchmarks split startup from training
            snapshots.append(snapshot)
            progress.history.append(record)
            _write_partial(storage, job, snapshots[-1], optimizer, generator, device, progress)
            log.info("expert %s/%03d epoch %d/%d %s", job.kind, job.index, epoch, job.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "finished_at")))
        storage.write_tensors(job.uri, {snapshot_name(i): s for i, s in enumerate(snapshots)},
                              _metadata(job, model, progress))
    storage.delete(job.partial_uri)
    return job.uri


# ---- Ray Train driver -------------------------------------------------------------------------------------
class _ExpertQueue:
    """Expert indices `0..count-1`, each handed to whichever worker asks first, so no worker idles while experts
    are left (a fixed share per rank left workers idle behind uneven, resumed or diverged experts).

    The queue is a counter in the TCP store that Ray Train's torch process group (`init_method="env"`) already
    runs on rank 0: no extra actor, no process importing torch. A restarted worker group builds a new process
    group and so a fresh counter: every expert is handed out again; finished ones return at once
    (`train_expert` skips them), partial ones resume from their last epoch.
    """

    _NEXT, _DONE = "vdistill/experts/next", "vdistill/experts/done"

    def __init__(self, rank: int, world_size: int, count: int) -> None:
        import torch.distributed as dist

        self.rank, self.world_size, self.count = rank, world_size, count
        self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)

    def __iter__(self) -> Iterator[int]:
        while (index := self._store.add(self._NEXT, 1) - 1) < self.count:
            yield index

    def close(self) -> None:
        """Rank 0 hosts the store, so it returns only after every rank has finished taking experts."""
        self._store.add(self._DONE, 1)
        while self.rank == 0 and self._store.add(self._DONE, 0) < self.world_size:
            time.sleep(0.5)


def _expert_worker(config: dict[str, Any]) -> None:
    """Ray Train loop of one worker: experts from the shared queue, one after the other, until none is left.

    Each expert streams its epochs from the cache (`SplitStream`) rather than the worker holding the split (or
    taking a Ray Data shard): every expert needs every clip in an order fixed by its seed, and a stream holds
    one bounded shuffle buffer, so memory does not grow with the cache and several workers share a node.
    """
    import ray.train
    import ray.train.torch

    from vdistill.device import resolve_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    jobs: list[ExpertJob] = config["jobs"]
    device = ray.train.torch.get_device() if config["use_gpu"] else resolve_device(config["device"])
    storage: Storage = config["storage"]
    train = SplitStream(storage, jobs[0].cache_uri, jobs[0].train_split)
    test = SplitStream(storage, jobs[0].cache_uri, jobs[0].test_split)
    queue = _ExpertQueue(context.get_world_rank(), context.get_world_size(), len(jobs))
    for index in queue:
        job = jobs[index]
        try:
            train_expert(job, storage, train, test, device, config["on_epoch"])
        except ExpertDiverged as exc:  # retrying cannot help (training is deterministic): report, go on
            storage.write_json(job.failure_uri, {"error": str(exc)})
    queue.close()


class _ProgressPoller:
    """Driver-side tqdm bar fed by listing the experts' files: two LISTs per kind and poll, however many experts.

    Not `ray.train.report`: in Ray Train V2 every report is a barrier of all ranks, and the ranks here
    train different numbers of epochs (resumed, diverged, uneven shares), which would hang or lock-step
    them; and its callbacks run in the Ray Train controller actor, not in this process.
    """

    def __init__(self, storage: Storage, jobs: list[ExpertJob], enabled: bool, interval_s: float = 2.0) -> None:
        self.storage, self.jobs, self.enabled, self.interval_s = storage, jobs, enabled, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _epochs_done(self) -> int:
        """Finished experts count whole; partial ones by their snapshot files (epoch_000 is the init)."""
        done = 0
        for out in sorted({job.out_uri for job in self.jobs}):
            finished = set(self.storage.list_files(out, recursive=False))
            snapshots = Counter(int(m.group(1)) for uri in self.storage.list_files(join(out, "partial"))
                                if (m := _PARTIAL_SNAPSHOT.search(uri)))
            done += sum(job.epochs if job.uri in finished else max(0, snapshots[job.index] - 1)
                        for job in self.jobs if job.out_uri == out)
        return done

    def _loop(self) -> None:
        from tqdm import tqdm

        kinds = "+".join(dict.fromkeys(job.kind for job in self.jobs))
        with tqdm(total=sum(j.epochs for j in self.jobs), desc=f"{kinds} experts", unit="epoch") as bar:
            while True:
                try:
                    bar.update(self._epochs_done() - bar.n)
                except OSError:  # a folder deleted while listed: the next poll sees it
                    pass
                if self._stop.wait(self.interval_s):
                    return

    def __enter__(self) -> "_ProgressPoller":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


def _fit(cfg: Config, storage: Storage, jobs: list[ExpertJob], progress: bool, on_epoch: EpochHook | None) -> None:
    """One Ray Train run over the unfinished experts of every kind; Ray Train restarts failed workers, which
    resume."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    e = cfg.experts
    resources = {"CPU": e.cpus_per_worker, **({"GPU": e.gpus_per_worker} if e.gpus_per_worker > 0 else {})}
    fs, path = storage.resolve(join(cfg.run_uri, "experts", "_ray_train"))
    kinds = "+".join(dict.fromkeys(job.kind for job in jobs))
    trainer = TorchTrainer(
        _expert_worker,
        train_loop_config={"jobs": jobs, "storage": storage, "device": cfg.run.device, "on_epoch": on_epoch,
                           "use_gpu": e.gpus_per_worker > 0, "threads": max(1, int(e.cpus_per_worker))},
        # gloo: no collective ever runs (NCCL would refuse several ranks sharing one GPU); its env:// store
        # on rank 0 carries the expert queue.
        torch_config=TorchConfig(backend="gloo", init_method="env"),
        scaling_config=ScalingConfig(num_workers=min(e.num_workers, len(jobs)), use_gpu=e.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{kinds}-{jobs[0].input_hash}-{int(time.time())}", storage_path=path,
                             storage_filesystem=fs, failure_config=FailureConfig(max_failures=e.max_failures),
                             worker_runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}}),
    )
    with _ProgressPoller(storage, jobs, enabled=progress):
        trainer.fit()


class ExpertsFailed(UserError, RuntimeError):
    """Some experts could not be finished (the message lists each and why); none is marked complete."""


def _failure(storage: Storage, job: ExpertJob) -> str:
    record = storage.read_json_or(job.failure_uri)
    return record["error"] if record else f"{job.kind} expert {job.index}: Ray Train finished without its file {job.uri}"


def _pending(storage: Storage, jobs: list[ExpertJob], *, stage_finished: bool) -> list[ExpertJob]:
    """Experts to train. Files from other settings are retrained while the stage never finished (a run that
    failed, e.g. on a diverging lr, then re-run with a fix); on a finished stage they are refused."""
    pending = []
    for job in jobs:
        found = _finished_hash(storage, job)
        if found == job.input_hash:
            continue
        if found is not None:
            if stage_finished:
                is_complete(storage, job)  # raises: the finished stage used other settings
            log.info("%s expert %d was trained with other settings by an unfinished run: retraining", job.kind,
                     job.index)
            storage.delete(job.uri)
        pending.append(job)
    return pending


def run_experts(cfg: Config, storage: Storage, kinds: Sequence[str], *, progress: bool = True,
                on_epoch: EpochHook | None = None) -> dict[str, list[str]]:
    """Train every unfinished expert of `kinds` in one Ray Train run; -> each kind's trajectory URIs, by index.

    A no-op (no Ray Train run, no file written) when every expert and the manifests are already there. A kind
    whose experts all finished gets its manifest even when another kind failed (ExpertsFailed names those).
    """
    planned = {kind: plan_experts(cfg, storage, kind) for kind in kinds}
    manifest_uris = {kind: join(trajectory_dir(cfg.run_uri, kind), "manifest.json") for kind in kinds}
    pending = [job for kind, jobs in planned.items()
               for job in _pending(storage, jobs, stage_finished=storage.is_file(manifest_uris[kind]))]
    failed: list[str] = []
    if pending:
        for kind in kinds:
            log.info("training %d of %d %s experts for %d epochs", sum(j.kind == kind for j in pending),
                     len(planned[kind]), kind, planned[kind][0].epochs)
            storage.delete(join(trajectory_dir(cfg.run_uri, kind), "failed"))
        _fit(cfg, storage, pending, progress, on_epoch)
    for kind, jobs in planned.items():
        unfinished = [job for job in pending if job.kind == kind and not is_complete(storage, job)]
        if unfinished:
            failed.append(f"{len(unfinished)} of {len(jobs)} {kind} experts did not finish:\n  "
                          + "\n  ".join(_failure(storage, job) for job in unfinished))
            continue
        storage.delete(join(trajectory_dir(cfg.run_uri, kind), "partial"))
        manifest = {"format": FORMAT, "kind": kind, "epochs": jobs[0].epochs,
                    "cache_manifest_hash": jobs[0].manifest_hash,
                    "experts": {os.path.basename(job.uri): job.input_hash for job in jobs}}
        if storage.read_json_or(manifest_uris[kind]) != manifest:
            storage.write_json(manifest_uris[kind], manifest)
    if failed:
        raise ExpertsFailed("\n".join(failed))
    return {kind: [job.uri for job in jobs] for kind, jobs in planned.items()}
