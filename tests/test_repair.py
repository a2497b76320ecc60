"""Linear repair: spans and carriers, the closed-form map, the fold, never worse on held-out samples."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_calib, tiny_model, whole_model_loss

from prunekit.adapters import get_adapter
from prunekit.errors import PlanError
from prunekit.losses import split_check
from prunekit.plans import DropTarget, PruningPlan
from prunekit.repair import Span, fit_map, folded, linear_repair, removed_spans
from prunekit.surgery import apply_plan, count_parameters


def test_spans_group_removed_sublayers_with_their_carrier():
    plan = PruningPlan(dropped=[DropTarget(0, "attn"), DropTarget(2, "attn"), DropTarget(3, "block"),
                                DropTarget(5, "mlp")])
    assert removed_spans(plan, 6) == [
        Span(carrier=(1, "mlp"), removed=[(2, "attn")]),
        Span(carrier=(2, "mlp"), removed=[(3, "attn"), (3, "mlp")]),
        Span(carrier=(5, "attn"), removed=[(5, "mlp")]),
    ]  # attention 0 has no carrier before it
    # A run that starts the model, however long, has none either (its own members are no carriers).
    plan = PruningPlan(dropped=[DropTarget(0, "block"), DropTarget(1, "attn"), DropTarget(3, "block")])
    assert removed_spans(plan, 4) == [Span(carrier=(2, "mlp"), removed=[(3, "attn"), (3, "mlp")])]


def test_fit_recovers_an_exact_linear_relation_and_fold_applies_it():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(500, 8, generator=g, dtype=torch.float64)
    t_true = torch.randn(8, 8, generator=g, dtype=torch.float64)
    d = c @ t_true
    t, resid = fit_map(c.T @ c, c.T @ d, float((d * d).sum()), ridge=0.0)
    assert torch.allclose(t, t_true, atol=1e-9) and abs(resid) < 1e-12
    t_id, _ = fit_map(c.T @ c, c.T @ d, float((d * d).sum()), ridge=1e9)
    assert torch.allclose(t_id, torch.eye(8, dtype=torch.float64), atol=1e-6)  # heavy ridge: no repair
    lin = torch.nn.Linear(5, 8).double()
    x = torch.randn(3, 5, dtype=torch.float64, generator=g)
    want = lin(x) @ t_true
    w, b = folded(lin.weight.detach(), t_true), folded(lin.bias.detach(), t_true)
    assert torch.allclose(torch.nn.functional.linear(x, w, b), want, atol=1e-12)


@pytest.mark.parametrize("drops", [[DropTarget(2, "attn")], [DropTarget(1, "block")], [DropTarget(2, "mlp")]])
def test_repair_keeps_the_structure_and_never_worsens_held_out_loss(drops):
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    plan = PruningPlan(dropped=drops, method="test")
    apply_plan(get_adapter(pruned), plan)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    n = count_parameters(pruned)
    calib = random_calib(n=8, t=16, seed=3)
    unrepaired = copy.deepcopy(pruned)
    rec = linear_repair(dense, pruned, plan, calib, progress=False)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes and count_parameters(pruned) == n
    assert rec["check_loss"] <= rec["check_loss_unrepaired"]
    # The runner's incremental check losses are the whole model's, before and after (maps kept or undone).
    check = split_check(calib, "test")[1]
    assert rec["check_loss_unrepaired"] == pytest.approx(whole_model_loss(unrepaired, check), rel=1e-6)
    assert rec["check_loss"] == pytest.approx(whole_model_loss(pruned, check), rel=1e-6)
    assert len(rec["spans"]) == 1 and 0 <= rec["spans"][0]["relative_residual"]


def test_a_map_undone_leaves_no_trace_in_the_next_check():
    """Two spans, the first map rejected and the second kept (this model and calibration): the second is
    checked on layers re-run without the first fold, so every recorded loss is the whole model's."""
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    plan = PruningPlan(dropped=[DropTarget(1, "mlp"), DropTarget(3, "attn")], method="test")
    apply_plan(get_adapter(pruned), plan)
    calib = random_calib(n=8, t=16, seed=5)
    rec = linear_repair(dense, pruned, plan, calib, progress=False)
    assert [s["applied"] for s in rec["spans"]] == [False, True]
    assert rec["check_loss"] == rec["spans"][1]["check_loss_after"]
    assert rec["check_loss"] == pytest.approx(whole_model_loss(pruned, split_check(calib, "test")[1]), rel=1e-6)


