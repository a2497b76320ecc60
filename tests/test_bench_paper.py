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
                     "block-drop-4-iter", "joint-drop-8", "transact-mlp-75", "transact-heads-67", "compress-90"]


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


def test_paired_difference_uses_the_common_questions_and_their_paired_stderr():
    bench = _bench()
    dense, pruned = _row("dense", 1000, 0.5), _row("attn-drop-8", 950, 0.25)
    # Every task: dense right on questions 0-3, the pruned model right on 0-1 only (question 9: dense only).
    dense["per_doc"] = {t: {**{str(i): 1.0 for i in range(4)}, "9": 1.0} for t in PAPER_TASKS}
    pruned["per_doc"] = {t: {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0} for t in PAPER_TASKS}
    p = bench.paired(pruned, dense)
    # differences 0, 0, -1, -1 per task: mean -0.5, variance 1/3, se = sqrt(7 * (1/3) / 4) / 7
    assert p["difference"] == -0.5 and abs(p["stderr"] - (7 / 12) ** 0.5 / 7) < 1e-12 and p["ratio"] == 0.5
    assert bench.paired(_row("old", 950, 0.4), dense) is None  # rows measured before per-doc scores were kept
    assert "-0.500 ± 0.109" in bench.paired_table([dense, pruned], dense)
    # Every pair, the later row against the earlier one; a row without per-doc scores pairs with none.
    found = bench.pairs([dense, pruned, _row("old", 950, 0.4)])
    assert [(q["a"], q["b"]) for q in found] == [("dense", "attn-drop-8")]
    assert found[0]["difference"] == -0.5 and abs(found[0]["standard_errors"] - 0.5 / p["stderr"]) < 1e-9
    assert "| dense | attn-drop-8 | -0.5000 ± 0.1091 | 4.58 |" in bench.pairs_table(found)


def _fake_lm_eval(calls: list[str], stop_after: int | None = None):
    """evaluate(task) as lm-eval would answer for one task: question i of every task right when i is even;
    raises (a kill) once `stop_after` tasks have been answered."""
    def evaluate(task: str) -> dict:
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(task)
        value = 0.5 + len(task) / 100  # differs per task, so a mix-up between tasks shows
        entry = {"acc": value, "acc_stderr": 0.01, AVERAGE_METRIC.get(task, "acc"): value,
                 AVERAGE_METRIC.get(task, "acc") + "_stderr": 0.01}
        samples = [{"doc_id": i, AVERAGE_METRIC.get(task, "acc"): float(i % 2 == 0)} for i in range(4)]
        return {"tasks": {task: entry}, "data_hashes": {task: "h-" + task}, "samples": {task: samples}}
    return evaluate


def test_row_tasks_resume_after_a_kill_gives_the_uninterrupted_row(tmp_path):
    bench = _bench()
    structure = {"dropped": [{"layer": 3, "module": "attn"}], "widths": {}}
    whole_calls: list[str] = []
    whole = bench.row_tasks(_fake_lm_eval(whole_calls), structure, {}, lambda: None)
    assert sorted(bench.TASKS) == sorted([*PAPER_TASKS, "lambada"]) and bench.TASKS[-1] == "hellaswag"
    assert whole_calls == bench.TASKS and whole["average"]["complete"]
    assert whole["per_doc"]["piqa"] == {"0": 1.0, "1": 0.0, "2": 1.0, "3": 0.0}

    # Killed after three tasks: what was saved (through a JSON round trip, as the file keeps it) holds those three.
    file = tmp_path / "paper.json"
    partial: dict = {}
    calls: list[str] = []
    try:
        bench.row_tasks(_fake_lm_eval(calls, stop_after=3), structure,
                        partial, lambda: bench.write_json(file, {"partial": {"r": partial}}))
    except KeyboardInterrupt:
        pass
    kept = json.loads(file.read_text())["partial"]["r"]
    assert list(kept["tasks"]) == bench.TASKS[:3]

    # The rerun asks lm-eval only for the rest, and the row is exactly the uninterrupted one (seconds aside).
    calls.clear()
    resumed = bench.row_tasks(_fake_lm_eval(calls), json.loads(json.dumps(structure)), kept, lambda: None)
    assert calls == bench.TASKS[3:]
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}

    # Tasks kept for a model of another structure are not reused.
    calls.clear()
    bench.row_tasks(_fake_lm_eval(calls), {"dropped": [], "widths": {}}, kept, lambda: None)
    assert calls == bench.TASKS
