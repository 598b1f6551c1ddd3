"""One typed, validated config for a whole run: YAML preset + dotted `key=value` overrides.

Every stage reads its own section; nothing reads configuration back from the tracker. A bad value
fails before any work starts, with the dotted key and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vdistill.errors import UserError
from vdistill.redact import redact
from vdistill.storage import absolute_uri


class ConfigError(UserError, ValueError):
    """A config problem, phrased for the user: the dotted key and what it accepts."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9._-]+$", description="run id; outputs go to <root>/<name>/")
    root: str = Field("runs", description="run root URI (local path or s3://bucket/prefix)")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    coordinator_cpus: float = Field(
        1.0, ge=0, description="Ray CPUs held by the coordinator actor, which runs distillation with as many torch "
        "threads on a cluster; a local run (no RAY_ADDRESS) gives it every core")
    coordinator_gpus: float = Field(0.0, ge=0, description="Ray GPUs held by the coordinator actor; 1 on GPU clusters")
    distill_workers: int = Field(
        1, ge=1, description="Ray Train workers of a DM / DC distillation stage (static, DM+S2D, DM on pixels): each "
        "takes a block of classes and the workers sum their gradients every iteration, so the set is the same for "
        "any number (METHOD.md 5.4); MTT stages run on one")
    distill_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs (and torch threads) per distillation worker")
    distill_gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per distillation worker (NCCL when > 0)")


class StorageConfig(_Section):
    """S3 settings; empty values fall back to the standard AWS variables (AWS_ENDPOINT_URL, ...)."""

    endpoint_url: str = ""
    region: str = ""
    access_key: str = Field("", repr=False)
    secret_key: str = Field("", repr=False)


class DataConfig(_Section):
    dataset: Literal["generic_csv", "kinetics400", "ssv2", "ucf101", "miniucf", "hmdb51"] = "generic_csv"
    root: str = Field("", description="URI of the video files")
    annotations: str = Field("", description="URI of the annotation files (default: data.root)")
    split_id: int = Field(1, ge=1, le=3, description="official split number (UCF101, HMDB51)")
    hmdb_unused_as_train: bool = Field(True, description="HMDB51: count split-file id 0 (unused) as train, like the paper")
    allow_outside_root: bool = Field(
        False, description="read annotation rows whose file resolves outside data.root (absolute paths, file:// "
        "URLs, symlinks leading out); off: each such row is reported and nothing is ingested")
    k400_replacement: str = Field(
        "replacement", description="K400 folder (under root) whose clips win over the same-named originals")
    train_split: str = Field("train", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="a cache folder name")
    test_split: str = Field("test", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="a cache folder name")
    val_split: str = Field(
        "val", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="cache folder of the validation clips carved out "
        "of the training split at ingest (never the test split; experts and real batches never see them)")
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of each class's training clips held out for validation (0 = none: "
        "the distillation stages then export their last iterate)")
    val_max_per_class: int = Field(10, ge=1, description="at most this many validation clips per class")

    @model_validator(mode="after")
    def _three_distinct_splits(self) -> "DataConfig":
        if len({self.train_split, self.test_split, self.val_split}) < 3:
            raise ValueError(f"data.train_split, data.test_split and data.val_split must differ (got "
                             f"{self.train_split!r}, {self.test_split!r}, {self.val_split!r})")
        return self


class DemoConfig(_Section):
    """The demo dataset: procedural shapes (vdistill.data.synthetic) or real camera footage (vdistill.data.footage)."""

    kind: Literal["procedural", "footage"] = Field(
        "procedural", description="footage = real camera shots whose classes need motion (demo.motion; what "
        "`vdistill demo` runs); procedural = generated shapes, a smoke test (`vdistill demo --procedural`)")
    motion: Literal["playback", "camera", "rotation"] = Field(
        "playback", description="footage only: what tells its classes apart (vdistill.data.footage): playback "
        "direction and speed, a panning or zooming camera, or a rolling, shaking or still camera")
    classes: int = Field(0, ge=0, le=20, description="0 = the kind's default: 10 procedural, 12 footage (3 shots x 4 "
                         "motions)")
    train_per_class: int = Field(30, ge=1)
    test_per_class: int = Field(10, ge=1)
    size: int = Field(48, ge=16, le=512)
    frames: int = Field(16, ge=4)
    fps: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)

    @property
    def num_classes(self) -> int:
        return self.classes or (12 if self.kind == "footage" else 10)


