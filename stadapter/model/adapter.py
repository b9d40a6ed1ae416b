"""The ST-Adapter (Pan, Lin et al., NeurIPS 2022): ``x + fc2(act(dwconv3d(fc1(x))))`` on patch tokens.

The paper's Eq. 2 is ``X + f(DWConv3D(X W_down)) W_up``; the official code uses no f (identity), which is the
default here.

Adapter weights are data: :func:`adapter_delta` is a pure function of the tokens and a dict of tensors, and it
is the one place the adapter's maths lives. Training (:func:`st_adapter`, :class:`STAdapter`), the inference
engine (each task's delta added into its own rows of one batch) and the compiled bank (weights gathered per
clip by slot index) all call it. Its weights are either shared by every clip (``fc1.weight`` (r, C),
``conv.weight`` (r, 1, kT, kH, kW), ...) or stacked one per clip (``fc1.weight`` (N, r, C), ``conv.weight``
(N, r, 1, kT, 1, 1), ...); the functions broadcast over both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stadapter.config import ACTIVATIONS


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


# One function for each name in config.ACTIVATIONS (the torch-free list configs are checked against).
_ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda x: x,
    "gelu": F.gelu,
    "relu": F.relu,
    "quick_gelu": _quick_gelu,
}


def activation_function(name: str) -> Callable[[Tensor], Tensor]:
    """The function behind an activation name of :data:`stadapter.config.ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return _ACTIVATION_FUNCTIONS[name]


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


def temporal_only(tensors: Mapping[str, Tensor]) -> bool:
    """Whether the adapter's conv mixes time alone (kernel (kT, 1, 1)) or there is no conv: then its taps run
    over any rows of a frame, and the prefix tokens may ride along with the patches."""
    w = tensors.get("conv.weight")
    return w is None or tuple(w.shape[-2:]) == (1, 1)


def temporal_taps(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A depth-wise conv over time alone on h (B, T, L, r): kT per-channel taps, zero padding kT // 2.

    ``weight`` (r, kT) and ``bias`` (r,) are shared by every clip; ``weight`` (B, r, kT) and ``bias`` (B, r)
    hold one per clip. The taps are written with ``addcmul`` into one new buffer (no padded copy, no
    temporaries, nothing written into ``h``): exact, accepted by autograd and torch.compile, and clear of the
    cuDNN fp16/bf16 Conv3d bugs (pytorch #40275, #163539).
    """
    T = h.shape[1]
    w, b = weight.to(h.dtype), bias.to(h.dtype)
    if w.dim() == 3:  # one per clip: (B, r, kT) -> (B, 1, 1, r, kT), broadcast over frames and tokens
        w, b = w[:, None, None], b[:, None, None]
    kT = w.shape[-1]
    pad = kT // 2
    out = torch.addcmul(b, h, w[..., pad])  # (B, T, L, r): the bias and the centre tap
    for k in range(kT):
        s = k - pad  # tap k reads frame t + s (zero padding outside the clip)
        if s < 0 and T + s > 0:
            out[:, -s:].addcmul_(h[:, :T + s], w[..., k])
        elif s > 0 and T - s > 0:
            out[:, :T - s].addcmul_(h[:, s:], w[..., k])
    return out


def depthwise_conv3d(x: Tensor, weight: Tensor, bias: Tensor, grid: tuple[int, int]) -> Tensor:
    """Depth-wise 3D conv over (time, height, width), zero padding k // 2, on tokens laid out (B, T, HW, r).

    A temporal-only kernel (kT, 1, 1) runs as :func:`temporal_taps` (no permute, clear of the cuDNN fp16/bf16
    Conv3d bugs). Other kernels use F.conv3d with groups=r and take shared weights only.
    """
    B, T, HW, r = x.shape
    kT, kH, kW = weight.shape[-3:]
    if kH == 1 and kW == 1:
        return temporal_taps(x, weight[..., 0, :, 0, 0], bias)  # (..., r, kT)
    if weight.dim() != 5:
        raise ValueError(f"a spatial kernel takes one weight (r, 1, kT, kH, kW), got {tuple(weight.shape)}")
    H, W = grid
    v = x.reshape(B, T, H, W, r).permute(0, 4, 1, 2, 3)  # (B, r, T, H, W)
    y = F.conv3d(v, weight.to(x.dtype), bias.to(x.dtype), padding=(kT // 2, kH // 2, kW // 2), groups=r)
    return y.permute(0, 2, 3, 4, 1).reshape(B, T, HW, r)


def _linear(x: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """x (B*T, L, in) -> (B*T, L, out), with one weight (out, in) for every clip or one per clip (B, out, in)."""
    weight, bias = weight.to(dtype), bias.to(dtype)
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    B = weight.shape[0]
    y = torch.baddbmm(bias[:, None, :], x.reshape(B, -1, x.shape[-1]), weight.transpose(1, 2))  # (B, T*L, out)
    return y.reshape(*x.shape[:-1], -1)


def adapter_delta(x: Tensor, tensors: Mapping[str, Tensor], num_frames: int, num_prefix: int = 1,
                  activation: str = "none", grid: tuple[int, int] | None = None) -> Tensor:
    """x (B*T, P + HW, C) -> what the adapter adds to it, (B*T, P + HW, C), zero on the P prefix rows.

    Computed for few passes over memory: fc1 runs on every row of the (contiguous) input, prefix rows
    included, so no copy of a non-contiguous patch slice is made (1/L more multiply-adds); a temporal kernel's
    taps run over those rows too (they are dropped at the end); zeroing fc2's prefix rows lets a caller add the
    delta in one pass, or add each task's delta into its own rows of one batch. A spatial kernel convolves the
    patch rows on their ``grid`` (needed then) and keeps the prefix rows as they are.
    """
    BT, L, _ = x.shape
    h = _linear(x, tensors["fc1.weight"], tensors["fc1.bias"], x.dtype)  # (B*T, L, r)
    conv = tensors.get("conv.weight")
    if conv is not None:
        h4 = h.reshape(BT // num_frames, num_frames, L, -1)  # (B, T, L, r)
        if temporal_only(tensors):
            h4 = temporal_taps(h4, conv[..., 0, :, 0, 0], tensors["conv.bias"])
        else:
            if grid is None:
                raise ValueError("a spatial conv kernel needs the patch grid")
            patches = depthwise_conv3d(h4[:, :, num_prefix:], conv, tensors["conv.bias"], grid)
            h4 = torch.cat([h4[:, :, :num_prefix], patches], dim=2) if num_prefix else patches
        h = h4.reshape(BT, L, -1)
    h = activation_function(activation)(h)  # Eq. 2: f(DWConv3D(X W_down)); Eq. 1: f(X W_down)
    delta = _linear(h, tensors["fc2.weight"], tensors["fc2.bias"], x.dtype)  # (B*T, L, C)
    if num_prefix:
        delta[:, :num_prefix] = 0
    return delta


def st_adapter(x: Tensor, tensors: Mapping[str, Tensor], num_frames: int, grid: tuple[int, int],
               num_prefix: int = 1, activation: str = "none") -> Tensor:
    """Apply one adapter to a block's input tokens.

    x: (B*T, P + H*W, C) with P prefix tokens (the CLS token, registers) first. The prefix tokens bypass the
    whole adapter (the official code feeds only patch tokens to fc1 and adds the residual to them alone; so
    does this function, which is what training and the FLOP count see). Returns a new tensor; nothing is
    written in place. Without ``conv.weight`` in ``tensors`` this is the plain bottleneck adapter of the
    paper's Eq. 1.
    """
    rows, length, _ = x.shape
    if length != num_prefix + grid[0] * grid[1] or rows % num_frames:
        raise ValueError(f"tokens {tuple(x.shape)} do not fit {num_frames} frames of a {grid} grid "
                         f"with {num_prefix} prefix tokens")
    patches = x[:, num_prefix:]  # (B*T, HW, C)
    delta = adapter_delta(patches, tensors, num_frames, 0, activation, grid)
    return torch.cat([x[:, :num_prefix], patches + delta], dim=1)


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
        activation_function(activation)  # refuses an unknown name
        self.activation = activation
        self.num_prefix = num_prefix
        self.fc1 = nn.Linear(dim, width)
        padding = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
        self.conv = nn.Conv3d(width, width, kernel, padding=padding, groups=width)
        self.fc2 = nn.Linear(width, dim)
        for name, value in init_adapter_tensors(dim, width, kernel).items():
            self.get_parameter(name).data.copy_(value)

    def forward(self, x: Tensor, num_frames: int, grid: tuple[int, int]) -> Tensor:
        tensors = dict(self.named_parameters())
        return st_adapter(x, tensors, num_frames, grid, self.num_prefix, self.activation)
