"""benchmarks/bench_heal_recipe.py: the row syntax (no model needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # it imports bench_heal beside it
from bench_heal_recipe import parse_row  # noqa: E402


@pytest.mark.parametrize("row, parsed", [
    ("ce:5e-5", (5e-5, None, 0.0, 1.0)),
    ("kd:2e-4", (2e-4, 0.0, 0.0, 1.0)),
    ("kd0.5:2e-4", (2e-4, 0.5, 0.0, 1.0)),
    ("kd0.5h5:5e-4", (5e-4, 0.5, 5.0, 1.0)),
    ("kd0.5t2:2e-4", (2e-4, 0.5, 0.0, 2.0)),
    ("kd0t4h1:1e-3", (1e-3, 0.0, 1.0, 4.0)),
])
def test_row_is_lr_alpha_hidden_weight_temperature(row, parsed):
    assert parse_row(row) == (row, *parsed)


@pytest.mark.parametrize("row", ["kdx:1e-4", "kd0.5h2t2:1e-4", "mse:1e-4"])
def test_bad_row_is_refused(row):
    with pytest.raises(SystemExit, match="bad row"):
        parse_row(row)
