"""prunekit: structured pruning of Hugging Face causal LMs (LLM-Drop layer dropping, TransAct width pruning)
with honest measurements.

The public API, importable from the top level (loaded on first use, so `prunekit --help` stays fast)::

    import prunekit
    model, tok = prunekit.load_model("smollm2-135m")
    calib = prunekit.calibration_data(tok, "c4", samples=16, seq_len=512)
    plan = prunekit.llm_drop(model, prunekit.get_adapter(model), calib, target="attn", n=8)  # model pruned
    prunekit.save(model, tok, "pruned/", plan)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "load_model": "prunekit.io.checkpoint",
    "get_adapter": "prunekit.adapters",
    "calibration_data": "prunekit.data",
    "eval_windows": "prunekit.data",
    "llm_drop": "prunekit.drop",
    "score_model": "prunekit.drop",
    "width_prune": "prunekit.width",
    "compress": "prunekit.compress",
    "parse_budget": "prunekit.compress",
    "apply_plan": "prunekit.surgery",
    "count_parameters": "prunekit.surgery",
    "PruningPlan": "prunekit.plans",
    "DropTarget": "prunekit.plans",
    "LayerWidth": "prunekit.plans",
    "save": "prunekit.save",
    "perplexity": "prunekit.evaluation.perplexity",
    "evaluate_tasks": "prunekit.evaluation.zeroshot",
    "recover": "prunekit.recovery",
    "score_job": "prunekit.jobs",
    "drop_job": "prunekit.jobs",
    "width_job": "prunekit.jobs",
    "compress_job": "prunekit.jobs",
    "heal_checkpoint": "prunekit.jobs",
    "ResidentLayers": "prunekit.engine.sources",
    "StreamedLayers": "prunekit.engine.streamed",
    "PrunekitError": "prunekit.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
