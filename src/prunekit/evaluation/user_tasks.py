"""Your own zero-shot multiple-choice tasks from a local JSON-lines file.

Evaluating your own local multiple-choice data
----------------------------------------------
Write one JSON object per line::

    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1}

(``answer`` is the 0-based index of the correct choice; any number of choices >= 2), then::

    from prunekit.evaluation.zeroshot import make_jsonl_task, evaluate_tasks
    make_jsonl_task("my_quiz", "data/my_quiz.jsonl", "my_tasks/")   # writes my_tasks/my_quiz.yaml
    evaluate_tasks(model, tokenizer, ["my_quiz"], task_dir="my_tasks/")

The generated YAML uses the prompt ``"Question: {question}\\nAnswer:"`` and scores each choice as the
continuation ``" " + choice``; edit it freely. ``task_dir`` can hold any lm-eval task YAMLs you wrote by hand:
to keep them offline use ``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: /ABSOLUTE/path.jsonl}}``
(``datasets`` resolves relative paths against the current working directory, not against the YAML).
Tasks in ``task_dir`` override prunekit's built-in tasks of the same name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml  # comes with the optional `eval` extra (lm-eval), like everything zero-shot

from prunekit.errors import TaskError
from prunekit.io.outputs import atomic_file

# Task names become file names; keep them to a conservative character set.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _validate_mc_jsonl(path: Path) -> int:
    """Check every row of a multiple-choice JSONL file; return the number of rows."""
    n = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise TaskError(f"{where}: expected a JSON object")
            question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
            if not isinstance(question, str):
                raise TaskError(f"{where}: 'question' must be a string")
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) for c in choices)
            ):
                raise TaskError(f"{where}: 'choices' must be a list of at least two strings")
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise TaskError(f"{where}: 'answer' must be an integer index into 'choices'")
            n += 1
    if n == 0:
        raise TaskError(f"{path}: no rows")
    return n


def make_jsonl_task(name: str, jsonl_path: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``<out_dir>/<name>.yaml``, an lm-eval task over a local multiple-choice JSONL file.

    Each line of ``jsonl_path`` must be ``{"question": str, "choices": [str, ...], "answer": int}`` (all rows
    are checked; extra fields are allowed). The prompt is ``"Question: {question}\\nAnswer:"``, each choice is
    scored as the continuation ``" " + choice``, and the metrics are ``acc`` and ``acc_norm``. Pass ``out_dir``
    as ``task_dir`` to :func:`evaluate_tasks` and ask for ``name``. Returns the YAML path; an existing one is
    replaced only with ``force``.
    """

    if not NAME_RE.match(name):
        raise TaskError(f"invalid task name {name!r}: use letters, digits, '_', '-', '.'")
    data = Path(jsonl_path).expanduser().resolve()
    if not data.is_file():
        raise TaskError(f"{data}: no such file")
    _validate_mc_jsonl(data)
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",  # a feature name: lm-eval returns the list as is
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    path = Path(out_dir).expanduser() / f"{name}.yaml"
    with atomic_file(path, force, inputs=[data]) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


