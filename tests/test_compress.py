"""`compress`: the error curves are the refit's exact Fisher-weighted residuals, the allocation spends the
budget, a zeroed-and-refitted candidate equals the physically pruned model, and the job saves a checkpoint
that loads back with its Pareto table."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_calib, tiny_model, whole_model_loss

from prunekit.adapters import get_adapter
from prunekit.compress.allocate import allocate, near_uniform_mlp, uniform_mlp
from prunekit.compress.budget import Budget, SublayerCost, parse_budget, removal_target, removed, sublayer_costs
from prunekit.compress.candidate import plan_for
from prunekit.compress.curves import RIDGE, Curve, error_curve, obs_order, refit, unit_columns
from prunekit.compress.editable import EditableModel
from prunekit.compress.search import compress
from prunekit.compress.stats import SublayerStats, collect_stats
from prunekit.engine.sources import ResidentLayers
from prunekit.errors import PlanError
from prunekit.plans import PruningPlan
from prunekit.surgery import apply_plan
from prunekit.surgery.structure import count_parameters


def _random_stats(tokens: int, n_in: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, n_in,
                                                                                      dtype=torch.float64)
    grad = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, n_in, generator=g, dtype=torch.float64)
    return SublayerStats(x.T @ x, grad.T @ grad, tokens), w


@pytest.mark.parametrize("cols_per_unit,step,order_by", [(1, 2, "norm"), (4, 1, "norm"), (1, 2, "obs"),
                                                          (4, 1, "obs")])
def test_curve_is_the_fisher_weighted_residual_of_the_refit(cols_per_unit, step, order_by):
    st, w = _random_stats(200, 24, 6)
    alive = list(range(24 // cols_per_unit))
    curve = error_curve(st, w, alive, cols_per_unit, step, order_by=order_by)
    cols = unit_columns(alive, cols_per_unit)
    greg = st.gram + RIDGE * float(torch.diagonal(st.gram[cols][:, cols]).mean()) * torch.eye(24, dtype=torch.float64)
    for k, err in zip(curve.ks, curve.err):
        new = refit(st, w, alive, curve.order[:k], cols_per_unit) if k else torch.zeros_like(w)
        r = new - w
        direct = float(torch.trace(st.fisher @ r @ greg @ r.T))
        assert err == pytest.approx(direct, rel=1e-8, abs=1e-8)
    assert curve.ks[0] == len(alive) and curve.err[0] == pytest.approx(0.0, abs=1e-6)
    assert curve.err == sorted(curve.err)  # keeping fewer units never fits better
    torch.testing.assert_close(refit(st, w, alive, alive, cols_per_unit), w)  # keeping all changes nothing


@pytest.mark.parametrize("cols_per_unit", [1, 4])
def test_obs_order_removes_first_what_the_others_can_stand_in_for(cols_per_unit):
    """A unit whose columns are copies of another's (its activation norm the largest) costs nothing to remove
    with a refit: the OBS order drops one of the twins first, TransAct's norm order keeps the strong one first. Each greedy step's
    removal is the cheapest single removal, measured directly by refitting."""
    tokens, n_units = 300, 6
    st, w = _random_stats(tokens, n_units * cols_per_unit, 5, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, n_units * cols_per_unit, generator=g, dtype=torch.float64)
    twin, copy_of = unit_columns([0], cols_per_unit), unit_columns([3], cols_per_unit)
    x[:, twin] = 3 * x[:, copy_of]
    st = SublayerStats(x.T @ x, st.fisher, tokens)
    alive = list(range(n_units))
    order = obs_order(st, w, alive, cols_per_unit, chunk=1)
    assert sorted(order) == alive and order[-1] in (0, 3)  # either twin stands in for the other
    assert error_curve(st, w, alive, cols_per_unit, 1).order[0] == 0
    cols = unit_columns(alive, cols_per_unit)
    greg = st.gram + RIDGE * float(torch.diagonal(st.gram[cols][:, cols]).mean()) * torch.eye(len(cols),
                                                                                          dtype=torch.float64)

    def cost(kept):
        r = refit(st, w, alive, kept, cols_per_unit) - w
        return float(torch.trace(st.fisher @ r @ greg @ r.T))

    first = min(alive, key=lambda u: cost([a for a in alive if a != u]))
    assert order[-1] == first


def test_allocation_spends_the_budget_where_it_costs_least():
    costs = {(0, "mlp"): SublayerCost(4, 10, 0, 1), (1, "mlp"): SublayerCost(4, 10, 0, 1),
             (1, "attn"): SublayerCost(2, 20, 8, 1)}
    curves = {(0, "mlp"): Curve([0, 1, 2, 3], [4, 2, 0], [0.0, 1.0, 50.0]),
              (1, "mlp"): Curve([0, 1, 2, 3], [4, 2, 0], [0.0, 5.0, 6.0]),
              (1, "attn"): Curve([0, 1], [2, 1, 0], [0.0, 100.0, 200.0])}
    assert allocate(curves, costs, 20, "params") == {(0, "mlp"): 2}
    # 41 = both halves of MLP 1 (cheap per parameter once dropped) plus half of MLP 0.
    got = allocate(curves, costs, 41, "params")
    assert got == {(1, "mlp"): 0, (0, "mlp"): 2}
    assert removed(costs, got, "params") >= 41
    assert all(k == 0 for k in allocate(curves, costs, 41, "params", "depth").values())
    assert all(k > 0 for k in allocate(curves, costs, 30, "params", "width").values())
    assert allocate(curves, costs, 8, "kv") == {(1, "attn"): 1}  # only attention holds KV
    assert uniform_mlp(curves, costs, 40, "params") == {(0, "mlp"): 2, (1, "mlp"): 2}
    # Uniform width 2 removes 40 where 20 are needed: the MLP whose cut half costs more (1) gets it back.
    assert uniform_mlp(curves, costs, 20, "params") == {(0, "mlp"): 2, (1, "mlp"): 2}
    assert near_uniform_mlp(curves, costs, 20, "params") == {(0, "mlp"): 2}
    assert near_uniform_mlp(curves, costs, 30, "params") == {(0, "mlp"): 2, (1, "mlp"): 2}  # no room
    assert near_uniform_mlp(curves, costs, 40, "params") == {(0, "mlp"): 2, (1, "mlp"): 2}


def test_budgets_parse_and_impossible_ones_fail_before_work():
    assert parse_budget("params=0.8") == Budget("params", 0.8)
    assert parse_budget("kv=0.5") == Budget("kv", 0.5)
    for bad in ("params=1.2", "params=0", "flops=0.5", "params", "kv=half"):
        with pytest.raises(PlanError):
            parse_budget(bad)
    model = tiny_model("llama")
    with pytest.raises(PlanError, match="impossible"):
        removal_target(model, sublayer_costs(get_adapter(model)), Budget("params", 0.01))


def _reference_stats(model, ad, calib):
    """Grams, Fishers and the loss from one whole-graph forward and backward (autograd over the full model,
    hooks on the output projections): what the layer-by-layer backward sweep must reproduce. A sub-layer whose
    output is normalised (Gemma 3) has its Fisher taken with the norm's rms held fixed."""
    from prunekit.compress.stats import output_projections
    from prunekit.losses import token_nll
    from prunekit.width.importance import masked_rows

    grams, fishers, handles = {}, {}, []
    ids, mask = calib.input_ids, calib.attention_mask
    for key, proj in output_projections(ad).items():
        grams[key] = torch.zeros(proj.in_features, proj.in_features, dtype=torch.float64)
        fishers[key] = torch.zeros(proj.out_features, proj.out_features, dtype=torch.float64)

        norm = ad.output_norm(ad.layers()[key[0]], key[1])

        def hook(module, args, out, key=key, fisher=norm is None):
            rows = masked_rows(args[0].detach(), mask).double()
            grams[key] += rows.T @ rows

            def grad_hook(g, key=key):
                rows = masked_rows(g, mask).double()
                fishers[key] += rows.T @ rows
            if fisher:
                out.register_hook(grad_hook)

        def norm_hook(module, args, out, key=key):
            # Gemma 3's y = (1 + weight) * z / sqrt(mean(z^2) + eps): with that divisor held fixed,
            # dL/dz = (1 + weight) / divisor * dL/dy
            z = args[0].detach().double()
            scale = (1.0 + module.weight.detach().double()) / (z.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()

            def grad_hook(g, key=key):
                rows = masked_rows(g.double() * scale, mask)
                fishers[key] += rows.T @ rows
            out.register_hook(grad_hook)
        handles.append(proj.register_forward_hook(hook))
        if norm is not None:
            handles.append(norm.register_forward_hook(norm_hook))
    model.zero_grad()
    nll, n = token_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    nll.backward()
    for h in handles:
        h.remove()
    return grams, fishers, float(nll.detach()) / n, n


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_layer_by_layer_backward_gives_the_whole_graph_statistics(family):
    """`collect_stats` runs the layers forward, then re-runs them top-down with autograd one at a time
    (`LayerRunner.backward`): the same Grams, Fishers and loss as autograd over the whole model, padding
    excluded, at any batch size; for Gemma 3's normalised sub-layers, the Fisher of the gradient at the
    projection's output with the norm's rms held fixed (the reference scales by Gemma's own 1 + weight, the
    runner by the gains it reads from the module)."""
    model = tiny_model(family)
    if family == "gemma3_text":  # the soft-capped logits of Gemma 2/3 must be the model's own
        model.config.final_logit_softcapping = 5.0
    ad = get_adapter(model)
    calib = random_calib(6, 16, pad_last=5)
    ref = copy.deepcopy(model)
    grams, fishers, loss, tokens = _reference_stats(ref, get_adapter(ref), calib)
    for batch_size in (1, 4):
        st = collect_stats(model, calib, adapter=ad, batch_size=batch_size, progress=False)
        assert st.tokens == tokens == 6 * 15 - 5 and st.loss == pytest.approx(loss, rel=1e-6)
        assert sorted(st.layers) == sorted(grams)
        for key, sub in st.layers.items():
            assert sub.tokens == 6 * 16 - 5
            for got, want in ((sub.gram, grams[key]), (sub.fisher, fishers[key])):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_grams_spilled_to_disk_layer_by_layer_equal_those_in_memory(tmp_path):
    """Over a Gram budget, each layer's Grams are written to disk once summed: the same sums."""
    model = tiny_model("llama")
    ad = get_adapter(model)
    calib = random_calib(4, 16, pad_last=3)
    whole = collect_stats(model, calib, adapter=ad, progress=False)
    parts = collect_stats(model, calib, adapter=ad, progress=False, gram_budget_bytes=1, spill_dir=tmp_path)
    assert not whole.grams_on_disk and parts.grams_on_disk
    assert parts.loss == whole.loss and parts.tokens == whole.tokens
    for key, st in whole.layers.items():
        spilled = parts.layers[key]
        assert spilled.gram is None and spilled.gram_file is not None and spilled.gram_file.is_file()
        loaded = parts.layer(key)
        assert loaded.tokens == st.tokens
        assert torch.equal(loaded.gram, st.gram) and torch.equal(loaded.fisher, st.fisher)
    parts.release()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="spill_dir"):
        collect_stats(model, calib, adapter=ad, progress=False, gram_budget_bytes=1)


