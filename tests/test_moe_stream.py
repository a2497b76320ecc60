"""Layer streaming of Mixture-of-Experts checkpoints: each family's tiny model saved with `save_pretrained` (one
tensor per expert; Mixtral under its hub names `block_sparse_moe.experts.N.w1`) is read one layer at a time,
its fused expert tensors built from the kept experts' stored tensors only, and every streamed result equals
the in-memory one exactly: scores, expert statistics, and the checkpoints of each command, tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MOE_FAMILIES, tiny_model, tiny_tokenizer
from test_stream import OneLayerAtATime, _tensors, calib

from prunekit.adapters import get_adapter
from prunekit.drop import SimilarityScorer, score_model
from prunekit.engine.streamed import StreamedLayers
from prunekit.errors import CheckpointError
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.moe.stats import collect_expert_stats
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.save import save_pruned_streamed
from prunekit.surgery import apply_plan

# What save_pretrained writes for expert 3 of layer 0 (gate, up and down), by family.
STORED = {
    "mixtral": ["model.layers.0.block_sparse_moe.experts.3.w1.weight", "model.layers.0.block_sparse_moe.experts.3.w3.weight",
                "model.layers.0.block_sparse_moe.experts.3.w2.weight"],
    "gpt_oss": ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"],  # fused as held
}
PER_EXPERT = [f"model.layers.0.mlp.experts.3.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-ckpt")
    out = {}
    for family in MOE_FAMILIES:
        model = tiny_model(family)
        model.save_pretrained(root / family)
        tiny_tokenizer().save_pretrained(root / family)
        out[family] = root / family
    return out


def inputs() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(inputs()).logits


def in_memory(path: Path, plan: PruningPlan | None = None):
    model, _ = load_model(path, tokenizer=False)
    if plan is not None:
        apply_plan(get_adapter(model), plan)
    return model


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def channels(seed: int, keep: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(128, generator=g)[:keep].tolist()) for _ in range(4)]


# Uniform expert drop (stock config); each expert its own channels (stock); per-layer expert counts with an MLP
# and a block removed (heterogeneous).
PLANS = {
    "experts": PruningPlan(widths={i: LayerWidth(experts=[0, 2, 3]) for i in range(4)}, method="test"),
    "channels": PruningPlan(widths={i: LayerWidth(expert_channels=channels(i)) for i in range(4)}, method="test"),
    "mixed": PruningPlan(widths={0: LayerWidth(experts=[1], expert_channels=channels(7, 72)),
                                 3: LayerWidth(experts=[0, 3])},
                         dropped=[DropTarget(1, "mlp"), DropTarget(2, "block")], method="test"),
}


# --- the stored layout --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_checkpoints_store_what_the_reader_must_convert(moe_checkpoints, family):
    sm = StreamedLayers(moe_checkpoints[family])
    names = set(sm.files.names())
    assert set(STORED.get(family, PER_EXPERT)) <= names
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert (fused in sm.layout.fused) == (family != "gpt_oss")
    if family == "mixtral":  # the router is renamed, the experts fused from w1 (gate) and w3 (up)
        assert sm.layout.renamed["model.layers.0.mlp.gate.weight"] == "model.layers.0.block_sparse_moe.gate.weight"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_streamed_layer_equals_the_loaded_one_and_a_narrowed_one_reads_only_kept_experts(moe_checkpoints, family):
    path = moe_checkpoints[family]
    ref = in_memory(path)
    sm = StreamedLayers(path)
    full = sm.materialise_layer(2)
    want = get_adapter(ref).layers()[2].state_dict()
    got = full.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    sm.release(full)

    plan = PruningPlan(widths={2: LayerWidth(experts=[0, 3], expert_channels=channels(5))})
    apply_plan(get_adapter(ref), plan)
    apply_plan(sm.adapter, plan, structure_only=True)
    sm.set_widths(plan.widths)
    read: list[str] = []
    load = sm.files.load
    sm.files.load = lambda names, device: (read.extend(names), load(names, device))[1]  # type: ignore[method-assign]
    cut = sm.materialise_layer(2).state_dict()
    want = get_adapter(ref).layers()[2].state_dict()
    assert sorted(want) == sorted(cut) and all(torch.equal(want[k], cut[k]) for k in want)
    experts = {n.split(".experts.")[1].split(".")[0] for n in read if ".experts." in n}
    assert experts == ({"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"} if family == "gpt_oss"
                       else {"0", "3"})


def test_a_fused_tensor_read_in_pieces_equals_the_whole_one_cut(moe_checkpoints):
    """Cuts the reader pushes onto the stored experts, and cuts it cannot (rows not block by block, experts
    keeping different counts of gate and up rows), which it reads whole and then cuts: the same values."""
    from prunekit.adapters.units import ExpertCut, apply_cut

    sm = StreamedLayers(moe_checkpoints["qwen3_moe"])
    load = lambda names: sm.files.load(names, sm.device)  # noqa: E731
    gate_up, down = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    whole = {n: sm.layout.read_fused(n, load) for n in (gate_up, down)}
    t = torch.tensor
    cuts = {
        gate_up: [ExpertCut((1, 2), 0, t([5, 3, 130, 128])), ExpertCut(None, 0, t([129, 0])),
                  ExpertCut((0, 3), 0, {0: t([0, 1, 128, 129]), 3: t([2, 3, 4, 200])}), (0, t([3])),
                  (1, t([255, 0])), (2, t([63, 1]))],
        down: [ExpertCut((0, 3), 1, {0: t([7, 1]), 3: t([127, 0])}), (2, t([4, 5, 6])), (1, t([0]))],
    }
    for name, each in cuts.items():
        for cut in each:
            assert torch.equal(sm.layout.read_fused(name, load, cut), apply_cut(whole[name], cut)), (name, cut)


def test_a_checkpoint_without_a_tensor_the_model_needs_is_refused_up_front(moe_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = moe_checkpoints["qwen3_moe"]
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.1.up_proj.weight"], tensors["model.layers.2.mlp.experts.1.gate_proj.weight"]
    (tmp_path / "bad").mkdir()
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.experts\.gate_up_proj \(stored for 3 of 4 experts"):
        StreamedLayers(tmp_path / "bad")
    # gpt-oss's hub files hold the experts quantized (MXFP4 `*_blocks` and `*_scales`), not the tensors themselves.
    src = moe_checkpoints["gpt_oss"]
    tensors = {n.replace("_proj", "_proj_blocks") if n.endswith(("gate_up_proj", "down_proj")) else n: t
               for n, t in load_file(str(src / "model.safetensors")).items()}
    (tmp_path / "mxfp4").mkdir()
    save_file(tensors, str(tmp_path / "mxfp4" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "mxfp4" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match="experts.gate_up_proj.*reads unquantized checkpoints"):
        StreamedLayers(tmp_path / "mxfp4")


# --- scores and statistics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_scores_and_expert_statistics_equal_in_memory(moe_checkpoints, family):
    path, data = moe_checkpoints[family], calib()
    model = in_memory(path)
    ref = score_model(model, get_adapter(model), data, batch_size=3, pairwise=True, progress=False)
    sm = StreamedLayers(path)
    watch = OneLayerAtATime(sm)
    got = SimilarityScorer(sm, data, batch_size=3, observers=[watch], progress=False).score()
    assert watch.seen == [0, 1, 2, 3]
    assert (got.block, got.attn, got.mlp, got.pairwise, got.tokens) == (ref.block, ref.attn, ref.mlp, ref.pairwise,
                                                                      ref.tokens)
    want = collect_expert_stats(model, data, adapter=get_adapter(model), batch_size=3, progress=False)
    sm = StreamedLayers(path)
    stats = collect_expert_stats(sm, data, adapter=sm.adapter, batch_size=3, progress=False)  # type: ignore[arg-type]
    assert sorted(stats) == sorted(want) == [0, 1, 2, 3]
    a, b = want.to_tensors(), stats.to_tensors()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.is_meta for p in sm.model.parameters())


# --- saving ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_streamed_save_equals_in_memory_and_reloads(moe_checkpoints, family, plan_name, tmp_path):
    from transformers import AutoModelForCausalLM

    src, plan = moe_checkpoints[family], PLANS[plan_name]
    model = in_memory(src, plan)
    mem = save_checkpoint(model, tiny_tokenizer(), tmp_path / "mem", plan)
    got = save_pruned_streamed(src, plan, tmp_path / "str", dtype="float32", max_shard_bytes=200_000,
                               progress=False)
    assert (got / "model.safetensors.index.json").is_file()  # layers split over shards, per-expert tensors too
    assert_same_tensors(mem, got)
    for f in ("config.json", "generation_config.json", "prunekit_plan.json"):
        assert json.loads((mem / f).read_text()) == json.loads((got / f).read_text()), f
    cfg = json.loads((got / "config.json").read_text())
    assert ("auto_map" in cfg) == (plan_name == "mixed")  # uniform plans give a stock config
    reloaded = AutoModelForCausalLM.from_pretrained(got, trust_remote_code=plan_name == "mixed")
    assert torch.equal(logits(reloaded), logits(model))
    # The pruned checkpoint streams again, per-layer expert counts and all (prunekit's own model class).
    again = StreamedLayers(got)
    for i, layer in enumerate(get_adapter(model).layers()):
        want, streamed = layer.state_dict(), again.materialise_layer(i).state_dict()
        assert sorted(want) == sorted(streamed) and all(torch.equal(want[k], streamed[k]) for k in want)


# --- the commands ---------------------------------------------------------------------------------------------------

COMMANDS = {
    "expert": ["drop", "--target", "expert", "--n", "1"],
    "slim": ["width", "--mlp-keep", "0.5", "--shots", "2", "--multiple-of", "8"],
    "mlp": ["drop", "--target", "mlp", "--n", "1"],
}


@pytest.mark.usefixtures("isolated_cache")
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_commands_write_the_in_memory_checkpoints(moe_checkpoints, tiny_checkpoint, family, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.cli import main

    src = moe_checkpoints[family]
    _, text = tiny_checkpoint
    common = ["--calib", str(text), "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    scores = {}
    for mode in ("--no-stream", "--stream"):
        scores[mode] = tmp_path / f"scores{mode}.json"
        assert main(["-q", "score", str(src), *common, mode, "--no-cache", "--json", str(scores[mode])]) == 0
    assert json.loads(scores["--stream"].read_text()) == json.loads(scores["--no-stream"].read_text())
    for name, argv in COMMANDS.items():
        mem, got = tmp_path / f"{name}-mem", tmp_path / f"{name}-str"
        assert main(["-q", argv[0], str(src), *argv[1:], *common, "--no-stream", "--out", str(mem)]) == 0
        assert main(["-q", argv[0], str(src), *argv[1:], *common, "--stream", "--no-cache",
                     "--offload-dir", str(tmp_path / "off"), "--out", str(got)]) == 0
        assert_same_tensors(mem, got)
        plan_mem, plan_str = (json.loads((d / "prunekit_plan.json").read_text()) for d in (mem, got))
        for key in ("method", "widths", "dropped", "scores"):
            assert plan_mem.get(key) == plan_str.get(key), (name, key)
        cfg = json.loads((got / "config.json").read_text())
        assert cfg == json.loads((mem / "config.json").read_text())
        assert ("auto_map" in cfg) == (name == "mlp")  # expert drop and slimming are uniform: stock configs
        plan = PruningPlan.load(got / "prunekit_plan.json")
        reloaded = AutoModelForCausalLM.from_pretrained(got, trust_remote_code=name == "mlp")
        assert torch.equal(logits(reloaded), logits(in_memory(src, plan)))
    assert list((tmp_path / "off").iterdir()) == []


@pytest.mark.usefixtures("isolated_cache")
@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("name,argv", [
    ("repair", ["drop", "--target", "attn", "--n", "2", "--repair", "linear"]),
    ("compress", ["compress", "--budget", "params=0.8"]),
])
def test_streamed_linear_repair_and_compress_write_the_in_memory_checkpoints(moe_checkpoints, tiny_checkpoint, family,
                                                                           name, argv, tmp_path):
    """Linear repair folds into the streamed experts (read and written through the source), and compress's
    candidates, expert drop's included (scored with the streamed layers read cut), are the in-memory ones."""
    from prunekit.cli import main

    src = moe_checkpoints[family]
    _, text = tiny_checkpoint
    common = ["--calib", str(text), "--samples", "8", "--seq-len", "32", "--batch-size", "2"]
    mem, got = tmp_path / "mem", tmp_path / "str"
    assert main(["-q", argv[0], str(src), *argv[1:], *common, "--no-stream", "--out", str(mem)]) == 0
    assert main(["-q", argv[0], str(src), *argv[1:], *common, "--stream", "--no-cache", "--offload-dir",
                 str(tmp_path / "off"), "--out", str(got)]) == 0
    assert_same_tensors(mem, got)
    plan_mem, plan_str = (json.loads((d / "prunekit_plan.json").read_text()) for d in (mem, got))
    for key in ("method", "widths", "dropped", "repair", "history", "scores"):
        assert plan_mem.get(key) == plan_str.get(key), key
    assert json.loads((got / "config.json").read_text()) == json.loads((mem / "config.json").read_text())
