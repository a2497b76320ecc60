"""`compress`: the best model for a budget, searched over depth and width together.

1. Statistics on the fit part of the calibration data (`stats`: input Grams and output Fishers).
2. Error curves for every sub-layer (`curves`) and a greedy allocation of the budget (`allocate`) for each
   candidate family: ``mixed`` (widths and drops chosen together), ``depth`` (sub-layer drops only),
   ``width`` (per-layer widths only), ``uniform-width`` (TransAct uniform MLP width), ``near-uniform-width``
   (the same, with some MLPs one step wider so as not to overshoot the budget), each with the refit of
   every cut projection, plus ``mixed`` without refit (the check that refitting helps), ``mixed (OBS order)``
   (units ranked by greedy Optimal Brain Surgeon removal instead of by activation norm), ``mixed`` reached
   in several rounds (the budget spent in steps, statistics re-taken on the partly pruned model in between,
   like iterative pruning; units in the order whose one-shot candidate checked better), ``mixed``, ``width``
   and ``near-uniform-width`` allocated on curves rescaled by measurement (`measure`: every sub-layer cut
   alone on a few fit sequences, its loss increase read), and LLM-Drop's own attention / MLP / block /
   joint plans (cosine-ranked, the fewest drops that meet the budget), which the Fisher estimate can
   misjudge.
3. Every candidate is applied (zeroed units and refitted weights on the full-size model, which gives exactly
   the logits of the physically smaller one) and scored by the calibration loss on the held-out check part
   of the calibration data; the best is kept, and the plan says how it was found. The intermediate rounds
   are points of the quality-vs-budget curve too.
4. The two best candidates' kept output projections are refitted once more, layer by layer, against the
   dense model's residual stream (`correct`: each corrects what the cuts below it changed); each corrected
   model is one more candidate, and the best of all is kept.

Every pass goes through the one layer runner, so the search runs on a model in memory or layer-streamed
alike (`stats` for the backward sweep; candidate edits through `LayerSource.write` / `revert`).

Costs, in forward-pass equivalents over the calibration tokens: a forward, a re-run and a backward (about 4
passes) on the fit part per round, one forward over it for the LLM-Drop candidates' cosine scores, four
over it per error-corrected candidate, one forward on the check part per candidate, and over the probed
sequences one forward plus, per sub-layer, the layers from its own up; the allocation itself is arithmetic.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import ModelAdapter
from prunekit.compress.allocate import allocate, near_uniform_mlp, uniform_mlp
from prunekit.compress.budget import Budget, SublayerCost, dense_total, removal_target, removed, sublayer_costs
from prunekit.compress.correct import Correction, Edits, correct_model
from prunekit.compress.curves import Curve, error_curve, refit, unit_columns
from prunekit.compress.measure import Probe, probe_counts, probe_part, rescaled
from prunekit.compress.stats import CompressStats, Sublayer, collect_stats, grams_bytes, output_projections
from prunekit.data import CalibrationData
from prunekit.drop.choose import TARGETS, plan_drops
from prunekit.drop.scorer import SimilarityScorer
from prunekit.engine.head import LossObserver
from prunekit.engine.memory import available_memory_bytes
from prunekit.engine.runner import LayerRunner
from prunekit.engine.sources import LayerSource, as_source
from prunekit.errors import PlanError
from prunekit.io.outputs import scratch_dir
from prunekit.losses import KL_TOPK, Reference, loss_perplexity, means, split_check
from prunekit.plans import DropTarget, LayerWidth, PruningPlan, normalize_drops
from prunekit.surgery import apply_plan
from prunekit.surgery.structure import count_parameters

CRITERIA = ("loss", "kl")
# Calibration sequences (of 512 tokens) `prunekit compress` takes by default: more than the other commands'
# 16, because it fits as well as it chooses. Every kept projection is refitted by least squares from the
# Grams, and 12 fitting sequences (6k tokens) are few beside a 1536-wide MLP's Gram. Measured on SmolLM2 at
# params=0.8 and judged on LAMBADA, a text used for no reported number: 64 sequences gave LAMBADA
# perplexity 72.8 against 88.1 with 16, at 3.5x the time (385 s vs 110 s). 128 sequences of a mix
# (c4:2,technical:1,tiny:1) gave 65.5 (wiki 46.25 against 46.81) at 1.7x the time and twice the memory for
# hidden states; the same mix at 64 gave 67.0 but wiki 47.86 (README, "More and other calibration text").
DEFAULT_SAMPLES = 64
OBS_TAG = " (OBS order)"  # candidate names of units ranked by `curves.obs_order`
# Candidates at the budget that get the error correction, best first: it can reorder them, and each keeps a
# copy of its edited projections until then.
CORRECTED = 2
MEASURED_TAG = " (measured)"  # candidate names allocated on curves rescaled by probes (`compress.measure`)
# Fit sequences the probes of `compress.measure` run over (`--probe-samples`); 8 when asked for: each probe is
# a partial pass over them, and there is one per sub-layer, so few (a loss difference on the same tokens is
# far less noisy than either loss). Off by default: measured on both models, at 8, they cost 25-50% more
# time and the chosen model got no better (SmolLM2 params=0.8: the best measured candidate checked 57.16
# against 55.93; Gemma-3-270m params=0.9: 132.67 against 135.93 before the correction, but that one did
# not take the correction and ended at 81.93 on wiki against 68.99), though they did fix the per-layer
# widths' scale on Gemma (`width` 200.68 -> 132.93).
DEFAULT_PROBE_SAMPLES = 0


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise PlanError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


class Sums(Protocol):
    """How `compress` shares its passes out: `shard` gives this process's part of some calibration data and
    `total` turns this process's float64 sums into the sums over all processes. Everything else (curves,
    allocation, the choice) is arithmetic on those totals, so every process makes the same choices."""

    def shard(self, calib: CalibrationData) -> CalibrationData: ...

    def total(self, values: torch.Tensor) -> torch.Tensor: ...


class OneProcess:
    """`Sums` in a single process: all the data, sums as they are."""

    def shard(self, calib: CalibrationData) -> CalibrationData:
        return calib

    def total(self, values: torch.Tensor) -> torch.Tensor:
        return values


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
    holds)."""
    out = dict.fromkeys(("grams", "largest_gram", "fishers", "weights", "logits", "states", "layer", "head"), 0)
    itemsize = adapter.dtype().itemsize
    for proj in output_projections(adapter).values():
        gram = 8 * proj.in_features ** 2
        out["grams"] += gram
        out["largest_gram"] = max(out["largest_gram"], gram)
        out["fishers"] += 8 * proj.out_features ** 2
        out["weights"] += (1 + CORRECTED) * itemsize * proj.in_features * proj.out_features
    out["logits"] = 3 * 4 * seq_len * adapter.lm_head().out_features
    fit_samples = samples - max(1, samples // 4)  # `split_check`
    out["states"] = fit_samples * seq_len * adapter.hidden_size * adapter.num_layers * itemsize
    out["layer"] = max((_bytes(layer) for layer in adapter.layers()), default=0)
    out["head"] = _bytes(adapter.lm_head()) + _bytes(adapter.final_norm())
    return out


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Candidate:
    """One model tried: kept units per cut sub-layer (ORIGINAL unit ids) and how it scored."""

    name: str
    kept: dict[Sublayer, list[int]]
    removed_params: int
    removed_kv: int
    check_loss: float
    at_budget: bool
    check_kl: float | None = None  # KL from the dense model, with criterion="kl"
    weights: dict[Sublayer, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def value(self) -> float:
        """What candidates are chosen by: the held-out loss, or the KL from the dense model."""
        return self.check_loss if self.check_kl is None else self.check_kl

    def row(self, totals: dict[str, int]) -> dict[str, Any]:
        row = {"name": self.name, "removed_params": self.removed_params / totals["params"],
               "removed_kv": self.removed_kv / totals["kv"] if totals["kv"] else 0.0,
               "check_loss": self.check_loss, "check_ppl": loss_perplexity(self.check_loss),
               "at_budget": self.at_budget}
        return row if self.check_kl is None else {**row, "check_kl": self.check_kl}


class _Model:
    """The full-size model under search (resident or streamed): which units are alive, and edits as zeroed and
    refitted output projections, written through the source (`LayerSource.write`) and undone by `reset`."""

    def __init__(self, source: LayerSource, costs: dict[Sublayer, SublayerCost]):
        self.source, self.adapter, self.costs = source, source.adapter, costs
        names = {id(module): name for name, module in self.adapter.model.named_modules()}
        self.names = {s: names[id(self._proj(s))] for s in costs}
        self.alive: dict[Sublayer, list[int]] = {s: list(range(c.units)) for s, c in costs.items()}

    def _proj(self, s: Sublayer) -> nn.Linear:
        return self.adapter.output_projection(self.adapter.layers()[s[0]], s[1])

    def weight(self, s: Sublayer) -> torch.Tensor:
        """The output projection's weight as it is now (edits included)."""
        return self.source.read(self.names[s] + ".weight")

    def cols_per_unit(self, s: Sublayer) -> int:
        if s[1] == "mlp":
            return 1
        nh, nkv = self.adapter.attention_shape(self.adapter.layers()[s[0]])
        return (nh // nkv) * self.adapter.head_dim

    def curves(self, stats: CompressStats, step: int, order_by: str = "norm") -> dict[Sublayer, Curve]:
        return self.curves_by_order(stats, step, (order_by,))[order_by]

    def curves_by_order(self, stats: CompressStats, step: int,
                        orders: tuple[str, ...]) -> dict[str, dict[Sublayer, Curve]]:
        """The curves for each unit order, each sub-layer's statistics read once for all orders (a spilled
        Gram comes from disk)."""
        out: dict[str, dict[Sublayer, Curve]] = {o: {} for o in orders}
        for s, alive in self.alive.items():
            if not alive:
                continue
            st, weight = stats.layer(s), self.weight(s)
            for o in orders:
                out[o][s] = error_curve(st, weight, alive, self.cols_per_unit(s), step if s[1] == "mlp" else 1,
                                        order_by=o)
        return out

    @torch.no_grad()
    def cut(self, stats: CompressStats, curves: dict[Sublayer, Curve], counts: dict[Sublayer, int],
            fit: bool) -> None:
        """Keep the strongest `counts[s]` alive units of each sub-layer, refitting its projection (`fit`) or
        just zeroing what goes."""
        for s, k in counts.items():
            keep = curves[s].order[:k]
            if fit and k:
                new = refit(stats.layer(s), self.weight(s), self.alive[s], keep, self.cols_per_unit(s))
            else:
                new = self.weight(s).clone()
                gone = sorted(set(self.alive[s]) - set(keep))
                if gone:
                    new[:, unit_columns(gone, self.cols_per_unit(s))] = 0
            self.write(s, new, removed=k == 0)
            self.alive[s] = sorted(keep)

    def write(self, s: Sublayer, weight: torch.Tensor, removed: bool) -> None:
        self.source.write(self.names[s] + ".weight", weight)
        if removed and self._proj(s).bias is not None:  # a removed sub-layer adds nothing
            bias = self.names[s] + ".bias"
            self.source.write(bias, torch.zeros_like(self.source.read(bias)))

    def reset(self) -> None:
        self.source.revert()
        self.alive = {s: list(range(c.units)) for s, c in self.costs.items()}

    def snapshot(self) -> dict[Sublayer, torch.Tensor]:
        return {s: self.weight(s).clone() for s, a in self.alive.items() if len(a) < self.costs[s].units}

    def kept_counts(self) -> dict[Sublayer, int]:
        return {s: len(a) for s, a in self.alive.items()}


def _residuals(before: dict[Sublayer, float], after: dict[Sublayer, float]) -> dict[str, list[float]]:
    """{"layer.part": [relative residual before, after]} of a correction's fits, for the plan."""
    return {f"{i}.{p}": [round(before[(i, p)], 6), round(after[(i, p)], 6)] for i, p in sorted(before)}


class _Scorer:
    """The held-out check of a candidate: the check part through the one runner (layer-0 inputs remembered, so
    a candidate costs one pass of the layers), mean NLL and KL summed over processes. With the KL criterion
    the dense model's top-K logits are taken first (build it before any edit)."""

    def __init__(self, source: LayerSource, check: CalibrationData, batch_size: int, kl: bool, sums: Sums,
                 work_dir: Path | None):
        self.source, self.sums = source, sums
        self.runner = LayerRunner(source, check, batch_size=batch_size, work_dir=work_dir, progress=False)
        self.reference: Reference | None = None
        if kl:
            obs = LossObserver(source, self.runner.batches, keep_topk=KL_TOPK)
            self.runner.run([obs])
            self.reference = [obs.kept[b] for b in range(len(self.runner.batches))]

    def __call__(self) -> tuple[float, float | None]:
        self.runner.invalidate_from(0)
        obs = LossObserver(self.source, self.runner.batches, reference=self.reference)
        self.runner.run([obs])
        return means(self.sums.total(obs.sums), self.reference is not None)


def plan_for(adapter: ModelAdapter, kept: dict[Sublayer, list[int]]) -> tuple[list[DropTarget], dict[int, LayerWidth]]:
    """Drops and widths (ORIGINAL indices) of a candidate."""
    drops: list[DropTarget] = []
    widths: dict[int, LayerWidth] = {}
    for (i, part), units in sorted(kept.items()):
        if not units:
            drops.append(DropTarget(i, part))  # type: ignore[arg-type]
            continue
        w = widths.setdefault(i, LayerWidth())
        if part == "mlp":
            w.channels = sorted(units)
        else:
            nh, nkv = adapter.attention_shape(adapter.layers()[i])
            g = nh // nkv
            w.kv_heads = sorted(units)
            w.heads = [k * g + j for k in sorted(units) for j in range(g)]
    return normalize_drops(drops), widths


@dataclass
class CompressResult:
    plan: PruningPlan
    candidates: list[dict[str, Any]]
    chosen: str


def _spent(m: _Model, key: str) -> int:
    return removed(m.costs, m.kept_counts(), key)


def compress(model: nn.Module | LayerSource, adapter: ModelAdapter | None, calib: CalibrationData,
             budget: Budget, *, rounds: int = 2, multiple_of: int = 64, batch_size: int = 4,
             criterion: str = "loss", progress: bool = True, source: str = "", sums: Sums | None = None,
             gram_budget_bytes: int | None = None, work_dir: str | Path | None = None,
             correct: bool = True, probe_samples: int = DEFAULT_PROBE_SAMPLES) -> CompressResult:
    """Search, apply the best candidate and return its plan and the table of every candidate tried. `model`: a
    model in memory (cut in place, physically) or any layer source (a streamed one keeps the refitted
    weights as overrides and its skeleton is cut; `prunekit.save` writes the checkpoint from its files).
    `criterion`: candidates are chosen by their loss on the held-out calibration samples ("loss"), or by the
    KL divergence there from the dense model's next-token distributions ("kl", over the dense model's top
    `KL_TOPK` tokens). `sums`: data parallel (`jobs.dist.AllReduceSums` under torchrun); every process
    returns the same result. `gram_budget_bytes`: memory for all the input Grams at once (default a quarter
    of the memory free when the search starts); beyond it each layer's wait on disk. `work_dir`: where the
    temporary directory for spilled Grams (and a streamed model's calibration hidden states) goes (default
    the system's). `correct`: refit the chosen model's kept projections against the dense model's residual
    stream (`compress.correct`), kept only where it checks better. `probe_samples`: fit sequences over which
    every sub-layer's cut alone is measured, for the candidates allocated on measured curves
    (`compress.measure`; 0: none)."""
    check_criterion(criterion)
    src = as_source(model, adapter)
    with scratch_dir("compress", work_dir) as spill:
        opts = _Settings(budget, rounds, multiple_of, batch_size, criterion, progress, source, correct,
                         probe_samples)
        return _Search(src, calib, opts, sums or OneProcess(), gram_budget_bytes, spill).run()


def _gram_budget(sums: Sums, given: int | None) -> int:
    """`given`, or a quarter of the memory free now; the mean over processes, so that every rank makes the
    same choice of spilling (and so the same collective calls)."""
    mine = given if given is not None else available_memory_bytes() // 4
    both = sums.total(torch.tensor([float(mine), 1.0], dtype=torch.float64))
    return int(both[0] / both[1])


@dataclass
class _Settings:
    """What `compress` was asked for, as `_Search` reads it."""

    budget: Budget
    rounds: int
    multiple_of: int
    batch_size: int
    criterion: str
    progress: bool
    source: str
    correct: bool = True
    probe_samples: int = DEFAULT_PROBE_SAMPLES


class _Search:
    """One search: the model under edit, every candidate tried so far, and the passes that score them. `run`
    reads in the order of the module docstring: statistics, one-shot candidates, LLM-Drop's plans, rounds,
    the best applied."""

    def __init__(self, src: LayerSource, calib: CalibrationData, opts: _Settings, sums: Sums,
                 gram_budget_bytes: int | None, spill: Path):
        self.started = time.monotonic()
        self.src, self.calib, self.opts, self.sums, self.spill = src, calib, opts, sums, spill
        self.costs = sublayer_costs(src.adapter)
        self.need = removal_target(src.adapter.model, self.costs, opts.budget)
        self.fit, self.check = split_check(calib, "compress")
        self.my_fit = sums.shard(self.fit)
        self.gram_budget = _gram_budget(sums, gram_budget_bytes)
        self.totals = {"params": count_parameters(src.adapter.model),
                       "kv": dense_total(src.adapter.model, self.costs, "kv")}
        self.m = _Model(src, self.costs)
        self.tried: list[Candidate] = []
        self.correction: dict[str, Any] | None = None
        self.corrections = 0  # error corrections run (each about 4 passes over the fit part)
        self.probes: dict[str, Any] | None = None
        # Built before any edit: with the KL criterion it takes the dense model's reference logits first.
        self.scorer = _Scorer(src, sums.shard(self.check), opts.batch_size, opts.criterion == "kl", sums,
                              self.states())

    def states(self) -> Path | None:
        """Where a pass's hidden states wait: on disk for a streamed model, in RAM for a resident one."""
        return Path(tempfile.mkdtemp(dir=self.spill)) if self.src.resumable else None

    def collect(self, desc: str) -> CompressStats:
        work = self.states()
        try:
            return collect_stats(self.src, self.my_fit, batch_size=self.opts.batch_size, progress=self.opts.progress,
                                 desc=desc, total=self.sums.total, gram_budget_bytes=self.gram_budget,
                                 spill_dir=Path(tempfile.mkdtemp(dir=self.spill)), work_dir=work)
        finally:  # the remembered layer inputs are not needed once the statistics are summed
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    def score(self, name: str, at_budget: bool) -> Candidate:
        """The model as edited now, scored on the check part and remembered as a candidate."""
        m = self.m
        loss, kl = self.scorer()
        c = Candidate(name, {s: list(a) for s, a in m.alive.items() if len(a) < self.costs[s].units},
                      _spent(m, "params"), _spent(m, "kv"), loss, at_budget, kl)
        # Only the best `CORRECTED` candidates at the budget keep their edited projections (that many models'
        # worth of them, not one per candidate): one of them will be corrected and cut.
        if at_budget and self._among_best(c.value):
            c.weights = m.snapshot()
        self.tried.append(c)
        for t in self._ranked()[CORRECTED:]:
            t.weights = {}
        return c

    def _ranked(self) -> list[Candidate]:
        """The candidates at the budget, best first."""
        return sorted((t for t in self.tried if t.at_budget), key=lambda t: t.value)

    def _among_best(self, value: float) -> bool:
        ranked = self._ranked()
        return len(ranked) < CORRECTED or value < ranked[CORRECTED - 1].value

    def run(self) -> CompressResult:
        self.score("dense", False)
        dense_stats = self.collect("compress statistics")
        by_order = self.one_shot(dense_stats)
        self.llm_drop(dense_stats, by_order["norm"])
        order = _better_order(self.tried)
        if self.opts.probe_samples > 0:
            self.measured(dense_stats, by_order[order], order)
        if self.opts.rounds > 1:
            self.in_rounds(dense_stats, by_order[order], order)
        best = self.corrected() if self.opts.correct else self._ranked()[0]
        plan = self.apply(best)
        self.record(plan)
        return CompressResult(plan, [c.row(self.totals) for c in self.tried], best.name)

    def one_shot(self, stats: CompressStats) -> dict[str, dict[Sublayer, Curve]]:
        """Every family's one-shot allocation, each cut, scored and undone; returns the dense model's curves in
        both unit orders ("norm": what LLM-Drop's candidates are zeroed along; the later steps' first curves)."""
        m, costs, need, key = self.m, self.costs, self.need, self.opts.budget.key
        by_order = m.curves_by_order(stats, self.opts.multiple_of, ("norm", "obs"))
        curves, obs_curves = by_order["norm"], by_order["obs"]
        families = {"mixed": lambda: (curves, allocate(curves, costs, need, key, "mixed")),
                    f"mixed{OBS_TAG}": lambda: (obs_curves, allocate(obs_curves, costs, need, key, "mixed")),
                    "depth": lambda: (curves, allocate(curves, costs, need, key, "depth")),
                    "width": lambda: (curves, allocate(curves, costs, need, key, "width")),
                    "uniform-width": lambda: (curves, uniform_mlp(curves, costs, need, key)),
                    "near-uniform-width": lambda: (curves, near_uniform_mlp(curves, costs, need, key))}
        for name, choose in tqdm(list(families.items()), desc="compress candidates", disable=not self.opts.progress,
                                 leave=False):
            used, chosen = choose()
            if not chosen:
                continue
            # Without the refit, the check that refitting helps (a refit on too few tokens overfits).
            for fitted in (True, False) if name == "mixed" else (True,):
                self.try_cut(stats, used, chosen, fitted, name if fitted else f"{name} (no refit)")
        return by_order

    def try_cut(self, stats: CompressStats, curves: dict[Sublayer, Curve], counts: dict[Sublayer, int], fit: bool,
                name: str) -> None:
        """One candidate at the budget: `counts` cut along `curves` (`_Model.cut`), scored, and undone."""
        self.m.cut(stats, curves, counts, fit)
        self.score(name, True)
        self.m.reset()

    def llm_drop(self, stats: CompressStats, curves: dict[Sublayer, Curve]) -> None:
        """LLM-Drop's own one-shot plans as candidates too, so that the held-out check can pick them where the
        Fisher estimate misjudges whole drops (Gemma-3-270m at kv=0.5: 1.36x LLM-Drop's perplexity without)."""
        for name, drops in _llm_drop_candidates(self.src, self.fit, self.costs, self.need, self.opts.budget.key,
                                                self.opts.batch_size, self.states()).items():
            self.try_cut(stats, curves, drops, False, name)

    def measured(self, stats: CompressStats, curves: dict[Sublayer, Curve], order_by: str) -> None:
        """`mixed`, `width` and `near-uniform-width` once more, allocated on the dense model's `curves` (units in
        `order_by`) rescaled by what cutting each sub-layer alone measurably costs (`compress.measure`)."""
        m, costs, need, key, started = self.m, self.costs, self.need, self.opts.budget.key, time.monotonic()
        counts = probe_counts(curves, uniform_mlp(curves, costs, need, key))
        whole = probe_part(self.fit, self.opts.probe_samples)
        probe = Probe(self.src, self.sums.shard(whole), self.opts.batch_size, self.opts.criterion == "kl",
                      self.sums.total, self.states())
        found: dict[Sublayer, tuple[int, float]] = {}
        for s in tqdm(sorted(counts, reverse=True), desc="compress probes", disable=not self.opts.progress,
                      leave=False):  # the top layer first: each probe re-runs only the layers above it
            m.cut(stats, curves, {s: counts[s]}, True)
            found[s] = (counts[s], probe.increase(s[0]))
            m.reset()
        del probe  # its remembered layer inputs
        scaled = rescaled(curves, found)
        tag = (OBS_TAG if order_by == "obs" else "") + MEASURED_TAG
        families = {"mixed": lambda: allocate(scaled, costs, need, key, "mixed"),
                    "width": lambda: allocate(scaled, costs, need, key, "width"),
                    "near-uniform-width": lambda: near_uniform_mlp(scaled, costs, need, key)}
        for name, choose in families.items():
            chosen = choose()
            if chosen:
                self.try_cut(stats, scaled, chosen, True, name + tag)
        # In passes over the probed sequences: the dense one, and each probe from its layer up.
        layers = self.src.adapter.num_layers
        passes = 1 + sum((layers - i) / layers for i, _ in found)
        self.probes = {"samples": len(whole.input_ids), "order": order_by, "passes": round(passes, 2),
                       "seconds": round(time.monotonic() - started, 1),
                       "increase": {f"{i}.{p}": [k, round(d, 6), round(curves[(i, p)].error_at(k), 6)]
                                    for (i, p), (k, d) in sorted(found.items())}}

    def in_rounds(self, stats: CompressStats, curves: dict[Sublayer, Curve], order_by: str) -> None:
        """`mixed` reached in `rounds` steps, the statistics re-taken on the partly pruned model in between,
        units ordered by `order_by` (`curves`: the dense model's, for the first step); every step is a candidate
        (the last one at the budget)."""
        m, key, rounds = self.m, self.opts.budget.key, self.opts.rounds
        tag = OBS_TAG if order_by == "obs" else ""
        for r in range(1, rounds + 1):
            target = math.ceil(self.need * r / rounds)
            step_curves = curves if r == 1 else m.curves(stats, self.opts.multiple_of, order_by=order_by)
            m.cut(stats, step_curves, allocate(step_curves, m.costs, target - _spent(m, key), key, "mixed"), True)
            self.score(f"mixed{tag} x{rounds} rounds" if r == rounds else f"mixed{tag} round {r}/{rounds}",
                       r == rounds)
            if r < rounds:
                # Emptied, not just replaced: the caller's reference would otherwise keep two sets of Grams
                # alive (or on disk) while the next ones are taken.
                stats.release()
                stats = self.collect(f"compress statistics, round {r + 1}")
        m.reset()

    def corrected(self) -> Candidate:
        """The best `CORRECTED` candidates, each with every kept projection refitted against the dense residual
        stream (`compress.correct`), a candidate of its own: the correction can change their order (Gemma-3-270m
        at params=0.9: the best one checked 2.4% ahead of the next before it, 21% behind after it). Returns the
        best of them all, written when it is a corrected one (else the model is dense again)."""
        ranked = self._ranked()[:CORRECTED]
        # The best last: its correction, the likeliest winner, is the one left written.
        results = [(base, *self._correct(base)) for base in reversed(ranked)][::-1]
        base, fixed, record = min(results, key=lambda r: min(r[0].value, r[1].value))
        applied = fixed.value < base.value
        self.correction = {**record, "applied": applied,
                           "tried": [{"candidate": b.name, "check_value_uncorrected": b.value,
                                      "check_value": c.value} for b, c, _ in results]}
        if not applied:
            self.m.reset()
            return base
        if base is not ranked[0]:  # another candidate's correction is written now: this one's again
            self._write_corrected(base)
        return fixed  # its weights are written (`apply` has nothing to write)

    def _correct(self, base: Candidate) -> tuple[Candidate, dict[str, Any]]:
        """`base` corrected, written, scored and remembered; and the record of how the correction went."""
        started = time.monotonic()
        fitted = self._write_corrected(base)
        loss, kl = self.scorer()
        c = Candidate(f"{base.name} + correction", base.kept, base.removed_params, base.removed_kv, loss, True, kl)
        self.tried.append(c)
        return c, {"ridge": fitted.ridge, "input_ridge": fitted.input_ridge, "check_value_uncorrected": base.value,
                   "check_value": c.value, "seconds": round(time.monotonic() - started, 1),
                   "relative_residual": _residuals(fitted.before, fitted.after),
                   "input_relative_residual": _residuals(fitted.inputs_before, fitted.inputs_after)}

    def _write_corrected(self, base: Candidate) -> Correction:
        """The model dense again, then `base`'s edits written with the correction (deterministic: the same
        weights every time)."""
        m = self.m
        m.reset()
        self.corrections += 1
        m.alive = {s: list(base.kept.get(s, range(c.units))) for s, c in self.costs.items()}
        columns = {s: unit_columns(a, m.cols_per_unit(s)) for s, a in m.alive.items() if a}
        edits = Edits(columns, base.weights, m.weight, m.write, m.adapter.output_projection, m.adapter.output_norm)
        return correct_model(self.src, self.my_fit, edits, batch_size=self.opts.batch_size, total=self.sums.total,
                             work_dirs=self.states, progress=self.opts.progress)

    def apply(self, best: Candidate) -> PruningPlan:
        """The best candidate's weights written and kept, and its plan applied: a resident model is cut
        physically, a streamed one's skeleton is (its overrides are cut to the kept units when read or
        saved)."""
        m = self.m
        for s, w in best.weights.items():
            m.write(s, w, removed=not best.kept.get(s))
        m.source.commit()
        drops, widths = plan_for(m.adapter, best.kept)
        plan = PruningPlan(dropped=drops, widths=widths, method="compress")
        plan.options = {"budget": self.opts.budget.describe(), "rounds": self.opts.rounds,
                        "multiple_of": self.opts.multiple_of, "chosen": best.name, "removal_target": self.need}
        plan.history = [c.row(self.totals) for c in self.tried]
        plan.calibration = self.calib.describe()
        plan.model = {"source": self.opts.source}
        apply_plan(m.adapter, plan)
        m.source.set_widths(plan.widths)
        return plan

    def record(self, plan: PruningPlan) -> None:
        """How the search ran, in the plan's options."""
        opts = plan.options
        opts["criterion"] = self.opts.criterion
        if self.opts.criterion == "kl":
            opts["kl_topk"] = KL_TOPK
        # Cost in forward-pass equivalents over the whole calibration set: the statistics are a forward, a
        # re-run and a backward (about 4 passes) on the fit part per round, the LLM-Drop candidates' cosine
        # scoring one forward over it, and every candidate one forward over the check part.
        share = len(self.check.input_ids) / len(self.calib.input_ids)
        # The error correction: the dense model once and the pruned one three times over the fit part.
        fit_passes = 4 * self.opts.rounds + 1 + 4 * self.corrections
        probe_passes = 0.0 if self.probes is None else (
            self.probes["passes"] * self.probes["samples"] / len(self.calib.input_ids))
        opts["forward_passes"] = round(fit_passes * (1 - share) + len(self.tried) * share + probe_passes, 2)
        if self.correction is not None:
            opts["correction"] = self.correction
        if self.probes is not None:
            opts["probes"] = self.probes
        opts["grams_on_disk"] = grams_bytes(self.src.adapter) > self.gram_budget  # as `collect_stats` decides
        opts["seconds"] = round(time.monotonic() - self.started, 1)
        opts["fit_tokens"], opts["check_tokens"] = self.fit.num_tokens, self.check.num_tokens


def _llm_drop_candidates(src: LayerSource, fit: CalibrationData, costs: dict[Sublayer, SublayerCost], need: int,
                         key: str, batch_size: int, work_dir: Path | None) -> dict[str, dict[Sublayer, int]]:
    """For each LLM-Drop target, the fewest cosine-ranked drops that remove at least `need`, as kept counts (0:
    dropped). Scored on the whole fit part in every process (not a shard), so that all ranks agree."""
    adapter = src.adapter
    scorer = SimilarityScorer(src, fit, batch_size=batch_size, pairwise=False, rescore=False, work_dir=work_dir,
                              progress=False)
    scores = scorer.score()
    scorer.cleanup()
    out: dict[str, dict[Sublayer, int]] = {}
    for target in TARGETS:
        for n in range(1, 2 * adapter.num_layers + 1):
            try:
                drops = plan_drops(scores, target, n)  # type: ignore[arg-type]
            except PlanError:
                break  # more than the model has of this kind
            attn, mlp = PruningPlan(dropped=drops).drops_by_module()
            counts = {s: 0 for s in [*((i, "attn") for i in attn), *((i, "mlp") for i in mlp)] if s in costs}
            if removed(costs, counts, key) >= need:
                out[f"LLM-Drop {target}"] = counts
                break
    return out


def _better_order(tried: list[Candidate]) -> str:
    """The unit order whose one-shot `mixed` candidate did better on the check part: the rounds use it (taking
    the statistics again for both orders would cost another set of passes per round)."""
    value = {c.name: c.value for c in tried}
    obs, norm = value.get(f"mixed{OBS_TAG}"), value.get("mixed")
    return "obs" if obs is not None and (norm is None or obs < norm) else "norm"
