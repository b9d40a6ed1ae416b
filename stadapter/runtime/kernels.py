"""The ST-Adapter for inference, with fewer passes over memory than :func:`stadapter.model.adapter.st_adapter`.

Same function (equal within float rounding; checked in the tests), computed as a *delta* to add to the tokens:

- fc1 runs on every token of the contiguous input (the prefix tokens' rows are computed and then ignored:
  1/L more multiply-adds, but no copy of the non-contiguous patch slice into a new buffer);
- the temporal conv (kT, 1, 1) is kT per-channel taps written with ``addcmul`` into one buffer (no padded
  copy, no temporaries), which is also clear of the cuDNN fp16/bf16 Conv3d bugs;
- fc2's output rows of the prefix tokens are zeroed, so the caller adds the delta in one pass (and a mixed
  batch adds each task's delta into its own rows of one output buffer, with no concatenation).

Spatial kernels (kH or kW > 1) are not handled here: :func:`fast_path` says so, and callers use st_adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from stadapter.model.adapter import ACTIVATIONS


def fast_path(tensors: Mapping[str, Tensor]) -> bool:
    """Whether :func:`adapter_delta` covers this adapter (no conv, or a temporal-only kernel)."""
    w = tensors.get("conv.weight")
    return w is None or tuple(w.shape[-2:]) == (1, 1)


def adapter_delta(x: Tensor, tensors: Mapping[str, Tensor], num_frames: int, num_prefix: int = 1,
                  activation: str = "none") -> Tensor:
    """x (B*T, P + HW, C) -> what the adapter adds to it, (B*T, P + HW, C), zero on the P prefix rows."""
    BT, L, C = x.shape
    dtype = x.dtype
    h = F.linear(x, tensors["fc1.weight"].to(dtype), tensors["fc1.bias"].to(dtype))  # (B*T, L, r)
    w = tensors.get("conv.weight")
    if w is not None:
        T = num_frames
        r = h.shape[-1]
        h4 = h.view(BT // T, T, L, r)  # (B, T, L, r); the prefix rows ride along and are dropped below
        taps = w.to(dtype).reshape(r, -1)  # (r, kT)
        kT = taps.shape[1]
        pad = kT // 2
        out = torch.addcmul(tensors["conv.bias"].to(dtype), h4, taps[:, pad])  # (B, T, L, r)
        for k in range(kT):
            s = k - pad  # tap k reads frame t + s (zero padding outside the clip)
            if s < 0 and T + s > 0:
                out[:, -s:].addcmul_(h4[:, :T + s], taps[:, k])
            elif s > 0 and T - s > 0:
                out[:, :T - s].addcmul_(h4[:, s:], taps[:, k])
        h = out.view(BT, L, r)
    h = ACTIVATIONS[activation](h)  # as st_adapter: f(DWConv3D(X W_down)) (Eq. 2), f(X W_down) (Eq. 1)
    d = F.linear(h, tensors["fc2.weight"].to(dtype), tensors["fc2.bias"].to(dtype))  # (B*T, L, C)
    d[:, :num_prefix] = 0
    return d


__all__ = ["adapter_delta", "fast_path"]
