"""The distilled artifact: a folder anyone can load with `vdistill.load_distilled(uri)` and train on.

Layout of `<uri>/` (local or s3://, written through Storage; `meta.json` is written last, so a folder
with a `meta.json` is complete):

- S2D set: `static_memory.safetensors` `(C*spc, 3, H, W)`, `dynamic_memory.safetensors`
  `(C, dpc, T, 1, H, W)`, `integrator.safetensors` (the 327-parameter state dict);
- pixel set (baselines): `videos.safetensors` with `videos` (float normalised `(N, T, 3, H, W)` or
  uint8 `(N, T, H, W, 3)` for real-clip coresets) and `labels` `(N,)`;
- `meta.json`: format version, kind, classes, shapes, layout, normalisation, syn_lr, storage MB per
  component against the equal-VPC pixel baseline (METHOD.md 5.8), config hash, metrics, previews.

Tensors are safetensors, never pickle: an artifact fetched from object storage cannot run code. The loaded
Datasets extend `synset.FrozenS2DSet` / `FrozenPixelSet`, so an artifact regenerates its videos by the same rule,
shape checks and storage accounting as training and evaluation.
"""
from __future__ import annotations

import abc
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from vdistill.data.pixels import MEAN, STD, to_uint8
from vdistill.distill.synset import (FrozenPixelSet, FrozenS2DSet, SlotLayout, check_memory_shapes, pixel_storage,
                                     s2d_storage)
from vdistill.errors import DamagedFile, UserError
from vdistill.storage import Storage, join, location

FORMAT_VERSION = 1
META = "meta.json"
Pairing = Literal["random", "fixed"]


def _common_meta(kind: str, classes: list[str], frames: int, size: int, syn_lr: float | None, config_hash: str,
                 metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "kind": kind, "classes": list(classes), "num_classes": len(classes),
            "frames": frames, "size": size, "syn_lr": syn_lr, "config_hash": config_hash,
            "normalisation": {"name": "imagenet", "mean": list(MEAN), "std": list(STD)},
            "metrics": dict(metrics or {}), "previews": []}


# ---- export -----------------------------------------------------------------------------------
def export_s2d(storage: Storage, uri: str, *, static_memory: torch.Tensor, dynamic_memory: torch.Tensor,
               integrator_state: dict[str, torch.Tensor], layout: SlotLayout, classes: list[str],
               syn_lr: float | None = None, config_hash: str = "", metrics: dict[str, Any] | None = None,
               previews: bool = True, fps: int = 8) -> dict[str, Any]:
    """Write an S2D set (static memory `(C*spc, 3, h, w)`, dynamic memory `(C, dpc, T, 1, h, w)` at `1/layout.scale`
    of the video size, integrator state dict) to `uri`; returns the meta written to `<uri>/meta.json`."""
    if layout.num_classes != len(classes):
        raise ValueError(f"the layout has {layout.num_classes} classes, the class list {len(classes)}")
    static, dynamic = static_memory.detach().float().cpu(), dynamic_memory.detach().float().cpu()
    check_memory_shapes(layout, static, dynamic)
    frames, height, width = dynamic.shape[2], dynamic.shape[4], dynamic.shape[5]
    if height != width:
        raise ValueError(f"frames must be square, got {height}x{width}")
    size, vpc = width * layout.scale, layout.vpc
    state = {k: v.detach().float().cpu() for k, v in integrator_state.items()}
    meta = _common_meta("s2d", classes, frames, size, syn_lr, config_hash, metrics)
    meta["layout"] = {**layout.to_dict(), "spc": layout.spc, "dpc": layout.dpc, "num_slots": layout.num_slots,
                      "num_items": layout.num_items}
    meta["shapes"] = {"static_memory": list(static.shape), "dynamic_memory": list(dynamic.shape),
                      "integrator": {k: list(v.shape) for k, v in state.items()}}
    meta["storage"] = s2d_storage(static.numel(), dynamic.numel(), sum(v.numel() for v in state.values()),
                                  num_classes=len(classes), vpc=vpc, frames=frames, size=size)
    dataset = S2DDataset(static, dynamic, state, layout, meta)  # fails on an integrator state before any write
    storage.write_tensors(join(uri, "static_memory.safetensors"), {"static_memory": static})
    storage.write_tensors(join(uri, "dynamic_memory.safetensors"), {"dynamic_memory": dynamic})
    storage.write_tensors(join(uri, "integrator.safetensors"), state)
    return _finish(storage, uri, dataset, previews, fps)


