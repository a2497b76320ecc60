"""A heterogeneous checkpoint loads as the pruned model or not at all (issue #41, item 4).

Its config.json carries prunekit's own model_type (`prunekit_<stock>`), so plain transformers refuses it without
`trust_remote_code` instead of building the stock model with random weights where sub-layers were removed;
with `trust_remote_code=True` the checkpoint's modeling_prunekit.py builds it, and prunekit reads it without
remote code. Uniform results keep the stock config.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import transformers
from conftest import FAMILIES, tiny_model, tiny_tokenizer
from test_drop import run_without_prunekit

from prunekit.adapters import get_adapter
from prunekit.engine.streamed import StreamedLayers
from prunekit.io import config_edit
from prunekit.io.checkpoint import build_skeleton, load_config, load_model, load_tokenizer, save_checkpoint
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.save import save_pruned_streamed
from prunekit.surgery import apply_plan

ATTN_DROP = PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(2, "attn")], method="test")
PER_LAYER_WIDTH = PruningPlan(method="test", widths={0: LayerWidth(heads=[2, 3], kv_heads=[1],
                                                                   channels=list(range(0, 128, 2))),
                                                     3: LayerWidth(channels=list(range(50)))})
UNIFORM = PruningPlan(method="test", dropped=[DropTarget(2, "block")],
                      widths={i: LayerWidth(heads=[0, 2], kv_heads=[0, 1], channels=list(range(0, 128, 2)))
                              for i in range(4)})
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
           "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
           "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"), "granite": ("GraniteConfig", "GraniteForCausalLM"),
           "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM")}


def inputs(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(inputs()).logits


def pruned(family: str, plan: PruningPlan, seed: int = 0):
    model = tiny_model(family, seed)
    apply_plan(get_adapter(model), plan)
    return model


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture
def no_answer(monkeypatch):
    """transformers asks on stdin before running a checkpoint's code when it is not told; answer nothing, as
    in any non-interactive run, so the refusal does not depend on how pytest captures stdin."""
    def _eof(*_):
        raise EOFError
    monkeypatch.setattr("builtins.input", _eof)


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_drop_is_sealed_refused_without_remote_code_and_exact_with_it(family, tmp_path, no_answer):
    model = pruned(family, ATTN_DROP)
    ref = logits(model)
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "het", ATTN_DROP)
    cfg = config_of(out)
    config_cls, model_cls = CLASSES[family]
    assert cfg["model_type"] == f"prunekit_{family}"
    assert cfg["prunekit"]["base_model_type"] == family and cfg["prunekit"]["dropped_attn"] == [1, 2]
    assert cfg["auto_map"] == {"AutoConfig": f"modeling_prunekit.Prunekit{config_cls}",
                               "AutoModelForCausalLM": f"modeling_prunekit.Prunekit{model_cls}"}
    assert cfg["architectures"] == [f"Prunekit{model_cls}"]
    for auto in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        with pytest.raises(ValueError, match="trust_remote_code"):
            auto.from_pretrained(out)
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == f"Prunekit{model_cls}" and type(remote.config).__name__ == f"Prunekit{config_cls}"
    assert remote.config.model_type == f"prunekit_{family}"
    ours, _ = load_model(out, tokenizer=False)
    # prunekit reads it as the stock config class, so its adapters apply
    assert type(ours.config) is getattr(transformers, config_cls) and ours.config.model_type == family
    assert "base_model_type" not in ours.config.prunekit and get_adapter(ours).num_layers == 4
    assert torch.equal(logits(remote), logits(ours)) and torch.equal(logits(ours), ref)


def test_per_layer_width_is_sealed_and_exact_with_remote_code(tmp_path, no_answer):
    model = pruned("llama", PER_LAYER_WIDTH)
    ref = logits(model)
    out = save_checkpoint(model, None, tmp_path / "w", PER_LAYER_WIDTH)
    cfg = config_of(out)
    assert cfg["model_type"] == "prunekit_llama" and cfg["prunekit"]["layer_overrides"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ours, _ = load_model(out, tokenizer=False)
    assert torch.equal(logits(remote), logits(ours)) and torch.equal(logits(ours), ref)


def test_without_prunekit_plain_transformers_refuses_and_remote_code_is_exact(tmp_path):
    """The checkpoints as a user without prunekit meets them: a clean interpreter in which prunekit cannot be
    imported, stdin closed (a non-interactive run)."""
    cases = {"llama-attn": ("llama", ATTN_DROP), "gemma3-attn": ("gemma3_text", ATTN_DROP),
             "llama-width": ("llama", PER_LAYER_WIDTH)}
    want = {}
    for name, (family, plan) in cases.items():
        model = pruned(family, plan)
        want[name] = logits(model)
        save_checkpoint(model, None, tmp_path / name, plan)
        ours, _ = load_model(tmp_path / name, tokenizer=False)
        assert torch.equal(logits(ours), want[name]), name
    script = textwrap.dedent(f"""
        import importlib.util, json
        assert importlib.util.find_spec("prunekit") is None, "prunekit must not be importable here"
        import torch
        from transformers import AutoModelForCausalLM
        refused = {{}}
        for name in {sorted(cases)!r}:
            path = {str(tmp_path)!r} + "/" + name
            try:
                AutoModelForCausalLM.from_pretrained(path)
                refused[name] = None
            except Exception as e:
                refused[name] = str(e)
            m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                torch.save(m(torch.tensor({inputs().tolist()})).logits, path + "/remote_logits.pt")
        json.dump(refused, open({str(tmp_path / 'refused.json')!r}, "w"))
    """)
    proc = run_without_prunekit(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = json.loads((tmp_path / "refused.json").read_text())
    for name in cases:
        assert refused[name] and "trust_remote_code" in refused[name], (name, refused[name])
        assert torch.equal(torch.load(tmp_path / name / "remote_logits.pt"), want[name]), name


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_uniform_result_keeps_the_stock_config(family, tmp_path):
    model = pruned(family, UNIFORM)
    ref = logits(model)
    out = save_checkpoint(model, None, tmp_path / "u", UNIFORM)
    cfg = config_of(out)
    assert cfg["model_type"] == family and cfg["num_hidden_layers"] == 3 and cfg["num_attention_heads"] == 2
    assert "auto_map" not in cfg and "prunekit" not in cfg and not (out / "modeling_prunekit.py").exists()
    assert cfg["architectures"] == [CLASSES[family][1]]
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(plain) is getattr(transformers, CLASSES[family][1])
    assert torch.equal(logits(plain), ref)


def test_resaving_a_loaded_heterogeneous_model_stays_sealed(tmp_path, no_answer):
    """What `heal` does to an attention-drop result (load, then save the same structure), and a second pruning
    pass that keeps it heterogeneous or makes it uniform."""
    first = save_checkpoint(pruned("llama", ATTN_DROP), tiny_tokenizer(), tmp_path / "first", ATTN_DROP)
    model, tok = load_model(first)
    again = save_checkpoint(model, tok, tmp_path / "again", ATTN_DROP)
    assert config_of(again) == config_of(first)
    assert (again / "modeling_prunekit.py").read_text() == (first / "modeling_prunekit.py").read_text()

    model, _ = load_model(first, tokenizer=False)
    second = PruningPlan(dropped=[DropTarget(3, "mlp")], method="test")
    apply_plan(get_adapter(model), second)
    ref = logits(model)
    out = save_checkpoint(model, None, tmp_path / "second", second)
    cfg = config_of(out)
    assert cfg["model_type"] == "prunekit_llama" and cfg["prunekit"]["dropped_mlp"] == [3]
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(logits(remote), ref)

    # Removing the MLPs of the attention-less layers removes those layers: uniform again, stock config back,
    # although the model in memory is prunekit's class.
    model, _ = load_model(first, tokenizer=False)
    apply_plan(get_adapter(model), PruningPlan(dropped=[DropTarget(1, "mlp"), DropTarget(2, "mlp")], method="t"))
    ref = logits(model)
    out = save_checkpoint(model, None, tmp_path / "uniform")
    cfg = config_of(out)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in cfg and "prunekit" not in cfg and not (out / "modeling_prunekit.py").exists()
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(out)), ref)


def test_checkpoint_of_an_older_prunekit_still_loads_and_is_sealed_when_saved_again(tmp_path):
    model = pruned("llama", ATTN_DROP)
    ref = logits(model)
    out = save_checkpoint(model, None, tmp_path / "old", ATTN_DROP)
    cfg = config_of(out)
    # As prunekit wrote it before: the stock model_type and architectures, only the model class in auto_map.
    old = config_edit.unsealed_config(cfg)
    old["architectures"] = ["LlamaForCausalLM"]
    assert old["model_type"] == "llama" and set(old["auto_map"]) == {"AutoModelForCausalLM"}
    (out / "config.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    ours, _ = load_model(out, tokenizer=False)
    assert torch.equal(logits(ours), ref)
    assert config_of(save_checkpoint(ours, None, tmp_path / "new", ATTN_DROP)) == cfg


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_streamed_save_of_a_sealed_source_equals_in_memory(family, tmp_path):
    src = save_checkpoint(pruned(family, ATTN_DROP), tiny_tokenizer(), tmp_path / "src", ATTN_DROP)
    plan = PruningPlan(dropped=[DropTarget(0, "mlp")], widths={3: LayerWidth(channels=list(range(64)))},
                       method="test")
    model, tok = load_model(src)
    apply_plan(get_adapter(model), plan)
    ref = logits(model)
    mem = save_checkpoint(model, tok, tmp_path / "mem", plan)
    got = save_pruned_streamed(src, plan, tmp_path / "str", dtype="float32", progress=False)
    assert config_of(got) == config_of(mem)
    assert config_of(got)["model_type"] == f"prunekit_{family}"
    assert (got / "modeling_prunekit.py").read_text() == (mem / "modeling_prunekit.py").read_text()
    reloaded, _ = load_model(got, tokenizer=False)
    assert torch.equal(logits(reloaded), ref)


def test_every_reader_gets_the_stock_config_without_warnings_or_questions(tmp_path, monkeypatch):
    out = save_checkpoint(pruned("gemma3_text", ATTN_DROP), tiny_tokenizer(), tmp_path / "het", ATTN_DROP)
    asked: list[str] = []  # transformers asks this (and swallows a failed answer) before running remote code

    def _ask(prompt: str = "") -> str:
        asked.append(prompt)
        return "n"
    monkeypatch.setattr("builtins.input", _ask)
    log = transformers.utils.logging
    level = log.get_verbosity()
    log.set_verbosity_warning()
    try:
        from transformers.testing_utils import CaptureLogger

        with CaptureLogger(log.get_logger("transformers")) as cl:
            config = load_config(out)
            skeleton = build_skeleton(out)
            streamed = StreamedLayers(out)
            model, tok = load_model(out)
            assert type(load_tokenizer(out)) is type(tok)
            save_pruned_streamed(out, PruningPlan(dropped=[DropTarget(0, "mlp")]), tmp_path / "str", progress=False)
    finally:
        log.set_verbosity(level)
    assert asked == [] and "model of type" not in cl.out, (asked, cl.out)
    assert config_of(tmp_path / "str")["model_type"] == "prunekit_gemma3_text"
    assert type(config) is transformers.Gemma3TextConfig and config.model_type == "gemma3_text"
    assert config.prunekit["dropped_attn"] == [1, 2] and "base_model_type" not in config.prunekit
    assert set(config.auto_map) == {"AutoModelForCausalLM"}
    assert type(skeleton).__name__ == "PrunekitGemma3ForCausalLM" and skeleton.config.model_type == "gemma3_text"
    assert not get_adapter(streamed.model).has_attention(get_adapter(streamed.model).layers()[1])


def test_sealing_is_idempotent_and_undone_by_unsealing():
    model = pruned("qwen2", ATTN_DROP)
    in_memory = model.config.to_dict()
    in_memory["architectures"] = ["Qwen2ForCausalLM"]
    sealed = config_edit.sealed_config(in_memory)
    assert sealed["model_type"] == "prunekit_qwen2" and config_edit.is_sealed(sealed)
    assert config_edit.sealed_config(sealed) == sealed
    back = config_edit.unsealed_config(sealed)
    assert {k: v for k, v in back.items() if k != "architectures"} == \
        {k: v for k, v in in_memory.items() if k != "architectures"}
    assert config_edit.remote_classes(sealed) == config_edit.RemoteClasses("Qwen2ForCausalLM", "Qwen2Config",
                                                                           "prunekit_qwen2")
    stock = tiny_model("qwen2").config.to_dict()
    assert config_edit.sealed_config(stock) == stock and config_edit.remote_classes(stock) is None
    broken = dict(in_memory, auto_map={})
    with pytest.raises(ValueError, match="auto_map"):
        config_edit.sealed_config(broken)