class DecodeConfig(_Section):
    frames: int = Field(8, ge=1, le=512, description="T: frames per clip")
    size: int = Field(32, ge=8, le=1024, description="output height = width")
    resize: Literal["squash", "short_side_crop"] = "squash"
    sampling: Literal["uniform", "stride"] = "uniform"
    stride: int = Field(4, ge=1, description="frame step for sampling=stride")
    start: Literal["center", "random"] = Field("center", description="where a stride window starts")
    short_video: Literal["loop", "pad", "quarantine"] = "loop"
    min_frames: int = Field(1, ge=1, description="videos with fewer decoded frames are quarantined as too short")
    interpolation: Literal["bilinear", "fast_bilinear", "bicubic", "area"] = "bilinear"


class CacheConfig(_Section):
    uri: str = Field("", description="clip cache URI (default: <run.root>/<run.name>/cache)")
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    videos_per_task: int = Field(
        256, ge=1, description="most videos per Ray decode task; within it, tasks are cut to 4 per CPU slot so "
        "the cores stay busy to the end and Ray's per-task cost is paid rarely")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs per ingest task; also its codec threads")
    file_mb: float = Field(
        64.0, gt=0, description="a class's clip files are cut once they reach this size (MB): B bytes of a class "
        "take at most ceil(B / file_mb) files")
    rows_per_group: int = Field(
        16, ge=1, description="clips per Parquet row group at most: the smallest read of a random-row-group reader")
    sampler_mb: float = Field(
        8192.0, gt=0, description="memory of the distillation's real-clip sampler, all classes together; a class "
        "that does not fit its share is sampled from a rotating random pool of its clips (half the share, the other "
        "half reads the next pool ahead). Give a pool at least batch_real clips: 2 x batch_real x classes x clip bytes")


class ModelConfig(_Section):
    name: Literal["convnet3d", "r3d_18", "mc3_18", "r2plus1d_18"] = "convnet3d"
    width: int = Field(32, ge=4, description="ConvNet3D channels after the first block (paper: 128)")
    head: Literal["paper", "adaptive"] = Field(
        "adaptive", description="paper = exact ConvNet3D pooling (valid for 43..64 and >=107 px); adaptive = any size"
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    width_2d: int = Field(32, ge=4, description="2-D ConvNet (static stage) width (paper: 128)")
    depth_2d: int = Field(3, ge=1, le=5)


class TrainConfig(_Section):
    """One epoch loop shared by experts, evaluation and the full-data baseline."""

    standardize: bool = Field(False, description="per-batch (x-mean)/std like the original code (METHOD.md 1.2)")
    augment: bool = Field(False, description="differentiable clip augmentation (crop/flip/scale/rotate/colour)")


class ExpertsConfig(_Section):
    num_experts: int = Field(4, ge=1)
    epochs: int = Field(0, ge=0, description="0 = max_start_epoch + expert_epochs + margin (what MTT reads)")
    epoch_margin: int = Field(1, ge=0)
    lr: float = Field(0.01, gt=0, description="SGD lr (the paper's 0.01; 0.1 diverges on real camera clips)")
    momentum: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(16, ge=1)
    num_workers: int = Field(2, ge=1, description="Ray Train workers; each trains its own experts")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="fractional GPUs let several small experts share one")
    frames_2d: bool = Field(True, description="also train single-frame 2-D experts for the static MTT stage")
    test_every: int = Field(10, ge=0, description="test top1/top5 every n epochs and after the last (0 = last only)")
    max_failures: int = Field(3, ge=-1, description="Ray Train restarts after a worker error (-1 = unlimited)")


class EvaluateConfig(_Section):
    """Defaults are a fast protocol for tiny sets; the paper's (METHOD.md 6) is the preset configs/_paper.yaml."""

    num_eval: int = Field(3, ge=1)
    epochs: int = Field(200, ge=1)
    lr: float = Field(0.01, gt=0)
    use_learned_lr: bool = Field(
        False, description="train with MTT's learned synthetic lr (the paper) instead of evaluate.lr; it was learned "
        "for plain SGD steps, so with momentum 0.9 it can be ~10x too large"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    test_passes: int = Field(1, ge=1)
    test_flip: bool = False
    models: list[Literal["convnet3d", "r3d_18", "mc3_18", "r2plus1d_18"]] = ["convnet3d"]
    coreset_embedder: Literal["random", "expert"] = "random"
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.0, ge=0)


