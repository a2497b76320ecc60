"""Recovery fine-tuning: exact no-op at lr 0, reproducible runs, learning, structure kept, the CLI contract."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_calib, tiny_model

from prunekit.adapters import get_adapter
from prunekit.errors import RecoveryError
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.plans import PLAN_FILE, DropTarget, LayerWidth, PruningPlan
from prunekit.recovery import _lr_factor, recover
from prunekit.recovery.train import lr_schedule
from prunekit.surgery import apply_plan, count_parameters

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def pruned_model() -> tuple[torch.nn.Module, PruningPlan]:
    """A heterogeneous tiny llama: attention of layer 1 and MLP of layer 2 removed, layer 0 narrowed."""
    model = tiny_model("llama")
    plan = PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(2, "mlp")], method="test",
                       widths={0: LayerWidth(heads=[2, 3], kv_heads=[1], channels=list(range(0, 128, 2)))})
    apply_plan(get_adapter(model), plan)
    return model, plan


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=X).logits


def test_lr_zero_changes_nothing_and_leaves_eval_mode():
    model, _ = pruned_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = recover(model, random_calib(n=6, t=16), steps=3, lr=0.0, batch_size=2, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert len(rec["losses"]) == 3 and rec["tokens_seen"] == 3 * 2 * 16


def test_training_is_reproducible_learns_and_keeps_the_structure(tmp_path):
    data = random_calib(n=4, t=16, seed=2, pad_last=4)
    runs = []
    for _ in range(2):
        model, plan = pruned_model()
        n_params = count_parameters(model)
        rec = recover(model, data, steps=30, lr=3e-3, batch_size=2, warmup=0.1, progress=False)
        runs.append((model, rec))
        assert count_parameters(model) == n_params  # nothing grew back
    (m1, r1), (m2, r2) = runs
    assert r1["losses"] == r2["losses"] and torch.equal(logits(m1), logits(m2))  # same seed, same run
    # Four sequences seen over and over: the loss must fall well below where it started.
    assert r1["loss_last_10pct_mean"] < 0.7 * r1["loss_first"]
    # Saved with its plan, it reloads (heterogeneous) with the trained weights.
    plan.recovery.append(r1)
    out = save_checkpoint(m1, None, tmp_path / "healed", plan)
    again, _ = load_model(out, tokenizer=False)
    assert torch.equal(logits(again), logits(m1))
    loaded = PruningPlan.load(out / PLAN_FILE)
    assert loaded.dropped == plan.dropped and loaded.widths == plan.widths
    assert loaded.recovery[0]["losses"] == r1["losses"]


def test_padding_is_not_trained_on():
    """Changing the tokens under the mask must not change anything."""
    data = random_calib(n=2, t=16, seed=3, pad_last=6)
    other_ids = data.input_ids.clone()
    other_ids[-1, -6:] = (other_ids[-1, -6:] + 7) % 256
    from prunekit.data import CalibrationData

    other = CalibrationData(other_ids, data.attention_mask, data.source, data.sha256)
    results = []
    for d in (data, other):
        model = tiny_model("llama")
        rec = recover(model, d, steps=2, lr=1e-3, batch_size=2, progress=False)
        results.append((rec["losses"], logits(model)))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_schedule_warms_up_then_decays_to_zero():
    f = [_lr_factor(s, 10, 2) for s in range(10)]
    assert f[:2] == [0.5, 1.0] and f[2] == 1.0 and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))


@pytest.mark.parametrize("steps,warmup_steps", [(10, 2), (30, 3), (3, 1), (5, 0), (1, 1)])
def test_torch_schedulers_follow_the_closed_form(steps, warmup_steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = lr_schedule(opt, steps, warmup_steps)
    got = []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    assert got == pytest.approx([_lr_factor(s, steps, warmup_steps) for s in range(steps)], abs=1e-12)


@pytest.mark.parametrize("kw,message", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(lr=-1.0), "learning rate must be a finite number"),
    (dict(lr=float("nan")), "learning rate must be a finite number"),
    (dict(batch_size=0), "batch size must be a positive integer"),
    (dict(warmup=1.0), "warmup must be a fraction"),
    (dict(alpha=0.5), "needs a teacher"),
    (dict(hidden_weight=1.0), "hidden-state loss needs the teacher model"),
])
def test_bad_settings_are_clear_errors(kw, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecoveryError, match=message):
        recover(model, random_calib(), **{"steps": 1, **kw}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any step


def test_cli_heal_keeps_plan_and_structure(tiny_checkpoint, tmp_path, capsys):
    from prunekit.cli import main

    ck, text = tiny_checkpoint
    pruned = tmp_path / "pruned"
    assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "1", "--calib", str(text), "--samples", "2",
                 "--seq-len", "24", "--no-cache", "--out", str(pruned)]) == 0
    capsys.readouterr()
    argv = ["-q", "heal", str(pruned), "--text", str(text), "--samples", "4", "--seq-len", "24", "--batch-size", "2",
            "--steps", "3", "--lr", "1e-3", "--out", str(tmp_path / "healed")]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 2 * 24
    base = PruningPlan.load(pruned / PLAN_FILE)
    healed = PruningPlan.load(tmp_path / "healed" / PLAN_FILE)
    assert healed.dropped == base.dropped and healed.scores == base.scores
    assert len(healed.recovery) == 1 and healed.recovery[0]["data"]["sha256"]
    a, _ = load_model(pruned, tokenizer=False)
    b, _ = load_model(tmp_path / "healed", tokenizer=False)
    assert count_parameters(a) == count_parameters(b) and not torch.equal(logits(a), logits(b))
    # An existing output is refused before training; bad settings are one line, exit 2.
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "x"), "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("steps must be a positive integer, got 0")
    assert not (tmp_path / "x").exists()
