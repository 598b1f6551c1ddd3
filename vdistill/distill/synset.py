"""The synthetic set: static memory + dynamic memory + integrator -> videos, and the plain pixel set of the baselines.

`vpc` is the storage budget (real videos per class). A *slot* is one of the `C * vpc * slots_per_video` class
positions (class-major); it owns `statics_per_slot` static images and `dynamics_per_slot` dynamic clips. An *item*
is one dynamic clip: the set has `C * dpc` items, and item `k` becomes a video with one of its slot's statics drawn
at random (METHOD.md 5.2), so that every stored clip is a video of every epoch. The memories may be stored at
`1/scale` of the clip size and are upsampled when a video is made (METHOD.md 5.2a: more, smaller clips in the
same storage). The original hard-wires one slot per video with 2 and 2 at full size (METHOD.md W-7); here the
layout is explicit and validated, and that is the paper preset.

`S2DSet` and `PixelSet` are the trainable sets; `.source()` freezes one into a picklable `FrozenS2DSet` /
`FrozenPixelSet` for evaluation, which `vdistill.export` extends into its Datasets, so that training, evaluation
and the artifact share one materialisation rule. Storage accounting (METHOD.md 5.8) lives here for the same reason.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vdistill.data.pixels import to_model_input
from vdistill.models import Integrator, seeded

# Real clips for one class: `sample_real(c, n, generator) -> uint8 (n, T, H, W, 3)`.
RealSampler = Callable[[int, int, torch.Generator], torch.Tensor]

PAPER_SLOT_PAIRING = 2  # statics_per_slot = dynamics_per_slot = 2 in every released DM/MTT+Ours script
BYTES_PER_FLOAT = 4  # storage is accounted in fp32 like the paper (METHOD.md 5.8)


@dataclass(frozen=True)
class SlotLayout:
    """`vpc` is the storage budget (that many real videos per class); it holds `vpc * slots_per_video` slots per
    class, each owning `statics_per_slot` stills and `dynamics_per_slot` dynamic clips (`spc`/`dpc` per class),
    stored `scale` times smaller than the videos they make."""

    num_classes: int
    vpc: int
    statics_per_slot: int = PAPER_SLOT_PAIRING
    dynamics_per_slot: int = PAPER_SLOT_PAIRING
    scale: int = 1
    slots_per_video: int = 1

    def __post_init__(self) -> None:
        for key, value in (("num_classes", self.num_classes), ("dynamic.vpc", self.vpc),
                           ("dynamic.statics_per_slot", self.statics_per_slot),
                           ("dynamic.dynamics_per_slot", self.dynamics_per_slot), ("dynamic.scale", self.scale),
                           ("dynamic.slots_per_video", self.slots_per_video)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer (got {value!r})")

    @classmethod
    def from_config(cls, num_classes: int, dynamic_cfg, frames: int) -> "SlotLayout":
        """From a DynamicConfig (`vpc`, `statics_per_slot`, `dynamics_per_slot`, `scale`, `slots_per_video`);
        `slots_per_video: 0` is as many slots as fit in one real video's storage (`fitting_slots`)."""
        slots = dynamic_cfg.slots_per_video or fitting_slots(frames, dynamic_cfg.statics_per_slot,
                                                             dynamic_cfg.dynamics_per_slot, dynamic_cfg.scale)
        return cls(num_classes, dynamic_cfg.vpc, dynamic_cfg.statics_per_slot, dynamic_cfg.dynamics_per_slot,
                   dynamic_cfg.scale, slots)

    @property
    def slots_per_class(self) -> int:
        return self.vpc * self.slots_per_video

    @property
    def spc(self) -> int:
        """Static images per class."""
        return self.statics_per_slot * self.slots_per_class

    @property
    def dpc(self) -> int:
        """Dynamic clips per class."""
        return self.dynamics_per_slot * self.slots_per_class

    @property
    def num_slots(self) -> int:
        return self.num_classes * self.slots_per_class

    @property
    def num_items(self) -> int:
        """Videos the set makes per epoch: one per dynamic clip."""
        return self.num_classes * self.dpc

    def labels(self, items: torch.Tensor) -> torch.Tensor:
        return torch.div(items.cpu().long(), self.dpc, rounding_mode="floor")

    def draw_statics(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For each item (a CPU LongTensor `(n,)`), a static row of `(C*spc, ...)` drawn among its slot's statics."""
        items = items.cpu().long()
        if items.numel() and (items.min() < 0 or items.max() >= self.num_items):
            raise IndexError(f"item indices must lie in [0, {self.num_items}), got {items.tolist()}")
        slot = (items % self.dpc) // self.dynamics_per_slot
        pick = torch.randint(self.statics_per_slot, items.shape, generator=generator)
        return self.spc * self.labels(items) + self.statics_per_slot * slot + pick

    def to_dict(self) -> dict[str, int]:
        return dict(num_classes=self.num_classes, vpc=self.vpc, statics_per_slot=self.statics_per_slot,
                    dynamics_per_slot=self.dynamics_per_slot, scale=self.scale, slots_per_video=self.slots_per_video)


def fitting_slots(frames: int, statics_per_slot: int, dynamics_per_slot: int, scale: int) -> int:
    """Slots that fit in one real video's storage (`3T` planes of the video size):
    `slots * (3*statics + T*dynamics) / scale^2 <= 3T`. At T = 8, 1 + 1 per slot, scale 2: 8."""
    slots = 3 * frames * scale * scale // (3 * statics_per_slot + frames * dynamics_per_slot)
    if slots < 1:
        raise ValueError(f"dynamic.statics_per_slot={statics_per_slot} and dynamic.dynamics_per_slot="
                         f"{dynamics_per_slot} at dynamic.scale={scale} take more than one video's storage at "
                         f"{frames} frames; lower them, raise dynamic.scale, or set dynamic.slots_per_video")
    return slots


def downscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Images `(..., C, H, W)` averaged over `scale x scale` blocks (what a memory at `1/scale` size starts from)."""
    if scale == 1:
        return x
    lead = x.shape[:-3]
    out = F.avg_pool2d(x.reshape(-1, *x.shape[-3:]), scale)
    return out.reshape(*lead, *out.shape[-3:])


def upscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Images `(..., C, h, w)` -> `(..., C, h*scale, w*scale)`, bilinear; differentiable (memories -> videos)."""
    if scale == 1:
        return x
    lead = x.shape[:-3]
    out = F.interpolate(x.reshape(-1, *x.shape[-3:]), scale_factor=scale, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


# ---- storage accounting (the one place for METHOD.md 5.8) --------------------------------------
def fp32_mb(numel: int) -> float:
    """Megabytes (10^6 bytes) of `numel` values counted as fp32, the paper's accounting."""
    return numel * BYTES_PER_FLOAT / 1e6


def storage_mb(*tensors: torch.Tensor, as_float32: bool = False) -> float:
    """Megabytes of tensors AS STORED: fp32 synthetic sets count 4 bytes/value, uint8 clips 1.

    Counting the stored bytes is what a user pays for; `as_float32=True` counts every value as fp32,
    which is how the paper's storage column treats real clips too.
    """
    if as_float32:
        return fp32_mb(sum(t.numel() for t in tensors))
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def pixel_baseline_mb(num_classes: int, vpc: int, frames: int, size: int) -> float:
    """A plain synthetic set of `vpc` RGB videos per class: `C*vpc*T*3*H*W` floats."""
    return fp32_mb(num_classes * vpc * frames * 3 * size * size)


def s2d_storage(static_numel: int, dynamic_numel: int, integrator_numel: int, *, num_classes: int, vpc: int,
                frames: int, size: int) -> dict[str, float]:
    """MB per S2D component, their total, the equal-VPC pixel baseline and total/baseline."""
    parts = {"static_mb": fp32_mb(static_numel), "dynamic_mb": fp32_mb(dynamic_numel),
             "integrator_mb": fp32_mb(integrator_numel)}
    total = sum(parts.values())
    baseline = pixel_baseline_mb(num_classes, vpc, frames, size)
    return {**parts, "total_mb": total, "pixel_baseline_mb": baseline, "ratio_to_baseline": total / baseline}


def pixel_storage(videos: torch.Tensor) -> dict[str, float]:
    """MB of a pixel set counted as fp32 (it is its own baseline), and `file_mb` as stored (uint8 coresets: 1/4)."""
    total = fp32_mb(videos.numel())
    return {"videos_mb": total, "total_mb": total, "file_mb": storage_mb(videos), "pixel_baseline_mb": total,
            "ratio_to_baseline": 1.0}


# ---- the S2D set --------------------------------------------------------------------------------
def check_memory_shapes(layout: SlotLayout, static_memory: torch.Tensor, dynamic_memory: torch.Tensor) -> None:
    """Static `(C*spc, 3, H, W)` and dynamic `(C, dpc, T, 1, H, W)` must match the layout and each other;
    the errors name the config keys to check, since a mismatch means the stages ran with different layouts."""
    c, spc, dpc = layout.num_classes, layout.spc, layout.dpc
    if static_memory.dim() != 4 or static_memory.shape[:2] != (c * spc, 3):
        raise ValueError(f"static memory must be (C*spc={c * spc}, 3, H, W); got {tuple(static_memory.shape)} "
                         "(check dynamic.vpc and dynamic.statics_per_slot against the static stage output)")
    if dynamic_memory.dim() != 6 or dynamic_memory.shape[:2] != (c, dpc) or dynamic_memory.shape[3] != 1:
        raise ValueError(f"dynamic memory must be (C={c}, dpc={dpc}, T, 1, H, W); got "
                         f"{tuple(dynamic_memory.shape)} (check dynamic.vpc and dynamic.dynamics_per_slot)")
    if dynamic_memory.shape[-2:] != static_memory.shape[-2:]:
        raise ValueError(f"static {tuple(static_memory.shape[-2:])} and dynamic {tuple(dynamic_memory.shape[-2:])} "
                         "memories must have the same H, W")


def integrate_items(layout: SlotLayout, static_memory: torch.Tensor, dynamic_memory: torch.Tensor,
                    integrator: Integrator, items: torch.Tensor, static_rows: torch.Tensor) -> torch.Tensor:
    """The rule of METHOD.md 5.2, shared by training and evaluation: item -> (the static row given by
    `static_rows`, from `SlotLayout.draw_statics`; its own dynamic clip), both upscaled to the video size,
    -> integrator; videos `(n, T, 3, H, W)`."""
    device = dynamic_memory.device
    items = items.cpu().long()
    labels, within = layout.labels(items), items % layout.dpc
    static = upscale(static_memory[static_rows.to(device)], layout.scale)
    dynamic = upscale(dynamic_memory[labels.to(device), within.to(device)], layout.scale)
    return integrator(static, dynamic)


def _integrator_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The integrator's state dict out of `S2DSet.state_tensors()` (keys `integrator.<name>`)."""
    return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("integrator.")}


def tensor_digest(tensors: dict[str, torch.Tensor], **extra: object) -> str:
    """A content hash of named tensors (values, dtypes, shapes) and a few JSON-able facts: the identity of a set."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def draw_seed(generator: torch.Generator) -> int:
    """A 63-bit seed from an explicit generator: how sub-components get their own reproducible stream."""
    return int(torch.randint(2**62, (1,), generator=generator))


def substream(seed: int, key: int) -> torch.Generator:
    """An independent generator for `key` (a class) under `seed` (an iteration's draw): what one class draws then
    does not depend on which other classes are drawn, in which order, or in which process."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, key]).generate_state(1, np.uint64)[0] >> 1))


def random_real_frames(sample_real: RealSampler, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """One random frame of each of `n` random clips of class `c`: uint8 `(n, H, W, 3)`."""
    clips = sample_real(c, n, generator)
    frame = torch.randint(clips.shape[1], (clips.shape[0],), generator=generator)
    return clips[torch.arange(clips.shape[0]), frame]


def init_static_memory(layout: SlotLayout, size: int, init: str, generator: torch.Generator,
                       sample_real: RealSampler | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Static memory `(C*spc, 3, H, W)`, class-major: random real frames (`init="real"`) or `randn` (`"noise"`)."""
    if init == "noise":
        return torch.randn(layout.num_classes * layout.spc, 3, size, size, generator=generator).to(device)
    if init != "real":
        raise ValueError(f"static.init must be 'real' or 'noise' (got {init!r})")
    if sample_real is None:
        raise ValueError("static.init=real needs a real-clip sampler")
    frames = [random_real_frames(sample_real, c, layout.spc, generator) for c in range(layout.num_classes)]
    return to_model_input(torch.cat(frames), device)


def real_residuals(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips `(n, T, H, W, 3)` -> what moves in them, `(n, T, 1, H, W)`: each frame minus the clip's temporal
    mean, averaged over colour channels, in the normalised space the networks see."""
    x = to_model_input(clips)
    return (x - x.mean(dim=1, keepdim=True)).mean(dim=2, keepdim=True)


def _dynamic_start(layout: SlotLayout, static: torch.Tensor, c: int, clips: torch.Tensor, init: str) -> torch.Tensor:
    """Class `c`'s `dpc` dynamic clips `(dpc, T, 1, h, w)` from `dpc` real uint8 clips (see `S2DSet.create`)."""
    if init == "real":
        return downscale(real_residuals(clips), layout.scale)
    luma = downscale(to_model_input(clips, static.device).mean(2, keepdim=True), layout.scale)
    stills = static[c * layout.spc:(c + 1) * layout.spc].reshape(layout.slots_per_class, layout.statics_per_slot,
                                                                 *static.shape[1:])
    slot_luma = stills.mean((1, 2)).unsqueeze(1)  # (slots, 1, h, w): each slot's stills, averaged, in grayscale
    return luma - slot_luma[torch.arange(layout.dpc) // layout.dynamics_per_slot].unsqueeze(1)


class S2DSet:
    """Static memory `(C*spc, 3, H, W)` + dynamic memory `(C, dpc, T, 1, H, W)` + integrator + `syn_lr`.

    The dynamic memory and integrator are trainable; the static memory only when `train_static`.
    """

    def __init__(self, layout: SlotLayout, static_memory: torch.Tensor, dynamic_memory: torch.Tensor,
                 integrator: Integrator, syn_lr: torch.Tensor, train_static: bool = False) -> None:
        check_memory_shapes(layout, static_memory, dynamic_memory)
        self.layout = layout
        self.static_memory = static_memory.detach().clone().requires_grad_(train_static)
        self.dynamic_memory = dynamic_memory.detach().clone().requires_grad_(True)
        self.integrator = integrator.to(device=dynamic_memory.device, dtype=dynamic_memory.dtype)
        self.syn_lr = syn_lr.detach().clone().to(dynamic_memory.device, dynamic_memory.dtype)

    @classmethod
    def create(cls, layout: SlotLayout, static_memory: torch.Tensor, frames: int, generator: torch.Generator,
               syn_lr: float = 0.01, train_static: bool = False, integrator_init: str = "default",
               dynamic_init: str = "randn", sample_real: RealSampler | None = None) -> "S2DSet":
        """Fresh set around a static memory of video-sized stills (stored at `1/layout.scale` of their size),
        integrator seeded from `generator` with `integrator_init` ("default" as in the paper, "identity" or
        "residual").

        `dynamic_init="randn"` is the paper's dynamic memory. `"real"` starts each dynamic clip as the temporal
        residual of a random real clip of its class (`real_residuals`): with the "residual" integrator a video
        starts as that clip's motion on a still. `"clip"` starts it as a random real clip's luminance minus the
        mean luminance of its slot's stills: with the "residual" integrator a video starts as that whole clip in
        grayscale, coloured by the still (METHOD.md 5.2a).
        """
        size = static_memory.shape[-1]
        if size % layout.scale:
            raise ValueError(f"dynamic.scale={layout.scale} must divide the clip size {size}")
        static = downscale(static_memory, layout.scale)
        small = size // layout.scale
        if dynamic_init == "randn":
            dynamic = torch.randn(layout.num_classes, layout.dpc, frames, 1, small, small, generator=generator,
                                  dtype=static_memory.dtype)
        elif dynamic_init in ("real", "clip"):
            if sample_real is None:
                raise ValueError(f"dynamic.init={dynamic_init} needs a real-clip sampler")
            dynamic = torch.stack([_dynamic_start(layout, static, c, sample_real(c, layout.dpc, generator),
                                                  dynamic_init) for c in range(layout.num_classes)])
        else:
            raise ValueError(f"dynamic.init must be 'randn', 'real' or 'clip' (got {dynamic_init!r})")
        integrator = seeded(draw_seed(generator), lambda: Integrator(integrator_init))
        return cls(layout, static, dynamic.to(static.device), integrator, torch.tensor(syn_lr), train_static)

    @property
    def size(self) -> int:
        """Height = width of the videos (the memories are `scale` times smaller)."""
        return self.dynamic_memory.shape[-1] * self.layout.scale

    @property
    def frames(self) -> int:
        return self.dynamic_memory.shape[2]

    @property
    def device(self) -> torch.device:
        return self.dynamic_memory.device

    def trainable(self) -> dict[str, list[torch.Tensor]]:
        """Parameter groups the stage optimises (optimizer groups in METHOD.md 5.1)."""
        groups = {"dynamic": [self.dynamic_memory], "integrator": list(self.integrator.parameters())}
        if self.static_memory.requires_grad:
            groups["static"] = [self.static_memory]
        return groups

    def leaves(self) -> list[torch.Tensor]:
        """Every tensor whose gradient the objectives must deliver (excluding `syn_lr`)."""
        return [t for group in self.trainable().values() for t in group]

    def materialize(self, items: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `(n,)` -> videos `(n, T, 3, H, W)`, labels `(n,)` on the set's device; differentiable.

        Each item's still is drawn from `generator` (replaying a generator state replays the draw). With `rows`,
        only `items[rows]` are made, their stills drawn as for all of `items` (a worker's share of a batch).
        """
        statics = self.layout.draw_statics(items, generator)[rows]
        items = items[rows]
        videos = integrate_items(self.layout, self.static_memory, self.dynamic_memory, self.integrator, items, statics)
        return videos, self.layout.labels(items).to(self.device)

    def all_videos(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One video per item, class-major: `(C*dpc, T, 3, H, W)` and labels."""
        return self.materialize(torch.arange(self.layout.num_items), generator)

    def class_videos(self, c: int, generator: torch.Generator) -> torch.Tensor:
        """Class `c`'s videos `(dpc, T, 3, H, W)`, one per item, differentiable, each item's still drawn from
        `generator`: a loop that goes class by class holds one class's graph at a time."""
        items = torch.arange(c * self.layout.dpc, (c + 1) * self.layout.dpc)
        return self.materialize(items, generator)[0]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Detached copies of everything that defines the set (checkpoints and export)."""
        out = {"static_memory": self.static_memory, "dynamic_memory": self.dynamic_memory, "syn_lr": self.syn_lr}
        out.update({f"integrator.{k}": v for k, v in self.integrator.state_dict().items()})
        return {k: v.detach().clone() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """In-place restore (keeps the leaf tensors the optimisers hold)."""
        with torch.no_grad():
            self.static_memory.copy_(tensors["static_memory"])
            self.dynamic_memory.copy_(tensors["dynamic_memory"])
            self.syn_lr.copy_(tensors["syn_lr"])
            self.integrator.load_state_dict(_integrator_state(tensors))

    def source(self) -> FrozenS2DSet:
        """A picklable CPU snapshot that draws every item's still anew on every call, for evaluation tasks."""
        t = {k: v.cpu() for k, v in self.state_tensors().items()}
        return FrozenS2DSet(t["static_memory"], t["dynamic_memory"], _integrator_state(t), self.layout,
                            float(t["syn_lr"]))


class FrozenS2DSet:
    """A detached S2D set (an `evaluate.EpochSource`): calling it draws every item's still anew and regenerates the
    whole set without autograd by the training rule (`integrate_items`), so what is evaluated is what was optimised.

    Picklable, so it ships to evaluation tasks; `export.S2DDataset` extends it with the Dataset interface.
    """

    def __init__(self, static_memory: torch.Tensor, dynamic_memory: torch.Tensor,
                 integrator_state: dict[str, torch.Tensor], layout: SlotLayout, syn_lr: float | None = None, *,
                 device: torch.device | str = "cpu") -> None:
        check_memory_shapes(layout, static_memory, dynamic_memory)
        self.device = torch.device(device)
        self.static_memory = static_memory.to(self.device)
        self.dynamic_memory = dynamic_memory.to(self.device)
        self.integrator = Integrator().to(self.device).eval()
        self.integrator.load_state_dict(integrator_state)
        self.integrator.requires_grad_(False)
        self.layout, self.syn_lr = layout, syn_lr
        self.labels = layout.labels(torch.arange(layout.num_items))

    def digest(self) -> str:
        """What training on this set depends on, hashed: two sets with one digest train the same networks."""
        tensors = {"static_memory": self.static_memory, "dynamic_memory": self.dynamic_memory,
                   **{f"integrator.{k}": v for k, v in self.integrator.state_dict().items()}}
        return tensor_digest(tensors, kind="s2d", layout=self.layout.to_dict(), syn_lr=self.syn_lr)

    def statics_for(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The static row of each item, drawn among its slot's statics from `generator`."""
        return self.layout.draw_statics(items, generator)

    @torch.no_grad()
    def materialise(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Item indices `(n,)` -> normalised videos `(n, T, 3, H, W)` on this set's device."""
        return integrate_items(self.layout, self.static_memory, self.dynamic_memory, self.integrator, items,
                               self.statics_for(items, generator))

    def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set for one epoch: videos `(C*dpc, T, 3, H, W)`, class-major labels `(C*dpc,)`."""
        return self.materialise(torch.arange(self.layout.num_items), generator), self.labels.to(self.device)


class PixelSet:
    """Learnable pixels, class-major labels: videos `(C*vpc, T, 3, H, W)` for the DM/MTT baselines (METHOD.md 7),
    or images `(C*spc, 3, H, W)` for the static stage (then `vpc` counts images per class)."""

    def __init__(self, videos: torch.Tensor, num_classes: int, syn_lr: float = 0.01) -> None:
        if videos.dim() not in (4, 5) or videos.shape[-3] != 3 or videos.shape[0] % num_classes:
            raise ValueError(f"pixel set must be (C*vpc, T, 3, H, W) or (C*spc, 3, H, W) with C={num_classes}; "
                             f"got {tuple(videos.shape)}")
        self.num_classes = num_classes
        self.vpc = videos.shape[0] // num_classes
        self.videos = videos.detach().clone().requires_grad_(True)
        self.syn_lr = torch.tensor(syn_lr, device=videos.device, dtype=videos.dtype)

    @classmethod
    def from_real(cls, sample_real: RealSampler, num_classes: int, vpc: int, generator: torch.Generator,
                  device: torch.device | str = "cpu", syn_lr: float = 0.01) -> "PixelSet":
        """`--init real`: `vpc` random real clips per class."""
        clips = torch.cat([sample_real(c, vpc, generator) for c in range(num_classes)])
        return cls(to_model_input(clips, device), num_classes, syn_lr)

    @property
    def num_slots(self) -> int:
        return self.videos.shape[0]

    @property
    def device(self) -> torch.device:
        return self.videos.device

    def labels(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.div(slots.cpu().long(), self.vpc, rounding_mode="floor").to(self.device)

    def trainable(self) -> dict[str, list[torch.Tensor]]:
        return {"pixels": [self.videos]}

    def leaves(self) -> list[torch.Tensor]:
        return [self.videos]

    def materialize(self, slots: torch.Tensor, generator: torch.Generator | None = None, rows: slice = slice(None)
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots `(n,)` (`slots[rows]` with `rows`) -> videos `(n, T, 3, H, W)`, labels; `generator` is unused (no
        pairing) but kept for the API."""
        slots = slots[rows]
        return self.videos[slots.to(self.device)], self.labels(slots)

    def all_videos(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.materialize(torch.arange(self.num_slots), generator)

    def class_videos(self, c: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class `c`'s rows `(vpc, ...)`; `generator` is unused (no pairing) but kept for the API."""
        return self.videos[c * self.vpc : (c + 1) * self.vpc]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"videos": self.videos.detach().clone(), "syn_lr": self.syn_lr.detach().clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.videos.copy_(tensors["videos"])
            self.syn_lr.copy_(tensors["syn_lr"])

    def source(self) -> FrozenPixelSet:
        """A picklable CPU snapshot, the same videos every epoch, for evaluation tasks."""
        videos, labels = self.all_videos()
        return FrozenPixelSet(videos.detach().cpu().clone(), labels.cpu(), float(self.syn_lr.detach()))


class FrozenPixelSet:
    """Fixed videos and labels (an `evaluate.EpochSource`): float normalised `(N, T, 3, H, W)`, or uint8
    `(N, T, H, W, 3)` real clips kept uint8 and normalised on access. `export.PixelDataset` extends it."""

    def __init__(self, videos: torch.Tensor, labels: torch.Tensor, syn_lr: float | None = None) -> None:
        self.videos, self.labels, self.syn_lr = videos, labels, syn_lr

    def digest(self) -> str:
        """What training on this set depends on, hashed: two sets with one digest train the same networks."""
        return tensor_digest({"videos": self.videos, "labels": self.labels}, kind="pixels", syn_lr=self.syn_lr)

    def normalised(self, index: slice | torch.Tensor) -> torch.Tensor:
        """Videos `(n, T, 3, H, W)` at `index` (a slice, mask or index tensor), in the networks' space."""
        videos = self.videos[index]
        return to_model_input(videos) if videos.dtype == torch.uint8 else videos

    def __call__(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set, the same every epoch; `generator` is unused (no pairing) but kept for the API."""
        return self.normalised(slice(None)), self.labels


__all__ = ["BYTES_PER_FLOAT", "PAPER_SLOT_PAIRING", "FrozenPixelSet", "FrozenS2DSet", "PixelSet", "RealSampler",
           "S2DSet", "SlotLayout", "check_memory_shapes", "downscale", "draw_seed", "fitting_slots", "fp32_mb",
           "init_static_memory", "integrate_items", "pixel_baseline_mb", "pixel_storage", "random_real_frames",
           "real_residuals", "s2d_storage", "storage_mb", "substream", "tensor_digest", "upscale"]
