"""The synthetic set: static memory + dynamic memory + integrator -> videos, and the plain pixel set of the baselines.

A *slot* is one synthetic video per class position (`C * vpc` slots, class-major). Slot `k` belongs to class
`k // vpc` and owns `statics_per_slot` static images and `dynamics_per_slot` dynamic clips; every time a video is
materialised one of each is drawn at random (method.md 5.2). The original hard-wires 2 and 2 (W-7); here the
layout is explicit and validated, with 2/2 as the paper preset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vdistill.data.pixels import to_model_input
from vdistill.models import Integrator, seeded

# Real clips for one class: `sample_real(c, n, generator) -> uint8 (n, T, H, W, 3)`.
RealSampler = Callable[[int, int, torch.Generator], torch.Tensor]

PAPER_SLOT_PAIRING = 2  # statics_per_slot = dynamics_per_slot = 2 in every released DM/MTT+Ours script


@dataclass(frozen=True)
class SlotLayout:
    """How many statics / dynamics each of the `num_classes * vpc` slots owns; `spc`/`dpc` are per class."""

    num_classes: int
    vpc: int
    statics_per_slot: int = PAPER_SLOT_PAIRING
    dynamics_per_slot: int = PAPER_SLOT_PAIRING

    def __post_init__(self) -> None:
        for key, value in (("num_classes", self.num_classes), ("dynamic.vpc", self.vpc),
                           ("dynamic.statics_per_slot", self.statics_per_slot),
                           ("dynamic.dynamics_per_slot", self.dynamics_per_slot)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer (got {value!r})")

    @classmethod
    def from_config(cls, num_classes: int, dynamic_cfg) -> "SlotLayout":
        """From a DynamicConfig (`vpc`, `statics_per_slot`, `dynamics_per_slot`)."""
        return cls(num_classes, dynamic_cfg.vpc, dynamic_cfg.statics_per_slot, dynamic_cfg.dynamics_per_slot)

    @property
    def spc(self) -> int:
        """Static images per class."""
        return self.statics_per_slot * self.vpc

    @property
    def dpc(self) -> int:
        """Dynamic clips per class."""
        return self.dynamics_per_slot * self.vpc

    @property
    def num_slots(self) -> int:
        return self.num_classes * self.vpc

    def labels(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.div(slots, self.vpc, rounding_mode="floor")

    def draw_pairing(self, slots: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (static row, dynamic index within the class) for each slot, never leaving the slot.

        `slots` is a CPU LongTensor `(n,)`; returns two CPU LongTensors `(n,)`: static rows index
        `(C*spc, ...)`, dynamic indices index the `dpc` axis of `(C, dpc, ...)`.
        """
        slots = slots.cpu().long()
        if slots.numel() and (slots.min() < 0 or slots.max() >= self.num_slots):
            raise IndexError(f"slot indices must lie in [0, {self.num_slots}), got {slots.tolist()}")
        label, slot = self.labels(slots), slots % self.vpc
        pick_s = torch.randint(self.statics_per_slot, slots.shape, generator=generator)
        pick_d = torch.randint(self.dynamics_per_slot, slots.shape, generator=generator)
        static_idx = self.spc * label + self.statics_per_slot * slot + pick_s
        dynamic_idx = self.dynamics_per_slot * slot + pick_d
        return static_idx, dynamic_idx

    def to_dict(self) -> dict[str, int]:
        return dict(num_classes=self.num_classes, vpc=self.vpc, statics_per_slot=self.statics_per_slot,
                    dynamics_per_slot=self.dynamics_per_slot)


def draw_seed(generator: torch.Generator) -> int:
    """A 63-bit seed from an explicit generator: how sub-components get their own reproducible stream."""
    return int(torch.randint(2**62, (1,), generator=generator))


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


