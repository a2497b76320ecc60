"""TransAct-style width pruning: rank attention heads and MLP channels by the activations flowing through them
on calibration data, and remove the weakest in several shots, giving a smaller dense model with the same
hidden size.

Where things are: `stats` (the activation statistics, an observer of the one runner), `importance` (the
pure scoring math), `targets` (keep targets, schedules, rounding), `ranking` (units within and across
layers), `prune` (the shot loop, `width_prune`); `prunekit.surgery.widths` slices the weights.

Units. Every width is counted in *units* that can be removed one at a time without breaking GQA:
  * MLP: one intermediate channel.
  * heads, ``head_mode="kv-groups"``: one KV group = a KV head together with the g query heads sharing it.
    `heads_keep` then counts KV groups per layer (a ratio is a fraction of the KV groups).
  * heads, ``head_mode="query-heads"``: one "slice" = one query head from *every* KV group (the weakest head
    left in each group), so num_heads % num_kv_heads == 0 always holds and the KV heads all stay.
    `heads_keep` then counts query heads per layer (a multiple of num_kv_heads; a ratio is a fraction of
    the query heads and must land on such a multiple).
A ratio r becomes round(r * width) units (halves round up); it must give at least one unit.

Modes. ``uniform``: every layer keeps the same number of units (TransAct). ``per-layer``: the same total
number of units as uniform would keep, chosen by one global ranking across layers, with a per-layer floor of
max(1, ceil(min_layer_keep * original units)). Scores are normalised per layer before the global ranking by
dividing by the *median* unit score of that layer in the unpruned model (taken at the first shot and kept
for later shots). Why: raw activation norms differ by orders of magnitude between layers (the residual
stream grows with depth), so unnormalised ranking strips whole layers; the mean is dominated by the few
outlier channels LLMs have in some layers, which makes every other channel of such a layer look negligible;
and a reference re-taken after each shot drifts up in layers already pruned hard (their weakest units are
gone), so they keep losing units shot after shot (docs/decisions.md, "TransAct"). With only a few units per layer (e.g. 3 KV groups) the median is the
middle unit, which makes a one-shot per-layer plan close to uniform.

Shots. The target is reached in `shots` steps on a geometric schedule (each shot removes about the same
*fraction* of what is left, like iterative magnitude pruning: after shot s of K the width is
round(W * (T / W) ** (s / K)), and exactly T after the last). `uniform` schedules every layer's width;
`per-layer` schedules the total. Between shots the partly pruned model is re-scored. A shot whose schedule
removes nothing is skipped (no scoring, no `between_shots` call).

Multiples. `multiple_of=m` (MLP channels only; heads are whole units already; default 64, 1 for exact
targets) makes every final MLP width a multiple of m, because engines serve such shapes faster or at all:
llama.cpp quantizes each row in blocks of 32 (q8_0, q4_0) or 256 (q4_k_m and the other k-quants), and the
down projection's rows are as long as the MLP width, so an off-block width falls back to a bigger type (use
256 for k-quant exports); vLLM's and llama.cpp's GPU matrix kernels tile by 64-128 and CPU kernels by vector
width, so a 1399-wide layer can be slower than a 1408-wide one. Uniform: the per-layer target is rounded to
the nearest multiple (never above the layer's width). Per-layer: the shot that reaches the final total
rounds the ranking's counts with `round_counts` (each layer down to a multiple, then blocks of m back to
the layers that lost most), so the total stays within m/2 of the target. Intermediate shots are not rounded.

Width pruning edits the model in place and returns a `PruningPlan` whose `widths` hold kept indices into the
ORIGINAL layers (composed across shots), so `surgery.apply_plan(plan)` on a fresh copy of the original
model rebuilds the same model (and `apply_plan` on the already narrowed model changes nothing: it has the
plan's structure, `surgery.carries`). Each shot's statistics are taken on the model as narrowed so far, so
this method cuts as it goes (with the surgery's own `apply_widths`) rather than proposing a plan first. Layer keys are the model's layer indices at the time of the call (layers whose attention
or MLP was already removed are skipped for that sub-layer).
"""

from prunekit.width.importance import SCORERS
from prunekit.width.prune import width_prune
from prunekit.width.stats import ActivationCollector, LayerActivations, WidthCollector, WidthStatsObserver
from prunekit.width.targets import HEAD_MODES, MODES, check_width_options, geometric_schedule

__all__ = ["HEAD_MODES", "MODES", "SCORERS", "ActivationCollector", "LayerActivations", "WidthCollector",
           "WidthStatsObserver", "check_width_options", "geometric_schedule", "width_prune"]
