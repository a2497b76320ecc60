"""Layer streaming, streamed saving, data-parallel scoring, the score cache and resuming: exact comparisons
with the in-memory path on tiny in-process models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_calib, tiny_model, tiny_tokenizer

from prunekit.adapters import get_adapter
from prunekit.data import CalibrationData
from prunekit.drop import SimilarityScorer, score_model
from prunekit.engine.memory import should_stream
from prunekit.engine.runner import Observer
from prunekit.engine.streamed import StreamedLayers
from prunekit.errors import ActivationOverflowError, CheckpointError, DataError, DistributedError
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.jobs import drop_job, score_job, width_job
from prunekit.jobs.cache import ScoreCache
from prunekit.jobs.dist import DistEnv, shard_calibration
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.save import save_pruned_streamed
from prunekit.surgery import apply_plan, mark_drops
from prunekit.width import ActivationCollector, WidthStatsObserver, width_prune

TOL = 1e-6


def calib(n: int = 7, t: int = 20, seed: int = 1, pad_last: int = 5) -> CalibrationData:
    return random_calib(n=n, t=t, seed=seed, pad_last=pad_last)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny llama, gemma3_text (sliding window, per-layer-type masks and rotary embeddings), qwen2
    (q/k/v biases), and a heterogeneous llama whose layer 1 has no attention and layer 2 no MLP."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer()
    out = {fam: save_checkpoint(tiny_model(fam), tok, root / fam) for fam in ("llama", "gemma3_text", "qwen2")}
    model = tiny_model("llama", seed=3)
    plan = PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(2, "mlp")], method="test")
    apply_plan(get_adapter(model), plan)
    out["llama-dropped"] = save_checkpoint(model, tok, root / "llama-dropped", plan)
    return out


def assert_scores_close(a, b, tol: float = TOL) -> None:
    assert a.tokens == b.tokens
    for key in ("block", "attn", "mlp"):
        diffs = [abs(x - y) for x, y in zip(getattr(a, key), getattr(b, key))]
        assert len(diffs) == a.num_layers and max(diffs) < tol, (key, diffs)
    assert (a.pairwise is None) == (b.pairwise is None)
    if a.pairwise is not None:
        assert max(abs(x - y) for ra, rb in zip(a.pairwise, b.pairwise) for x, y in zip(ra, rb)) < tol


def in_memory_scores(path: Path, data: CalibrationData, batch_size: int = 3, pairwise: bool = True):
    model, _ = load_model(path, tokenizer=False)
    return score_model(model, get_adapter(model), data, batch_size=batch_size, pairwise=pairwise, progress=False)


class OneLayerAtATime(Observer):
    """Checks that exactly one decoder layer has real weights whenever a layer is being run."""

    def __init__(self, sm: StreamedLayers):
        self.sm = sm
        self.seen: list[int] = []

    def begin_layer(self, i: int, layer: torch.nn.Module) -> None:
        real = [j for j, lay in enumerate(self.sm.adapter.layers())
                if any(not p.is_meta for p in lay.parameters())]
        assert real == [i]
        self.seen.append(i)


# --- streamed scoring --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("on_disk", [False, True])
def test_streamed_scores_equal_in_memory(checkpoints, family, on_disk, tmp_path):
    data = calib()
    ref = in_memory_scores(checkpoints[family], data)
    sm = StreamedLayers(checkpoints[family])
    watch = OneLayerAtATime(sm)
    work = tmp_path / "work" if on_disk else None
    got = SimilarityScorer(sm, data, batch_size=3, observers=[watch], work_dir=work, progress=False).score()
    assert_scores_close(ref, got)
    assert watch.seen == [0, 1, 2, 3]
    assert all(p.is_meta for p in sm.model.parameters())  # everything released afterwards
    # A wrong mask would change the scores: the sliding window (8) is shorter than the sequences (20).
    if family == "gemma3_text":
        assert sm.model.config.sliding_window < data.input_ids.shape[1]


def test_bfloat16_weights_with_float64_sums_match_in_memory(checkpoints):
    data = calib(seed=9)
    path = checkpoints["llama"]
    model, _ = load_model(path, dtype="bfloat16", tokenizer=False)
    ref = score_model(model, get_adapter(model), data, batch_size=3, progress=False)
    sm = StreamedLayers(path, dtype="bfloat16")
    got = SimilarityScorer(sm, data, batch_size=3, progress=False).score()
    assert_scores_close(ref, got)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert ref.block != in_memory_scores(path, data).block  # bfloat16 really computed in bfloat16


def test_streamed_scores_from_a_sharded_checkpoint(tmp_path):
    model = tiny_model("llama", seed=3)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    data = calib(seed=4)
    got = SimilarityScorer(StreamedLayers(path), data, batch_size=3, progress=False).score()
    assert_scores_close(in_memory_scores(path, data), got)


def test_streamed_rescore_reruns_only_later_layers(checkpoints):
    data = calib(seed=5)
    path = checkpoints["llama"]
    model, _ = load_model(path, tokenizer=False)
    ad = get_adapter(model)
    ref = SimilarityScorer(model, data, adapter=ad, batch_size=3, pairwise=False, rescore=True, progress=False)
    ref.score()
    sm = StreamedLayers(path)
    ran: list[int] = []
    scorer = SimilarityScorer(sm, data, batch_size=3, pairwise=False, rescore=True, progress=False,
                            on_layer_done=ran.append)
    scorer.score()
    assert ran == [0, 1, 2, 3]
    ran.clear()
    for adapter in (ad, sm.adapter):
        mark_drops(adapter, [DropTarget(2, "attn")])
    got = scorer.score(start_layer=2)
    assert ran == [2, 3]  # layers 0-1 unchanged: their boundary states are reused
    assert_scores_close(ref.score(start_layer=2), got)
    assert got.attn[2] == 1.0  # a dropped attention leaves the residual stream unchanged


# --- streamed saving ---------------------------------------------------------------------------------------

def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _non_weight_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if not p.name.startswith("model")}


PLANS = {
    "attn": PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(3, "attn")], method="test"),
    "block": PruningPlan(dropped=[DropTarget(0, "block"), DropTarget(2, "block")], method="test"),
    "width": PruningPlan(dropped=[DropTarget(1, "block"), DropTarget(2, "mlp")], method="test",
                         widths={0: LayerWidth(heads=[2, 3], kv_heads=[1], channels=list(range(0, 128, 2))),
                                 3: LayerWidth(channels=list(range(50)))}),
}


@pytest.mark.parametrize("family,plan_name", [("llama", "attn"), ("llama", "block"), ("llama", "width"),
                                              ("gemma3_text", "attn"), ("gemma3_text", "width")])
def test_streamed_save_equals_in_memory(checkpoints, family, plan_name, tmp_path):
    src, plan = checkpoints[family], PLANS[plan_name]
    model, tok = load_model(src)
    apply_plan(get_adapter(model), plan)
    mem = save_checkpoint(model, tok, tmp_path / "mem", plan)
    # Small shards: the streamed writer splits layers across files and writes an index.
    got = save_pruned_streamed(src, plan, tmp_path / "str", dtype="float32", max_shard_bytes=30_000, progress=False)
    a, b = _tensors(mem), _tensors(got)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for f in ("config.json", "generation_config.json", "prunekit_plan.json"):
        assert json.loads((mem / f).read_text()) == json.loads((got / f).read_text()), f
    assert _non_weight_files(mem) == _non_weight_files(got)  # tokenizer, plan, modeling_prunekit.py alike
    assert (got / "model.safetensors.index.json").is_file()
    if plan_name == "width":  # heterogeneous: loads through its own code, gives the same logits
        reloaded, _ = load_model(got, tokenizer=False)
        x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(reloaded(x).logits, model(x).logits)


def test_streamed_save_refuses_existing_output_and_leaves_nothing_half_written(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists"):
        save_pruned_streamed(checkpoints["llama"], PLANS["attn"], out, progress=False)
    bad = PruningPlan(widths={0: LayerWidth(channels=[999])})
    from prunekit.errors import PlanError

    with pytest.raises(PlanError):
        save_pruned_streamed(checkpoints["llama"], bad, out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- jobs: drop end to end, cache, resume ------------------------------------------------------------------

def test_streamed_iterative_drop_job_equals_in_memory(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    kw = dict(target="joint", n=3, iterative=True, calib=text, samples=6, seq_len=24, batch_size=2,
              progress=False)
    p_mem = drop_job(str(path), tmp_path / "mem", stream=False, use_cache=False, **kw)
    p_str = drop_job(str(path), tmp_path / "str", stream=True, offload_dir=tmp_path / "off", **kw)
    assert p_mem.dropped == p_str.dropped and p_mem.history == p_str.history
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert list((tmp_path / "off").iterdir()) == []  # work directories removed after success


def test_cli_streamed_drop_equals_in_memory(tiny_checkpoint, tmp_path, monkeypatch):
    from prunekit.cli import main

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    common = ["-q", "drop", str(path), "--target", "block", "--n", "2", "--consecutive", "--calib", str(text),
              "--samples", "6", "--seq-len", "24", "--batch-size", "2"]
    assert main([*common, "--no-stream", "--out", str(tmp_path / "mem")]) == 0
    assert main([*common, "--stream", "--no-cache", "--offload-dir", str(tmp_path / "off"),
                 "--out", str(tmp_path / "str")]) == 0
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    plan_a = json.loads((tmp_path / "mem" / "prunekit_plan.json").read_text())
    plan_b = json.loads((tmp_path / "str" / "prunekit_plan.json").read_text())
    assert plan_a["dropped"] == plan_b["dropped"] and plan_a["scores"] == plan_b["scores"]
    assert list((tmp_path / "off").iterdir()) == []
    assert main([*common, "--stream", "--out", str(tmp_path / "str")]) == 2  # exists, no --force


def test_score_cache_hit_miss_and_bypass(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    kw = dict(calib=text, samples=6, seq_len=24, batch_size=2, progress=False)
    first = score_job(str(path), stream=True, **kw)
    again = score_job(str(path), stream=False, **kw)  # same sums, whichever path computed them
    assert not first.cache_hit and again.cache_hit
    assert first.scores.to_json() == again.scores.to_json()
    entries = list((tmp_path / "cache" / "scores").glob("*.safetensors"))
    assert len(entries) == 1
    other = score_job(str(path), stream=False, **{**kw, "batch_size": 3})  # options are part of the key
    assert not other.cache_hit
    os.utime(path / "model.safetensors", ns=(1, 1))  # a rewritten checkpoint invalidates its entries
    assert not score_job(str(path), stream=False, **kw).cache_hit
    n = len(list((tmp_path / "cache" / "scores").glob("*.safetensors")))
    assert not score_job(str(path), stream=False, use_cache=False, **kw).cache_hit
    assert len(list((tmp_path / "cache" / "scores").glob("*.safetensors"))) == n


def test_interrupted_streamed_run_resumes_from_last_finished_layer(checkpoints, tmp_path):
    data = calib(seed=6)
    path = checkpoints["gemma3_text"]
    work = tmp_path / "run"

    def stop_after_1(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises mid-run

    with pytest.raises(KeyboardInterrupt):
        SimilarityScorer(StreamedLayers(path), data, batch_size=3, work_dir=work, progress=False,
                       on_layer_done=stop_after_1).score()
    assert (work / "_progress.safetensors").is_file()
    ran: list[int] = []
    resumed = SimilarityScorer(StreamedLayers(path), data, batch_size=3, work_dir=work, progress=False,
                             on_layer_done=ran.append).score()
    assert ran == [2, 3]  # layers 0 and 1 were not run again
    assert_scores_close(in_memory_scores(path, data), resumed)
    assert not (work / "_progress.safetensors").exists()


# --- data parallel -----------------------------------------------------------------------------------------

def test_sharding_is_by_whole_batches():
    data = calib(n=7)
    shards = [shard_calibration(data, 2, DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert [s.input_ids.shape[0] for s in shards] == [3, 2, 2]  # batches {0, 3}, {1}, {2} of sizes 2 2 2 1
    assert torch.equal(shards[0].input_ids, torch.cat([data.input_ids[0:2], data.input_ids[6:7]]))
    with pytest.raises(DataError, match="at least 5 calibration batches"):
        shard_calibration(data, 2, DistEnv(rank=0, world_size=5))
    with pytest.raises(DistributedError):
        DistEnv.from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_two_processes_give_the_single_process_scores(tiny_checkpoint, tmp_path):
    path, text = tiny_checkpoint
    single = score_job(str(path), calib=text, samples=6, seq_len=24, batch_size=2, stream=False, use_cache=False,
                       progress=False)
    out = tmp_path / "scores.json"
    env = {**os.environ, "PRUNEKIT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "prunekit", "-q", "score", str(path), "--calib", str(text), "--samples", "6", "--seq-len", "24",
           "--batch-size", "2", "--stream", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    ref = single.scores.to_json()
    assert got["tokens"] == ref["tokens"] and got["calibration"] == ref["calibration"]
    for g, r in zip(got["layers"], ref["layers"], strict=True):
        assert all(abs(g[k] - r[k]) < TOL for k in ("block", "attn", "mlp"))
    assert max(abs(x - y) for rg, rr in zip(got["pairwise"], ref["pairwise"]) for x, y in zip(rg, rr)) < TOL


# --- streamed width pruning ----------------------------------------------------------------------------------

WIDTH_CASES = {
    "uniform-kv": dict(mlp_keep=0.5, heads_keep=0.5, mode="uniform", shots=3),
    "per-layer-query-heads-weight": dict(mlp_keep=0.6, heads_keep=0.5, mode="per-layer", shots=2,
                                         head_mode="query-heads", scorer="weight-activation"),
}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "llama-dropped"])
@pytest.mark.parametrize("case", sorted(WIDTH_CASES))
def test_streamed_width_plan_equals_in_memory(checkpoints, family, case, tmp_path):
    kw = WIDTH_CASES[case]
    path, data = checkpoints[family], calib(seed=4)
    model, _ = load_model(path, tokenizer=False)
    ref = width_prune(model, get_adapter(model), data, batch_size=3, progress=False, **kw)
    sm = StreamedLayers(path)
    reads: list[tuple[int, bool, bool]] = []
    original = sm.materialise

    def spy(module, prefix, slices=None):  # every layer is read once per shot, cut to the widths so far
        if prefix.startswith(sm.adapter.spec.layers + "."):
            i = int(prefix.split(".")[-2])
            reads.append((i, bool(slices), i in sm.widths))
        return original(module, prefix, slices)

    sm.materialise = spy  # type: ignore[method-assign]
    col = ActivationCollector(sm, data, batch_size=3, keep_weights=kw.get("scorer") == "weight-activation",
                              progress=False)
    got = width_prune(sm.model, sm.adapter, data, batch_size=3, progress=False, collector=col, **kw)
    assert got.to_json() == ref.to_json()  # same statistics bit for bit, hence the same plan and scores
    assert all(not p.is_meta for p in model.parameters()) and all(p.is_meta for p in sm.model.parameters())
    n = sm.adapter.num_layers
    passes = len(ref.history)
    assert [i for i, _, _ in reads] == list(range(n)) * passes
    # A layer is read cut exactly when earlier shots narrowed it, and later passes do read cut layers.
    assert all(cut == narrowed for _, cut, narrowed in reads)
    assert not any(cut for _, cut, _ in reads[:n]) and any(cut for _, cut, _ in reads[n:])
    # And the streamed checkpoint equals the in-memory one, tensor for tensor.
    mem = save_checkpoint(model, None, tmp_path / "mem", ref)
    got = save_pruned_streamed(path, got, tmp_path / "str", tokenizer=None, progress=False)
    a, b = _tensors(mem), _tensors(got)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_width_job_streamed_equals_in_memory(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    kw = dict(mlp_keep=0.5, heads_keep=0.5, mode="per-layer", shots=2, calib=text, samples=6, seq_len=24,
              batch_size=2, progress=False)
    p_mem, s_mem = width_job(str(path), tmp_path / "mem", stream=False, use_cache=False, **kw)
    p_str, s_str = width_job(str(path), tmp_path / "str", stream=True, offload_dir=tmp_path / "off", **kw)
    assert (s_mem, s_str) == (False, True)
    assert p_mem.to_json() == p_str.to_json()
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == \
        json.loads((tmp_path / "str" / "config.json").read_text())
    assert list((tmp_path / "off").iterdir()) == []  # hidden states removed after the run
    # Every shot's statistics were cached by the streamed run; running again computes nothing.
    entries = list((tmp_path / "cache" / "scores").glob("width-*.safetensors"))
    assert len(entries) == len(p_str.history) == 2
    loads: list[bool] = []
    real = ScoreCache.load_width
    monkeypatch.setattr(ScoreCache, "load_width",
                        lambda self, key: loads.append(real(self, key) is not None) or real(self, key))
    monkeypatch.setattr(ActivationCollector, "collect", None)  # any pass would fail
    p_again, _ = width_job(str(path), tmp_path / "again", stream=True, **kw)
    assert loads == [True, True] and p_again.to_json() == p_mem.to_json()


def test_interrupted_width_run_resumes_at_the_first_unfinished_shot(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    kw = dict(mlp_keep=0.5, heads_keep=0.5, mode="per-layer", shots=3, calib=text, samples=6, seq_len=24,
              batch_size=2, progress=False)
    ref, _ = width_job(str(path), tmp_path / "ref", stream=False, use_cache=False, **kw)
    assert len(ref.history) == 3
    passes: list[dict] = []
    real = ActivationCollector.collect

    def dies_in_third_pass(self, **kwargs):
        passes.append(kwargs["widths"])
        if len(passes) == 3:
            raise KeyboardInterrupt
        return real(self, **kwargs)

    monkeypatch.setattr(ActivationCollector, "collect", dies_in_third_pass)
    with pytest.raises(KeyboardInterrupt):
        width_job(str(path), tmp_path / "out", stream=True, **kw)
    assert not (tmp_path / "out").exists()  # nothing half-written
    # Started again: the two finished shots come from the cache, only the third pass runs.
    passes.clear()
    monkeypatch.setattr(ActivationCollector, "collect",
                        lambda self, **kwargs: passes.append(kwargs["widths"]) or real(self, **kwargs))
    got, _ = width_job(str(path), tmp_path / "out", stream=True, **kw)
    assert len(passes) == 1 and passes[0]  # the third shot's pass, on the already narrowed widths
    assert got.to_json() == ref.to_json()
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_streamed_width_equals_in_memory(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from prunekit.cli import main

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    common = ["-q", "width", str(path), "--mlp-keep", "0.5", "--heads-keep", "2", "--head-mode", "query-heads",
              "--shots", "2", "--calib", str(text), "--samples", "6", "--seq-len", "24", "--batch-size", "2",
              "--no-cache", "--multiple-of", "48"]  # 64 of 128 channels, rounded to a multiple of 48: 48
    assert main([*common, "--no-stream", "--out", str(tmp_path / "mem")]) == 0
    assert json.loads(capsys.readouterr().out)["streamed"] is False
    assert main([*common, "--stream", "--out", str(tmp_path / "str")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["streamed"] is True and summary["parameters_after"] < summary["parameters_before"]
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Uniform widths give a stock checkpoint that plain transformers loads.
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "str")
    assert stock.config.intermediate_size == 48 and 'auto_map' not in json.loads((tmp_path / 'str' / 'config.json').read_text())
    assert not (tmp_path / "cache").exists()  # --no-cache wrote nothing


def test_two_processes_give_the_single_process_width_plan(tiny_checkpoint, tmp_path):
    path, text = tiny_checkpoint
    kw = dict(calib=text, samples=6, seq_len=24, batch_size=2)
    ref, _ = width_job(str(path), tmp_path / "single", mlp_keep=0.5, heads_keep=0.5, mode="per-layer", shots=2,
                       stream=False, use_cache=False, progress=False, **kw)
    env = {**os.environ, "PRUNEKIT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "prunekit", "-q", "width", str(path), "--mlp-keep", "0.5", "--heads-keep", "0.5", "--per-layer",
           "--shots", "2", "--calib", str(text), "--samples", "6", "--seq-len", "24", "--batch-size", "2",
           "--stream", "--out", str(tmp_path / "dp")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    got = PruningPlan.load(tmp_path / "dp" / "prunekit_plan.json")
    # Same kept heads and channels; the scores differ only by the order of the float64 additions.
    assert got.to_json()["widths"] == ref.to_json()["widths"] and got.history == ref.history
    assert got.calibration == ref.calibration
    for kind, per_layer in ref.scores["first_shot"].items():
        for layer, v in per_layer.items():
            g = got.scores["first_shot"][kind][layer]
            pairs = zip(v.values(), g.values()) if isinstance(v, dict) else zip(v, g)
            assert all(abs(x - y) <= 1e-9 * max(1.0, abs(x)) for x, y in pairs)
    a, b = _tensors(tmp_path / "single"), _tensors(tmp_path / "dp")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- precision, width statistics, choosing the path ----------------------------------------------------------

def test_half_precision_overflow_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    with torch.no_grad():  # an MLP whose output exceeds float16's range (65504) but not float32's
        ad.mlp_projections(ad.layers()[1])[2].weight.mul_(3e6)
    path = save_checkpoint(model, tiny_tokenizer(), tmp_path / "hot")
    data = calib(pad_last=0)
    SimilarityScorer(StreamedLayers(path, dtype="float32"), data, progress=False).score()  # fine in float32
    with pytest.raises(ActivationOverflowError, match="layer 1 .*float16"):
        SimilarityScorer(StreamedLayers(path, dtype="float16"), data, progress=False).score()
    half, _ = load_model(path, dtype="float16", tokenizer=False)
    with pytest.raises(ActivationOverflowError, match="layer 1"):
        score_model(half, get_adapter(half), data, progress=False)


def test_width_statistics_plug_into_the_streamed_pass(checkpoints):
    data = calib(seed=8)
    path = checkpoints["gemma3_text"]
    model, _ = load_model(path, tokenizer=False)
    ref = ActivationCollector(model, data, batch_size=3, progress=False).collect()
    sm = StreamedLayers(path)
    obs = WidthStatsObserver(sm.adapter)
    SimilarityScorer(sm, data, batch_size=3, observers=[obs], progress=False).score()
    for i, st in ref.items():
        assert torch.equal(st.attn.sums, obs.stats[i].attn.sums) and torch.equal(st.mlp.sums, obs.stats[i].mlp.sums)
        assert st.mlp.tokens == obs.stats[i].mlp.tokens == int(data.attention_mask.sum())


def test_streaming_is_chosen_when_the_model_does_not_fit(checkpoints, monkeypatch, tmp_path):
    from prunekit.engine import memory

    path = checkpoints["llama"]
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10_000)
    assert should_stream(path)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 40)
    assert not should_stream(path)
    assert not should_stream("some/hub-id")  # not local: cannot stream
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="safetensors"):
        StreamedLayers(tmp_path / "bin")


def test_score_cache_roundtrip(tmp_path):
    from prunekit.drop.similarity import SimilarityAccumulator

    acc = SimilarityAccumulator(3, pairwise=True)
    acc.block += torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    acc.tokens += 2
    acc.pair += 0.5  # type: ignore[operator]
    cache = ScoreCache(tmp_path)
    cache.store("k", acc)
    back = cache.load("k")
    assert back is not None and back.result().to_json() == acc.result().to_json()
    (tmp_path / "k.safetensors").write_bytes(b"garbage")
    assert cache.load("k") is None and cache.load("missing") is None


def test_damaged_weights_are_one_clear_error_when_streaming(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    from prunekit.cli import main

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path, text = tiny_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated download
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        StreamedLayers(bad)
    for cmd in (["width", str(bad), "--mlp-keep", "0.5"], ["drop", str(bad), "--target", "attn", "--n", "1"]):
        argv = ["-q", *cmd, "--stream", "--calib", str(text), "--samples", "2", "--seq-len", "24",
                "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("prunekit: error: ") and "not a readable safetensors file" in err[-1]
        assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()


def test_unwritable_offload_dir_is_one_clear_error_before_any_work(tiny_checkpoint, tmp_path, capsys):
    from prunekit.cli import main

    path, text = tiny_checkpoint
    (tmp_path / "a-file").write_text("not a directory")
    offload = tmp_path / "a-file" / "states"
    for cmd in (["score", str(path), "--json", str(tmp_path / "s.json")],
                ["width", str(path), "--mlp-keep", "0.5", "--out", str(tmp_path / "out")]):
        assert main(["-q", *cmd, "--stream", "--offload-dir", str(offload), "--calib", str(text), "--samples", "2",
                     "--seq-len", "24"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"prunekit: error: the offload directory {offload} cannot be written")
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "out").exists()
