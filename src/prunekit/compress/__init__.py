"""`prunekit compress`: the best model for a budget on parameters or KV-cache bytes, searched over depth
(attention, MLP and block drops) and width (MLP channels, KV groups) together, training-free.

Where things are, from the bottom up: `budget` (budgets and unit costs), `stats` (input Grams and output
Fishers from one forward+backward pass), `curves` (per sub-layer error of keeping k units after a
least-squares refit, and the refit), `allocate` (greedy spending of the budget), `families` (the registry of
candidate families), `candidate` (a candidate's record and plan), `editable` (`EditableModel`, the model under
search), `scorer` (the held-out check of a candidate), `memory` (what the search holds), `measure`,
`llm_drop` and `experts` (more candidates; `experts`: expert drop on Mixture-of-Experts models), `correct`
(the error correction), `search` (the search itself), `report` (Pareto table and plot).
"""

from prunekit._callable import call_as
from prunekit.compress.allocate import FAMILIES
from prunekit.compress.budget import BUDGET_KEYS, Budget, parse_budget
from prunekit.compress.editable import EditableModel
from prunekit.compress.memory import memory_estimate
from prunekit.compress.report import write_pareto
from prunekit.compress.scorer import check_criterion
from prunekit.compress.search import (
    DEFAULT_PROBE_SAMPLES,
    DEFAULT_SAMPLES,
    CompressResult,
    compress,
    cut,
    search_plan,
)

__all__ = ["BUDGET_KEYS", "DEFAULT_PROBE_SAMPLES", "DEFAULT_SAMPLES", "FAMILIES", "Budget", "CompressResult",
           "EditableModel", "check_criterion", "compress", "cut", "memory_estimate", "parse_budget", "search_plan",
           "write_pareto"]

call_as(__name__, compress)  # `prunekit.compress(...)` calls `compress` even once this package is the attribute
