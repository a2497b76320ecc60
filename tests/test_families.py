"""Every command on every family added for issue #40 (tiny saved checkpoints): it works, or refuses one method
with one clear line and exit 2. The exact facts (zeroing equals removing, identical reloads) are in the
family-parametrised tests of test_units, test_width, test_drop, test_remote_load and test_adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model, tiny_tokenizer

from prunekit.cli import main
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.plans import PLAN_FILE

pytestmark = pytest.mark.usefixtures("isolated_cache")

NEW_FAMILIES = ["gemma2", "olmo2", "granite", "smollm3", "phi3"]
# Families whose sub-layer outputs are normed before the residual add: linear repair cannot fold there.
POST_NORMED = {"gemma2", "olmo2"}


def run(*argv) -> int:
    return main(["-q", *map(str, argv)])


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ck = save_checkpoint(tiny_model(request.param), tiny_tokenizer(), root / "model")
    words = SAMPLE_TEXT.split()
    rng = torch.Generator().manual_seed(0)
    text = root / "text.txt"
    text.write_text("\n\n".join(" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=rng).tolist())
                                for _ in range(40)))
    return request.param, ck, text


def calib(text) -> list:
    return ["--calib", text, "--samples", 4, "--seq-len", 24, "--batch-size", 2]


def test_score_drop_eval_bench(saved, tmp_path):
    family, ck, text = saved
    assert run("score", ck, *calib(text), "--json", tmp_path / "s.json") == 0
    assert len(json.loads((tmp_path / "s.json").read_text())["layers"]) == 4
    assert run("drop", ck, "--target", "block", "--n", 1, *calib(text), "--out", tmp_path / "block") == 0
    cfg = json.loads((tmp_path / "block" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["num_hidden_layers"] == 3 and "auto_map" not in cfg
    for key in ("layer_types", "no_rope_layers"):  # per-layer lists go with their layers
        if key in cfg:
            dropped = json.loads((tmp_path / "block" / PLAN_FILE).read_text())["dropped"][0]["layer"]
            dense = json.loads((ck / "config.json").read_text())[key]
            assert cfg[key] == [v for i, v in enumerate(dense) if i != dropped]
    assert run("drop", ck, "--target", "attn", "--n", 2, *calib(text), "--out", tmp_path / "attn") == 0
    kv = []
    for out in (ck, tmp_path / "attn"):
        assert run("eval", out, "--text", text, "--windows", 2, "--window-len", 32, "--json", tmp_path / "e.json",
                   "--force") == 0
        kv.append(json.loads((tmp_path / "e.json").read_text())["kv_bytes_per_token"])
    assert kv[1] * 2 == kv[0]  # 2 of 4 attention layers gone
    assert run("bench", tmp_path / "attn", "--context", "8", "--new-tokens", 2, "--repeats", 1,
               "--json", tmp_path / "b.json") == 0


def test_width_and_its_reload(saved, tmp_path):
    _, ck, text = saved
    out = tmp_path / "narrow"
    assert run("width", ck, "--mlp-keep", 0.5, "--heads-keep", 0.5, "--shots", 2, *calib(text), "--out", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 64 and cfg["num_key_value_heads"] == 1 and "auto_map" not in cfg
    model, _ = load_model(out, tokenizer=False)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in load_model(ck, tokenizer=False)[0]
                                                          .parameters())
    stream = tmp_path / "narrow-stream"
    assert run("width", ck, "--mlp-keep", 0.5, "--heads-keep", 0.5, "--shots", 2, *calib(text), "--stream",
               "--out", stream) == 0
    a, _ = load_model(stream, tokenizer=False)
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(x).logits, model(x).logits)


def test_compress_and_repair(saved, tmp_path, capsys):
    family, ck, text = saved
    base = [ck, "--budget", "params=0.85", "--calib", text, "--samples", 8, "--seq-len", 24]
    assert run("compress", *base, "--out", tmp_path / "c") == 0
    assert (tmp_path / "c" / PLAN_FILE).is_file()
    capsys.readouterr()
    code = run("compress", *base, "--repair", "linear", "--out", tmp_path / "r")
    if family in POST_NORMED:
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "normalises sub-layer outputs" in err[0]
        assert not (tmp_path / "r").exists()
    else:
        assert code == 0


def test_heal_with_lora_and_compare(saved, tmp_path):
    _, ck, text = saved
    pruned = tmp_path / "pruned"
    assert run("drop", ck, "--target", "mlp", "--n", 1, *calib(text), "--out", pruned) == 0
    assert run("heal", pruned, "--teacher", ck, "--text", text, "--samples", 2, "--seq-len", 24, "--batch-size", 2,
               "--steps", 2, "--lora", 2, "--out", tmp_path / "healed") == 0
    assert run("heal", pruned, "--text", text, "--samples", 2, "--seq-len", 24, "--batch-size", 2, "--steps", 1,
               "--out", tmp_path / "full") == 0
    assert run("compare", ck, tmp_path / "healed", "--out", tmp_path / "report", "--text", text, "--windows", 2,
               "--window-len", 32, "--context", "8", "--new-tokens", 2, "--repeats", 1, "--calib", text) == 0
    assert len(json.loads((tmp_path / "report" / "report.json").read_text())["rows"]) == 2


# GGUF refusals of this fixture's checkpoints. Granite, OLMo 2 and Phi-3 are written (test_export_families,
# test_export_gemma2_olmo2, test_export_phi3_smollm3), but this fixture's tokenizer has one id more than the
# vocabulary, which the export refuses first; its Gemma 2 keeps Gemma 2's query_pre_attn_scalar (256), an
# attention scale llama.cpp's gemma2 graph does not use for head size 16; its SmolLM3's layer without rope
# (layer 1) is not where llama.cpp puts it.
GGUF_REFUSAL = {"granite": "tokenizer", "olmo2": "tokenizer", "phi3": "tokenizer", "gemma2": "attention scale 0.0625",
                "smollm3": "no longer follow llama.cpp's rule"}


def test_export_refuses_in_one_line(saved, tmp_path, capsys):
    """GGUF: every family here is written (test_export_families, test_export_gemma2_olmo2,
    test_export_phi3_smollm3); this fixture's checkpoints are refused for what they are, each in one line."""
    family, ck, _ = saved
    capsys.readouterr()
    assert run("export", ck, "--format", "gguf", "--out", tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and GGUF_REFUSAL[family] in err[0]
    assert run("export", ck, "--format", "nemotron-nas", "--out", tmp_path / "nas") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nemotron-nas export supports model types llama, mistral, qwen2" in err[0]
