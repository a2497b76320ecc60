"""`compress`'s error correction: a model whose residual stream already is the dense one is left as it is, a
cut sub-layer's refit equals the closed-form ridge least squares computed from ordinary forward passes of the
dense and the pruned model, removed units stay removed, and the search keeps the correction only where it
checks better (and then saves exactly the corrected model)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_calib, tiny_model, whole_model_loss

from prunekit.adapters import get_adapter
from prunekit.compress import correct as correct_mod
from prunekit.compress.budget import Budget, sublayer_costs
from prunekit.compress.candidate import Candidate
from prunekit.compress.correct import Edits, correct_model
from prunekit.compress.editable import EditableModel
from prunekit.compress.search import compress
from prunekit.engine.sources import ResidentLayers
from prunekit.losses import split_check


def _edits(model, edits, kept):
    """`Edits` over a model in memory through the search's own `EditableModel`: every sub-layer refitted,
    `kept[s]` (input columns) where it is cut."""
    ad = get_adapter(model)
    src = ResidentLayers(model, ad)
    m = EditableModel(src, sublayer_costs(ad))
    columns = {s: kept.get(s, torch.arange(m.weight(s).shape[1])) for s in m.costs}
    return src, Edits(columns, edits, m.weight, m.write, ad.output_projection, ad.output_norm)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_correcting_the_dense_model_changes_nothing(family):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    src, edits = _edits(model, {}, {})
    fitted = correct_model(src, random_calib(6, 16, pad_last=5), edits, input_ridge=1.0, progress=False)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=1e-4, atol=1e-5)
    assert max(fitted.before.values()) < 1e-9 and max(fitted.after.values()) < 1e-9
    assert max(fitted.inputs_before.values()) < 1e-9 and max(fitted.inputs_after.values()) < 1e-9


# Where the pruned model's mid residual (the input of the MLP's first norm) is read, per family.
MID = {"llama": "post_attention_layernorm", "gemma3_text": "pre_feedforward_layernorm"}


@torch.no_grad()
def _layer_sums(dense, pruned, calib, layer: int, cols: torch.Tensor, family: str):
    """Gram and cross sums of layer `layer`'s down_proj (kept `cols`) from whole-model forwards with hooks: the
    pruned model's down_proj input and mid residual, the dense model's layer output; padding excluded. For
    Gemma, whose down_proj output passes through a norm: inputs x / rms(z) (z the pruned down_proj output now),
    target the dense down_proj output over its rms (the norm's eps in both)."""
    seen: dict[str, torch.Tensor] = {}
    block = pruned.model.layers[layer]
    hooks = [block.mlp.down_proj.register_forward_hook(lambda m, a, out: seen.update(x=a[0], z=out)),
             getattr(block, MID[family]).register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0])),
             dense.model.layers[layer].mlp.down_proj.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("z_dense", out)),
             dense.model.layers[layer].register_forward_hook(
                 lambda m, a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))]
    gram = cross = 0
    for ids, mask in calib.batches(4):
        dense(input_ids=ids, attention_mask=mask, use_cache=False)
        pruned(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = mask.reshape(-1) != 0
        flat = {k: v.reshape(-1, v.shape[-1]).double()[keep] for k, v in seen.items()}
        x, t = flat["x"][:, cols], flat["h"] - flat["mid"]
        if family == "gemma3_text":
            eps = block.post_feedforward_layernorm.eps
            def rms(v):
                return (v.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            x, t = x / rms(flat["z"]), flat["z_dense"] / rms(flat["z_dense"])
        gram, cross = gram + x.T @ x, cross + x.T @ t
    for h in hooks:
        h.remove()
    return gram, cross


def _half_cut(dense, layer: int):
    """A copy of `dense` whose layer `layer` MLP keeps every other channel: (the copy, its down_proj, the kept
    channels, the cut weight, and the `Edits` for it)."""
    pruned = copy.deepcopy(dense)
    down = pruned.model.layers[layer].mlp.down_proj
    keep = torch.arange(0, down.in_features, 2)
    cut = torch.zeros_like(down.weight)
    cut[:, keep] = down.weight.detach()[:, keep]
    src, edits = _edits(pruned, {(layer, "mlp"): cut}, {(layer, "mlp"): keep})
    return pruned, down, keep, cut, src, edits


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_cut_sublayer_is_refitted_to_the_dense_residual_stream_from_the_pruned_inputs(family):
    """Layer 1's MLP keeps half its channels: its refit is the ridge least squares of the dense layer output
    minus the pruned mid residual on the pruned down_proj inputs (an oracle from ordinary forwards; for Gemma
    the dense down_proj output's direction, linearised through the norm that follows), the removed
    channels stay zero, and the layer below (already on the dense stream) is left as it is."""
    dense = tiny_model(family)
    if family == "gemma3_text":  # uneven gains in the norm after down_proj: the fit must not depend on them
        with torch.no_grad():
            for block in dense.model.layers:
                block.post_feedforward_layernorm.weight.normal_(0.0, 0.5)
    pruned, down, keep, cut, src, edits = _half_cut(dense, 1)
    calib = random_calib(6, 16, pad_last=5)
    below = pruned.model.layers[0].mlp.down_proj.weight.detach().clone()
    correct_model(src, calib, edits, ridge=0.3, progress=False)

    oracle = copy.deepcopy(dense)
    oracle.model.layers[1].mlp.down_proj.weight.data.copy_(cut)
    gram, cross = _layer_sums(dense, oracle, calib, 1, keep, family)
    lam = 0.3 * float(torch.diagonal(gram).mean())
    want = torch.linalg.solve(gram + lam * torch.eye(len(keep), dtype=gram.dtype),
                              cross + lam * cut[:, keep].double().T).T
    got = down.weight.detach()
    torch.testing.assert_close(got[:, keep].double(), want, rtol=1e-4, atol=1e-5)
    gone = torch.ones(down.in_features, dtype=torch.bool)
    gone[keep] = False
    assert bool((got[:, gone] == 0).all())
    torch.testing.assert_close(pruned.model.layers[0].mlp.down_proj.weight.detach(), below, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@torch.no_grad()
def test_the_input_map_is_the_ridge_fit_of_the_dense_inputs_merged_into_every_input_projection(family):
    """Layer 0's MLP keeps half its channels, so layer 1's attention reads a drifted stream: its q, k and v
    become W M, M the ridge least squares of the dense model's q_proj input on the corrected model's (an
    oracle from ordinary forwards: layer 1's input depends only on layer 0, final when layer 1 is fitted)."""
    dense = tiny_model(family)
    pruned, _, _, _, src, edits = _half_cut(dense, 0)
    calib = random_calib(6, 16, pad_last=5)
    fitted = correct_model(src, calib, edits, input_ridge=0.2, progress=False)

    seen: dict[str, torch.Tensor] = {}
    hooks = [m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, a, key=key: seen.__setitem__(key, a[0])) for key, m in (("p", pruned), ("d", dense))]
    gram = cross = 0
    for ids, mask in calib.batches(4):
        dense(input_ids=ids, attention_mask=mask, use_cache=False)
        pruned(input_ids=ids, attention_mask=mask, use_cache=False)
        keep_t = mask.reshape(-1) != 0
        x, t = (seen[k].reshape(-1, seen[k].shape[-1]).double()[keep_t] for k in ("p", "d"))
        gram, cross = gram + x.T @ x, cross + x.T @ t
    for h in hooks:
        h.remove()
    lam = 0.2 * float(torch.diagonal(gram).mean())
    eye = torch.eye(len(gram), dtype=gram.dtype)
    m = torch.linalg.solve(gram + lam * eye, cross + lam * eye)  # [d, d]: x_dense ~ M^T x
    for name in ("q_proj", "k_proj", "v_proj"):
        want = getattr(dense.model.layers[1].self_attn, name).weight.double() @ m.T
        got = getattr(pruned.model.layers[1].self_attn, name).weight.double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fitted.inputs_before[(1, "attn")] > 1e-6 and fitted.inputs_after[(1, "attn")] < fitted.inputs_before[
        (1, "attn")]
    assert fitted.inputs_before[(0, "attn")] < 1e-12  # layer 0's attention reads the dense stream


def _compress(**kw):
    model = tiny_model("llama")
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.8), rounds=1,
                      multiple_of=16, progress=False, **kw)
    return model, result


