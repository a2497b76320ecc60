"""What `compress`'s search holds in memory: the estimate from shapes alone (checked before any work), and the
memory its input Grams may take at once."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.compress.candidate import CORRECTED
from prunekit.compress.stats import stat_shapes
from prunekit.engine.memory import available_memory_bytes


def memory_estimate(adapter: ModelAdapter, samples: int, seq_len: int) -> dict[str, int]:
    """Bytes the search holds beside the model's weights, from shapes alone (`adapter` may be a meta-device
    skeleton), for `samples` calibration sequences of `seq_len` tokens. `grams`: a float64 input Gram
    [in, in] per sub-layer (at 1.5B parameters, 28 MLPs 8960 wide, 18 GiB; beyond `compress`'s
    `gram_budget_bytes` each layer's wait on disk, so the least needed is the `largest_gram`); `fishers`: a
    float64 [d, d] per sub-layer; `weights`: 1 + `CORRECTED` copies of every output projection (the
    candidate's edits, the best candidates' refitted ones); `logits`: one sequence's float32 logits about
    three times over (logits, log-softmax, a gradient or float copy); `states`: every layer's input for the
    fit part of the calibration data (kept in RAM for a resident model, on disk for a streamed one); `layer`:
    the largest decoder layer's weights and `head`: the final norm's and LM head's (what a streamed model
    holds); `layer_stats`: one layer's Grams and Fishers together, which are summed on the device the layer
    runs on before they go to the CPU."""
    keys = ("grams", "largest_gram", "fishers", "weights", "logits", "states", "layer", "head", "layer_stats")
    out = dict.fromkeys(keys, 0)
    itemsize = adapter.dtype().itemsize
    per_layer: dict[int, int] = {}
    for (i, _), (n_in, n_out) in stat_shapes(adapter).items():
        gram = 8 * n_in ** 2
        out["grams"] += gram
        out["largest_gram"] = max(out["largest_gram"], gram)
        out["fishers"] += 8 * n_out ** 2
        per_layer[i] = per_layer.get(i, 0) + gram + 8 * n_out ** 2
        out["weights"] += (1 + CORRECTED) * itemsize * n_in * n_out
    out["logits"] = 3 * 4 * seq_len * adapter.lm_head().out_features
    fit_samples = samples - max(1, samples // 4)  # `split_check`
    out["states"] = fit_samples * seq_len * adapter.hidden_size * adapter.num_layers * itemsize
    out["layer"] = max((_bytes(layer) for layer in adapter.layers()), default=0)
    out["head"] = _bytes(adapter.lm_head()) + _bytes(adapter.final_norm())
    out["layer_stats"] = max(per_layer.values(), default=0)
    return out


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def gram_budget(total: Callable[[torch.Tensor], torch.Tensor], given: int | None) -> int:
    """`given`, or a quarter of the memory free now; the mean over processes (`total` sums over them), so that
    every rank makes the same choice of spilling (and so the same collective calls)."""
    mine = given if given is not None else available_memory_bytes() // 4
    both = total(torch.tensor([float(mine), 1.0], dtype=torch.float64))
    return int(both[0] / both[1])
