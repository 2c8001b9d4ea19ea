"""Doc processing for the offline task configs, copied from lm-evaluation-harness.

Each function mirrors the one named in its docstring (lm-eval 0.4.x, MIT licence) so that the offline
tasks score exactly like the standard ones; ``tests/test_zeroshot.py`` checks this against the installed
lm-eval. lm-eval loads this file by path (``!function utils.<name>``), so it imports nothing from rankcut.
"""

import re


def hellaswag_preprocess(text):
    """``lm_eval/tasks/hellaswag/utils.py: preprocess``."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset):
    """``lm_eval/tasks/hellaswag/utils.py: process_docs``."""

    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out_doc = {
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }
        return out_doc

    return dataset.map(_process_doc)


def winogrande_doc_to_text(doc):
    """``lm_eval/tasks/winogrande/preprocess_winogrande.py: doc_to_text`` (the gold context index)."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    """``lm_eval/tasks/winogrande/preprocess_winogrande.py: doc_to_target`` (the text after the blank)."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    """``lm_eval/tasks/winogrande/preprocess_winogrande.py: doc_to_choice`` (one context per option)."""
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


def mathqa_doc_to_choice(doc):
    """``lm_eval/tasks/mathqa/utils.py: doc_to_choice``."""
    choices = [
        c[4:].rstrip(" ,")
        for c in re.findall(r"[abcd] \) .*?, |e \) .*?$", doc["options"])
    ]
    return choices