def test_a_correction_that_checks_worse_is_not_kept(monkeypatch):
    """A deliberately broken refit (every weight negated) checks worse: the plan says so, the candidate table
    shows it, and the model is exactly the one compress gives without the correction."""
    plain_model, plain = _compress(correct=False)
    monkeypatch.setattr(correct_mod, "solve", lambda gram, cross, tt, w0, ridge: (-w0, 0.0, 1.0))
    model, result = _compress()
    corr = result.plan.options["correction"]
    assert not corr["applied"] and corr["check_value"] > corr["check_value_uncorrected"]
    assert result.chosen == plain.chosen and f"{plain.chosen} + correction" in [c["name"] for c in result.candidates]
    ids = random_calib(2, 16, seed=5).input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain_model(input_ids=ids).logits)
    assert "correction" not in plain.plan.options


def test_a_kept_correction_is_the_model_compress_returns(monkeypatch):
    """With the corrected candidate made to win, the physically cut model is the corrected one: its loss on
    the check part is the corrected candidate's, not the uncorrected one's, and it keeps the same units."""
    value = Candidate.value
    monkeypatch.setattr(Candidate, "value",
                        property(lambda c: value.fget(c) - (10.0 if c.name.endswith("+ correction") else 0.0)))
    model, result = _compress()
    corr = result.plan.options["correction"]
    assert corr["applied"] and result.chosen.endswith(" + correction")
    rows = {c["name"]: c for c in result.candidates}
    uncorrected = rows[result.chosen.removesuffix(" + correction")]
    check = split_check(random_calib(8, 24), "test")[1]
    with torch.no_grad():
        got = whole_model_loss(model, check)
    assert got == pytest.approx(rows[result.chosen]["check_loss"], rel=1e-5)
    assert got != pytest.approx(uncorrected["check_loss"], rel=1e-5)
    assert rows[result.chosen]["removed_params"] == uncorrected["removed_params"]


def test_the_second_best_candidates_correction_can_win_and_is_the_model_returned(monkeypatch):
    """The two best candidates are both corrected; made to win, the second one's correction (written first,
    then overwritten by the best one's) is written again and is the model that is cut."""
    _, plain = _compress(correct=False)
    at_budget = sorted((c for c in plain.candidates if c["at_budget"]), key=lambda c: c["check_loss"])
    second = f"{at_budget[1]['name']} + correction"
    value = Candidate.value
    monkeypatch.setattr(Candidate, "value",
                        property(lambda c: value.fget(c) - (10.0 if c.name == second else 0.0)))
    model, result = _compress()
    assert result.chosen == second
    corr = result.plan.options["correction"]
    assert corr["applied"] and [t["candidate"] for t in corr["tried"]] == [c["name"] for c in at_budget[:2]]
    rows = {c["name"]: c for c in result.candidates}
    check = split_check(random_calib(8, 24), "test")[1]
    with torch.no_grad():
        got = whole_model_loss(model, check)
    assert got == pytest.approx(rows[second]["check_loss"], rel=1e-5)
    assert got != pytest.approx(rows[f"{at_budget[0]['name']} + correction"]["check_loss"], rel=1e-5)
