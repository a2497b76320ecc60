"""`prunekit compare` and `prunekit bench`: report files, valid plots, and KV bytes equal to the analytic value."""

from __future__ import annotations

import json

import pytest

from prunekit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.mark.parametrize("interleave", [True, False])
def test_compare_dense_vs_attention_dropped(tiny_checkpoint, tmp_path, interleave):
    ck, text = tiny_checkpoint
    dropped = tmp_path / "dropped"
    assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "2", "--calib", str(text), "--samples", "2",
                 "--seq-len", "32", "--out", str(dropped)]) == 0
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("\n".join(json.dumps({"question": f"pick {i}", "choices": ["fox dog", "lazy network"],
                                          "answer": i % 2}) for i in range(4)))
    from prunekit.evaluation.zeroshot import make_jsonl_task

    make_jsonl_task("quiz", quiz, tmp_path / "tasks")
    out = tmp_path / "report"
    assert main(["-q", "compare", str(ck), str(dropped), "--out", str(out), "--text", str(text), "--windows", "2",
                 "--window-len", "32", "--context", "16,40", "--new-tokens", "3", "--repeats", "1",
                 "--tasks", "quiz", "--task-dir", str(tmp_path / "tasks"), "--calib", str(text),
                 *([] if interleave else ["--no-interleave"])]) == 0
    report = json.loads((out / "report.json").read_text())
    base, pruned = report["rows"]
    assert report["options"]["interleave"] is interleave
    assert all(len(run["decode_s_all"]) == 1 for r in report["rows"] for run in r["bench"]["runs"])
    for row in (base, pruned):
        for run in row["bench"]["runs"]:
            assert run["kv_bytes"] == run["kv_bytes_analytic"]
            assert run["kv_bytes"] == row["kv_bytes_per_token"] * run["context"]
        assert row["zeroshot"]["tasks"]["quiz"]["n"] == 4
    assert pruned["ratios"]["kv_bytes_per_token"] == 0.5
    assert pruned["ratios"]["params"] < 1 and base["ratios"]["params"] == 1
    # removing 2 of 4 attention layers: the ideal layer-compute speed-up is > 1
    assert pruned["ratios"]["ideal_layers@40"] > 1
    md = (out / "report.md").read_text()
    assert "quiz acc" in md and "decode" in md
    for name in ("similarity.png", "perplexity_vs_params.png", "speed_vs_context.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert name in md
    assert report["versions"]["torch"].startswith("2.13")
    assert report["seed"] == 1234 and len(report["eval_tokens_sha256"]) == 64


def test_bench_json_contract(tiny_checkpoint, tmp_path):
    ck, _ = tiny_checkpoint
    out = tmp_path / "b.json"
    assert main(["-q", "bench", str(ck), "--context", "8,16", "--new-tokens", "2", "--repeats", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"params", "disk_bytes", "runs"} <= set(data)
    assert [r["context"] for r in data["runs"]] == [8, 16]
    for r in data["runs"]:
        assert {"context", "prefill_tok_s", "decode_tok_s", "kv_bytes", "peak_rss_bytes"} <= set(r)
        assert r["kv_bytes"] == 2 * 4 * 2 * 16 * 4 * r["context"]  # K+V, 4 layers, 2 KV heads x 16, fp32


def test_compare_with_only_a_width_pruned_model(tiny_checkpoint, tmp_path):
    """A width plan's scores are importances, not similarities: the heatmap then comes from scoring the base."""
    ck, text = tiny_checkpoint
    narrow = tmp_path / "narrow"
    assert main(["-q", "width", str(ck), "--mlp-keep", "0.5", "--shots", "1", "--calib", str(text),
                 "--samples", "2", "--seq-len", "32", "--out", str(narrow)]) == 0
    out = tmp_path / "report"
    assert main(["-q", "compare", str(ck), str(narrow), "--out", str(out), "--text", str(text), "--windows", "2",
                 "--window-len", "32", "--no-bench", "--calib", str(text)]) == 0
    report = json.loads((out / "report.json").read_text())
    base, pruned = report["rows"]
    assert pruned["ratios"]["params"] < 1 and pruned["ratios"]["kv_bytes_per_token"] == 1
    assert (out / "similarity.png").read_bytes()[:8] == PNG_MAGIC


def test_stdout_holds_only_the_json_summary(tiny_checkpoint, tmp_path, capfd):
    """Without -q, progress goes to stderr: stdout of `compare` and `eval` parses as one JSON object."""
    ck, text = tiny_checkpoint
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("\n".join(json.dumps({"question": f"pick {i}", "choices": ["fox dog", "lazy network"],
                                          "answer": i % 2}) for i in range(4)))
    from prunekit.evaluation.zeroshot import make_jsonl_task

    make_jsonl_task("quiz", quiz, tmp_path / "tasks")
    capfd.readouterr()
    out = tmp_path / "report"
    assert main(["compare", str(ck), str(ck), "--out", str(out), "--text", str(text), "--windows", "2",
                 "--window-len", "32", "--context", "16", "--new-tokens", "2", "--repeats", "2",
                 "--calib", str(text)]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out)["out"] == str(out)
    assert "[compare]" in captured.err
    dest = tmp_path / "eval.json"
    assert main(["eval", str(ck), "--text", str(text), "--windows", "2", "--window-len", "32", "--tasks", "quiz",
                 "--task-dir", str(tmp_path / "tasks"), "--json", str(dest)]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert summary["json"] == str(dest) and summary["tasks"]["quiz"]["n"] == 4
