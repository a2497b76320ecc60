"""Sub-layers whose output passes through an RMS norm before the residual add (Gemma 3's post-norms).

Such a sub-layer adds y = s * z / r(z) to the residual stream, z = W x + b the output projection's output,
r(z) = sqrt(mean(z^2) + eps) per token and s the norm's gains: a token's output has a fixed size and is not
linear in W. `compress` linearises it with the rms held at its current value, y ~ (s / r) * z, both where it
estimates the cost of a cut (`stats`: the Fisher of the gradient at z with r held fixed) and where it refits
(`correct`: the dense output's direction matched by z / r).
"""

from __future__ import annotations

import torch
from torch import nn


def eps(norm: nn.Module) -> float:
    """The norm's epsilon, under either name transformers uses."""
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))


def rms(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """sqrt(mean(z^2) + eps) over the last dimension, kept: the divisor of an RMS norm."""
    return (z.pow(2).mean(-1, keepdim=True) + epsilon).sqrt()


def unit(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z / sqrt(mean(z^2) + eps) per token, as an RMS norm divides before its gains (in float32 at least)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z / rms(z, epsilon)


@torch.no_grad()
def gains(norm: nn.Module, width: int) -> torch.Tensor:
    """The norm's per-channel gains s (float32), read by normalising a vector of ones (whose rms is
    sqrt(1 + eps)): whatever parametrises them (Gemma's 1 + weight, Llama's weight), the module says."""
    p = next(norm.parameters(), None)
    ones = torch.ones(width, dtype=torch.float32 if p is None else p.dtype, device=None if p is None else p.device)
    return norm(ones).to(torch.float32) * (1.0 + eps(norm)) ** 0.5
