"""Plans and similarity scores read back from JSON: real plans of every method round-trip unchanged, and every
malformed field is one `PlanError` naming the field and its value, raised on load (or where a plan meets a
model), before anything expensive runs."""

from __future__ import annotations

import copy
import json
import shutil
from typing import Any, Callable

import pytest
import torch
from conftest import random_calib, tiny_model

from prunekit.adapters import get_adapter
from prunekit.drop import llm_drop
from prunekit.drop.similarity import SimilarityScores
from prunekit.errors import PlanError
from prunekit.plans import PLAN_FILE, DropTarget, LayerWidth, PruningPlan, check_layers, checkpoint_plan
from prunekit.surgery import apply_plan


def _scores_json(layers: int = 4, pairwise: bool = True) -> dict[str, Any]:
    s = SimilarityScores(block=[0.5] * layers, attn=[0.9] * layers, mlp=[0.7] * layers, tokens=96,
                         pairwise=[[1.0] * (layers + 1) for _ in range(layers + 1)] if pairwise else None,
                         calibration={"sha256": "x"})
    return s.to_json()


def _valid_plan() -> dict[str, Any]:
    """A plan as `to_json` writes it, with every field present."""
    plan = PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(2, "block")],
                       widths={0: LayerWidth(heads=[0, 1], kv_heads=[0], channels=[3, 1, 2])}, method="llm-drop/attn",
                       options={"n": 2}, scores=_scores_json(), history=[{"step": 0}], calibration={"sha256": "x"},
                       model={"num_layers": 4}, recovery=[{"steps": 1}], repair={"spans": []})
    return json.loads(json.dumps(plan.to_json()))


def test_a_valid_plan_round_trips():
    data = _valid_plan()
    assert PruningPlan.from_json(data).to_json() == data


def _plans_of_every_method() -> dict[str, PruningPlan]:
    from prunekit.compress.budget import Budget
    from prunekit.compress.search import compress
    from prunekit.recovery import recover
    from prunekit.repair import linear_repair
    from prunekit.width import width_prune

    plans: dict[str, PruningPlan] = {}
    for name, kw in {"drop": dict(target="attn", n=1), "drop-iterative": dict(target="block", n=2, iterative=True),
                     "drop-consecutive": dict(target="block", n=2, consecutive=True)}.items():
        m = tiny_model("llama")
        plans[name] = llm_drop(m, get_adapter(m), random_calib(), progress=False, **kw)
    m = tiny_model("llama")
    plans["width"] = width_prune(m, get_adapter(m), random_calib(), mlp_keep=0.5, heads_keep=0.5, shots=2,
                                 multiple_of=1, progress=False)
    m = tiny_model("llama")
    plans["compress"] = compress(m, get_adapter(m), random_calib(8, 24), Budget("params", 0.8), rounds=1,
                                 multiple_of=16, progress=False).plan
    # repair: the record `linear_repair` returns, as the drop job stores it in the plan.
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    plan = llm_drop(pruned, get_adapter(pruned), random_calib(), target="mlp", n=1, progress=False)
    plan.repair = linear_repair(dense, pruned, plan, random_calib(n=8, t=16), progress=False)
    plans["repair"] = plan
    # heal: the source plan plus the run's record, as `heal_checkpoint` stores it.
    healed = copy.deepcopy(plans["drop"])
    healed.recovery.append(recover(pruned, random_calib(n=4, t=16), steps=1, lr=0.0, batch_size=2, progress=False))
    plans["heal"] = healed
    return plans


def test_real_plans_of_every_method_round_trip_unchanged(tmp_path):
    for name, plan in _plans_of_every_method().items():
        written = json.loads(json.dumps(plan.to_json()))
        again = PruningPlan.from_json(written)
        assert again.to_json() == written, name
        assert again.dropped == sorted(plan.dropped) and again.widths == plan.widths, name
        plan.save(tmp_path / f"{name}.json")
        assert PruningPlan.load(tmp_path / f"{name}.json").to_json() == written, name
        check_layers(again, 4)  # every index lies in the 4-layer model they were made from
        if again.scores and "layers" in again.scores:
            assert SimilarityScores.from_json(again.scores).to_json() == again.scores, name


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    """A mutation of the valid plan: the field at dotted `path` (list positions as numbers) set to `value`."""
    def mutate(data: dict[str, Any]) -> Any:
        keys = path.split(".")
        node: Any = data
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        node[int(last) if isinstance(node, list) else last] = value
        return data
    return mutate


