"""Linear repair: spans and carriers, the closed-form map, the fold, never worse on held-out samples."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_calib, tiny_model

from prunekit.adapters import get_adapter
from prunekit.errors import PlanError
from prunekit.plans import DropTarget, PruningPlan
from prunekit.repair import Span, _fold, fit_map, linear_repair, removed_spans
from prunekit.surgery import apply_plan, count_parameters


def test_spans_group_removed_sublayers_with_their_carrier():
    plan = PruningPlan(dropped=[DropTarget(0, "attn"), DropTarget(2, "attn"), DropTarget(3, "block"),
                                DropTarget(5, "mlp")])
    assert removed_spans(plan, 6) == [
        Span(carrier=(1, "mlp"), removed=[(2, "attn")]),
        Span(carrier=(2, "mlp"), removed=[(3, "attn"), (3, "mlp")]),
        Span(carrier=(5, "attn"), removed=[(5, "mlp")]),
    ]  # attention 0 has no carrier before it


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
    _fold(lin, t_true)
    assert torch.allclose(lin(x), want, atol=1e-12)


@pytest.mark.parametrize("drops", [[DropTarget(2, "attn")], [DropTarget(1, "block")], [DropTarget(2, "mlp")]])
def test_repair_keeps_the_structure_and_never_worsens_held_out_loss(drops):
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    plan = PruningPlan(dropped=drops, method="test")
    apply_plan(get_adapter(pruned), plan)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    n = count_parameters(pruned)
    rec = linear_repair(dense, pruned, plan, random_calib(n=8, t=16, seed=3), progress=False)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes and count_parameters(pruned) == n
    assert rec["check_loss"] <= rec["check_loss_unrepaired"]
    assert len(rec["spans"]) == 1 and 0 <= rec["spans"][0]["relative_residual"]


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
    assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "1", "--repair", "linear", "--stream",
                 "--calib", str(text), "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()
