"""The adapter-set layout, torch-free: the names of a task's tensors and their shapes for a config.

    adapters.{block}.{attn|mlp}.{fc1,conv,fc2}.{weight,bias}   fc1 (r, D), conv (r, 1, kT, kH, kW), fc2 (D, r)
    head.weight (num_classes, D), head.bias (num_classes,)
    backbone.{name}                                            only for bitfit (biases), partial and full

Used by the model (``video_vit.VideoViT.expected_shapes``, with the backbone known) and by the bundle
validator (``bundle/tensors.py``, from a file's header alone), so both read one layout.
"""

from __future__ import annotations

from collections.abc import Iterable

from stadapter.config import AdapterConfig

TENSOR_NAMES = ("fc1.weight", "fc1.bias", "conv.weight", "conv.bias", "fc2.weight", "fc2.bias")
CONV_NAMES = ("conv.weight", "conv.bias")
BOTTLENECK_NAMES = tuple(n for n in TENSOR_NAMES if n not in CONV_NAMES)  # the plain adapter (no conv)
OVERRIDE_METHODS = ("bitfit", "partial", "full")  # methods whose sets replace backbone tensors
ADAPTER_PREFIX = "adapters."
BACKBONE_PREFIX = "backbone."


def slot_names(adapter: AdapterConfig) -> tuple[str, ...]:
    """The tensor names of one adapter slot: with the depth-wise conv for st-adapter, without for the plain
    bottleneck adapter."""
    return TENSOR_NAMES if adapter.method == "st-adapter" else BOTTLENECK_NAMES


def set_shapes(adapter: AdapterConfig, dim: int, slots: Iterable[tuple[int, str]]) -> dict[str, tuple[int, ...]]:
    """Every adapter and head tensor of a set for ``adapter`` on a backbone of width ``dim`` with adapters in
    ``slots`` ((block, position) pairs), with its shape. Backbone tensors (baselines) are not included."""
    r = adapter.width
    per_slot = {"fc1.weight": (r, dim), "fc1.bias": (r,), "conv.weight": (r, 1, *adapter.kernel), "conv.bias": (r,),
                "fc2.weight": (dim, r), "fc2.bias": (dim,)}
    shapes = {f"{ADAPTER_PREFIX}{block}.{pos}.{name}": per_slot[name]
              for block, pos in slots for name in slot_names(adapter)}
    shapes["head.weight"] = (adapter.num_classes, dim)
    shapes["head.bias"] = (adapter.num_classes,)
    return shapes


__all__ = ["ADAPTER_PREFIX", "BACKBONE_PREFIX", "BOTTLENECK_NAMES", "CONV_NAMES", "OVERRIDE_METHODS",
           "TENSOR_NAMES", "set_shapes", "slot_names"]
