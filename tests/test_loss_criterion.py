"""Loss-guided dropping: trial losses equal a full forward of the model with that module removed, a module
that contributes nothing is chosen first, and the search re-runs only the layers after each candidate."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_calib, tiny_model

from prunekit.adapters import get_adapter
from prunekit.drop import llm_drop, score_model
from prunekit.drop.loss import LossSearch
from prunekit.errors import PlanError
from prunekit.plans import DropTarget
from prunekit.surgery import mark_drops


def full_loss(model, calib) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in calib.batches(4):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            keep = mask[:, 1:].reshape(-1) != 0
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            nll += float(losses[keep].double().sum())
            n += int(keep.sum())
    return nll / n


@pytest.mark.parametrize("d", [DropTarget(2, "attn"), DropTarget(1, "mlp"), DropTarget(3, "block")])
def test_trial_loss_equals_a_full_forward_without_the_module(d):
    model = tiny_model("llama")
    data = random_calib(n=6, t=16, seed=4, pad_last=3)
    search = LossSearch(model, get_adapter(model), data, progress=False)
    base = search._loss(0)
    assert abs(base - full_loss(model, data)) < 1e-6
    trial = search.trial(d)
    assert abs(search._loss(0) - base) < 1e-12  # the model is back as it was
    ref = copy.deepcopy(model)
    mark_drops(get_adapter(ref), [d])
    assert abs(trial - full_loss(ref, data)) < 1e-6


def test_a_module_that_contributes_nothing_costs_exactly_nothing_and_the_best_trial_wins():
    model = tiny_model("llama")
    ad = get_adapter(model)
    with torch.no_grad():
        ad.attn_projections(ad.layers()[1])[3].weight.zero_()  # attention 1 adds nothing
    data = random_calib(n=6, t=16, seed=5)
    search = LossSearch(model, ad, data, progress=False)
    assert search.trial(DropTarget(1, "attn")) == search._loss(0)  # exactly: it changes nothing
    plan = llm_drop(model, ad, data, target="attn", n=2, criterion="loss", prefilter=None, progress=False)
    trials = plan.history[0]["trials"]
    pick = f"{plan.history[0]['module']}@{plan.history[0]['layer']}"
    assert trials[pick] == min(trials.values()) and len(trials) == 4  # every attention layer tried
    assert len(plan.history[1]["trials"]) == 3
    # Step 1 ran 4 trials from their own layers (4+3+2+1 = 10 of 16 layer-runs) plus one update pass.
    assert plan.options["criterion"] == "loss" and 0 < plan.options["forward_passes"] < 2 * 4
    assert len(plan.dropped) == 2


def test_loss_criterion_is_refused_where_it_cannot_run(tiny_checkpoint, tmp_path, isolated_cache):
    from prunekit.cli import main

    model = tiny_model("llama")
    with pytest.raises(PlanError, match="consecutive"):
        llm_drop(model, get_adapter(model), random_calib(), target="block", n=2, consecutive=True, criterion="loss")
    with pytest.raises(PlanError, match="unknown criterion"):
        llm_drop(model, get_adapter(model), random_calib(), target="attn", n=1, criterion="entropy")
    ck, text = tiny_checkpoint
    assert main(["-q", "drop", str(ck), "--target", "joint", "--n", "2", "--criterion", "loss", "--calib", str(text),
                 "--samples", "4", "--seq-len", "24", "--out", str(tmp_path / "l")]) == 0
    assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "1", "--criterion", "ce",
                 "--calib", str(text), "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()
    assert score_model  # the cosine scores still go into every plan


def full_kl(model, dense, calib) -> float:
    """Mean over the real tokens of KL(dense || model) over dense's top KL_TOPK tokens, from two full forwards."""
    from prunekit.drop.loss import KL_TOPK
    from prunekit.losses import kl_distill_loss

    total, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in calib.batches(4):
            a = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            b = dense(input_ids=ids, attention_mask=mask, use_cache=False).logits
            k = int(mask.sum())
            total += float(kl_distill_loss(a, b, mask, topk=KL_TOPK)) * k
            n += k
    return total / n


@pytest.mark.parametrize("d", [DropTarget(2, "attn"), DropTarget(3, "block")])
def test_kl_trial_equals_the_kl_of_a_full_forward_without_the_module(d):
    model = tiny_model("llama")  # vocabulary 256 = KL_TOPK: the top-K KL is the full KL here
    data = random_calib(n=6, t=16, seed=4, pad_last=3)
    search = LossSearch(model, get_adapter(model), data, criterion="kl", progress=False)
    assert search._loss(0) == 0.0 and search._loss(0) == 0.0  # the dense model against itself: exactly 0
    trial = search.trial(d)
    ref = copy.deepcopy(model)
    mark_drops(get_adapter(ref), [d])
    assert trial > 0 and abs(trial - full_kl(ref, model, data)) < 1e-6


def test_kl_criterion_picks_the_least_kl_and_records_it(tiny_checkpoint, tmp_path, isolated_cache):
    import json

    from prunekit.cli import main

    model = tiny_model("llama")
    plan = llm_drop(model, get_adapter(model), random_calib(n=6, t=16, seed=5), target="attn", n=2, criterion="kl",
                    prefilter=None, progress=False)
    first = plan.history[0]
    assert first["trials"][f"{first['module']}@{first['layer']}"] == min(first["trials"].values())
    assert plan.options["criterion"] == "kl" and plan.options["kl_topk"] == 256 and len(plan.dropped) == 2
    ck, text = tiny_checkpoint
    assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "1", "--criterion", "kl", "--calib", str(text),
                 "--samples", "4", "--seq-len", "24", "--out", str(tmp_path / "k")]) == 0
    assert json.loads((tmp_path / "k" / "prunekit_plan.json").read_text())["options"]["criterion"] == "kl"


@pytest.mark.parametrize("criterion", ["loss", "kl"])
def test_streamed_loss_search_equals_the_in_memory_one(tiny_checkpoint, tmp_path, isolated_cache, criterion):
    """`drop --criterion loss|kl --stream`: trials on the meta skeleton, layers read one at a time, the head
    read for each pass; the same drops and the same trial losses as in memory."""
    import json

    from prunekit.jobs.drop import drop_job

    ck, text = tiny_checkpoint
    opts = dict(target="joint", n=3, calib=text, samples=4, seq_len=24, criterion=criterion, prefilter=None,
                progress=False)
    memory = drop_job(str(ck), tmp_path / "memory", stream=False, **opts)
    streamed = drop_job(str(ck), tmp_path / "streamed", stream=True, offload_dir=tmp_path / "off", **opts)
    assert memory is not None and streamed is not None
    assert streamed.to_json()["dropped"] == memory.to_json()["dropped"]
    for a, b in zip(streamed.history, memory.history, strict=True):
        assert a["trials"].keys() == b["trials"].keys()
        assert all(abs(a["trials"][k] - b["trials"][k]) <= 1e-6 * max(1.0, abs(b["trials"][k])) for k in a["trials"])
    assert not list((tmp_path / "off").glob("prunekit-loss-*"))
    saved = json.loads((tmp_path / "streamed" / "prunekit_plan.json").read_text())
    assert saved["options"]["criterion"] == criterion
