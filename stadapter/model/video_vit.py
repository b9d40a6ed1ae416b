"""The video model: a frozen image backbone with adapter slots and a per-task linear head.

clips (B, T, 3, H, W) -> per-frame tokens through the backbone, with each bound adapter before its branch ->
pooled token per frame (the CLS token) -> mean over T -> the backbone's final norm (CLIP's ln_post) ->
dropout -> the task's linear head. CLIP's ``proj`` is not used and there is no temporal position embedding
(as in the official code).

Adapter weights are data, not modules: a task's *adapter set* is a flat ``dict[str, Tensor]`` that
:meth:`VideoViT.bind` stores by reference (no copy, no module rebuild). Its keys:

    adapters.{block}.{attn|mlp}.{fc1,conv,fc2}.{weight,bias}   the adapters
    head.weight, head.bias                                     the task head
    backbone.{parameter name}                                  replacements for backbone tensors (BitFit,
                                                               partial and full fine-tuning baselines); the
                                                               shared backbone itself never changes
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stadapter.config import AdapterConfig
from stadapter.errors import AdapterSetError, InputError
from stadapter.model.adapter import init_adapter_tensors, st_adapter
from stadapter.model.backbone import Backbone, swapped_parameters
from stadapter.model.head import clip_features, head_logits
from stadapter.model.layout import BACKBONE_PREFIX, set_shapes

AdapterSet = dict[str, Tensor]
SlotTensors = dict[tuple[int, str], dict[str, Tensor]]  # (block, position) -> that adapter's tensors


class VideoViT(nn.Module):
    def __init__(self, backbone: Backbone, config: AdapterConfig, num_frames: int) -> None:
        super().__init__()
        if num_frames < 1:
            raise InputError(f"num_frames must be >= 1, got {num_frames}")
        self.backbone = backbone
        self.config = config
        self.num_frames = num_frames
        self._bound: Mapping[str, Tensor] | None = None
        self._slots: SlotTensors = {}
        self._overrides: dict[str, Tensor] = {}

    # -- adapter-set layout ------------------------------------------------------------------------
    def slots(self) -> list[tuple[int, str]]:
        """(block, position) of every adapter, in forward order."""
        cfg = self.config
        return [(i, pos) for i in cfg.adapter_blocks(self.backbone.depth) for pos in ("attn", "mlp")
                if pos in cfg.positions]

    def trainable_backbone_names(self) -> list[str]:
        """Backbone parameters a baseline method replaces with trained copies."""
        cfg, names = self.config, [n for n, _ in self.backbone.named_parameters()]
        if cfg.method == "bitfit":
            return [n for n in names if n.endswith("bias")]
        if cfg.method == "partial":
            prefixes = tuple(self.backbone.block_prefix(i)
                             for i in range(max(0, self.backbone.depth - cfg.partial_blocks), self.backbone.depth))
            return [n for n in names if n.startswith(prefixes)]
        if cfg.method == "full":
            return names
        return []

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key an adapter set for this model must hold, with its shape."""
        shapes = set_shapes(self.config, self.backbone.dim, self.slots())
        params = dict(self.backbone.named_parameters())
        for name in self.trainable_backbone_names():
            shapes[f"{BACKBONE_PREFIX}{name}"] = tuple(params[name].shape)
        return shapes

    def init_adapter_set(self, generator: torch.Generator | None = None) -> AdapterSet:
        """A fresh set: identity adapters, head weight ~ N(0, 0.02), head bias 0, baseline copies of the
        backbone tensors. Float32 on the CPU."""
        cfg, D = self.config, self.backbone.dim
        kernel = cfg.kernel if cfg.method == "st-adapter" else None
        out: AdapterSet = {}
        for i, pos in self.slots():
            for name, t in init_adapter_tensors(D, cfg.width, kernel, generator).items():
                out[f"adapters.{i}.{pos}.{name}"] = t
        params = dict(self.backbone.named_parameters())
        for name in self.trainable_backbone_names():
            out[f"backbone.{name}"] = params[name].detach().to("cpu", torch.float32).clone()
        out["head.weight"] = torch.randn(cfg.num_classes, D, generator=generator) * cfg.head_init_std
        out["head.bias"] = torch.zeros(cfg.num_classes)
        return out

    # -- binding -----------------------------------------------------------------------------------
    def bind(self, tensors: Mapping[str, Tensor]) -> None:
        """Make ``tensors`` the active adapter set. Checks every key and shape first; copies nothing."""
        check_adapter_set(self.expected_shapes(), tensors)
        self._bound = tensors
        self._slots, self._overrides = split_adapter_set(tensors)

    @property
    def bound(self) -> Mapping[str, Tensor] | None:
        return self._bound

    # -- forward -----------------------------------------------------------------------------------
    def check_clips(self, clips: Tensor) -> None:
        if not isinstance(clips, Tensor) or clips.dim() != 5:
            shape = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
            raise InputError(f"clips must be a tensor (B, T, 3, H, W), got {shape}")
        _, frames, channels, height, width = clips.shape
        if frames != self.num_frames:
            raise InputError(f"clips have {frames} frames, the model expects {self.num_frames}")
        if channels != 3 or (height, width) != tuple(self.backbone.image_size):
            raise InputError(f"frames must be 3 x {self.backbone.image_size[0]} x {self.backbone.image_size[1]}, "
                             f"got {channels} x {height} x {width}")
        if not clips.is_floating_point():
            raise InputError(f"clips must be normalised floating-point tensors, got {clips.dtype}")

    def frame_tokens(self, clips: Tensor, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        """(B, T, 3, H, W) -> tokens after the last block, (B, T, P + HW, C)."""
        self.check_clips(clips)
        slots, overrides = self._resolve(tensors)
        B, T = clips.shape[:2]
        param = next(self.backbone.parameters())
        images = clips.reshape(B * T, *clips.shape[2:]).to(param.device, param.dtype)
        bb, act = self.backbone, self.config.act

        def hook(i: int, pos: str, x: Tensor) -> Tensor:
            w = slots.get((i, pos))
            return x if w is None else st_adapter(x, w, T, bb.grid, bb.num_prefix, act)

        ctx = swapped_parameters(bb, overrides) if overrides else contextlib.nullcontext()
        with ctx:
            tokens = bb(images, hook if slots else None)  # (B*T, P + HW, C)
        return tokens.reshape(B, T, *tokens.shape[1:])

    def features(self, clips: Tensor, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        """Pooled clip features after the final norm, (B, C), in float32: what the head reads."""
        tokens = self.frame_tokens(clips, tensors)  # (B, T, L, C)
        _, overrides = self._resolve(tensors)
        return clip_features(self.backbone, tokens, self.config.pool, overrides)

    def forward(self, clips: Tensor, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        """(B, T, 3, H, W) -> logits (B, num_classes), float32."""
        t = self._bound if tensors is None else tensors
        feats = F.dropout(self.features(clips, tensors), self.config.dropout, self.training)
        assert t is not None  # features() refused a call with no set bound and none passed
        return head_logits(feats, t)

    def _resolve(self, tensors: Mapping[str, Tensor] | None) -> tuple[SlotTensors, dict[str, Tensor]]:
        if tensors is None:
            if self._bound is None:
                raise AdapterSetError("no adapter set is bound: call bind() or pass tensors")
            return self._slots, self._overrides
        return split_adapter_set(tensors)


def split_adapter_set(tensors: Mapping[str, Tensor]) -> tuple[SlotTensors, dict[str, Tensor]]:
    """Group a flat set into per-slot dicts and backbone overrides (references, no copies)."""
    slots: SlotTensors = {}
    overrides: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("adapters."):
            _, block, pos, rest = key.split(".", 3)
            slots.setdefault((int(block), pos), {})[rest] = t
        elif key.startswith("backbone."):
            overrides[key[len("backbone."):]] = t
    return slots, overrides


def check_adapter_set(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Tensor]) -> None:
    """Raise AdapterSetError naming every missing, unexpected, mis-shaped or non-float tensor."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected "
                        f"({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
    for key in sorted(set(expected) & set(tensors)):
        t = tensors[key]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            problems.append(f"{key} is not a floating-point tensor")
        elif tuple(t.shape) != tuple(expected[key]):
            problems.append(f"{key} has shape {tuple(t.shape)}, expected {tuple(expected[key])}")
    if problems:
        raise AdapterSetError("adapter set does not fit the model: " + "; ".join(problems))


def count_parameters(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())
