"""benchmarks/bench_paper.py: the table's rows and columns, and the atomic JSON write (no model needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from prunekit.evaluation.zeroshot import AVERAGE_METRIC, PAPER_TASKS

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_paper.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_paper", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_paper"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(name: str, params: int, value: float) -> dict:
    tasks = {t: {"acc": 0.25, AVERAGE_METRIC[t]: 0.5} for t in PAPER_TASKS}
    return {"name": name, "label": name, "params": params, "kv_bytes_per_token": 46080, "wiki_perplexity": 25.0,
            "lambada": {"perplexity": 40.0, "acc": 0.3}, "tasks": tasks,
            "average": {"value": value, "stderr": 0.02}}


def test_rows_cover_the_issue():
    names = [r.name for r in _bench().ROWS]
    assert names == ["dense", "attn-drop-4", "attn-drop-8", "attn-drop-12", "mlp-drop-4", "block-drop-4",
                     "block-drop-4-iter", "joint-drop-8", "transact-mlp-75"]


def test_markdown_table(tmp_path):
    bench = _bench()
    table = bench.markdown([_row("dense", 1000, 0.5), _row("attn-drop-8", 950, 0.45)], 1000)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "piqa (acc_norm)" in lines[0] and "boolq (acc)" in lines[0] and "winogrande (acc)" in lines[0]
    assert lines[3].startswith("| attn-drop-8 | 0.0M (-5.0%) | 46,080 | 25.00 | 40.00 | 0.300 |")
    assert lines[3].endswith("| 0.450 ± 0.020 |")
    out = tmp_path / "r" / "paper.json"
    bench.write_json(out, {"rows": [1]})
    assert json.loads(out.read_text()) == {"rows": [1]} and [p.name for p in out.parent.iterdir()] == ["paper.json"]
