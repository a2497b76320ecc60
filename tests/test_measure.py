"""`compress.measure`: a probe's loss increase is exactly the whole model's, probing top layer first re-runs
only what changed, in any order no stale state is read, and the rescaled curves pass through their probes."""

from __future__ import annotations

import pytest
import torch
from conftest import random_calib, tiny_model, whole_model_loss

from prunekit.adapters import get_adapter
from prunekit.compress.budget import Budget, sublayer_costs
from prunekit.compress.curves import Curve
from prunekit.compress.editable import EditableModel
from prunekit.compress.measure import SPREAD, Probe, probe_counts, probe_part, rescaled
from prunekit.compress.search import compress
from prunekit.compress.stats import collect_stats
from prunekit.engine.sources import ResidentLayers


@pytest.mark.parametrize("top_first", [True, False])
def test_probes_in_any_order_equal_whole_model_losses(family, top_first):
    model = tiny_model(family)
    ad = get_adapter(model)
    src = ResidentLayers(model, ad)
    m = EditableModel(src, sublayer_costs(ad))
    calib = random_calib(6, 16, pad_last=3)
    stats = collect_stats(model, calib, adapter=ad, progress=False)
    curves = m.curves(stats, 16)
    dense = whole_model_loss(model, calib)
    probe = Probe(src, calib, 4, False, lambda t: t, None)
    assert probe.base == pytest.approx(dense, rel=1e-6)
    counts = probe_counts(curves, {})
    assert counts  # every sub-layer of the tiny models can be cut
    # Top first each probe re-runs only the layers from its own up; in any other order it must re-run more
    # rather than read a state the previous probe left.
    for s in sorted(counts, reverse=top_first):
        m.cut(stats, curves, {s: counts[s]}, True)
        expected = whole_model_loss(model, calib) - dense
        got = probe.increase(s[0])
        m.reset()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), s
        assert abs(expected) > 1e-6  # the cut changed the model, so a stale state would show


def test_rescaled_curves_pass_through_their_probes_within_the_spread():
    curves = {(0, "mlp"): Curve([0, 1, 2, 3], [4, 2, 0], [0.0, 1.0, 4.0]),
              (1, "mlp"): Curve([0, 1, 2, 3], [4, 2, 0], [0.0, 2.0, 8.0]),
              (2, "mlp"): Curve([0, 1, 2, 3], [4, 2, 0], [0.0, 1.0, 2.0]),
              (3, "mlp"): Curve([0, 1, 2, 3], [4, 2, 0], [0.0, 1.0, 2.0])}
    probes = {(0, "mlp"): (2, 3.0), (1, "mlp"): (2, 2.0), (2, "mlp"): (2, -0.5)}
    out = rescaled(curves, probes)
    assert out[(0, "mlp")].err == [0.0, 3.0, 12.0]  # scale 3
    assert out[(1, "mlp")].err == [0.0, 2.0, 8.0]  # scale 1
    mid = 2.0  # the median of the positive scales (3 and 1)
    assert out[(2, "mlp")].err == pytest.approx([0.0, mid / SPREAD, 2 * mid / SPREAD])  # fell: the floor
    assert out[(3, "mlp")].err == [0.0, mid, 2 * mid]  # not probed: the median
    assert rescaled(curves, {}) == curves


def test_probe_part_spreads_over_the_fit_part():
    calib = random_calib(12, 8)
    part = probe_part(calib, 4)
    assert torch.equal(part.input_ids, calib.input_ids[[0, 4, 7, 11]])
    assert len(probe_part(calib, 50).input_ids) == 12


def test_compress_tries_the_measured_candidates_and_records_the_probes():
    model = tiny_model("llama")
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.8), rounds=1,
                      multiple_of=16, progress=False, probe_samples=3)
    names = {c["name"] for c in result.candidates}
    tag = " (OBS order)" if result.plan.options["probes"]["order"] == "obs" else ""
    assert {f"mixed{tag} (measured)", f"width{tag} (measured)"} <= names
    probes = result.plan.options["probes"]
    assert probes["samples"] == 3 and len(probes["increase"]) == 2 * 4
    off = compress(tiny_model("llama"), None, random_calib(8, 24), Budget("params", 0.8), rounds=1,
                   multiple_of=16, progress=False, probe_samples=0)
    assert "probes" not in off.plan.options
    assert not any("(measured)" in c["name"] for c in off.candidates)


def test_negative_probe_samples_is_one_error_before_any_work(tiny_checkpoint, tmp_path, capsys):
    from prunekit.cli import main

    ck, text = tiny_checkpoint
    argv = ["-q", "compress", str(ck), "--budget", "params=0.85", "--calib", str(text), "--samples", "8",
            "--seq-len", "24", "--probe-samples", "-1", "--out", str(tmp_path / "small")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--probe-samples must be at least 0" in err[0]
    assert not (tmp_path / "small").exists()