Optimizer = Literal["adam", "sgd"]
OPTIMIZER_HELP = ("adam = steps in the data's own units whatever the gradient scale, lr = step size in normalised "
                  "pixels (METHOD.md 5.1a), cosine-decayed over the iterations; sgd = the paper's rule (its lrs are "
                  "tuned to one dataset's gradient magnitudes)")


class StaticConfig(_Section):
    method: Literal["dm", "mtt", "dc"] = "dm"
    iterations: int = Field(100, ge=0)
    optimizer: Optimizer = Field("adam", description=OPTIMIZER_HELP)
    lr: float = Field(0.01, gt=0, description="adam: step in normalised pixels; sgd: the paper's 1.0")
    momentum: float = Field(0.5, ge=0, lt=1, description="sgd only")
    batch_real: int = Field(32, ge=1)
    init: Literal["real", "noise"] = "real"


class DynamicConfig(_Section):
    method: Literal["dm", "mtt"] = "mtt"
    vpc: int = Field(1, ge=1, description="storage budget: the storage of this many real videos per class (the "
                     "baselines hold vpc videos per class)")
    statics_per_slot: int = Field(1, ge=1, description="still images per slot; a video draws one (the paper: 2)")
    dynamics_per_slot: int = Field(1, ge=1, description="dynamic clips per slot, each a video of every epoch "
                                   "(the paper: 2)")
    scale: int = Field(
        2, ge=1, description="the memories are stored this many times smaller than the videos and upsampled when a "
        "video is made: more, smaller clips in the same storage (METHOD.md 5.2a; the paper: 1)")
    slots_per_video: int = Field(
        0, ge=0, description="slots per vpc (per real video's storage); 0 = as many as fit (8 at 8 frames, scale 2, "
        "1 still + 1 clip a slot; the paper: 1)")
    iterations: int = Field(100, ge=0)
    optimizer: Optimizer = Field("adam", description=OPTIMIZER_HELP)
    lr_dynamic: float = Field(0.01, gt=0, description="adam: step in normalised pixels; sgd: the paper's 1e4 (MTT) "
                              "or 1e-4 (DM), tuned to its gradient scale")
    lr_integrator: float = Field(1e-3, gt=0, description="adam: step of the 327 integrator weights; sgd: 1e-5 (MTT)")
    integrator_init: Literal["default", "identity", "residual"] = Field(
        "residual", description="default = PyTorch init (paper); identity = the tiled still image plus a faint "
        "random trace of the dynamic clip; residual = still image + dynamic clip on every channel"
    )
    init: Literal["randn", "real", "clip"] = Field(
        "clip", description="dynamic memory start: randn (paper); real = temporal residuals of random real clips (with "
        "integrator_init=residual a video starts as real motion on a still); clip = random real clips' luminance "
        "relative to their slot's stills (with integrator_init=residual a video starts as that clip in grayscale, "
        "coloured by the still; METHOD.md 5.2a)")
    momentum: float = Field(0.95, ge=0, lt=1, description="sgd only")
    train_static: bool = False
    lr_static: float = Field(0.01, gt=0, description="adam: step in normalised pixels; sgd: the paper's 100")
    batch_real: int = Field(32, ge=1)
    syn_steps: int = Field(10, ge=1)
    expert_epochs: int = Field(1, ge=1)
    max_start_epoch: int = Field(15, ge=1, description="MTT starts from expert epochs [0, max_start_epoch)")
    lr_teacher: float | None = Field(None, gt=0, description="where syn_lr starts; unset = experts.lr")
    train_lr: bool = True
    lr_lr: float = Field(1e-5, gt=0)
    min_syn_lr: float = Field(1e-3, gt=0)
    batch_syn: int = Field(0, ge=0, description="synthetic videos per MTT student step; 0 = C*vpc (one per slot, "
                           "the paper's batch), drawn from all C*dpc without replacement across steps")
    mtt_mode: Literal["constant", "unrolled"] = Field("constant", description="memory-constant (TESLA) or unrolled")
    checkpoint_every: int = Field(25, ge=1)
    eval_every: int = Field(0, ge=0, description="test-split evaluations during the stage, logged only (0 = none); "
                            "the iterate that is exported is chosen on the validation split (validation.*)")