def _drop_key(path: str, key: str) -> Callable[[dict[str, Any]], Any]:
    def mutate(data: dict[str, Any]) -> Any:
        node: Any = data
        for k in path.split("."):
            node = node[int(k)] if isinstance(node, list) else node[k]
        del node[key]
        return data
    return mutate


def _widths(value: Any) -> Callable[[dict[str, Any]], Any]:
    return _set("widths", value)


BAD = [
    (lambda d: [], "the plan is []"),
    (lambda d: "plan", 'the plan is "plan"'),
    (_set("dropped.0.layer", -5), "dropped[0].layer is -5"),
    (_set("dropped.0.layer", 1e30), "dropped[0].layer is 1e+30"),
    (_set("dropped.0.layer", "abc"), 'dropped[0].layer is "abc"'),
    (_set("dropped.0.layer", True), "dropped[0].layer is true"),
    (_set("dropped.0.layer", 1.0), "dropped[0].layer is 1.0"),
    (_set("dropped.1.module", "../../outside"), 'dropped[1].module is "../../outside"'),
    (_set("dropped.1.module", ["attn"]), "dropped[1].module is [\"attn\"]"),
    (_drop_key("dropped.0", "module"), "dropped[0].module is missing"),
    (_set("dropped.0.extra", 1), "dropped[0] has the unknown key 'extra'"),
    (_set("dropped", {"layer": 1}), "dropped is {\"layer\": 1}"),
    (_set("dropped.0", 3), "dropped[0] is 3"),
    (_widths({"x": {"heads": [0]}}), 'a key of widths is "x"'),
    (_widths({"-1": {"heads": [0]}}), 'a key of widths is "-1"'),
    (_widths({"01": {"heads": [0]}}), 'a key of widths is "01"'),
    (_widths([]), "widths is []"),
    (_set("widths.0.heads", "abc"), 'widths.0.heads is "abc"'),
    (_set("widths.0.heads", [0, -1]), "widths.0.heads[1] is -1"),
    (_set("widths.0.heads", [0, 0]), "widths.0.heads lists index 0 twice"),
    (_set("widths.0.channels", []), "widths.0.channels is []"),
    (_set("widths.0.kv_heads", [False]), "widths.0.kv_heads[0] is false"),
    (_set("widths.0.queries", [0]), "widths.0 has the unknown key 'queries'"),
    (_set("widths.0", None), "widths.0 is null"),
    (_set("scores.layers", "abc"), 'scores.layers is "abc"'),
    (_set("scores.layers", {"0": 1}), "scores.layers is {"),
    (_set("scores.layers", []), "scores.layers is []"),
    (_set("scores.layers.0", 0.5), "scores.layers[0] is 0.5"),
    (_drop_key("scores.layers.0", "index"), "scores.layers[0].index is missing"),
    (_set("scores.layers.0.index", 1), "scores.layers[1].index is 1"),  # the second entry of layer 1
    (_set("scores.layers.3.index", 7), "scores.layers[3].index is 7"),
    (_set("scores.layers.2.attn", "high"), 'scores.layers[2].attn is "high"'),
    (_set("scores.tokens", -1), "scores.tokens is -1"),
    (_drop_key("scores", "tokens"), "scores.tokens is missing"),
    (_set("scores.pairwise", [[1.0]]), "scores.pairwise has 1 rows"),
    (_set("scores.pairwise.2", [1.0]), "scores.pairwise[2] has 1 numbers"),
    (_set("scores.pairwise.2.1", "x"), 'scores.pairwise[2][1] is "x"'),
    (_set("scores.calibration", []), "scores.calibration is []"),
    (_set("scores", [1]), "scores is [1]"),
    (_set("format", 2), "format is 2"),
    (_set("format", "1"), 'format is "1"'),
    (_set("format", True), "format is true"),
    (lambda d: {k: v for k, v in d.items() if k != "format"}, "format is missing"),
    (_set("method", 5), "method is 5"),
    (_set("options", []), "options is []"),
    (_set("calibration", "c4"), 'calibration is "c4"'),
    (_set("model", None), "model is null"),
    (_set("history", {}), "history is {}"),
    (_set("history.0", 1), "history[0] is 1"),
    (_set("recovery", "x"), 'recovery is "x"'),
    (_set("recovery.0", [1]), "recovery[0] is [1]"),
    (_set("repair", []), "repair is []"),
    (_set("prunekit_version", 1), "prunekit_version is 1"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_every_bad_field_is_one_plan_error_naming_it(mutate, message, tmp_path):
    data = mutate(_valid_plan())
    with pytest.raises(PlanError) as e:
        PruningPlan.from_json(data)
    assert message in str(e.value) and "\n" not in str(e.value)
    # From a file: the same sentence, naming the file.
    f = tmp_path / PLAN_FILE
    f.write_text(json.dumps(data))
    with pytest.raises(PlanError) as e:
        PruningPlan.load(f)
    assert str(f) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_null_optional_fields_and_absent_fields_are_accepted():
    data = _valid_plan()
    data["scores"] = data["repair"] = None
    data["widths"]["0"] = {"heads": None, "channels": [5]}
    plan = PruningPlan.from_json(data)
    assert plan.scores is None and plan.repair is None and plan.widths[0] == LayerWidth(channels=[5])
    bare = PruningPlan.from_json({"format": 1})
    assert bare.dropped == [] and bare.widths == {} and bare.method == "none"
    # Other methods keep their own importances in `scores` (TransAct): an object without `layers` is theirs.
    assert PruningPlan.from_json({"format": 1, "scores": {"scorer": "activation", "first_shot": {}}}).scores


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b""])
def test_unreadable_plan_files_are_plan_errors(tmp_path, content):
    f = tmp_path / PLAN_FILE
    f.write_bytes(content)
    with pytest.raises(PlanError, match="cannot read plan"):
        PruningPlan.load(f)


