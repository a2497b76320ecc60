"""`compress`: the best model for a budget, searched over depth and width together.

1. Statistics on the fit part of the calibration data (`stats`: input Grams and output Fishers).
2. Error curves for every sub-layer (`curves`) and, for each candidate family of the registry (`families`),
   an allocation of the budget (`allocate`), each with the refit of every cut projection: ``mixed`` (widths
   and drops chosen together), ``depth`` (sub-layer drops only), ``width`` (per-layer widths only),
   ``uniform-width`` (TransAct uniform MLP width), ``near-uniform-width`` (the same, with some MLPs one step
   wider so as not to overshoot the budget), plus ``mixed`` without refit (the check that refitting helps),
   ``mixed (OBS order)`` (units ranked by greedy Optimal Brain Surgeon removal instead of by activation norm),
   ``mixed`` reached in several rounds (the budget spent in steps, statistics re-taken on the partly pruned
   model in between, like iterative pruning; units in the order whose one-shot candidate checked better),
   ``mixed``, ``width`` and ``near-uniform-width`` allocated on curves rescaled by measurement (`measure`:
   every sub-layer cut alone on a few fit sequences, its loss increase read), and LLM-Drop's own attention /
   MLP / block / joint plans (`llm_drop`: cosine-ranked, the fewest drops that meet the budget), which the
   Fisher estimate can misjudge.
3. Every candidate is applied to the full-size model (`editable`: zeroed units and refitted weights, which
   give exactly the logits of the physically smaller one) and scored by the calibration loss on the held-out
   check part of the calibration data (`scorer`); the best is kept, and the plan says how it was found. The
   intermediate rounds are points of the quality-vs-budget curve too.
4. The two best candidates' kept output projections are refitted once more, layer by layer, against the
   dense model's residual stream (`correct`: each corrects what the cuts below it changed); each corrected
   model is one more candidate, and the best of all is kept.

On a Mixture-of-Experts model a block of experts is one unit of the allocation, kept or removed whole
(`budget`, `editable`), the families that give every MLP one width are skipped (`families`, recorded in the
plan's `skipped_families`), and the correction refits no block of experts. With a `params`
budget, expert drop is tried too (`experts`: the lowest-scoring experts of every MoE layer, one count for all,
by router statistics and by REAP; one more forward pass over the fit part), scored with the experts
physically removed; those candidates are not corrected (the correction's edits are of the full-size model).

Every pass goes through the one layer runner, so the search runs on a model in memory or layer-streamed
alike (`stats` for the backward sweep; candidate edits through `LayerSource.write` / `revert`).

Costs, in forward-pass equivalents over the calibration tokens: a forward, a re-run and a backward (about 4
passes) on the fit part per round, one forward over it for the LLM-Drop candidates' cosine scores, four
over it per error-corrected candidate, one forward on the check part per candidate, and over the probed
sequences one forward plus, per sub-layer, the layers from its own up; the allocation itself is arithmetic.
The search counts the passes over the fit part as it runs them (`_Search.fit_passes`); the plan records the total.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import ModelAdapter
from prunekit.adapters.moe import MoEAdapter
from prunekit.compress.allocate import uniform_mlp
from prunekit.compress.budget import Budget, dense_total, removal_target, sublayer_costs
from prunekit.compress.candidate import CORRECTED, Candidate, Tried, plan_for
from prunekit.compress.correct import INPUT_RIDGE, Correction, Edits, correct_model
from prunekit.compress.curves import Curve, unit_columns
from prunekit.compress.editable import EditableModel
from prunekit.compress.experts import expert_drop_candidates, removed, removed_params
from prunekit.compress.families import MEASURED_TAG, applicable, better_order, order_tag, orders, rounds_family
from prunekit.compress.llm_drop import llm_drop_candidates
from prunekit.compress.measure import Probe, probe_counts, probe_part, rescaled
from prunekit.compress.memory import gram_budget, memory_estimate
from prunekit.compress.scorer import CRITERIA, HeldOutScorer, check_criterion
from prunekit.compress.stats import CompressStats, StatsStore, Sublayer, collect_stats, grams_bytes
from prunekit.data import CalibrationData
from prunekit.engine.sources import LayerSource, as_source
from prunekit.engine.sums import OneProcess, Sums
from prunekit.io.outputs import scratch_dir
from prunekit.losses import KL_TOPK, split_check
from prunekit.moe.stats import collect_expert_stats
from prunekit.plans import PruningPlan
from prunekit.surgery import apply_plan
from prunekit.surgery.structure import count_parameters

# `memory_estimate`, `check_criterion`, `CRITERIA`, `Candidate` and `plan_for` are re-exported: callers of
# `compress` import them from here.
__all__ = ["CORRECTED", "CRITERIA", "DEFAULT_PROBE_SAMPLES", "DEFAULT_SAMPLES", "Candidate", "CompressResult",
           "OneProcess", "Sums", "check_criterion", "compress", "memory_estimate", "plan_for"]

# Calibration sequences (of 512 tokens) `prunekit compress` takes by default: more than the other commands'
# 16, because it fits as well as it chooses: every kept projection is refitted by least squares from the
# Grams, and 12 fitting sequences (6k tokens) are few beside a 1536-wide MLP's Gram (docs/decisions.md).
DEFAULT_SAMPLES = 64
# Fit sequences the probes of `compress.measure` run over (`--probe-samples`); 8 when asked for: each probe is
# a partial pass over them, and there is one per sub-layer, so few (a loss difference on the same tokens is
# far less noisy than either loss). Off by default: they add a pass per sub-layer and the held-out check
# already catches a misjudged scale (docs/decisions.md).
DEFAULT_PROBE_SAMPLES = 0
# Passes over the fit part: the statistics (a forward, a re-run and a backward), LLM-Drop's cosine scores (one
# forward), an error correction (the dense model once and the pruned one three times).
STATS_PASSES, LLM_DROP_PASSES, CORRECTION_PASSES, EXPERT_PASSES = 4, 1, 4, 1


@dataclass
class CompressResult:
    """The chosen model's plan, the table of every candidate tried (`Candidate.row`) and the chosen one's name."""

    plan: PruningPlan
    candidates: list[dict[str, Any]]
    chosen: str


def compress(model: nn.Module | LayerSource, adapter: ModelAdapter | None, calib: CalibrationData,
             budget: Budget, **options: Any) -> CompressResult:
    """`search_plan` (same options), then the chosen plan applied (`surgery.apply_plan`): a model in memory is cut
    in place, physically; a layer source's skeleton is cut and its kept widths set (a streamed one keeps the
    refitted weights as overrides; `prunekit.save` writes the checkpoint from its files)."""
    src = as_source(model, adapter)
    result = search_plan(src, None, calib, budget, **options)
    cut(src, result.plan)
    return result


def cut(src: LayerSource, plan: PruningPlan) -> None:
    """The surgery of a compress plan on the source the search ran on: its chosen weights are already written."""
    apply_plan(src.adapter, plan, structure_only=True)
    src.set_widths(plan.widths)


def search_plan(model: nn.Module | LayerSource, adapter: ModelAdapter | None, calib: CalibrationData,
           budget: Budget, *, rounds: int = 2, multiple_of: int = 64, batch_size: int = 4,
           criterion: str = "loss", progress: bool = True, source: str = "", sums: Sums | None = None,
           gram_budget_bytes: int | None = None, work_dir: str | Path | None = None,
           correct: bool = True, probe_samples: int = DEFAULT_PROBE_SAMPLES,
           input_ridge: float | None = INPUT_RIDGE, store: StatsStore | None = None) -> CompressResult:
    """Search, write the best candidate's weights and return its plan and the table of every candidate tried;
    the model keeps its shape (`cut` applies the plan). `model`: a model in memory or any layer source.
    `criterion`: candidates are chosen by their loss on the held-out calibration samples ("loss"), or by the
    KL divergence there from the dense model's next-token distributions ("kl", over the dense model's top
    `KL_TOPK` tokens). `sums`: data parallel (`jobs.dist.AllReduceSums` under torchrun); every process
    returns the same result. `gram_budget_bytes`: memory for all the input Grams at once (default a quarter
    of the memory free when the search starts); beyond it each layer's wait on disk. `work_dir`: where the
    temporary directory for spilled Grams (and a streamed model's calibration hidden states) goes (default
    the system's). `correct`: refit the chosen model's kept projections against the dense model's residual
    stream (`compress.correct`), kept only where it checks better. `probe_samples`: fit sequences over which
    every sub-layer's cut alone is measured, for the candidates allocated on measured curves
    (`compress.measure`; 0: none). `input_ridge`: the correction's input maps' ridge (`compress.correct`;
    None: no input maps). `store`: where each statistics pass is looked up before it is run and kept after
    (`jobs.cache.PassCache`: a repeated or interrupted run skips the passes already done); a pass whose
    Grams had to wait on disk is not kept."""
    check_criterion(criterion)
    src = as_source(model, adapter)
    with scratch_dir("compress", work_dir) as spill:
        opts = _Settings(budget, rounds, multiple_of, batch_size, criterion, progress, source, correct,
                         probe_samples, input_ridge)
        return _Search(src, calib, opts, sums or OneProcess(), gram_budget_bytes, spill, store).run()


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
    input_ridge: float | None = INPUT_RIDGE


class _Search:
    """One search: the model under edit, every candidate tried so far, and the passes that score them. `run`
    reads in the order of the module docstring: statistics, one-shot candidates, LLM-Drop's plans, rounds,
    the best applied."""

    def __init__(self, src: LayerSource, calib: CalibrationData, opts: _Settings, sums: Sums,
                 gram_budget_bytes: int | None, spill: Path, store: StatsStore | None = None):
        self.started = time.monotonic()
        self.src, self.calib, self.opts, self.sums, self.spill = src, calib, opts, sums, spill
        self.store = store
        self.costs = sublayer_costs(src.adapter)
        self.need = removal_target(src.adapter.model, self.costs, opts.budget)
        self.fit, self.check = split_check(calib, "compress")
        self.my_fit = sums.shard(self.fit)
        self.gram_budget = gram_budget(sums.total, gram_budget_bytes)
        self.totals = {"params": count_parameters(src.adapter.model),
                       "kv": dense_total(src.adapter.model, self.costs, "kv")}
        self.m = EditableModel(src, self.costs)
        self.whole_mlp = any(part == "mlp" for _, part in self.m.whole)
        self.families, self.skipped = applicable(self.whole_mlp)
        self.tried = Tried()
        self.correction: dict[str, Any] | None = None
        self.fit_passes = 0  # passes over the fit part, counted as they are run
        self.probes: dict[str, Any] | None = None
        # Built before any edit: with the KL criterion it takes the dense model's reference logits first.
        self.scorer = HeldOutScorer(src, sums.shard(self.check), batch_size=opts.batch_size,
                                    kl=opts.criterion == "kl", total=sums.total, work_dir=self.states())

    def states(self) -> Path | None:
        """Where a pass's hidden states wait: on disk for a streamed model, in RAM for a resident one."""
        return Path(tempfile.mkdtemp(dir=self.spill)) if self.src.resumable else None

    def step(self, name: str) -> str:
        """A statistics pass's name for the store: the model it is taken on follows from the search's options
        and the step reached (the dense model's pass, "dense", depends on neither)."""
        o = self.opts
        return json.dumps([name, o.budget.describe(), o.rounds, o.multiple_of, o.criterion, o.probe_samples])

    def collect(self, desc: str, step: str) -> CompressStats:
        """The statistics of the model as edited now (`step` names it for the store)."""
        kept = self.store.get(step) if self.store is not None else None
        if kept is not None:
            return kept
        work = self.states()
        self.fit_passes += STATS_PASSES
        try:
            stats = collect_stats(self.src, self.my_fit, batch_size=self.opts.batch_size, progress=self.opts.progress,
                                  desc=desc, total=self.sums.total, gram_budget_bytes=self.gram_budget,
                                  spill_dir=Path(tempfile.mkdtemp(dir=self.spill)), work_dir=work)
        finally:  # the remembered layer inputs are not needed once the statistics are summed
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        if self.store is not None and not stats.grams_on_disk:
            self.store.put(step, stats)
        return stats

    def score(self, name: str, at_budget: bool) -> Candidate:
        """The model as edited now, scored on the check part and remembered as a candidate; at the budget only
        where it removes enough (a family may fall short: `width` where the MLPs are blocks of experts)."""
        m = self.m
        loss, kl = self.scorer.score()
        at_budget = at_budget and m.spent(self.opts.budget.key) >= self.need
        c = Candidate(name, m.kept(), m.spent("params"), m.spent("kv"), loss, at_budget, kl)
        self.tried.add(c, m.snapshot)
        return c

    def run(self) -> CompressResult:
        self.score("dense", False)
        dense_stats = self.collect("compress statistics", "dense")
        by_order = self.one_shot(dense_stats)
        self.llm_drop(dense_stats, by_order["norm"])
        self.expert_drop()
        order = better_order(self.tried.values())
        if self.opts.probe_samples > 0:
            self.measured(dense_stats, by_order[order], order)
        if self.opts.rounds > 1:
            self.in_rounds(dense_stats, by_order[order], order)
        best = self.corrected() if self.opts.correct else self.tried.ranked()[0]
        plan = self.apply(best)
        self.record(plan)
        return CompressResult(plan, self.tried.rows(self.totals), best.name)

    def one_shot(self, stats: CompressStats) -> dict[str, dict[Sublayer, Curve]]:
        """Every family's one-shot allocation, each cut, scored and undone; returns the dense model's curves in
        every unit order ("norm": what LLM-Drop's candidates are zeroed along; the later steps' first curves)."""
        by_order = self.m.curves_by_order(stats, self.opts.multiple_of, orders())
        for family in tqdm(self.families, desc="compress candidates", disable=not self.opts.progress, leave=False):
            curves = by_order[family.order]
            chosen = family.allocate(curves, self.costs, self.need, self.opts.budget.key)
            if not chosen:
                continue
            self.try_cut(stats, curves, chosen, True, family.one_shot_name)
            if family.without_refit:
                self.try_cut(stats, curves, chosen, False, f"{family.one_shot_name} (no refit)")
        return by_order

    def try_cut(self, stats: CompressStats, curves: dict[Sublayer, Curve], counts: dict[Sublayer, int], fit: bool,
                name: str) -> None:
        """One candidate at the budget: `counts` cut along `curves` (`EditableModel.cut`), scored, and undone."""
        self.m.cut(stats, curves, counts, fit)
        self.score(name, True)
        self.m.reset()

    def llm_drop(self, stats: CompressStats, curves: dict[Sublayer, Curve]) -> None:
        """LLM-Drop's own one-shot plans as candidates too (`compress.llm_drop`)."""
        self.fit_passes += LLM_DROP_PASSES
        for name, drops in llm_drop_candidates(self.src, self.fit, self.costs, self.need, self.opts.budget.key,
                                               self.opts.batch_size, self.states()).items():
            self.try_cut(stats, curves, drops, False, name)

    def expert_drop(self) -> None:
        """Expert drop's candidates (`compress.experts`), each scored with its experts physically removed, then
        put back; on a MoE model with a `params` budget (else the plan says why not)."""
        ad = self.src.adapter
        if not isinstance(ad, MoEAdapter) or not ad.moe_layers():
            return
        if self.opts.budget.key != "params":
            self.skipped["expert drop"] = "expert drop removes no KV cache"
            return
        self.fit_passes += EXPERT_PASSES
        stats = collect_expert_stats(self.src, self.my_fit, adapter=ad, batch_size=self.opts.batch_size,
                                     sums=self.sums, progress=False)
        for name, kept in expert_drop_candidates(ad, stats, self.need).items():
            with removed(self.src, kept):
                loss, kl = self.scorer.score()
            gone = removed_params(ad, kept)
            self.tried.add(Candidate(name, {}, gone, 0, loss, gone >= self.need, kl, experts=kept), dict)

    def measured(self, stats: CompressStats, curves: dict[Sublayer, Curve], order_by: str) -> None:
        """The `measured` families once more, allocated on the dense model's `curves` (units in `order_by`)
        rescaled by what cutting each sub-layer alone measurably costs (`compress.measure`)."""
        m, costs, need, key, started = self.m, self.costs, self.need, self.opts.budget.key, time.monotonic()
        counts = probe_counts(curves, {} if self.whole_mlp else uniform_mlp(curves, costs, need, key))
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
        for family in self.families:
            chosen = family.allocate(scaled, costs, need, key) if family.measured else None
            if chosen:
                self.try_cut(stats, scaled, chosen, True, family.name + order_tag(order_by) + MEASURED_TAG)
        # In passes over the probed sequences: the dense one, and each probe from its layer up.
        layers = self.src.adapter.num_layers
        passes = 1 + sum((layers - i) / layers for i, _ in found)
        self.probes = {"samples": len(whole.input_ids), "order": order_by, "passes": round(passes, 2),
                       "seconds": round(time.monotonic() - started, 1),
                       "increase": {f"{i}.{p}": [k, round(d, 6), round(curves[(i, p)].error_at(k), 6)]
                                    for (i, p), (k, d) in sorted(found.items())}}

    def in_rounds(self, stats: CompressStats, curves: dict[Sublayer, Curve], order_by: str) -> None:
        """The rounds family reached in `rounds` steps, the statistics re-taken on the partly pruned model in
        between, units ordered by `order_by` (`curves`: the dense model's, for the first step); every step is a
        candidate (the last one at the budget)."""
        m, key, rounds, family = self.m, self.opts.budget.key, self.opts.rounds, rounds_family()
        name = family.name + order_tag(order_by)
        for r in range(1, rounds + 1):
            target = math.ceil(self.need * r / rounds)
            step_curves = curves if r == 1 else m.curves(stats, self.opts.multiple_of, order_by=order_by)
            m.cut(stats, step_curves, family.allocate(step_curves, m.costs, target - m.spent(key), key), True)
            self.score(f"{name} x{rounds} rounds" if r == rounds else f"{name} round {r}/{rounds}", r == rounds)
            if r < rounds:
                # Emptied, not just replaced: the caller's reference would otherwise keep two sets of Grams
                # alive (or on disk) while the next ones are taken.
                stats.release()
                stats = self.collect(f"compress statistics, round {r + 1}", self.step(f"{name} round {r}/{rounds}"))
        m.reset()

    def corrected(self) -> Candidate:
        """The best `CORRECTED` candidates, each with every kept projection refitted against the dense residual
        stream (`compress.correct`), a candidate of its own: the correction can change their order, so the best
        uncorrected candidate is not always the best corrected one (docs/decisions.md). Returns the
        best of them all, written when it is a corrected one (else the model is dense again)."""
        ranked = [c for c in self.tried.ranked() if not c.experts][:CORRECTED]
        # The best last: its correction, the likeliest winner, is the one left written.
        results = [(base, *self._correct(base)) for base in reversed(ranked)][::-1]
        base, fixed, record = min(results, key=lambda r: min(r[0].value, r[1].value))
        applied = fixed.value < base.value
        self.correction = {**record, "applied": applied,
                           "tried": [{"candidate": b.name, "check_value_uncorrected": b.value,
                                      "check_value": c.value} for b, c, _ in results]}
        rival = next((c for c in self.tried.ranked() if c.experts), None)  # expert drop's best, not corrected
        if rival is not None and rival.value < min(base.value, fixed.value):
            self.correction["applied"] = False
            self.m.reset()
            return rival
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
        loss, kl = self.scorer.score()
        c = Candidate(f"{base.name} + correction", base.kept, base.removed_params, base.removed_kv, loss, True, kl)
        self.tried.add_corrected(c)
        return c, {"ridge": fitted.ridge, "input_ridge": fitted.input_ridge, "check_value_uncorrected": base.value,
                   "check_value": c.value, "seconds": round(time.monotonic() - started, 1),
                   "relative_residual": _residuals(fitted.before, fitted.after),
                   "input_relative_residual": _residuals(fitted.inputs_before, fitted.inputs_after)}

    def _write_corrected(self, base: Candidate) -> Correction:
        """The model dense again, then `base`'s edits written with the correction (deterministic: the same
        weights every time)."""
        m = self.m
        m.reset()
        self.fit_passes += CORRECTION_PASSES
        m.alive = {s: list(base.kept.get(s, range(c.units))) for s, c in self.costs.items()}
        columns = {s: unit_columns(a, m.cols_per_unit(s)) for s, a in m.alive.items() if a and m.refittable(s)}
        edits = Edits(columns, base.weights, m.weight, m.write, m.adapter.output_projection, m.adapter.output_norm)
        return correct_model(self.src, self.my_fit, edits, input_ridge=self.opts.input_ridge,
                             batch_size=self.opts.batch_size, total=self.sums.total, work_dirs=self.states,
                             progress=self.opts.progress)

    def apply(self, best: Candidate) -> PruningPlan:
        """The best candidate's weights written and kept, and its plan (`cut` applies it: a resident model is
        cut physically, a streamed one's skeleton is, and its overrides are cut to the kept units when read or
        saved)."""
        m = self.m
        for s, w in best.weights.items():
            m.write(s, w, removed=not best.kept.get(s))
        m.source.commit()
        drops, widths = plan_for(m.adapter, best.kept, best.experts)
        plan = PruningPlan(dropped=drops, widths=widths, method="compress")
        plan.options = {"budget": self.opts.budget.describe(), "rounds": self.opts.rounds,
                        "multiple_of": self.opts.multiple_of, "chosen": best.name, "removal_target": self.need}
        if self.skipped:
            plan.options["skipped_families"] = dict(self.skipped)
        plan.history = self.tried.rows(self.totals)
        plan.calibration = self.calib.describe()
        plan.model = {"source": self.opts.source, "num_hidden_layers": m.adapter.num_layers}
        return plan

    def record(self, plan: PruningPlan) -> None:
        """How the search ran, in the plan's options."""
        opts = plan.options
        opts["criterion"] = self.opts.criterion
        if self.opts.criterion == "kl":
            opts["kl_topk"] = KL_TOPK
        # Cost in forward-pass equivalents over the whole calibration set: the passes over the fit part, every
        # candidate one forward over the check part, and the probes' passes over the probed sequences.
        share = len(self.check.input_ids) / len(self.calib.input_ids)
        probe_passes = 0.0 if self.probes is None else (
            self.probes["passes"] * self.probes["samples"] / len(self.calib.input_ids))
        opts["forward_passes"] = round(self.fit_passes * (1 - share) + len(self.tried) * share + probe_passes, 2)
        if self.correction is not None:
            opts["correction"] = self.correction
        if self.probes is not None:
            opts["probes"] = self.probes
        opts["grams_on_disk"] = grams_bytes(self.src.adapter) > self.gram_budget  # as `collect_stats` decides
        opts["seconds"] = round(time.monotonic() - self.started, 1)
        opts["fit_tokens"], opts["check_tokens"] = self.fit.num_tokens, self.check.num_tokens


def _residuals(before: dict[Sublayer, float], after: dict[Sublayer, float]) -> dict[str, list[float]]:
    """{"layer.part": [relative residual before, after]} of a correction's fits, for the plan."""
    return {f"{i}.{p}": [round(before[(i, p)], 6), round(after[(i, p)], 6)] for i, p in sorted(before)}
