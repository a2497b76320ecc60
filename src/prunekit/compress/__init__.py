"""`prunekit compress`: the best model for a budget on parameters or KV-cache bytes, searched over depth
(attention, MLP and block drops) and width (MLP channels, KV groups) together, training-free.

Where things are: `budget` (budgets and unit costs), `stats` (input Grams and output Fishers from one
forward+backward pass), `curves` (per sub-layer error of keeping k units after a least-squares refit, and the
refit), `allocate` (greedy spending of the budget), `search` (candidate families, scoring by held-out
calibration loss, the chosen plan), `report` (Pareto table and plot).
"""

from prunekit.compress.allocate import FAMILIES
from prunekit.compress.budget import BUDGET_KEYS, Budget, parse_budget
from prunekit.compress.report import write_pareto
from prunekit.compress.search import DEFAULT_PROBE_SAMPLES, DEFAULT_SAMPLES, CompressResult, compress

__all__ = ["BUDGET_KEYS", "DEFAULT_PROBE_SAMPLES", "DEFAULT_SAMPLES", "FAMILIES", "Budget", "CompressResult",
           "compress", "parse_budget", "write_pareto"]
