"""conv_block: avgpool2x2(leaky_relu(conv2d(upsample2x(x)))) as one op, the building block of every
ACAI network (SPEC.md section 1).

Reference in plain PyTorch (`conv_block_ref`); the fused Triton kernels come with issue 3.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference")


def conv_block_ref(x, weight, bias, *, upsample_input=False, leaky_slope=0.2, pool_output=False,
                   upcast=False):
    """Plain-PyTorch conv block: (N, Cin, H, W) -> (N, Cout, H', W').

    upsample_input: nearest 2x upsample of x before the conv; leaky_slope: None for no activation;
    pool_output: 2x2 average pool (stride 2) after the activation; upcast: compute in fp32.
    """
    if upcast:
        x, weight, bias = x.float(), weight.float(), bias.float() if bias is not None else None
    if upsample_input:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (N, C, H, W) -> (N, C, 2H, 2W)
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    if leaky_slope is not None:
        y = F.leaky_relu(y, leaky_slope)
    if pool_output:
        y = F.avg_pool2d(y, 2)  # (N, C, H, W) -> (N, C, H/2, W/2)
    return y


def conv_block(x, weight, bias, *, upsample_input=False, leaky_slope=0.2, pool_output=False,
               backend="auto"):
    """The conv block, computed by `backend` ("reference"; "auto" picks the fastest available)."""
    if backend not in BACKENDS:
        raise ValueError(f"conv_block: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return conv_block_ref(x, weight, bias, upsample_input=upsample_input, leaky_slope=leaky_slope,
                          pool_output=pool_output)
