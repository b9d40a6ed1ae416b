"""Frozen image ViT backbones behind one interface (open_clip CLIP towers and timm ViTs).

A backbone is named by a spec string ``library:model[?key=value&...]``:

    open_clip:ViT-B-16                      CLIP ViT-B/16 (the product default)
    open_clip:ViT-L-14-336
    timm:vit_base_patch16_224.augreg_in21k  an ImageNet-21K ViT (the paper's other rows)
    timm:vit_small_patch14_dinov2?img_size=224
    tiny                                    a built-in alias (see ALIASES) for tests and demos

Options after ``?`` override the architecture: open_clip vision-config fields (width, layers, head_width,
patch_size, image_size, quick_gelu) or timm ``create_model`` keyword arguments. This module builds and runs
models; it does no file or network I/O (that is :mod:`stadapter.model.loading`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from stadapter.errors import BackboneError

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block, VisionTransformer

LIBRARIES = ("open_clip", "timm")

# Small random-init backbones that build in well under a second, for tests and offline demos.
ALIASES = {
    "tiny": "open_clip:ViT-B-16?image_size=32&patch_size=8&width=64&layers=2&head_width=32",
    "small": "open_clip:ViT-B-16?image_size=64&patch_size=8&width=192&layers=6&head_width=64",
}

# Hook signature: (block index, position "attn" | "mlp", tokens (B*T, L, C)) -> tokens
AdapterHook = Callable[[int, str, Tensor], Tensor]


def _parse_value(v: str) -> Any:
    for number in (int, float):
        try:
            return number(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


@dataclass(frozen=True)
class BackboneSpec:
    library: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> BackboneSpec:
        text = ALIASES.get(spec.strip(), spec.strip())
        lib, sep, rest = text.partition(":")
        if not sep or lib not in LIBRARIES or not rest:
            raise BackboneError(
                f"unknown backbone {spec!r}: expected 'open_clip:MODEL', 'timm:MODEL' (optionally "
                f"'?key=value&...') or one of the aliases {', '.join(sorted(ALIASES))}")
        name, _, query = rest.partition("?")
        opts: dict[str, Any] = {}
        for part in filter(None, query.split("&")):
            key, eq, value = part.partition("=")
            if not eq or not key:
                raise BackboneError(f"backbone option {part!r} in {spec!r} is not key=value")
            opts[key] = _parse_value(value)
        return cls(lib, name, tuple(sorted(opts.items())))

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options)
        return f"{self.library}:{self.name}" + (f"?{query}" if query else "")


class Backbone(nn.Module):
    """A frozen ViT split into the pieces the video model needs.

    Subclasses expose: ``embed`` (patch + prefix tokens with positions), per-block ``attn_branch`` and
    ``mlp_branch`` (what each residual adds), ``final_norm`` (CLIP's ln_post, timm's norm). ``forward`` runs
    every block with an optional adapter hook before each branch.
    """

    spec: BackboneSpec
    dim: int
    depth: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # set by stadapter.model.loading.load_backbone; absent on a bare build_architecture()

    def __init__(self) -> None:
        super().__init__()
        self._fingerprint: str | None = None

    # -- the pieces -------------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, P + HW, C)
        raise NotImplementedError

    def attn_branch(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mlp_branch(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def final_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def block_prefix(self, i: int) -> str:
        """Parameter-name prefix of block i (for partial fine-tuning)."""
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    def forward(self, images: Tensor, hook: AdapterHook | None = None) -> Tensor:
        """(N, 3, H, W) -> tokens after the last block (N, P + HW, C), adapters applied through ``hook``."""
        x = self.embed(images)
        for i in range(self.depth):
            if hook is not None:
                x = hook(i, "attn", x)
            x = x + self.attn_branch(i, x)
            if hook is not None:
                x = hook(i, "mlp", x)
            x = x + self.mlp_branch(i, x)
        return x

    # -- frozen ------------------------------------------------------------------------------------
    def freeze(self) -> Backbone:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """A frozen backbone stays in eval mode (no dropout, no drop-path) whatever its parent asks."""
        return super().train(False)

    # -- identity ----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over the architecture (canonical spec) and every state-dict tensor (name, dtype, shape,
        bytes, in fp32). Two backbones share a fingerprint only if they compute the same function."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(str(self.spec), self.state_dict())
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"spec": str(self.spec), "dim": self.dim, "depth": self.depth,
                "image_size": list(self.image_size), "patch_size": list(self.patch_size),
                "num_prefix": self.num_prefix, "mean": list(self.mean), "std": list(self.std)}


def state_fingerprint(arch: str, state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"arch": arch}).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(json.dumps([name, list(t.shape)]).encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


class OpenClipBackbone(Backbone):
    """The vision tower of an open_clip CLIP model; CLIP's ``proj`` is dropped (the paper does not use it)."""

    visual: Any  # open_clip.transformer.VisionTransformer (open_clip ships no type hints)

    def __init__(self, spec: BackboneSpec, visual: Any) -> None:
        super().__init__()
        self.spec = spec
        self.visual = visual
        visual.proj = None
        blocks = visual.transformer.resblocks
        if not getattr(visual.transformer, "batch_first", True):
            raise BackboneError(f"{spec}: only batch-first open_clip transformers are supported")
        self.dim = visual.transformer.width
        self.depth = len(blocks)
        self.image_size = tuple(visual.image_size)
        self.patch_size = tuple(visual.patch_size)
        self.num_prefix = 1
        self.mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))

    def embed(self, images: Tensor) -> Tensor:
        return self.visual._embeds(images)  # conv1, CLS, positions, ln_pre

    def attn_branch(self, i: int, x: Tensor) -> Tensor:
        blk = self.visual.transformer.resblocks[i]
        return blk.ls_1(blk.attention(q_x=blk.ln_1(x)))

    def mlp_branch(self, i: int, x: Tensor) -> Tensor:
        blk = self.visual.transformer.resblocks[i]
        return blk.ls_2(blk.mlp(blk.ln_2(x)))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.visual.ln_post(x)

    def block_prefix(self, i: int) -> str:
        return f"visual.transformer.resblocks.{i}."


