"""LLM-Drop end to end: score, choose (one-shot or iteratively), and build the plan.

Iterative dropping removes the single most redundant module, re-scores, and repeats. Because removing
a module at layer j leaves layers < j untouched, each re-score re-runs only layers j.. from the layer
inputs the runner remembered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.drop.choose import TARGETS, Target, available_modules, candidates, check_n, plan_drops
from prunekit.drop.loss import LossSearch
from prunekit.drop.scorer import SimilarityScorer
from prunekit.drop.similarity import SimilarityScores
from prunekit.engine.sources import LayerSource
from prunekit.errors import PlanError
from prunekit.losses import KL_TOPK
from prunekit.plans import DropTarget, PruningPlan, normalize_drops
from prunekit.surgery import apply_plan, mark_drops

CRITERIA: tuple[str, ...] = ("cosine", "loss", "kl")


def model_info(adapter: ModelAdapter, source: str | None = None) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "source": source,
        "model_type": adapter.model.config.model_type,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)),
        "intermediate_size": int(cfg.intermediate_size),
    }


def score_model(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *, batch_size: int = 4,
                pairwise: bool = True, progress: bool = True) -> SimilarityScores:
    """LLM-Drop similarity scores of every layer from one calibration pass."""
    return SimilarityScorer(model, calib, adapter=adapter, batch_size=batch_size, pairwise=pairwise, rescore=False,
                            progress=progress).score()


def llm_drop(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, **options: Any) -> PruningPlan:
    """Choose what to drop (`choose_drops`, same options) and drop it (`surgery.apply_plan`): `model` is pruned
    in place when this returns, and the returned plan rebuilds the same model from a fresh copy of the
    original."""
    plan = choose_drops(model, adapter, calib, **options)
    apply_plan(adapter, plan)
    return plan


def choose_drops(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *, target: Target, n: int,
                 consecutive: bool = False, iterative: bool = False, batch_size: int = 4, progress: bool = True,
                 source: str | None = None, make_scorer: Callable[[bool, bool], Any] | None = None,
                 criterion: str = "cosine", prefilter: int | None = 8, layers: LayerSource | None = None,
                 work_dir: Path | None = None) -> PruningPlan:
    """The LLM-Drop plan for `model`: what to drop, chosen by redundancy. The model keeps all its layers; an
    iterative choice leaves the chosen sub-layers replaced by stand-ins (each re-score sees the model
    without them), which `surgery.apply_plan` then completes.

    `make_scorer(pairwise, rescore)` builds the scorer (anything with `score(start_layer=0)`, like
    `SimilarityScorer`): the layer-streamed, cached and data-parallel scorers plug in here; default: an
    in-memory `SimilarityScorer` over `model`.

    `criterion="loss"` / `"kl"`: choose module by module by the measured calibration loss, or the KL
    divergence from the dense model's next-token distributions (`drop.loss`), among the
    `prefilter` most redundant modules by cosine at each step (None: all). `layers`: the layer source the
    search runs over (a streamed model's; default the model in memory), `work_dir`: where it keeps every
    layer's calibration inputs (default RAM)."""
    _check_options(model, adapter, target, n, consecutive, iterative, criterion, layers)
    info = model_info(adapter, source)
    if make_scorer is not None:
        scorer = make_scorer(consecutive or not iterative, iterative)
    else:
        scorer = SimilarityScorer(model, calib, adapter=adapter, batch_size=batch_size,
                                  pairwise=consecutive or not iterative, rescore=iterative, progress=progress)
    scores = scorer.score()
    history: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if criterion != "cosine":
        search = LossSearch(layers if layers is not None else model, adapter, calib, batch_size=batch_size,
                            criterion=criterion, progress=progress, work_dir=work_dir)
        dropped, history = search.run(scores, target, n, prefilter=prefilter)
        dropped = normalize_drops(dropped)
        extra = {"criterion": criterion, "prefilter": prefilter, "forward_passes": round(search.passes, 2)}
        if criterion == "kl":
            extra["kl_topk"] = KL_TOPK
    elif not iterative:
        dropped = plan_drops(scores, target, n, consecutive=consecutive)
    else:
        dropped, history = _iterative(scorer, scores, adapter, target, n)
    plan = _plan(dropped, scores, calib, info, target=target, n=n, consecutive=consecutive, iterative=iterative,
                 batch_size=batch_size, history=history)
    plan.options.update(extra)
    return plan


def _check_options(model: nn.Module, adapter: ModelAdapter, target: Target, n: int, consecutive: bool,
                   iterative: bool, criterion: str, layers: LayerSource | None) -> None:
    """`PlanError` for options that cannot go together or an `n` the model cannot give, before any scoring."""
    if criterion not in CRITERIA:
        raise PlanError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion != "cosine" and consecutive:
        raise PlanError(f"--consecutive picks one run of blocks by cosine; it cannot be combined with --criterion "
                        f"{criterion}")
    if criterion != "cosine" and layers is None and any(p.is_meta for p in model.parameters()):
        raise PlanError(f"--criterion {criterion} on a streamed model needs its layer source (layers=)")
    if target not in TARGETS:
        raise PlanError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    L = adapter.num_layers
    check_n(target, n, available_modules(target, L), L)
    if iterative and consecutive:
        raise PlanError("--consecutive picks one run of blocks at once; it cannot be combined with --iterative")


def _iterative(scorer: Any, scores: Any, adapter: ModelAdapter, target: Target,
               n: int) -> tuple[list[DropTarget], list[dict[str, Any]]]:
    """One module at a time: drop the most redundant, then re-score from its layer on (the layers before it
    see the same inputs as before, so their scores stand)."""
    chosen: set[DropTarget] = set()
    history: list[dict[str, Any]] = []
    current = scores
    for step in range(n):
        score, pick = candidates(current, target, exclude=chosen)[0]
        history.append({"step": step, "layer": pick.layer, "module": pick.module, "score": score})
        chosen.add(pick)
        mark_drops(adapter, [pick])
        if step + 1 < n:
            current = scorer.score(start_layer=pick.layer)
    return normalize_drops(sorted(chosen)), history


def plan_from_scores(scores: SimilarityScores, adapter: ModelAdapter, calib: CalibrationData, *, target: Target,
                     n: int, consecutive: bool = False, batch_size: int = 4, source: str | None = None) -> PruningPlan:
    """The one-shot `llm_drop` plan from scores already computed (several `n` from one scoring pass); the
    model is not touched."""
    dropped = plan_drops(scores, target, n, consecutive=consecutive)
    return _plan(dropped, scores, calib, model_info(adapter, source), target=target, n=n, consecutive=consecutive,
                 iterative=False, batch_size=batch_size, history=[])


def _plan(dropped: list[DropTarget], scores: SimilarityScores, calib: CalibrationData, info: dict[str, Any], *,
          target: str, n: int, consecutive: bool, iterative: bool, batch_size: int,
          history: list[dict[str, Any]]) -> PruningPlan:
    options = {"target": target, "n": n, "consecutive": consecutive, "iterative": iterative,
               "batch_size": batch_size}
    return PruningPlan(dropped=dropped, method=f"llm-drop/{target}", options=options, scores=scores.to_json(),
                       history=history, calibration=calib.describe(), model=info)
