"""Frozen, validated configuration dataclasses and their JSON form.

Configs are written as sorted JSON carrying the stadapter version. On load, unknown keys warn (a newer
stadapter may have added them) and missing required keys raise.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from stadapter import __version__
from stadapter.errors import ConfigError

POSITIONS = ("attn", "mlp")
METHODS = ("st-adapter", "adapter", "linear-probe", "bitfit", "partial", "full")
ACTIVATIONS = ("none", "gelu", "quick_gelu", "relu")  # the one list; model/adapter.py maps each to its function
POOLS = ("cls", "patch-mean")
# The backbone a command builds when neither a task nor --backbone names one: CLIP ViT-B/16, as in the paper.
DEFAULT_BACKBONE = "open_clip:ViT-B-16"

T = TypeVar("T", bound="DataclassInstance")


@dataclass(frozen=True)
class AdapterConfig:
    """What one task's adapter set looks like.

    method: ``st-adapter`` (the paper), or a Table 1 baseline: ``adapter`` (plain bottleneck, Eq. 1, no conv),
        ``linear-probe`` (head only, on temporally averaged frame features), ``bitfit`` (backbone biases),
        ``partial`` (the last ``partial_blocks`` blocks), ``full`` (every backbone tensor).
    width: the bottleneck width r.
    kernel: the depth-wise Conv3d kernel (kT, kH, kW); padding is k // 2.
    positions: where adapters sit in a block: before MHSA (``attn``), before the MLP (``mlp``), or both.
    last_k: adapters only in the last k blocks (None: every block).
    activation: after the conv (before fc2). ``none`` as the official code; the paper's Eq. 2 writes
        f(DWConv3D(X W_down)).
        None picks ``none`` for st-adapter and ``gelu`` for the plain bottleneck adapter.
    pool: ``cls`` (the paper: CLS token per frame, mean over time) or ``patch-mean`` (mean over patch
        tokens and time; an option, not the paper).
    """

    num_classes: int
    method: str = "st-adapter"
    width: int = 384
    kernel: tuple[int, int, int] = (3, 1, 1)
    positions: tuple[str, ...] = ("attn",)
    last_k: int | None = None
    activation: str | None = None
    dropout: float = 0.5
    head_init_std: float = 0.02
    partial_blocks: int = 1
    pool: str = "cls"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", tuple(int(k) for k in self.kernel))
        object.__setattr__(self, "positions", tuple(self.positions))
        if self.activation is None:
            object.__setattr__(self, "activation", "gelu" if self.method == "adapter" else "none")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.width < 1:
            raise ConfigError(f"adapter width must be positive, got {self.width}")
        if len(self.kernel) != 3 or any(k < 1 or k % 2 == 0 for k in self.kernel):
            raise ConfigError(f"kernel must be three odd positive sizes (kT, kH, kW), got {self.kernel}")
        if not self.positions or any(p not in POSITIONS for p in self.positions):
            raise ConfigError(f"positions must be a non-empty subset of {POSITIONS}, got {self.positions}")
        if len(set(self.positions)) != len(self.positions):
            raise ConfigError(f"positions repeat: {self.positions}")
        if self.last_k is not None and self.last_k < 1:
            raise ConfigError(f"last_k must be >= 1 or None, got {self.last_k}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.partial_blocks < 1:
            raise ConfigError(f"partial_blocks must be >= 1, got {self.partial_blocks}")
        if self.pool not in POOLS:
            raise ConfigError(f"unknown pool {self.pool!r}; choose one of {', '.join(POOLS)}")

    @property
    def act(self) -> str:
        """The activation's name, with the method's default filled in (``activation`` is None only before
        ``__post_init__`` ran)."""
        return self.activation or "none"

    @property
    def has_adapters(self) -> bool:
        return self.method in ("st-adapter", "adapter")

    def adapter_blocks(self, depth: int) -> list[int]:
        """Indices of the blocks that carry adapters, for a backbone of ``depth`` blocks."""
        if not self.has_adapters:
            return []
        k = depth if self.last_k is None else min(self.last_k, depth)
        return list(range(depth - k, depth))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        return from_dict(cls, data)


SAMPLINGS = ("dense", "segments")
TRAIN_CROPS = ("random", "random-resized")


@dataclass(frozen=True)
class TaskSpec:
    """How a task's clips are sampled and preprocessed, in training and at test time.

    sampling: ``dense`` (num_frames x frame_stride consecutive frames, a random offset in training and
        ``temporal_views`` evenly spaced windows at test: K400) or ``segments`` (num_frames equal segments,
        a random frame of each in training and the centre at test: SSv2).
    spatial_views: 1 (centre crop) or 3 (three crops along the long side) at test.
    scale_range: short-side resize jitter in training, as multiples of the crop size (``random`` crop).
    flip: horizontal flip in training. Refused when ``direction_sensitive`` (left/right is the label).
    rand_augment: a timm RandAugment string such as ``rand-m7-n4-mstd0.5-inc1``, or None.
    """

    num_frames: int = 8
    sampling: str = "dense"
    frame_stride: int = 16
    temporal_views: int = 1
    spatial_views: int = 1
    train_crop: str = "random"
    scale_range: tuple[float, float] = (1.0, 1.15)
    flip: bool = True
    direction_sensitive: bool = False
    rand_augment: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        if self.frame_stride < 1:
            raise ConfigError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.temporal_views < 1:
            raise ConfigError(f"temporal_views must be >= 1, got {self.temporal_views}")
        if self.spatial_views not in (1, 3):
            raise ConfigError(f"spatial_views must be 1 (centre crop) or 3 (three crops), got {self.spatial_views}")
        if self.train_crop not in TRAIN_CROPS:
            raise ConfigError(f"unknown train_crop {self.train_crop!r}; choose one of {', '.join(TRAIN_CROPS)}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if self.flip and self.direction_sensitive:
            raise ConfigError("horizontal flip is refused for a task whose labels depend on direction "
                              "(left/right is the label); set flip to false")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (official recipes: AdamW, lr 1e-3 per 256 clips scaled linearly, wd 0.01 on
    weights only, linear warmup then cosine per step, AMP). Adapters, head and optimizer state stay fp32 under
    either autocast.

    lr_ref_batch: the recipe's own batch (set by :func:`stadapter.recipes.preset`). At and above it the peak
    learning rate is ``lr_per_256 * batch / 256`` (the paper's linear rule); below it the rate is not scaled
    down further: it stays ``lr_per_256 * lr_ref_batch / 256``, the recipe's rate at its own batch (the floor
    rule, :func:`stadapter.training.optim.scaled_lr`). None: linear at every batch.
    """

    epochs: float = 12
    warmup_epochs: float = 2
    batch_size: int = 64
    lr_per_256: float = 1e-3
    weight_decay: float = 0.01
    conv_lr_mult: float = 1.0
    head_lr_mult: float = 1.0  # the classifier head's learning rate over the adapters'
    grad_accum: int = 1
    amp: bool = True  # CUDA: fp16 backbone and autocast
    cpu_bf16: bool = False  # CPU: bfloat16 autocast (faster where the CPU has AVX512-BF16 or AMX); opt-in
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: float = 5
    num_workers: int = 2
    cache_clips: bool = False  # keep decoded clips in memory across epochs (small datasets; loads in-process)
    lr_ref_batch: int | None = None  # the recipe's batch: the learning rate's floor (see the class docstring)

    def __post_init__(self) -> None:
        if self.lr_ref_batch is not None and self.lr_ref_batch < 1:
            raise ConfigError(f"lr_ref_batch must be >= 1 or None, got {self.lr_ref_batch}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        if self.lr_per_256 <= 0 or self.weight_decay < 0 or self.conv_lr_mult <= 0 or self.head_lr_mult <= 0:
            raise ConfigError("lr_per_256, conv_lr_mult and head_lr_mult must be positive, weight_decay >= 0")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict (tuples become lists)."""
    out = dataclasses.asdict(obj)
    return json.loads(json.dumps(out))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict: unknown keys warn, missing required keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown} (written by a newer stadapter?)",
                      stacklevel=2)
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing required keys {missing}")
    kwargs = {k: v for k, v in data.items() if k in fields}
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def dumps(payload: dict[str, Any]) -> str:
    """Sorted, indented JSON with the stadapter version that wrote it."""
    return json.dumps({**payload, "stadapter_version": __version__}, sort_keys=True, indent=2) + "\n"


__all__ = ["ACTIVATIONS", "DEFAULT_BACKBONE", "METHODS", "POOLS", "POSITIONS", "AdapterConfig", "TaskSpec",
           "TrainConfig", "dumps", "from_dict", "to_dict"]
