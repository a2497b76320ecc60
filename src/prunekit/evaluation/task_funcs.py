"""Prompt helpers for prunekit's built-in lm-eval tasks, referenced from the YAMLs as ``!function task_funcs.X``.

lm-eval loads a ``!function`` module from the folder of the YAML that names it (by file path, not by import), so
:mod:`prunekit.evaluation.zeroshot` writes a one-line ``task_funcs.py`` re-exporting this module beside the rendered task
YAMLs. Standard library only, so the helpers stay cheap to load. Each function is a copy of the lm-eval 0.4.13 helper named in its docstring, so our prompts and
choices are exactly lm-eval's; only the data source differs.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["hellaswag_doc", "hellaswag_preprocess", "hellaswag_process_docs", "winogrande_doc_to_choice",
           "winogrande_doc_to_target", "winogrande_doc_to_text"]


# ------------------------------------------------------------------------------------------------ hellaswag
def hellaswag_preprocess(text: str) -> str:
    """``lm_eval/tasks/hellaswag/utils.py::preprocess``: strip WikiHow bracket artefacts."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """One document as ``lm_eval/tasks/hellaswag/utils.py::process_docs`` rewrites it."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset: Any) -> Any:
    """``process_docs`` for a ``datasets.Dataset``: adds ``query``, ``choices`` and ``gold`` (order kept)."""
    return dataset.map(hellaswag_doc)



# ----------------------------------------------------------------------------------------------- winogrande
# WinoGrande is scored by *partial evaluation*: the two candidate contexts (sentence up to the blank, with
# each option filled in) are compared on the likelihood of the same continuation (the rest of the sentence).
# doc_to_text returns the gold context's index, which lm-eval takes as "several inputs, one target".
def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """``lm_eval/tasks/winogrande/preprocess_winogrande.py::doc_to_text``: index of the gold option."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """``preprocess_winogrande.py::doc_to_target``: the sentence after the blank."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """``preprocess_winogrande.py::doc_to_choice``: the sentence up to the blank with each option filled in."""
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