def test_compress_with_grams_on_disk_chooses_the_same_model():
    model = tiny_model("qwen2")
    results = []
    for gram_budget in (None, 1):
        m = tiny_model("qwen2")
        m.load_state_dict(model.state_dict())
        results.append(compress(m, get_adapter(m), random_calib(8, 24), Budget("params", 0.8), rounds=2,
                                multiple_of=16, progress=False, gram_budget_bytes=gram_budget))
    assert not results[0].plan.options["grams_on_disk"] and results[1].plan.options["grams_on_disk"]
    assert results[0].chosen == results[1].chosen
    assert results[0].plan.to_json()["widths"] == results[1].plan.to_json()["widths"]
    for a, b in zip(results[0].candidates, results[1].candidates):
        assert a["name"] == b["name"] and a["check_loss"] == pytest.approx(b["check_loss"], rel=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_zeroed_and_refitted_candidate_equals_the_physically_pruned_model(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    costs = sublayer_costs(ad)
    m = EditableModel(ResidentLayers(model, ad), costs)
    calib = random_calib(4, 16)
    stats = collect_stats(model, calib, adapter=ad, progress=False)
    curves = m.curves(stats, 16)
    counts = {(0, "attn"): 0, (1, "mlp"): 48, (2, "attn"): 1, (3, "mlp"): 0, (3, "attn"): 0}
    m.cut(stats, curves, counts, True)
    n_before = count_parameters(model)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        zeroed = model(input_ids=ids).logits
    drops, widths = plan_for(ad, {s: m.alive[s] for s in counts})
    apply_plan(ad, PruningPlan(dropped=drops, widths=widths))
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, zeroed, rtol=1e-5, atol=1e-5)
    assert n_before - count_parameters(model) == removed(costs, counts, "params")


def test_compress_meets_the_budget_and_iterative_rounds_are_tried():
    model = tiny_model("llama")
    n0 = count_parameters(model)
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.8), rounds=2,
                      multiple_of=16, progress=False)
    assert count_parameters(model) <= 0.8 * n0
    names = [c["name"] for c in result.candidates]
    assert {"dense", "mixed", "mixed (no refit)", "mixed (OBS order)", "depth", "width", "uniform-width",
            "near-uniform-width"} <= set(names)
    # The rounds follow the unit order whose one-shot candidate checked better.
    value = {c["name"]: c["check_loss"] for c in result.candidates}
    tag = " (OBS order)" if value["mixed (OBS order)"] < value["mixed"] else ""
    assert {f"mixed{tag} round 1/2", f"mixed{tag} x2 rounds"} <= set(names)
    chosen = next(c for c in result.candidates if c["name"] == result.chosen)
    assert chosen["check_loss"] == min(c["check_loss"] for c in result.candidates if c["at_budget"])
    assert result.plan.method == "compress" and result.plan.options["budget"] == "params=0.8"