class BaselinesConfig(_Section):
    """What the results table compares against (each at dynamic.vpc videos per class)."""

    coresets: list[Literal["random", "herding", "kcenter"]] = ["random", "herding"]
    pixel_methods: list[Literal["dm", "mtt"]] = ["dm", "mtt"]
    s2d_methods: list[Literal["dm", "mtt"]] = Field(
        ["dm"], description="extra S2D runs besides dynamic.method, e.g. [dm] when dynamic.method is mtt"
    )
    s2d_overrides: dict[Literal["dm", "mtt"], dict[str, Any]] = Field(
        {"dm": {"iterations": 300}},
        description="dynamic.* values for an extra S2D method (its own learning rates, iterations, ...)"
    )
    full: bool = True
    full_epochs: int = Field(30, ge=1, description="epochs of the full-data upper bound (evaluate.epochs is for tiny sets)")
    pixel_iterations: int = Field(100, ge=0)
    pixel_optimizer: Optimizer = Field("adam", description=OPTIMIZER_HELP)
    pixel_lr_dm: float = Field(0.01, gt=0, description="adam: step in normalised pixels; sgd: the paper's 1.0")
    pixel_lr_mtt: float = Field(0.01, gt=0, description="adam: step in normalised pixels; sgd: the paper's 100")


class ValidationConfig(_Section):
    """How a distillation stage scores its set on the validation split (data.val_split) while it runs: the
    stage exports its best iterate, never one worse than where it started (METHOD.md 5.9)."""

    every: int = Field(
        0, ge=0, description="score every n iterations, plus iteration 0 and the last (0 = only those: the stage keeps "
        "the better of its start and its end; each score costs num_nets x epochs training steps)")
    num_nets: int = Field(1, ge=1, description="fresh ConvNet3Ds per score, the same seeds at every iterate")
    epochs: int = Field(
        200, ge=1, description="training epochs of each network (evaluate.* for the rest): as many as the evaluation "
        "trains, since a set that wins after a few steps can lose after many (measured with 60: validation rose while "
        "test accuracy fell)")
    backoffs: int = Field(
        2, ge=0, description="instability back-offs per stage: a matching loss that stays above its starting value, "
        "or a learned lr pinned at its floor, reloads the best iterate with steps scaled by backoff_factor")
    backoff_factor: float = Field(0.3, gt=0, lt=1)
    window: int = Field(10, ge=2, description="iterations over which a rise or a pinned lr must last")


class ExportConfig(_Section):
    method: Literal["auto", "dm", "mtt"] = Field(
        "auto", description="S2D set that becomes the artifact: auto = the best on the validation split among the "
        "S2D methods run")


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str = Field("", description="MLflow tracking URI; empty = MLFLOW_TRACKING_URI or sqlite under the run folder")
    experiment: str = "vdistill"


# every S2D method shares the static stage's layout (how many stills per class, at which size)
_SHARED_LAYOUT = {"vpc", "statics_per_slot", "dynamics_per_slot", "scale", "slots_per_video", "method"}


