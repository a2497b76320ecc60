"""LLM-Drop redundancy scores: pure functions over activations, and the plain result type.

A module is redundant when its output is nearly its input: the score of a sub-layer is the mean over
calibration tokens of cos(residual before, residual after). Sums are float64 running sums over tokens, so
no token's hidden state is kept beyond the batch that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.errors import DataError
from prunekit.plans import similarity_fields


def token_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token dot products, [tokens], computed in (at least) float32 by one fused kernel.

    The same kernel on equal values gives equal results, which the exact-identity property below
    relies on."""
    a32 = a.reshape(-1, a.shape[-1]).float()
    b32 = b.reshape(-1, b.shape[-1]).float()
    return torch.linalg.vecdot(a32, b32, dim=-1)


def cosines(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine, float64, from dot products and squared norms.

    Computed as a.b / sqrt(|a|^2 |b|^2): when a == b the dot product equals both squared norms and
    sqrt(s*s) == s in IEEE arithmetic, so a planted identity module scores exactly 1.0. Two zero vectors
    are identical (cos 1); a zero vector against a non-zero one shares nothing (cos 0)."""
    dot, sq_a, sq_b = dot.double(), sq_a.double(), sq_b.double()
    denom = torch.sqrt(sq_a * sq_b)
    degenerate = ((sq_a == 0) & (sq_b == 0)).double()
    return torch.where(denom > 0, dot / denom.clamp_min(1e-300), degenerate)


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    """float64 sum over tokens, skipping tokens where `mask` is 0 (padding)."""
    if mask is not None:
        values = values * mask.reshape(-1).to(values.dtype)
    return float(values.double().sum())


def unit_rows(h: torch.Tensor, mask: torch.Tensor | None, sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens of `h` scaled to unit length, flattened to [tokens * hidden], pad tokens zeroed: the dot
    product of two such vectors is the sum over tokens of their cosines."""
    flat = h.reshape(-1, h.shape[-1]).float()
    sq = token_dot(flat, flat) if sq_norm is None else sq_norm
    scale = torch.rsqrt(sq.clamp_min(1e-24))
    if mask is not None:
        scale = scale * mask.reshape(-1).to(scale.dtype)
    return (flat * scale[:, None]).reshape(-1)


def pairwise_sums(units: list[torch.Tensor]) -> torch.Tensor:
    """[S, S] float64 matrix of sums over tokens of cos(h_i, h_j) from `unit_rows` vectors (one matmul)."""
    stacked = torch.stack(units)
    return (stacked @ stacked.T).to(torch.float64).cpu()


@dataclass
class SimilarityScores:
    """Per-layer LLM-Drop scores: mean cosine similarity of the residual stream before/after each module.

    `pairwise[i][j]` (optional) is the mean cos(h_i, h_j) between the inputs of layers i and j (index L is
    the last layer's output): Block Drop of the consecutive run i..i+n-1 removes what lies between h_i and
    h_{i+n}."""

    block: list[float]
    attn: list[float]
    mlp: list[float]
    tokens: int
    pairwise: list[list[float]] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.block)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layers": [
                {"index": i, "block": self.block[i], "attn": self.attn[i], "mlp": self.mlp[i]}
                for i in range(self.num_layers)
            ],
            "tokens": self.tokens,
            "calibration": self.calibration,
        }
        if self.pairwise is not None:
            out["pairwise"] = self.pairwise
        return out

    @classmethod
    def from_json(cls, data: Any) -> "SimilarityScores":
        """Scores as `to_json` writes them; anything else raises one `PlanError` naming the bad field."""
        return cls(**similarity_fields(data))


class SimilarityAccumulator:
    """Running float64 sums for every layer; `update_layer` is fed one batch of one layer at a time."""

    def __init__(self, num_layers: int, pairwise: bool):
        self.num_layers = num_layers
        self.block = torch.zeros(num_layers, dtype=torch.float64)
        self.attn = torch.zeros(num_layers, dtype=torch.float64)
        self.mlp = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)
        self.pair = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64) if pairwise else None

    def reset_from(self, layer: int) -> None:
        """Forget layers >= `layer` (they are about to be re-run); the pairwise matrix cannot be partly
        re-run since it needs the states of earlier layers, so it is dropped."""
        for t in (self.block, self.attn, self.mlp, self.tokens):
            t[layer:] = 0
        self.pair = None

    def update_layer(self, i: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """Add one batch of layer i; returns |h_out|^2 per token (reusable for pairwise statistics)."""
        sq_in, sq_mid, sq_out = token_dot(h_in, h_in), token_dot(h_mid, h_mid), token_dot(h_out, h_out)
        self.attn[i] += masked_sum(cosines(token_dot(h_in, h_mid), sq_in, sq_mid), mask)
        self.mlp[i] += masked_sum(cosines(token_dot(h_mid, h_out), sq_mid, sq_out), mask)
        self.block[i] += masked_sum(cosines(token_dot(h_in, h_out), sq_in, sq_out), mask)
        self.tokens[i] += float(mask.sum()) if mask is not None else h_in.shape[0] * h_in.shape[1]
        return sq_out

    def update_pairwise(self, units: list[torch.Tensor]) -> None:
        if self.pair is not None:
            self.pair += pairwise_sums(units)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The float64 sums by name (what the score cache and the resume progress file store)."""
        out = {"block": self.block, "attn": self.attn, "mlp": self.mlp, "tokens": self.tokens}
        if self.pair is not None:
            out["pair"] = self.pair
        return {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SimilarityAccumulator":
        acc = cls(int(tensors["block"].shape[0]), "pair" in tensors)
        for name in ("block", "attn", "mlp", "tokens", "pair"):
            if name in tensors:
                getattr(acc, name).copy_(tensors[name])
        return acc

    def result(self, calibration: dict[str, Any] | None = None) -> SimilarityScores:
        if bool((self.tokens == 0).any()):
            raise DataError("some layers saw no calibration tokens (all padding?); use longer calibration text")
        n = self.tokens
        pair = None
        if self.pair is not None:
            pair = (self.pair / n[0]).tolist()
        return SimilarityScores(
            block=(self.block / n).tolist(),
            attn=(self.attn / n).tolist(),
            mlp=(self.mlp / n).tolist(),
            tokens=int(n[0]),
            pairwise=pair,
            calibration=dict(calibration or {}),
        )