class TimmBackbone(Backbone):
    """A timm VisionTransformer (classifier head removed)."""

    vit: VisionTransformer

    def __init__(self, spec: BackboneSpec, vit: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise BackboneError(f"{spec}: not a timm VisionTransformer")
        if getattr(vit, "cls_token", None) is None:
            raise BackboneError(f"{spec}: the model has no CLS token, which the ST-Adapter head reads")
        self.vit = vit = cast("VisionTransformer", vit)
        self.dim = vit.embed_dim
        self.depth = len(vit.blocks)
        self.image_size = tuple(vit.patch_embed.img_size)
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.num_prefix = vit.num_prefix_tokens
        cfg = getattr(vit, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    def embed(self, images: Tensor) -> Tensor:
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images))))

    def attn_branch(self, i: int, x: Tensor) -> Tensor:
        blk = cast("Block", self.vit.blocks[i])
        return blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))

    def mlp_branch(self, i: int, x: Tensor) -> Tensor:
        blk = cast("Block", self.vit.blocks[i])
        return blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.vit.norm(x)

    def block_prefix(self, i: int) -> str:
        return f"vit.blocks.{i}."


def build_architecture(spec: BackboneSpec) -> Backbone:
    """The backbone's architecture with random weights (no download). Raises BackboneError if unknown."""
    return build_open_clip(spec) if spec.library == "open_clip" else build_timm(spec)


def build_open_clip(spec: BackboneSpec) -> OpenClipBackbone:
    """An open_clip vision tower with random weights."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    opts = dict(spec.options)
    cfg = open_clip.get_model_config(spec.name)
    if cfg is None:
        raise BackboneError(f"unknown open_clip model {spec.name!r} (see open_clip.list_models())")
    quick_gelu = bool(opts.pop("quick_gelu", cfg.get("quick_gelu", False)))
    vision = dict(cfg["vision_cfg"])
    vision.update(opts)
    try:
        visual = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**vision), quick_gelu=quick_gelu)
    except TypeError as e:
        raise BackboneError(f"bad open_clip option in {spec}: {e}") from e
    if not hasattr(visual, "transformer"):
        raise BackboneError(f"{spec}: not a ViT vision tower")
    return OpenClipBackbone(spec, visual)


def build_timm(spec: BackboneSpec) -> TimmBackbone:
    """A timm VisionTransformer with random weights and no classifier head."""
    import timm

    opts = dict(spec.options)
    if not timm.is_model(spec.name.split(".")[0]):
        raise BackboneError(f"unknown timm model {spec.name!r} (see timm.list_models())")
    try:
        vit = timm.create_model(spec.name, pretrained=False, num_classes=0, **opts)
    except TypeError as e:
        raise BackboneError(f"bad timm option in {spec}: {e}") from e
    return TimmBackbone(spec, vit)


@contextlib.contextmanager
def swapped_parameters(module: nn.Module, overrides: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily replace named parameters of ``module`` by the given tensors (no copy), then restore."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for name, tensor in overrides.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = tensor  # type: ignore[assignment]
        yield
    finally:
        for owner, leaf, old in reversed(saved):
            owner._parameters[leaf] = old