class Config(_Section):
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    decode: DecodeConfig = DecodeConfig()
    cache: CacheConfig = CacheConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    experts: ExpertsConfig = ExpertsConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    static: StaticConfig = StaticConfig()
    dynamic: DynamicConfig = DynamicConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    validation: ValidationConfig = ValidationConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _mtt_reads_existing_snapshots(self) -> "Config":
        if self.experts.epochs and self.experts.epochs < self.dynamic.max_start_epoch + self.dynamic.expert_epochs:
            raise ValueError(
                f"experts.epochs={self.experts.epochs} is shorter than dynamic.max_start_epoch + "
                f"dynamic.expert_epochs = {self.dynamic.max_start_epoch + self.dynamic.expert_epochs}; "
                "raise experts.epochs or set it to 0 (auto)"
            )
        return self

    @model_validator(mode="after")
    def _syn_lr_starts_at_the_experts_lr(self) -> "Config":
        """One value, not two to keep in sync: MTT's synthetic lr starts where the experts trained."""
        if self.dynamic.lr_teacher is None:
            self.dynamic.lr_teacher = self.experts.lr
        return self

    @model_validator(mode="after")
    def _s2d_overrides_are_dynamic_keys(self) -> "Config":
        for method, values in self.baselines.s2d_overrides.items():
            unknown = sorted(set(values) - set(DynamicConfig.model_fields) | set(values) & _SHARED_LAYOUT)
            if unknown:
                raise ValueError(
                    f"baselines.s2d_overrides.{method} has unknown key(s) {unknown}; "
                    f"allowed: {', '.join(sorted(DynamicConfig.model_fields))}"
                )
            self.dynamic_for(method)
        return self

    @model_validator(mode="after")
    def _exported_method_is_run(self) -> "Config":
        if self.export.method != "auto" and self.export.method not in self.s2d_methods:
            raise ValueError(f"export.method={self.export.method} is not among the S2D methods run "
                             f"({', '.join(self.s2d_methods)}); add it to baselines.s2d_methods or use auto")
        return self

    def dynamic_for(self, method: str) -> DynamicConfig:
        """The dynamic-stage settings of one S2D method: dynamic.* with that method's overrides on top."""
        if method == self.dynamic.method:
            return self.dynamic
        values = {**self.dynamic.model_dump(), **self.baselines.s2d_overrides.get(method, {}), "method": method}
        return DynamicConfig.model_validate(values)

    @property
    def s2d_methods(self) -> list[str]:
        """dynamic.method first, then the extra ones."""
        return [self.dynamic.method] + [m for m in self.baselines.s2d_methods if m != self.dynamic.method]

    @property
    def run_uri(self) -> str:
        return f"{self.run.root.rstrip('/')}/{self.run.name}"

    @property
    def cache_uri(self) -> str:
        return self.cache.uri or f"{self.run_uri}/cache"

    @property
    def expert_epochs_to_train(self) -> int:
        return self.experts.epochs or (
            self.dynamic.max_start_epoch + self.dynamic.expert_epochs + self.experts.epoch_margin
        )

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections: a stage's input identity for resume checks."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def public_dict(self) -> dict[str, Any]:
        """The resolved config without credentials (keys and URL userinfo), for files next to outputs and MLflow."""
        return redact(self.model_dump(mode="json"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. decode.frames=16")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    return str(getattr(exc, "problem", None) or exc).strip()


def _load_yaml_file(path: Path) -> Any:
    """Parsed YAML, or ConfigError `file:line:column: YAML syntax error: what` (no parser traceback)."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(exc)}") from None


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override key {'.'.join(path)!r}: {part!r} is not a section")
    node[path[-1]] = value


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-after"))
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(parent)
        return f"unknown config key {key!r}; allowed here: {', '.join(allowed)}"
    if kind == "literal_error":
        return f"{key}: {error['msg'].replace('Input should be', 'must be one of')} (got {error['input']!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error.get('input')!r})" if key else message


def _allowed_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_preset(path: Path) -> dict:
    """YAML preset; a top-level `base: other.yaml` (relative to this file) is loaded first and overlaid."""
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} not found; presets live in configs/ (e.g. configs/demo.yaml)")
    data = _load_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    return _deep_merge(_read_preset(path.parent / base), data) if base else data


def _absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///relative.db` and plain or `file:` paths made absolute; server URIs unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + absolute_uri(uri.removeprefix("sqlite:///"))
    return absolute_uri(uri)


def with_absolute_paths(cfg: Config) -> Config:
    """Every local path in `cfg` made absolute against the current directory (s3:// and servers unchanged).

    Runs once on the driver, before anything reaches Ray: workers run in other directories.
    """
    cfg.run.root = absolute_uri(cfg.run.root)
    cfg.cache.uri = absolute_uri(cfg.cache.uri)
    cfg.data.root = absolute_uri(cfg.data.root)
    cfg.data.annotations = absolute_uri(cfg.data.annotations)
    cfg.tracking.uri = _absolute_tracking_uri(cfg.tracking.uri)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset YAML (or the built-in defaults) + overrides -> validated Config with absolute local paths.

    Raises ConfigError naming the key and what it accepts.
    """
    data = _read_preset(Path(path)) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _merge(data, key, value)
    try:
        return with_absolute_paths(Config.model_validate(data))
    except ValidationError as exc:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_describe(e) for e in exc.errors())) from None
