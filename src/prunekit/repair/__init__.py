"""Training-free linear repair after dropping (`linear`): each removed span of sub-layers approximated by a
linear map folded into the sub-layer before it, kept only where it lowers the held-out loss."""

from prunekit.repair.linear import (
    REPAIRS,
    RepairStats,
    Span,
    check_repairable,
    fit_map,
    folded,
    linear_repair,
    removed_spans,
)

__all__ = ["REPAIRS", "RepairStats", "Span", "check_repairable", "fit_map", "folded", "linear_repair",
           "removed_spans"]
