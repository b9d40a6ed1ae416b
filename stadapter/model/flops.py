"""Multiply-accumulate counts from a real forward pass (torch's FlopCounterMode), reported as GMACs.

fvcore, which the paper used, counts one multiply-add as one FLOP; torch counts two, so GMACs = FLOPs / 2.
Two gaps in torch's counter are closed here: the CPU attention kernel is given sdpa's formula, and
nn.MultiheadAttention's fused inference fast path (whose projections the counter cannot see) is turned off
while counting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

Shape = tuple[int, ...]


def _cpu_sdpa_flop(query_shape: Shape, key_shape: Shape, value_shape: Shape, *args: Any,
                   out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    ops: dict[Any, Callable[..., int]] = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = _cpu_sdpa_flop
    return ops


def count_gmacs(module: nn.Module, *args: Any, **kwargs: Any) -> float:
    """GMACs of one forward ``module(*args, **kwargs)`` under no_grad."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    was_fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            module(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(was_fast)
    return counter.get_total_flops() / 2e9