@pytest.mark.parametrize("mutate,message", [
    (_set("layers", "abc"), 'scores.layers is "abc"'),
    (lambda d: [], "scores is []"),
    (_set("layers.1.block", None), "scores.layers[1].block is null"),
    (_set("layers.1.index", 0), "scores.layers[1].index is 0"),
    (lambda d: {"tokens": 1}, "scores.layers is missing"),
])
def test_similarity_scores_from_json_is_checked(mutate, message):
    good = _scores_json(pairwise=False)
    assert SimilarityScores.from_json(good).to_json() == good
    # Rows in any order come back in layer order.
    shuffled = {**good, "layers": list(reversed(good["layers"]))}
    assert SimilarityScores.from_json(shuffled).to_json() == good
    with pytest.raises(PlanError) as e:
        SimilarityScores.from_json(mutate(copy.deepcopy(good)))
    assert message in str(e.value)


def test_apply_plan_refuses_layers_the_model_does_not_have():
    model = tiny_model("llama")
    ad = get_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for plan in (PruningPlan(dropped=[DropTarget(-5, "attn")]), PruningPlan(dropped=[DropTarget(4, "block")]),
                 PruningPlan(widths={7: LayerWidth(channels=[0, 1])})):
        with pytest.raises(PlanError, match="the model has 4 layers"):
            apply_plan(ad, plan)
    after = model.state_dict()
    assert ad.num_layers == 4 and all(before[k].equal(after[k]) for k in before)


def _checkpoint_with_plan(src, folder, plan: dict[str, Any]):
    shutil.copytree(src, folder)
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    return folder


def test_a_checkpoint_plan_must_fit_the_model_it_was_made_from(tiny_checkpoint, tmp_path):
    ck, _ = tiny_checkpoint  # 4 layers, no plan
    assert checkpoint_plan(ck) is None
    plan = {"format": 1, "dropped": [{"layer": 3, "module": "attn"}]}
    assert checkpoint_plan(_checkpoint_with_plan(ck, tmp_path / "ok", plan)).dropped == [DropTarget(3, "attn")]
    # A removed block: the source had one layer more than the checkpoint, so layer 4 exists but not 5.
    plan = {"format": 1, "dropped": [{"layer": 4, "module": "block"}]}
    assert checkpoint_plan(_checkpoint_with_plan(ck, tmp_path / "block", plan)) is not None
    for name, bad in {"attn4": {"format": 1, "dropped": [{"layer": 4, "module": "attn"}]},
                      "block5": {"format": 1, "dropped": [{"layer": 5, "module": "block"}]},
                      "width9": {"format": 1, "widths": {"9": {"channels": [0]}}}}.items():
        folder = _checkpoint_with_plan(ck, tmp_path / name, bad)
        with pytest.raises(PlanError, match="the model it was made from") as e:
            checkpoint_plan(folder)
        assert str(folder / PLAN_FILE) in str(e.value) and "\n" not in str(e.value)


