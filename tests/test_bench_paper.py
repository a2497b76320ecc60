"""benchmarks/bench_paper.py: the table's rows and columns, the atomic JSON write, resuming tasks and slices, and
pooling slices as lm-eval pools a whole task (the last on a tiny model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from test_zeroshot import make_model, make_tokenizer  # noqa: E402  (the tiny model and tokenizer)

from prunekit.evaluation.zeroshot import AVERAGE_METRIC, PAPER_TASKS, evaluate_tasks

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


def _fake_lm_eval(calls: list[tuple[str, range | None]], stop_after: int | None = None):
    """evaluate(task, docs) as lm-eval would answer for one task: document i of every task right when i is
    even (acc) and when i % 3 == 0 (acc_norm); raises (a kill) once `stop_after` calls have been answered."""
    def evaluate(task: str, docs: range | None) -> dict:
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append((task, docs))
        if docs is None:  # lambada: only its result is kept
            entry = {"perplexity": 40.0 + len(task), "acc": 0.25, "acc_stderr": 0.01, "n": 6}
            return {"tasks": {task: entry}, "data_hashes": {task: "h-" + task}}
        samples = [{"doc_id": i, "acc": float(i % 2 == 0), "acc_norm": float(i % 3 == 0), "target": 0} for i in docs]
        return {"tasks": {task: {}}, "data_hashes": {task: "h-" + task}, "samples": {task: samples}}
    return evaluate


SIZES = {"arc_challenge": 5, "arc_easy": 3, "boolq": 6, "hellaswag": 7, "openbookqa": 2, "piqa": 4, "winogrande": 5}


def test_row_tasks_resume_after_a_kill_gives_the_uninterrupted_row(tmp_path):
    bench = _bench()
    assert sorted(bench.TASKS) == sorted([*PAPER_TASKS, "lambada"]) and bench.TASKS[-1] == "hellaswag"
    structure = {"dropped": [{"layer": 3, "module": "attn"}], "widths": {}}
    whole_calls: list = []
    whole = bench.row_tasks(_fake_lm_eval(whole_calls), structure, {}, lambda: None, SIZES, 2)
    # Each multiple-choice task in slices of 2 documents, in TASKS order; lambada whole.
    expected = [(t, range(s, min(s + 2, SIZES[t]))) if t in SIZES else (t, None)
                for t in bench.TASKS for s in (range(0, SIZES[t], 2) if t in SIZES else [0])]
    assert whole_calls == expected and whole["average"]["complete"]
    assert whole["per_doc"]["piqa"] == {"0": 1.0, "1": 0.0, "2": 0.0, "3": 1.0}  # piqa's average uses acc_norm
    assert whole["per_doc"]["boolq"] == {str(i): float(i % 2 == 0) for i in range(6)}  # boolq's acc
    hella = whole["tasks"]["hellaswag"]
    acc_norm = [float(i % 3 == 0) for i in range(7)]
    mean = sum(acc_norm) / 7
    assert hella["acc_norm"] == mean and hella["n"] == 7 and hella["average_metric"] == "acc_norm"
    assert hella["acc_norm_stderr"] == (sum((x - mean) ** 2 for x in acc_norm) / 6) ** 0.5 / 7 ** 0.5
    assert whole["tasks"]["lambada"]["perplexity"] == 47.0

    # Killed in the middle of a task (after its first slice): what was saved, through a JSON round trip as the
    # file keeps it, holds the finished tasks and that slice.
    file = tmp_path / "paper.json"
    partial: dict = {}
    calls: list = []
    try:
        bench.row_tasks(_fake_lm_eval(calls, stop_after=5), structure,
                        partial, lambda: bench.write_json(file, {"partial": {"r": partial}}), SIZES, 2)
    except KeyboardInterrupt:
        pass
    kept = json.loads(file.read_text())["partial"]["r"]
    assert list(kept["tasks"]) == ["openbookqa", "arc_challenge"] and list(kept["chunks"]) == ["winogrande"]
    assert list(kept["chunks"]["winogrande"]) == ["0-2"]

    # The rerun asks lm-eval only for the rest, and the row is exactly the uninterrupted one (seconds aside).
    calls.clear()
    resumed = bench.row_tasks(_fake_lm_eval(calls), json.loads(json.dumps(structure)), kept, lambda: None, SIZES, 2)
    assert calls == expected[5:] and "chunks" not in kept
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}

    # Tasks kept for a model of another structure are not reused.
    calls.clear()
    bench.row_tasks(_fake_lm_eval(calls), {"dropped": [], "widths": {}}, kept, lambda: None, SIZES, 2)
    assert calls == expected


def test_pooled_slices_are_the_whole_runs_numbers(isolated_cache):
    """Real lm-eval on a tiny model: a task run in slices of documents and pooled gives exactly what lm-eval
    reports for the whole run (accuracies, standard errors, n, per-document scores)."""
    bench = _bench()
    model, tok = make_model(), make_tokenizer()
    tasks = ["arc_easy", "boolq", "hellaswag"]
    whole = evaluate_tasks(model, tok, tasks, limit=5, batch_size=4, samples=True)
    for task in tasks:
        calls: list = []

        def evaluate(t: str, docs: range | None) -> dict:
            calls.append(docs)
            return evaluate_tasks(model, tok, [t], docs=docs, batch_size=4, samples=True)
        entry = bench.task_in_chunks(evaluate, task, 5, 2, {}, lambda: None)
        assert calls == [range(0, 2), range(2, 4), range(4, 5)]
        assert entry["result"] == whole["tasks"][task]
        metric = AVERAGE_METRIC[task]
        assert entry["per_doc"] == {str(r["doc_id"]): r[metric] for r in whole["samples"][task]}
        assert entry["data_hash"] == whole["data_hashes"][task]
