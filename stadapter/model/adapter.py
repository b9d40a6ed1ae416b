"""The ST-Adapter (Pan, Lin et al., NeurIPS 2022): ``x + fc2(act(dwconv3d(fc1(x))))`` on patch tokens.

The paper's Eq. 2 is ``X + f(DWConv3D(X W_down)) W_up``; the official code uses no f (identity), which is the
default here.

Adapter weights are data: :func:`st_adapter` is a pure function of the tokens and a dict of tensors, so a
runtime can bind any task's tensors per call. :class:`STAdapter` is the same thing as an ``nn.Module`` for
users who want one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": F.gelu,
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}

TENSOR_NAMES = ("fc1.weight", "fc1.bias", "conv.weight", "conv.bias", "fc2.weight", "fc2.bias")
BOTTLENECK_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def init_adapter_tensors(dim: int, width: int, kernel: tuple[int, int, int] | None,
                         generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Fresh adapter tensors, exactly the identity: conv weight/bias and fc biases are zero.

    fc1/fc2 weights get nn.Linear's default init (kaiming-uniform with a=sqrt(5)). ``kernel=None`` gives the
    plain bottleneck adapter (no conv).
    """
    def linear_weight(out_f: int, in_f: int) -> Tensor:
        bound = 1.0 / math.sqrt(in_f)  # what kaiming_uniform_(a=sqrt(5)) gives for nn.Linear
        return (torch.rand(out_f, in_f, generator=generator) * 2 - 1) * bound

    t = {
        "fc1.weight": linear_weight(width, dim),
        "fc1.bias": torch.zeros(width),
        "fc2.weight": linear_weight(dim, width),
        "fc2.bias": torch.zeros(dim),
    }
    if kernel is not None:
        t["conv.weight"] = torch.zeros(width, 1, *kernel)
        t["conv.bias"] = torch.zeros(width)
    return t


def depthwise_conv3d(x: Tensor, weight: Tensor, bias: Tensor, grid: tuple[int, int]) -> Tensor:
    """Depth-wise 3D conv over (time, height, width), zero padding k // 2, on tokens laid out (B, T, HW, r).

    A temporal-only kernel (kT, 1, 1) runs as kT shifted, per-channel multiply-adds (plain broadcasting):
    exact, no permute, and clear of the cuDNN fp16/bf16 Conv3d bugs (pytorch #40275, #163539). Other kernels
    use F.conv3d with groups=r.
    """
    B, T, HW, r = x.shape
    kT, kH, kW = weight.shape[-3:]
    w = weight.to(x.dtype)
    b = bias.to(x.dtype)
    if kH == 1 and kW == 1:
        taps = w.reshape(r, kT)  # (r, kT)
        pad = kT // 2
        xp = F.pad(x, (0, 0, 0, 0, pad, pad))  # (B, T + 2 pad, HW, r)
        out = b.expand(B, T, HW, r)
        for k in range(kT):
            out = out + xp[:, k:k + T] * taps[:, k]
        return out
    H, W = grid
    v = x.reshape(B, T, H, W, r).permute(0, 4, 1, 2, 3)  # (B, r, T, H, W)
    y = F.conv3d(v, w, b, padding=(kT // 2, kH // 2, kW // 2), groups=r)
    return y.permute(0, 2, 3, 4, 1).reshape(B, T, HW, r)


def st_adapter(x: Tensor, tensors: Mapping[str, Tensor], num_frames: int, grid: tuple[int, int],
               num_prefix: int = 1, activation: str = "none") -> Tensor:
    """Apply one adapter to a block's input tokens.

    x: (B*T, P + H*W, C) with P prefix tokens (the CLS token, registers) first. The prefix tokens bypass the
    whole adapter (the official code feeds only patch tokens to fc1 and adds the residual to them alone).
    Returns a new tensor; nothing is written in place. Without ``conv.weight`` in ``tensors`` this is the
    plain bottleneck adapter of the paper's Eq. 1.
    """
    BT, L, C = x.shape
    HW = grid[0] * grid[1]
    if L != num_prefix + HW or BT % num_frames:
        raise ValueError(f"tokens {tuple(x.shape)} do not fit {num_frames} frames of a {grid} grid "
                         f"with {num_prefix} prefix tokens")
    dtype = x.dtype
    patches = x[:, num_prefix:]  # (B*T, HW, C)
    h = F.linear(patches, tensors["fc1.weight"].to(dtype), tensors["fc1.bias"].to(dtype))  # (B*T, HW, r)
    if "conv.weight" in tensors:
        h = h.reshape(BT // num_frames, num_frames, HW, -1)  # (B, T, HW, r)
        h = depthwise_conv3d(h, tensors["conv.weight"], tensors["conv.bias"], grid)
        h = h.reshape(BT, HW, -1)
    h = ACTIVATIONS[activation](h)  # Eq. 2: f(DWConv3D(X W_down)); Eq. 1: f(X W_down)
    h = F.linear(h, tensors["fc2.weight"].to(dtype), tensors["fc2.bias"].to(dtype))  # (B*T, HW, C)
    return torch.cat([x[:, :num_prefix], patches + h], dim=1)


class STAdapter(nn.Module):
    """One ST-Adapter as a module: fc1 (C->r) -> depth-wise Conv3d -> optional activation -> fc2 (r->C).

    The official code (linziyi96/st-adapter) has no activation; the paper's Eq. 2 writes one, f(.), applied to
    the conv's output. The default here is the official one (identity); pass ``activation="gelu"`` for Eq. 2
    as written (the activation then sits between the conv and fc2). At init
    the conv weight and bias and both fc biases are zero, so the adapter is exactly the identity.
    """

    def __init__(self, dim: int, width: int, kernel: tuple[int, int, int] = (3, 1, 1),
                 activation: str = "none", num_prefix: int = 1) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.num_prefix = num_prefix
        self.fc1 = nn.Linear(dim, width)
        self.conv = nn.Conv3d(width, width, kernel, padding=tuple(k // 2 for k in kernel), groups=width)
        self.fc2 = nn.Linear(width, dim)
        for name, value in init_adapter_tensors(dim, width, kernel).items():
            self.get_parameter(name).data.copy_(value)

    def forward(self, x: Tensor, num_frames: int, grid: tuple[int, int]) -> Tensor:
        tensors = dict(self.named_parameters())
        return st_adapter(x, tensors, num_frames, grid, self.num_prefix, self.activation)