def _no_models(monkeypatch):
    """Any model load fails the test: the plan must be refused first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the plan was checked")
    import prunekit.evaluation.compare as compare_mod
    import prunekit.jobs.heal as heal_mod

    monkeypatch.setattr(compare_mod, "load_model", refuse)
    monkeypatch.setattr(heal_mod, "load_model", refuse)


@pytest.mark.parametrize("bad,message", [
    ({"format": 1, "dropped": [{"layer": -5, "module": "attn"}]}, "dropped[0].layer is -5"),
    ({"format": 1, "dropped": [{"layer": 9, "module": "attn"}]}, "drops the attn of layer 9"),
    ({"format": 1, "scores": {"layers": "abc", "tokens": 1}}, 'scores.layers is "abc"'),
])
def test_cli_compare_and_heal_refuse_a_bad_plan_at_once(tiny_checkpoint, tmp_path, capsys, monkeypatch, bad,
                                                        message):
    from prunekit.cli import main

    ck, text = tiny_checkpoint
    bad_ck = _checkpoint_with_plan(ck, tmp_path / "bad", bad)
    _no_models(monkeypatch)
    capsys.readouterr()
    runs = {
        "compare": ["-q", "compare", str(ck), str(bad_ck), "--out", str(tmp_path / "report"), "--text", str(text),
                    "--windows", "2", "--window-len", "16", "--no-bench"],
        "heal": ["-q", "heal", str(bad_ck), "--text", str(text), "--samples", "4", "--seq-len", "24",
                 "--batch-size", "2", "--steps", "1", "--out", str(tmp_path / "healed")],
    }
    for name, argv in runs.items():
        assert main(argv) == 2, name
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prunekit: error: "), (name, out.err)
        assert message in lines[0] and str(bad_ck / PLAN_FILE) in lines[0], (name, lines[0])
        assert out.out == ""
    assert not (tmp_path / "report").exists() and not (tmp_path / "healed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad", "tiny-llama", "text.txt"])


def test_a_model_that_has_the_plans_structure_is_not_cut_again(tmp_path):
    """Whether a plan is already applied is told from the modules (`surgery.carries`), not from a record on
    the model object: a reloaded pruned checkpoint (whose layers were renumbered by the drop of a whole
    block and whose layers were narrowed) takes its own plan again unchanged, its original takes it as the
    first time, and the plan's structure is recognised only on the pruned model."""
    from conftest import tiny_tokenizer

    from prunekit.io.checkpoint import load_model, save_checkpoint
    from prunekit.surgery import apply_plan, carries

    base = tiny_model("llama")
    plan = PruningPlan(dropped=[DropTarget(0, "block"), DropTarget(2, "attn")], method="test",
                       widths={1: LayerWidth(heads=[0, 1], kv_heads=[0], channels=list(range(0, 128, 4)))},
                       model={"num_hidden_layers": get_adapter(base).num_layers})
    assert not carries(get_adapter(base), plan)
    apply_plan(get_adapter(base), plan)
    x = random_calib(2, 12).input_ids
    with torch.no_grad():
        want = base(input_ids=x).logits
    reloaded, _ = load_model(save_checkpoint(base, tiny_tokenizer(), tmp_path / "pruned", plan), tokenizer=False)
    ad = get_adapter(reloaded)
    assert carries(ad, plan) and ad.num_layers == plan.model["num_hidden_layers"] - 1
    apply_plan(ad, plan)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, want)


def test_api_names_that_are_also_submodules_stay_callable():
    """`prunekit.save` and `prunekit.compress` name both a function of the API and a submodule; importing the
    submodules (as the jobs do) must not turn `prunekit.save(...)` into "'module' object is not callable"."""
    import prunekit
    import prunekit.jobs  # noqa: F401  (imports prunekit.save and prunekit.compress)

    with pytest.raises(TypeError, match="missing"):
        prunekit.save()
    with pytest.raises(TypeError, match="missing"):
        prunekit.compress()
