"""Read a checkpoint of the authors' code (linziyi96/st-adapter) and map it onto an adapter set, key by key.

The official ``checkpoint-N.pth`` is ``{model, optimizer, lr_sched, loss_scaler, next_epoch}``; ``model`` holds
only the trainable tensors of ``models_adapter.VisionTransformer``:

    transformer.resblocks.{i}.adapter_pre_attn.{fc1,conv,fc2}.{weight,bias}   before MHSA   -> adapters.{i}.attn.*
    transformer.resblocks.{i}.adapter_pre_mlp.{fc1,conv,fc2}.{weight,bias}    before the MLP -> adapters.{i}.mlp.*
    fc.weight, fc.bias                                                        the head       -> head.weight, head.bias

fc1 (r, D), conv (r, 1, kT, kH, kW) depth-wise with padding k // 2, fc2 (D, r); no activation between the conv
and fc2; the CLS token bypasses the adapter. That is :func:`stadapter.model.adapter.st_adapter` with
``activation="none"`` exactly, so the tensors are copied as they are. The file is read with
``torch.load(weights_only=True)``: no object is ever unpickled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from stadapter.errors import AdapterSetError, InputError

POSITION_OF = {"adapter_pre_attn": "attn", "adapter_pre_mlp": "mlp"}
OFFICIAL_OF = {v: k for k, v in POSITION_OF.items()}
_ADAPTER_KEY = re.compile(r"transformer\.resblocks\.(\d{1,4})\.(adapter_pre_attn|adapter_pre_mlp)\."
                          r"(fc1|conv|fc2)\.(weight|bias)")
HEAD_KEYS = {"fc.weight": "head.weight", "fc.bias": "head.bias"}
MAX_CHECKPOINT_BYTES = 4 << 30  # the official files are ~300 MB with the optimizer state
MAX_KEY_CHARS = 200  # official keys are under 60 characters


@dataclass(frozen=True)
class OfficialLayout:
    """What the keys of an official checkpoint say: the adapter positions, the blocks that carry adapters,
    the token width D, the adapter width r, the conv kernel and the number of classes."""

    positions: tuple[str, ...]
    blocks: tuple[int, ...]
    dim: int
    width: int
    kernel: tuple[int, int, int]
    num_classes: int

    def describe(self) -> str:
        where = " and ".join({"attn": "before MHSA", "mlp": "before the MLP"}[p] for p in self.positions)
        return (f"{len(self.blocks) * len(self.positions)}x{self.width} (blocks {self.blocks[0]}-{self.blocks[-1]}, "
                f"{where}), kernel {self.kernel}, D={self.dim}, {self.num_classes} classes")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key an official checkpoint of this layout holds, with its shape."""
        r, D = self.width, self.dim
        per = {"fc1.weight": (r, D), "fc1.bias": (r,), "conv.weight": (r, 1, *self.kernel), "conv.bias": (r,),
               "fc2.weight": (D, r), "fc2.bias": (D,)}
        out = {f"transformer.resblocks.{i}.{OFFICIAL_OF[p]}.{n}": s
               for i in self.blocks for p in self.positions for n, s in per.items()}
        out["fc.weight"] = (self.num_classes, D)
        out["fc.bias"] = (self.num_classes,)
        return out


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """The model tensors of an official checkpoint: the training dict's ``model`` entry, or a bare state dict.

    Refused with one line naming the file: not a file, too large, not a plain tensor file (anything
    ``weights_only`` refuses, such as a pickled object), no model dict, or a value that is not a tensor."""
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise InputError(f"checkpoint {path} is over {MAX_CHECKPOINT_BYTES >> 30} GiB; not an ST-Adapter checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = _load_error(e)
        raise InputError(f"checkpoint {path} is not a plain tensor file (read with weights_only=True, no objects "
                         f"unpickled): {why[:300]}") from e
    if isinstance(data, dict) and "model" in data:
        data = data["model"]
    if not isinstance(data, dict) or not data:
        raise InputError(f"checkpoint {path} holds no state dict (expected the training dict with 'model', or "
                         f"a dict of tensors)")
    declared = 0
    for key, value in data.items():
        if not isinstance(key, str):
            raise InputError(f"checkpoint {path}: key {key!r} is not a string")
        if not key.isprintable() or len(key) > MAX_KEY_CHARS:
            raise InputError(f"checkpoint {path}: key {key[:MAX_KEY_CHARS]!r} is not an official key")
        if not isinstance(value, Tensor):
            raise InputError(f"checkpoint {path}: {key} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.device.type != "cpu":
            raise InputError(f"checkpoint {path}: {key} is a {value.layout} tensor on {value.device}, not a dense "
                             f"tensor of stored values")
        declared += value.numel() * value.element_size()
    if declared > path.stat().st_size:  # a stride-0 (expanded) tensor declares more values than the file holds
        raise InputError(f"checkpoint {path}: its tensors declare {declared:,} bytes of values, more than the "
                         f"file's {path.stat().st_size:,} bytes")
    return data


def _load_error(e: BaseException) -> str:
    """The useful line of torch.load's error (never its advice to retry with weights_only=False)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        first = rest.splitlines()[0].strip() if rest else ""
        return first.split(" was not an allowed global")[0].replace("GLOBAL ", "") or "not a tensor file"
    if text.startswith("Weights only load failed"):  # the reason sits in the paragraph after torch's advice
        lines = [ln.strip() for ln in text.split("\n\n")[1:] if ln.strip()]
        return (lines[0].splitlines()[0] if lines else "not a tensor file").replace("GLOBAL ", "")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:300]


def infer_layout(state: dict[str, Tensor]) -> OfficialLayout:
    """The layout the keys and shapes describe. Refuses (AdapterSetError naming the key) an unexpected key, a
    missing head, adapters not in the last blocks, or inconsistent widths; :func:`to_adapter_set` then checks
    every key and shape against the layout."""
    blocks: set[int] = set()
    positions: set[str] = set()
    for key in sorted(state):
        m = _ADAPTER_KEY.fullmatch(key)
        if m:
            blocks.add(int(m.group(1)))
            positions.add(POSITION_OF[m.group(2)])
        elif key not in HEAD_KEYS:
            raise AdapterSetError(f"unexpected key {key} in the checkpoint (an official ST-Adapter checkpoint holds "
                                  f"transformer.resblocks.N.adapter_pre_{{attn,mlp}}.{{fc1,conv,fc2}}.* and fc.*)")
    for key in HEAD_KEYS:
        if key not in state:
            raise AdapterSetError(f"missing key {key} in the checkpoint (the classifier head)")
    if not blocks:
        raise AdapterSetError("the checkpoint holds no adapter (no transformer.resblocks.N.adapter_pre_* key)")
    ordered = tuple(sorted(blocks))
    if ordered != tuple(range(ordered[0], ordered[-1] + 1)):
        gap = next(i for i in range(ordered[0], ordered[-1]) if i not in blocks)
        raise AdapterSetError(f"missing key transformer.resblocks.{gap}.adapter_pre_*: adapters sit in blocks "
                              f"{list(ordered)}, the official code puts them in the last N blocks without gaps")
    pos = tuple(p for p in ("attn", "mlp") if p in positions)
    first = f"transformer.resblocks.{ordered[0]}.{OFFICIAL_OF[pos[0]]}"
    fc1, conv, head = state.get(f"{first}.fc1.weight"), state.get(f"{first}.conv.weight"), state["fc.weight"]
    for key, t, dims in ((f"{first}.fc1.weight", fc1, 2), (f"{first}.conv.weight", conv, 5), ("fc.weight", head, 2)):
        if t is None:
            raise AdapterSetError(f"missing key {key} in the checkpoint")
        if t.dim() != dims:
            raise AdapterSetError(f"{key} has shape {tuple(t.shape)}, expected {dims} dimensions")
    assert fc1 is not None and conv is not None
    kernel = (int(conv.shape[2]), int(conv.shape[3]), int(conv.shape[4]))
    return OfficialLayout(pos, ordered, int(fc1.shape[1]), int(fc1.shape[0]), kernel, int(head.shape[0]))


def to_adapter_set(state: dict[str, Tensor], layout: OfficialLayout) -> dict[str, Tensor]:
    """Every official key renamed to stadapter's layout (``adapters.{i}.{attn|mlp}.*``, ``head.*``), float32.
    A missing, unexpected or mis-shaped key, or a non-float or non-finite tensor, is refused naming it."""
    expected = layout.expected_shapes()
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterSetError(f"missing key {missing[0]}{more} in the checkpoint (layout {layout.describe()})")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise AdapterSetError(f"unexpected key {unexpected[0]} in the checkpoint (layout {layout.describe()})")
    out: dict[str, Tensor] = {}
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise AdapterSetError(f"{key} has shape {tuple(t.shape)}, expected {shape} (layout {layout.describe()})")
        if not t.is_floating_point():
            raise AdapterSetError(f"{key} is {t.dtype}, not a floating-point tensor")
        value = t.detach().to(torch.float32).contiguous()  # isfinite has no float8 kernel: check the copy
        if not bool(torch.isfinite(value).all()):
            raise AdapterSetError(f"{key} holds NaN or infinite values")
        out[rename(key)] = value
    return out


def rename(key: str) -> str:
    """An official key's name in stadapter's adapter-set layout."""
    if key in HEAD_KEYS:
        return HEAD_KEYS[key]
    m = _ADAPTER_KEY.fullmatch(key)
    if m is None:
        raise AdapterSetError(f"unexpected key {key}")
    block, where, module, leaf = m.groups()
    return f"adapters.{int(block)}.{POSITION_OF[where]}.{module}.{leaf}"


__all__ = ["OfficialLayout", "infer_layout", "read_checkpoint", "rename", "to_adapter_set"]
