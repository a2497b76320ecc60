"""What one GGUF file costs llama.cpp per token, read from the file itself (so MLP stand-ins, quantized tensor
sizes and per-layer `deci` widths are counted exactly as the engine sees them).

Two simple models, used as the "ideal" beside measured speed:
- decode is memory-bound: each generated token reads every weight it multiplies with once, plus the KV cache of
  every attention layer up to the current position. For a tied model the token embedding is read in full as
  the output matrix; an untied model reads one embedding row and the whole `output` matrix.
- prefill is compute-bound: 2 FLOPs per weight per prompt token for the decoder's matrices, attention's
  QK^T and PV over the causal triangle (ggml's CPU flash attention skips masked positions), and the output
  matrix for the last prompt token only (llama.cpp computes logits only where they are asked for).
Norms, rope, softmax and activations are left out (well under 1% of either count for these shapes), and every
attention layer is counted as full attention (sliding windows are not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EngineCosts", "engine_costs"]

# llama.cpp's default KV cache type is f16.
KV_BYTES_PER_VALUE = 2


@dataclass(frozen=True)
class EngineCosts:
    """Per-token costs of one GGUF model in llama.cpp."""

    tensor_bytes: int  # every tensor in the file (what stays resident)
    decode_weight_bytes: int  # weight bytes read per generated token
    kv_bytes_per_position: int  # f16 K and V over all attention layers, per cached position
    matmul_params: int  # decoder matrix elements multiplied per token (no embedding, no output matrix)
    output_params: int  # output matrix elements (vocab x hidden)
    attn_head_dims: int  # sum over attention layers of n_head * (key_length + value_length): QK^T and PV

    def decode_bytes(self, position: float) -> float:
        """Bytes read to generate one token with `position` tokens already cached."""
        return self.decode_weight_bytes + self.kv_bytes_per_position * position

    def decode_flops(self, position: float) -> float:
        """FLOPs to generate one token with `position` tokens already cached: the compute-bound counterpart of
        `decode_bytes`, which matters where attention over a long context is arithmetic rather than memory."""
        return 2.0 * (self.matmul_params + self.attn_head_dims * position + self.output_params)

    def prefill_flops(self, n: int) -> float:
        """FLOPs to prefill an n-token prompt (logits for the last token only)."""
        causal_pairs = n * (n + 1) / 2
        return 2.0 * (self.matmul_params * n + self.attn_head_dims * causal_pairs + self.output_params)


def _per_layer(fields: dict[str, Any], key: str, n_layer: int) -> list[int]:
    v = fields[key]
    return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n_layer


def engine_costs(path: str | Path) -> EngineCosts:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arch = fields["general.architecture"]
    n_layer = int(fields[f"{arch}.block_count"])
    n_head = _per_layer(fields, f"{arch}.attention.head_count", n_layer)
    n_kv = _per_layer(fields, f"{arch}.attention.head_count_kv", n_layer)
    k_len, v_len = int(fields[f"{arch}.attention.key_length"]), int(fields[f"{arch}.attention.value_length"])
    tensors = {t.name: t for t in r.tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embd = tensors["token_embd.weight"]
    vocab = int(embd.shape[-1])
    out = tensors.get("output.weight", embd)  # tied: llama.cpp multiplies with token_embd itself
    decode_bytes = total if out is embd else total - int(embd.n_bytes) + int(embd.n_bytes) // vocab
    matmul = sum(int(t.n_elements) for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2)
    return EngineCosts(
        tensor_bytes=total,
        decode_weight_bytes=decode_bytes,
        kv_bytes_per_position=sum(kv * (k_len + v_len) for kv in n_kv) * KV_BYTES_PER_VALUE,
        matmul_params=matmul,
        output_params=int(out.n_elements),
        attn_head_dims=sum(h * (k_len + v_len) for h in n_head),
    )