def test_llm_drop_plans_are_candidates_scored_as_the_physically_dropped_model():
    import copy

    from prunekit.drop.llm_drop import plan_from_scores, score_model
    from prunekit.losses import split_check

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    calib = random_calib(8, 24)
    n0 = count_parameters(model)
    need = removal_target(model, sublayer_costs(get_adapter(model)), Budget("params", 0.8))
    result = compress(model, get_adapter(model), calib, Budget("params", 0.8), rounds=1, multiple_of=16,
                      progress=False)
    rows = {c["name"]: c for c in result.candidates}
    assert {"LLM-Drop attn", "LLM-Drop mlp", "LLM-Drop block", "LLM-Drop joint"} <= set(rows)
    fit, check = split_check(calib, "compress")
    scores = score_model(dense, get_adapter(dense), fit, pairwise=False, progress=False)
    for n in range(1, 5):  # the fewest blocks that reach the budget, as compress takes them
        dropped = copy.deepcopy(dense)
        apply_plan(get_adapter(dropped), plan_from_scores(scores, get_adapter(dense), fit, target="block", n=n))
        if n0 - count_parameters(dropped) >= need:
            break
    row = rows["LLM-Drop block"]
    assert row["at_budget"] and row["removed_params"] == pytest.approx(1 - count_parameters(dropped) / n0)
    assert row["check_loss"] == pytest.approx(whole_model_loss(dropped, check), rel=1e-6)