def export_pixels(storage: Storage, uri: str, *, videos: torch.Tensor, labels: torch.Tensor, classes: list[str],
                  method: str = "", syn_lr: float | None = None, config_hash: str = "",
                  metrics: dict[str, Any] | None = None, previews: bool = True, fps: int = 8) -> dict[str, Any]:
    """Write a pixel set to `uri`: float normalised `(N, T, 3, H, W)` (distilled pixels) or uint8
    `(N, T, H, W, 3)` (real-clip coresets, kept uint8), labels `(N,)`; returns the meta."""
    if videos.dtype == torch.uint8:
        n, frames, size, width, channels = videos.shape
    else:
        n, frames, channels, size, width = videos.shape
        videos = videos.detach().float()
    if channels != 3 or size != width or labels.shape != (n,):
        raise ValueError(f"videos must be (N, T, 3, S, S) float or (N, T, S, S, 3) uint8 with labels (N,); "
                         f"got {tuple(videos.shape)} and labels {tuple(labels.shape)}")
    labels = labels.detach().long().cpu()
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must lie in [0, {len(classes)}) (one per class name)")
    videos = videos.detach().cpu()
    storage.write_tensors(join(uri, "videos.safetensors"), {"videos": videos, "labels": labels})
    counts = torch.bincount(labels, minlength=len(classes))
    vpc = int(counts[0]) if bool((counts == counts[0]).all()) else None
    meta = _common_meta("pixels", classes, frames, size, syn_lr, config_hash, metrics)
    meta["method"] = method
    meta["pixel_dtype"] = "uint8" if videos.dtype == torch.uint8 else "float32"
    meta["layout"] = {"vpc": vpc, "videos_per_class": counts.tolist()}
    meta["shapes"] = {"videos": list(videos.shape), "labels": [n]}
    meta["storage"] = pixel_storage(videos)
    return _finish(storage, uri, PixelDataset(videos, labels, meta), previews, fps)


def _finish(storage: Storage, uri: str, dataset: "DistilledDataset", previews: bool, fps: int) -> dict[str, Any]:
    """Render previews next to the tensors, then write meta.json last (it marks the folder complete)."""
    meta = dataset.meta
    if previews:
        written = render_dataset(dataset, join(uri, "previews"), storage, fps=fps)
        meta["previews"] = [w[len(uri.rstrip("/")) + 1:] for w in written]
    storage.write_json(join(uri, META), meta)
    return meta