def test_gemma3_cannot_take_the_fold():
    dense = tiny_model("gemma3_text")
    pruned = copy.deepcopy(dense)
    plan = PruningPlan(dropped=[DropTarget(2, "attn")])
    apply_plan(get_adapter(pruned), plan)
    with pytest.raises(PlanError, match="normalises sub-layer outputs"):
        linear_repair(dense, pruned, plan, random_calib(n=8, t=16), progress=False)


def test_cli_drop_with_linear_repair_records_it_and_reloads(tiny_checkpoint, tmp_path, isolated_cache):
    from prunekit.cli import main
    from prunekit.io.checkpoint import load_model

    ck, text = tiny_checkpoint
    out = tmp_path / "rep"
    assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "2", "--repair", "linear", "--calib", str(text),
                 "--samples", "8", "--seq-len", "24", "--out", str(out)]) == 0
    plan = PruningPlan.load(out / "prunekit_plan.json")
    assert plan.repair is not None and len(plan.repair["spans"]) >= 1
    assert plan.repair["check_loss"] <= plan.repair["check_loss_unrepaired"]
    load_model(out)


@pytest.mark.parametrize("target,n", [("attn", 2), ("block", 1)])
def test_streamed_repair_equals_in_memory(tiny_checkpoint, tmp_path, isolated_cache, target, n):
    """`drop --repair linear --stream`: statistics from the streamed dense model, the check on a streamed view
    with the drops marked (layers not compacted), folds kept as overrides and written by the streamed save:
    the same maps, losses and saved weights as in memory (where a block drop renumbers the layers)."""
    from safetensors.torch import load_file

    from prunekit.cli import main

    ck, text = tiny_checkpoint
    plans, weights = [], []
    for mode in ("--no-stream", "--stream"):
        out = tmp_path / mode.strip("-")
        assert main(["-q", "drop", str(ck), "--target", target, "--n", str(n), "--repair", "linear", mode,
                     "--calib", str(text), "--samples", "8", "--seq-len", "24", "--out", str(out)]) == 0
        plans.append(PruningPlan.load(out / "prunekit_plan.json"))
        weights.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    mem, streamed = (p.repair for p in plans)
    assert plans[0].dropped == plans[1].dropped
    assert [s["applied"] for s in mem["spans"]] == [s["applied"] for s in streamed["spans"]]
    assert any(s["applied"] for s in mem["spans"])  # a fold reaches the saved weights
    for key in ("check_loss_unrepaired", "check_loss"):
        assert streamed[key] == pytest.approx(mem[key], rel=1e-6)
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6), k


def test_streamed_job_repair_reads_the_jobs_own_edits(tiny_checkpoint, tmp_path):
    """`compress --stream` repairs a fresh view of the files that must carry the search's edited weights
    (kept as overrides): with a weight edited beside the drop, the streamed repair checks the same
    unrepaired loss, keeps the same maps and saves the same tensors as the one in memory."""
    from safetensors.torch import load_file

    from prunekit.jobs.common import load_job
    from prunekit.jobs.dist import DistEnv
    from prunekit.jobs.repair import repair_job
    from prunekit.save import save

    ck, text = tiny_checkpoint
    records, weights = [], []
    for streamed in (False, True):
        job = load_job(str(ck), calib=text, samples=8, seq_len=24, batch_size=4, dtype="float32",
                       env=DistEnv.from_env(), device=torch.device("cpu"), stream=streamed)
        ad = job.source.adapter
        proj = ad.output_projection(ad.layers()[1], "mlp")
        name = next(n for n, m in ad.model.named_modules() if m is proj) + ".weight"
        edited = job.source.read(name).clone()
        edited[:, ::2] = 0  # half the MLP channels removed, as a search leaves them before the cut
        job.source.write(name, edited)
        job.source.commit()
        plan = PruningPlan(dropped=[DropTarget(2, "attn"), DropTarget(3, "mlp")])
        apply_plan(ad, plan)
        saved = repair_job(job, str(ck), plan, dtype="float32", batch_size=4, offload_dir=None, progress=False)
        save(saved, job.tokenizer, tmp_path / str(streamed), plan, progress=False)
        records.append(plan.repair)
        weights.append(load_file(str(tmp_path / str(streamed) / "model.safetensors")))
    mem, stream = records
    assert mem is not None and stream is not None and any(s["applied"] for s in mem["spans"])
    assert [s["applied"] for s in stream["spans"]] == [s["applied"] for s in mem["spans"]]
    for key in ("check_loss_unrepaired", "check_loss"):
        assert stream[key] == pytest.approx(mem[key], rel=1e-6)
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6), k