class S2DSet:
    """Static memory `(C*spc, 3, H, W)` + dynamic memory `(C, dpc, T, 1, H, W)` + integrator + `syn_lr`.

    The dynamic memory and integrator are trainable; the static memory only when `train_static`.
    """

    def __init__(self, layout: SlotLayout, static_memory: torch.Tensor, dynamic_memory: torch.Tensor,
                 integrator: Integrator, syn_lr: torch.Tensor, train_static: bool = False) -> None:
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
        self.layout = layout
        self.static_memory = static_memory.detach().clone().requires_grad_(train_static)
        self.dynamic_memory = dynamic_memory.detach().clone().requires_grad_(True)
        self.integrator = integrator.to(device=dynamic_memory.device, dtype=dynamic_memory.dtype)
        self.syn_lr = syn_lr.detach().clone().to(dynamic_memory.device, dynamic_memory.dtype)

    @classmethod
    def create(cls, layout: SlotLayout, static_memory: torch.Tensor, frames: int, generator: torch.Generator,
               syn_lr: float = 0.01, train_static: bool = False, integrator_init: str = "default",
               dynamic_init: str = "randn", sample_real: RealSampler | None = None) -> "S2DSet":
        """Fresh set around a static memory, integrator seeded from `generator` with `integrator_init`
        ("default" as in the paper, "identity" or "residual").

        `dynamic_init="randn"` is the paper's dynamic memory; `"real"` starts each dynamic clip as the
        temporal residual of a random real clip of its class (`real_residuals`), so that with the
        "residual" integrator every synthetic video starts as a real clip's motion on a distilled still.
        """
        size = static_memory.shape[-1]
        if dynamic_init == "randn":
            dynamic = torch.randn(layout.num_classes, layout.dpc, frames, 1, size, size, generator=generator,
                                  dtype=static_memory.dtype)
        elif dynamic_init == "real":
            if sample_real is None:
                raise ValueError("dynamic.init=real needs a real-clip sampler")
            dynamic = torch.stack([real_residuals(sample_real(c, layout.dpc, generator))
                                   for c in range(layout.num_classes)])
        else:
            raise ValueError(f"dynamic.init must be 'randn' or 'real' (got {dynamic_init!r})")
        integrator = seeded(draw_seed(generator), lambda: Integrator(integrator_init))
        return cls(layout, static_memory, dynamic.to(static_memory.device), integrator,
                   torch.tensor(syn_lr), train_static)

    @property
    def frames(self) -> int:
        return self.dynamic_memory.shape[2]

    @property
    def device(self) -> torch.device:
        return self.dynamic_memory.device

    def trainable(self) -> dict[str, list[torch.Tensor]]:
        """Parameter groups the stage optimises (optimizer groups in method.md 5.1)."""
        groups = {"dynamic": [self.dynamic_memory], "integrator": list(self.integrator.parameters())}
        if self.static_memory.requires_grad:
            groups["static"] = [self.static_memory]
        return groups

    def leaves(self) -> list[torch.Tensor]:
        """Every tensor whose gradient the objectives must deliver (excluding `syn_lr`)."""
        return [t for group in self.trainable().values() for t in group]

    def materialize(self, slots: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots `(n,)` -> videos `(n, T, 3, H, W)`, labels `(n,)` on the set's device; differentiable.

        The pairing inside each slot is drawn from `generator` (replaying a generator state replays the pairing).
        """
        static_idx, dynamic_idx = self.layout.draw_pairing(slots, generator)
        labels = self.layout.labels(slots.cpu().long())
        device = self.device
        static = self.static_memory[static_idx.to(device)]
        dynamic = self.dynamic_memory[labels.to(device), dynamic_idx.to(device)]
        return self.integrator(static, dynamic), labels.to(device)

    def all_videos(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One video per slot, class-major: `(C*vpc, T, 3, H, W)` and labels."""
        return self.materialize(torch.arange(self.layout.num_slots), generator)

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
            self.integrator.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()
                                             if k.startswith("integrator.")})

    @classmethod
    def from_tensors(cls, layout: SlotLayout, tensors: dict[str, torch.Tensor],
                     device: torch.device | str = "cpu", train_static: bool = False) -> "S2DSet":
        integrator = Integrator()
        integrator.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("integrator.")})
        return cls(layout, tensors["static_memory"].to(device), tensors["dynamic_memory"].to(device),
                   integrator, tensors["syn_lr"], train_static)

    def storage_floats(self) -> dict[str, int]:
        """Stored floats per component (method.md 5.8): what the distilled set costs on disk."""
        parts = {"static_memory": self.static_memory.numel(), "dynamic_memory": self.dynamic_memory.numel(),
                 "integrator": sum(p.numel() for p in self.integrator.parameters())}
        return {**parts, "total": sum(parts.values())}

    def source(self):
        """A picklable CPU snapshot that re-pairs on every call (an `export.S2DDataset`), for evaluation tasks."""
        from vdistill.export import S2DDataset  # export builds on this module

        t = self.state_tensors()
        return S2DDataset(t["static_memory"].cpu(), t["dynamic_memory"].cpu(),
                          {k.split(".", 1)[1]: v.cpu() for k, v in t.items() if k.startswith("integrator.")},
                          self.layout, {"syn_lr": float(self.syn_lr)})


class PixelSet:
    """Learnable pixels, class-major labels: videos `(C*vpc, T, 3, H, W)` for the DM/MTT baselines (method.md 7),
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

    def materialize(self, slots: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots `(n,)` -> videos `(n, T, 3, H, W)`, labels; `generator` is unused (no pairing) but kept for the API."""
        return self.videos[slots.to(self.device)], self.labels(slots)

    def all_videos(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.materialize(torch.arange(self.num_slots), generator)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"videos": self.videos.detach().clone(), "syn_lr": self.syn_lr.detach().clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.videos.copy_(tensors["videos"])
            self.syn_lr.copy_(tensors["syn_lr"])

    def storage_floats(self) -> dict[str, int]:
        return {"videos": self.videos.numel(), "total": self.videos.numel()}

    def source(self):
        """A picklable CPU snapshot, the same videos every epoch (an `export.PixelDataset`), for evaluation tasks."""
        from vdistill.export import PixelDataset  # export builds on this module

        videos, labels = self.all_videos()
        return PixelDataset(videos.detach().cpu().clone(), labels.cpu(), {"syn_lr": float(self.syn_lr)})


__all__ = ["PAPER_SLOT_PAIRING", "PixelSet", "RealSampler", "S2DSet", "SlotLayout",
           "draw_seed", "init_static_memory", "random_real_frames", "real_residuals"]