# ---- loading ----------------------------------------------------------------------------------
class DistilledDataset(Dataset, abc.ABC):
    """Items are (video float normalised `(T, 3, H, W)`, label int); calling it with a generator returns
    the whole set `(N, T, 3, H, W)`, labels `(N,)` for one epoch (an `evaluate.EpochSource`)."""

    meta: dict[str, Any]
    labels: torch.Tensor
    syn_lr: float | None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def __call__(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set for one epoch: normalised videos `(N, T, 3, H, W)`, labels `(N,)`."""

    @abc.abstractmethod
    def class_videos(self, label: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised videos `(n, T, 3, H, W)` of one class."""


class PixelDataset(FrozenPixelSet, DistilledDataset):
    """A pixel set; uint8 clips are normalised on access."""

    def __init__(self, videos: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
        super().__init__(videos, labels, meta.get("syn_lr"))
        self.meta = meta

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalised(slice(i, i + 1))[0], int(self.labels[i])

    def class_videos(self, label: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.normalised(self.labels == label)


class S2DDataset(FrozenS2DSet, DistilledDataset):
    """An S2D set: item `i` is dynamic clip `i` (class-major, `dpc` per class), its video regenerated by the
    integrator from it and one static image of its slot, upscaled to the video size (METHOD.md 5.2-5.3), without
    autograd.

    Evaluation uses the same rule as training (the original's VPC=1 evaluation instead draws the dynamic clip
    from all `dpc` of the class, one video per class), so what is evaluated is what was optimised.
    `pairing="random"` draws each item's still anew on every access from a generator seeded with `seed`
    (inside DataLoader workers, with the worker's seed as well); `"fixed"` draws them once from `seed` at
    construction and keeps them.
    """

    def __init__(self, static_memory: torch.Tensor, dynamic_memory: torch.Tensor,
                 integrator_state: dict[str, torch.Tensor], layout: SlotLayout, meta: dict[str, Any], *,
                 pairing: Pairing = "random", seed: int = 0, device: torch.device | str = "cpu") -> None:
        if pairing not in ("random", "fixed"):
            raise ValueError(f"pairing must be 'random' or 'fixed', got {pairing!r}")
        super().__init__(static_memory, dynamic_memory, integrator_state, layout, meta.get("syn_lr"), device=device)
        self.meta, self.pairing, self.seed = meta, pairing, seed
        self.fixed_statics = (layout.draw_statics(torch.arange(layout.num_items), torch.Generator().manual_seed(seed))
                              if pairing == "fixed" else None)
        self._generators: dict[int, torch.Generator] = {}

    def _access_generator(self) -> torch.Generator:
        """One generator per process: the main process uses `seed`, each DataLoader worker its own seed."""
        info = torch.utils.data.get_worker_info()
        key = -1 if info is None else info.id
        if key not in self._generators:
            seed = self.seed if info is None else (self.seed + info.seed) % 2**63
            self._generators[key] = torch.Generator().manual_seed(seed)
        return self._generators[key]

    def statics_for(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The static row of each item; `generator` is used only by the random pairing."""
        if self.fixed_statics is not None:
            return self.fixed_statics[items]
        return super().statics_for(items, generator)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.materialise(torch.tensor([i]), self._access_generator())[0], int(self.labels[i])

    def __call__(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return super().__call__(generator or self._access_generator())

    def class_videos(self, label: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dpc = self.layout.dpc
        return self.materialise(torch.arange(label * dpc, (label + 1) * dpc), generator or self._access_generator())


class NotAnArtifact(UserError, FileNotFoundError):
    """The folder has no meta.json: not an artifact, or its export did not finish."""


def _part(storage: Storage, uri: str, name: str) -> str:
    """`<uri>/<name>`, refused (DamagedFile) when missing or when a symlink leads it out of the artifact's folder:
    artifacts are shared and unpacked from archives, and must not read files elsewhere."""
    part = join(uri, name)
    if not storage.is_file(part):
        raise DamagedFile(f"{part} is missing: the artifact {uri} is incomplete")
    if not location(part).startswith(location(uri).rstrip("/") + "/"):
        raise DamagedFile(f"{part} is a link to {location(part)}, outside the artifact {uri}; refused")
    return part


def _tensors(storage: Storage, uri: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of one artifact file; DamagedFile naming the tensor and the file when one is not finite."""
    part = _part(storage, uri, name)
    tensors = storage.read_tensors(part)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DamagedFile(f"{part}: tensor {key!r} has non-finite values (NaN or inf); refused")
    return tensors


def load_distilled(uri: str, storage: Storage | None = None, *, pairing: Pairing = "random", seed: int = 0,
                   device: torch.device | str = "cpu") -> DistilledDataset:
    """Open an exported set as a torch Dataset of (video `(T, 3, H, W)` normalised, label).

    Exposes `.classes`, `.meta`, `.syn_lr`; S2D sets regenerate each video from (static, dynamic,
    integrator) with a random (`pairing="random"`, seeded) or fixed in-slot pairing. Tensors live on
    `device` (keep "cpu" for DataLoader workers; a GPU suits whole-set epochs via `dataset(generator)`).
    A damaged artifact (a part missing, cut short, not safetensors or JSON, non-finite, or a link out of the
    folder) raises DamagedFile naming the file and what is wrong.
    """
    storage = storage or Storage.from_config()
    if not storage.is_file(join(uri, META)):
        raise NotAnArtifact(f"{join(uri, META)} not found: not a vdistill artifact, or its export did not finish")
    meta_uri = _part(storage, uri, META)
    meta = storage.read_json(meta_uri)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DamagedFile(f"{meta_uri}: artifact format {version} is not supported "
                          f"(this vdistill reads format {FORMAT_VERSION})")
    try:
        if meta["kind"] == "pixels":
            tensors = _tensors(storage, uri, "videos.safetensors")
            return PixelDataset(tensors["videos"].to(device), tensors["labels"].to(device), meta)
        layout = SlotLayout(meta["num_classes"], meta["layout"]["vpc"], meta["layout"]["statics_per_slot"],
                            meta["layout"]["dynamics_per_slot"], meta["layout"].get("scale", 1),
                            meta["layout"].get("slots_per_video", 1))
        static = _tensors(storage, uri, "static_memory.safetensors")["static_memory"]
        dynamic = _tensors(storage, uri, "dynamic_memory.safetensors")["dynamic_memory"]
        state = _tensors(storage, uri, "integrator.safetensors")
    except KeyError as exc:
        raise DamagedFile(f"{uri}: the artifact lacks {exc} (meta.json or a tensor file)") from None
    return S2DDataset(static, dynamic, state, layout, meta, pairing=pairing, seed=seed, device=device)


# ---- previews (the `show` command's engine) -----------------------------------------------------
def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]


def render_dataset(dataset: DistilledDataset, out_dir_uri: str, storage: Storage, *, fps: int = 8, seed: int = 0,
                   min_size: int = 128, max_classes: int = 64) -> list[str]:
    """Write previews of a loaded set under `out_dir_uri`; returns the written URIs.

    One GIF + MP4 per class (its videos side by side), a GIF + MP4 grid with the first video of the
    first `max_classes` classes, and for S2D sets the static memory (PNG grid, a row per class) and
    the dynamic memory (grayscale GIF grid). Classes are materialised one at a time.
    """
    from vdistill import render

    generator = torch.Generator().manual_seed(seed)
    files: dict[str, tuple[str, torch.Tensor]] = {}
    firsts = []
    for c, name in enumerate(dataset.classes):
        videos = dataset.class_videos(c, generator)
        if len(videos) == 0:
            continue
        pixels = render.upscale(to_uint8(videos), min_size)  # (n, T, H, W, 3)
        grid = render.video_grid(pixels, nrow=len(pixels))
        files[f"class_{c:03d}_{_safe(name)}.gif"] = ("gif", grid)
        files[f"class_{c:03d}_{_safe(name)}.mp4"] = ("mp4", grid)
        if len(firsts) < max_classes:
            firsts.append(pixels[0])
    if firsts:
        overview = render.video_grid(torch.stack(firsts), nrow=math.ceil(math.sqrt(len(firsts))))
        files["classes.gif"], files["classes.mp4"] = ("gif", overview), ("mp4", overview)
    if isinstance(dataset, S2DDataset):
        layout = dataset.layout
        keep = min(max_classes, layout.num_classes)
        static = render.upscale(to_uint8(dataset.static_memory[: keep * layout.spc]), min_size)
        files["static_memory.png"] = ("png", render.image_grid(static, nrow=layout.spc))
        dynamic = render.grayscale_to_rgb(dataset.dynamic_memory[:keep])  # (C, dpc, T, H, W, 3)
        dynamic = render.upscale(dynamic.flatten(0, 1), min_size)
        files["dynamic_memory.gif"] = ("gif", render.video_grid(dynamic, nrow=layout.dpc))
    writers = {"gif": lambda x, p: render.write_gif(x, p, fps), "mp4": lambda x, p: render.write_mp4(x, p, fps),
               "png": render.write_png}
    written = []
    with tempfile.TemporaryDirectory(prefix="vdistill-render-") as tmp:
        for name, (ext, pixels) in files.items():
            local = Path(tmp) / name
            writers[ext](pixels, local)
            target = join(out_dir_uri, name)
            storage.upload_file(str(local), target)
            written.append(target)
    return written


def render_artifact(uri: str, out_dir_uri: str, storage: Storage | None = None, *, fps: int = 8, seed: int = 0,
                    min_size: int = 128, max_classes: int = 64) -> list[str]:
    """Load an exported set and write its previews under `out_dir_uri` (`vdistill show`)."""
    storage = storage or Storage.from_config()
    dataset = load_distilled(uri, storage, seed=seed)
    return render_dataset(dataset, out_dir_uri, storage, fps=fps, seed=seed, min_size=min_size,
                          max_classes=max_classes)