def test_kl_criterion_chooses_the_candidate_closest_to_the_dense_model():
    from prunekit.errors import PlanError

    model = tiny_model("llama")
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.8), rounds=1,
                      multiple_of=16, criterion="kl", progress=False)
    rows = {c["name"]: c for c in result.candidates}
    assert rows["dense"]["check_kl"] == 0.0  # the dense model against itself, exactly
    at_budget = [c for c in result.candidates if c["at_budget"]]
    assert rows[result.chosen]["check_kl"] == min(c["check_kl"] for c in at_budget) > 0
    assert result.plan.options["criterion"] == "kl" and result.plan.options["kl_topk"] == 256
    with pytest.raises(PlanError, match="unknown criterion"):
        compress(tiny_model("llama"), get_adapter(model), random_calib(8, 24), Budget("params", 0.8),
                 criterion="ce")


def test_kv_budget_halves_the_kv_cache():
    model = tiny_model("llama")
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("kv", 0.5), rounds=1,
                      multiple_of=16, progress=False)
    chosen = next(c for c in result.candidates if c["name"] == result.chosen)
    assert chosen["removed_kv"] >= 0.5


def test_cli_compress_saves_a_checkpoint_that_loads_back_with_its_pareto_table(tiny_checkpoint, tmp_path, capsys):
    from prunekit.cli import main
    from prunekit.io.checkpoint import load_model

    ck, text = tiny_checkpoint
    out = tmp_path / "small"
    assert main(["-q", "compress", str(ck), "--budget", "params=0.85", "--rounds", "2", "--multiple-of", "16",
                 "--calib", str(text), "--samples", "8", "--seq-len", "24", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["chosen"] == summary["chosen"] and (out / "pareto.png").stat().st_size > 0
    assert sum(r["chosen"] for r in pareto["candidates"]) == 1
    plan = PruningPlan.load(out / "prunekit_plan.json")
    assert plan.method == "compress"
    corr = plan.options["correction"]
    assert summary["correction"] == {k: corr[k] for k in ("applied", "check_value_uncorrected", "check_value")}
    model, _ = load_model(out, tokenizer=False)
    dense, _ = load_model(ck, tokenizer=False)
    assert count_parameters(model) <= 0.85 * count_parameters(dense)


def test_compress_repairs_the_chosen_models_removed_spans(tiny_checkpoint, tmp_path):
    """The chosen model (two blocks dropped at this budget) is linearly repaired by default: the repair's
    unrepaired check loss is the candidate's own, a kept map lowers it, and the saved checkpoint gives the
    recorded loss; `repair="none"` saves the same choice unrepaired."""
    from prunekit.data import calibration_data
    from prunekit.io.checkpoint import load_model, load_tokenizer
    from prunekit.jobs.compress import compress_job
    from prunekit.losses import split_check

    ck, text = tiny_checkpoint
    opts = dict(budget="params=0.7", multiple_of=16, calib=text, samples=8, seq_len=24, progress=False)
    repaired = compress_job(str(ck), tmp_path / "repaired", **opts)
    plain = compress_job(str(ck), tmp_path / "plain", repair="none", **opts)
    assert repaired is not None and plain is not None and plain.plan.repair is None
    assert repaired.chosen == plain.chosen and repaired.plan.dropped == plain.plan.dropped
    rep = repaired.plan.repair
    assert rep is not None and any(s["applied"] for s in rep["spans"])
    chosen = next(c for c in repaired.candidates if c["name"] == repaired.chosen)
    assert rep["check_loss_unrepaired"] == pytest.approx(chosen["check_loss"], rel=1e-6)
    assert rep["check_loss"] < rep["check_loss_unrepaired"]
    assert PruningPlan.load(tmp_path / "repaired" / "prunekit_plan.json").repair == rep
    check = split_check(calibration_data(load_tokenizer(ck), text, 8, 24), "test")[1]
    for out, want in (("repaired", rep["check_loss"]), ("plain", rep["check_loss_unrepaired"])):
        model, _ = load_model(tmp_path / out, tokenizer=False)
        assert whole_model_loss(model, check) == pytest.approx(want, rel=1e-5)


def test_compress_repair_where_the_architecture_cannot_take_it(tmp_path):
    """Gemma 3 normalises sub-layer outputs: by default compress saves its choice unrepaired and says why (the
    error correction, linearised through those norms, still runs); an
    explicit `repair="linear"` is one error before any work."""
    from conftest import tiny_tokenizer

    from prunekit.io.checkpoint import save_checkpoint
    from prunekit.jobs.compress import compress_job

    ck = save_checkpoint(tiny_model("gemma3_text"), tiny_tokenizer(), tmp_path / "tiny-gemma")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    opts = dict(budget="params=0.7", multiple_of=16, calib=text, samples=8, seq_len=24, progress=False)
    with pytest.raises(PlanError, match="normalises sub-layer outputs"):
        compress_job(str(ck), tmp_path / "refused", repair="linear", **opts)
    assert not (tmp_path / "refused").exists()
    result = compress_job(str(ck), tmp_path / "out", **opts)
    assert result is not None and result.plan.repair is not None and result.plan.repair["method"] == "none"
    saved = PruningPlan.load(tmp_path / "out" / "prunekit_plan.json")
    assert "normalised" in saved.repair["reason"]
    assert "ridge" in saved.options["correction"]  # the error correction runs through Gemma's output norms


def test_memory_estimate_counts_the_statistics_exactly():
    from prunekit.compress.memory import memory_estimate

    model = tiny_model("gemma3_text")
    ad = get_adapter(model)
    stats = collect_stats(model, random_calib(2, 16), adapter=ad, progress=False)
    held = sum(t.numel() * t.element_size() for st in stats.layers.values() for t in (st.gram, st.fisher))
    est = memory_estimate(ad, 8, 16)
    assert est["grams"] + est["fishers"] == held
    assert est["largest_gram"] == max(st.gram.numel() * 8 for st in stats.layers.values())
    m = EditableModel(ResidentLayers(model, ad), sublayer_costs(ad))
    projections = [m.weight(s) for s in m.costs]
    assert est["weights"] == 3 * sum(w.numel() * w.element_size() for w in projections)
    assert est["states"] == 6 * 16 * ad.hidden_size * ad.num_layers * 4  # the fit part: 6 of 8 samples
    assert est["layer"] == max(sum(p.numel() * 4 for p in layer.parameters()) for layer in ad.layers())


def test_compress_that_would_not_fit_is_one_error_before_any_work(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from prunekit.cli import main
    from prunekit.jobs import compress as job

    ck, text = tiny_checkpoint
    argv = ["-q", "compress", str(ck), "--budget", "params=0.85", "--calib", str(text), "--samples", "8",
            "--seq-len", "24", "--out", str(tmp_path / "small")]
    monkeypatch.setattr(job, "available_memory_bytes", lambda: 1000)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compress needs at least" in err[0] and "float64 statistics" in err[0]
    assert not (tmp_path / "small").exists()


def test_two_processes_choose_the_single_process_model(tiny_checkpoint, tmp_path):
    """Under torchrun each rank passes its share of the batches (the held-out part's one batch leaves rank 1
    none) and the sums are all-reduced: the same candidates score the same, the same model is chosen, and
    its refitted weights differ only by the order of the float64 additions."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from prunekit.jobs.compress import compress_job

    ck, text = tiny_checkpoint
    opts = ["--budget", "params=0.85", "--multiple-of", "16", "--calib", str(text), "--samples", "8",
            "--seq-len", "24"]
    single = compress_job(str(ck), tmp_path / "single", budget="params=0.85", multiple_of=16, calib=text,
                          samples=8, seq_len=24, progress=False)
    env = {**os.environ, "PRUNEKIT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "prunekit", "-q", "compress", str(ck), *opts, "--out", str(tmp_path / "dp")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    got = PruningPlan.load(tmp_path / "dp" / "prunekit_plan.json")
    assert single is not None and got.to_json()["dropped"] == single.plan.to_json()["dropped"]
    assert got.to_json()["widths"] == single.plan.to_json()["widths"]
    assert got.options["chosen"] == single.plan.options["chosen"]
    for g, r in zip(got.history, single.plan.history, strict=True):
        assert g["name"] == r["name"] and abs(g["check_loss"] - r["check_loss"]) <= 1e-9 * abs(r["check_loss"])
    a, b = load_file(str(tmp_path / "single" / "model.safetensors")), load_file(str(tmp_path / "dp" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.parametrize("budget", ["params=0.85", "params=0.7"])
def test_streamed_compress_equals_the_in_memory_one(tiny_checkpoint, tmp_path, budget):
    """`--stream`: one layer at a time, forward and backward, the candidates' edits kept beside the files and
    the checkpoint written from them: the same candidates score the same, the same model is chosen, the same
    repair maps are kept (at params=0.7 one is), and the saved checkpoint (with its Pareto table) gives the
    in-memory one's logits."""
    from prunekit.io.checkpoint import load_model
    from prunekit.jobs.compress import compress_job

    ck, text = tiny_checkpoint
    opts = dict(budget=budget, multiple_of=16, calib=text, samples=8, seq_len=24, progress=False)
    resident = compress_job(str(ck), tmp_path / "resident", stream=False, **opts)
    streamed = compress_job(str(ck), tmp_path / "streamed", stream=True, offload_dir=tmp_path / "offload", **opts)
    assert resident is not None and streamed is not None
    assert streamed.chosen == resident.chosen and streamed.plan.to_json()["widths"] == resident.plan.to_json()["widths"]
    assert streamed.plan.to_json()["dropped"] == resident.plan.to_json()["dropped"]
    for a, b in zip(streamed.candidates, resident.candidates, strict=True):
        assert a["name"] == b["name"] and a["check_loss"] == pytest.approx(b["check_loss"], rel=1e-6)
    rep, want_rep = streamed.plan.repair, resident.plan.repair
    assert (rep is None) == (want_rep is None)
    if rep is not None:
        assert [s["applied"] for s in rep["spans"]] == [s["applied"] for s in want_rep["spans"]]
        assert rep["check_loss"] == pytest.approx(want_rep["check_loss"], rel=1e-6)
    assert (tmp_path / "streamed" / "pareto.json").is_file() and (tmp_path / "streamed" / "pareto.png").is_file()
    assert not list((tmp_path / "offload").iterdir())  # the spilled states and Grams are gone
    ids = random_calib(2, 16).input_ids
    with torch.no_grad():
        want = load_model(tmp_path / "resident", tokenizer=False)[0](input_ids=ids).logits
        got = load_model(tmp_path / "streamed", tokenizer=False)[0](input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_streamed_compress_equals_the_in_memory_one_on_gemma(tmp_path):
    """Gemma 3's error correction (the dense sub-layers' output directions kept per batch) streamed: every
    candidate, the corrected one included, checks the same as in memory, and the saved models agree."""
    from conftest import tiny_tokenizer

    from prunekit.io.checkpoint import load_model, save_checkpoint
    from prunekit.jobs.compress import compress_job

    ck = save_checkpoint(tiny_model("gemma3_text"), tiny_tokenizer(), tmp_path / "tiny-gemma")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    opts = dict(budget="params=0.85", multiple_of=16, calib=text, samples=8, seq_len=24, progress=False)
    resident = compress_job(str(ck), tmp_path / "resident", stream=False, **opts)
    streamed = compress_job(str(ck), tmp_path / "streamed", stream=True, offload_dir=tmp_path / "offload", **opts)
    assert resident is not None and streamed is not None and streamed.chosen == resident.chosen
    names = [c["name"] for c in resident.candidates]
    assert any(n.endswith("+ correction") for n in names)
    for a, b in zip(streamed.candidates, resident.candidates, strict=True):
        assert a["name"] == b["name"] and a["check_loss"] == pytest.approx(b["check_loss"], rel=1e-6)
    ids = random_calib(2, 16).input_ids
    with torch.no_grad():
        want = load_model(tmp_path / "resident", tokenizer=False)[0](input_ids=ids).logits
        got = load_model(tmp_path / "streamed", tokenizer=False)[0](input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_streamed_edits_are_read_reverted_and_saved_cut_by_the_plan(tiny_checkpoint, tmp_path):
    """A streamed source's written tensors stand in for the files' values when a layer is read and when the
    checkpoint is saved (cut by the plan like the rest), and `revert` undoes what was not committed: the
    saved checkpoint equals, tensor for tensor, the in-memory model edited and cut the same way."""
    from safetensors.torch import load_file

    from prunekit.engine.streamed import StreamedLayers
    from prunekit.io.checkpoint import load_model, load_tokenizer
    from prunekit.plans import LayerWidth
    from prunekit.save import save

    ck, _ = tiny_checkpoint
    src = StreamedLayers(ck)
    name = EditableModel(src, sublayer_costs(src.adapter)).names[(1, "mlp")] + ".weight"
    width = src.adapter.mlp_width(src.adapter.layers()[1])
    edited = torch.randn_like(src.read(name))
    src.write(name, edited)
    src.commit()
    src.write(name, torch.zeros_like(edited))
    with src.layer(1) as layer:
        assert torch.equal(src.adapter.output_projection(layer, "mlp").weight, torch.zeros_like(edited))
    src.revert()
    assert torch.equal(src.read(name), edited)
    plan = PruningPlan(widths={1: LayerWidth(channels=list(range(0, width, 2)))})
    save(src, load_tokenizer(ck), tmp_path / "streamed", plan, progress=False)

    model, _ = load_model(ck, tokenizer=False)
    with torch.no_grad():
        model.get_parameter(name).copy_(edited)
    apply_plan(get_adapter(model), plan)
    want = model.state_dict()
    got = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert got[name].shape == (edited.shape[0], width // 2)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_compress_streams_by_itself_only_when_the_model_in_memory_would_not_fit(tiny_checkpoint, monkeypatch):
    """Default (no --stream flag): in memory when weights plus the search fit; streamed when only one layer's
    weights beside the search fit; --no-stream then is one clear error naming --stream."""
    from prunekit.compress.memory import memory_estimate
    from prunekit.engine.memory import STREAM_HEADROOM, checkpoint_bytes
    from prunekit.io.checkpoint import build_skeleton
    from prunekit.jobs import compress as job

    ck, _ = tiny_checkpoint
    cpu = torch.device("cpu")
    est = memory_estimate(get_adapter(build_skeleton(ck, "float32")), 8, 24)
    common = est["fishers"] + est["largest_gram"] + est["weights"] + est["logits"]
    in_memory = common + est["states"] + int(checkpoint_bytes(ck) * STREAM_HEADROOM)
    streamed = common + est["layer"] + est["head"]
    assert streamed < in_memory
    for free, expected in ((in_memory, False), (in_memory - 1, True), (streamed, True)):
        monkeypatch.setattr(job, "available_memory_bytes", lambda free=free: free)
        assert job.compress_memory(ck, "float32", cpu, 8, 24, None) is expected
    monkeypatch.setattr(job, "available_memory_bytes", lambda: in_memory - 1)
    with pytest.raises(PlanError, match="--stream"):
        job.compress_memory(ck, "float32", cpu, 8, 24, False)
    monkeypatch.setattr(job, "available_memory_bytes", lambda: streamed - 1)
    with pytest.raises(PlanError, match="one layer, streamed"):
        job.compress_memory(ck, "float32", cpu, 8, 24, None)


def test_compress_statistics_are_cached_and_an_interrupted_run_resumes(tiny_checkpoint, tmp_path, isolated_cache,
                                                                       monkeypatch):
    """Every statistics pass (the dense model's, and each round's) is kept in the score cache: a run killed in
    its second pass, started again, takes the first from the cache and computes only the second; a third run
    computes none; all three give the same checkpoint, tensor for tensor, as a run without the cache. Another
    budget takes the dense model's pass from the cache too."""
    from safetensors.torch import load_file

    import prunekit.compress.search as search
    from prunekit.jobs.compress import compress_job

    ck, text = tiny_checkpoint
    opts = dict(budget="params=0.8", rounds=2, multiple_of=16, calib=text, samples=8, seq_len=24, progress=False)
    compress_job(str(ck), tmp_path / "ref", use_cache=False, **opts)
    assert not isolated_cache.exists()
    real, passes = search.collect_stats, []

    def counted(*args, **kwargs):
        passes.append(kwargs["desc"])
        if passes == ["compress statistics", "compress statistics, round 2"] and dies:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "collect_stats", counted)
    dies = True
    with pytest.raises(KeyboardInterrupt):
        compress_job(str(ck), tmp_path / "killed", **opts)
    dies, passes[:] = False, []
    compress_job(str(ck), tmp_path / "resumed", **opts)
    assert passes == ["compress statistics, round 2"]
    passes[:] = []
    again = compress_job(str(ck), tmp_path / "again", **opts)
    assert passes == [] and again is not None
    compress_job(str(ck), tmp_path / "other-budget", **{**opts, "budget": "params=0.85"})
    assert passes == ["compress statistics, round 2"]  # the dense model's pass serves every budget
    want = load_file(str(tmp_path / "ref" / "model.safetensors"))
    for out in ("resumed", "again"):
        got = load_file(str(tmp_path / out / "model.safetensors"))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "killed").exists()
