"""Zero-shot evaluation: offline task configs load the shared data, prompt exactly like lm-eval's
standard tasks, and the harness's per-item scores match log-likelihoods computed by hand."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from rankcut.errors import ConfigError, DataNotFoundError, RankcutError
from rankcut import hub
from rankcut.evaluation import zeroshot
from rankcut.evaluation.zeroshot import DEFAULT_TASKS, evaluate_zeroshot, load_local_docs, local_tasks, offline_hub

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "zeroshot").is_dir(), reason=f"shared zero-shot data not found at {DATA / 'zeroshot'}"
)

# Items per task: full sets, and for HellaSwag/WinoGrande the 100-item samples (or the full dev sets).
EXPECTED_DOCS = {
    "arc_easy": {2376},
    "arc_challenge": {1172},
    "piqa": {1838},
    "hellaswag": {100, 10042},
    "winogrande": {100, 1267},
    "openbookqa": {500},
    "boolq": {3270},
    "mathqa": {2985},
}
# The standard WinoGrande and BoolQ tasks report acc only.
WITHOUT_ACC_NORM = {"winogrande", "boolq"}
# Where the installed lm-eval keeps each standard task's config.
STANDARD_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "mathqa": "mathqa/mathqa.yaml",
}


def _lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'rankcut[eval]')")


def _standard_tasks_dir() -> Path:
    """Where the installed lm-eval keeps its standard task configs."""
    _lm_eval()
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


# ------------------------------------------------------------------ local data


@needs_data
@pytest.mark.parametrize("task", DEFAULT_TASKS)
def test_local_docs_have_expected_counts(task):
    assert len(load_local_docs(task, DATA)) in EXPECTED_DOCS[task]


@needs_data
def test_local_docs_are_consistent():
    for task in ("arc_easy", "arc_challenge", "openbookqa"):
        for doc in load_local_docs(task, DATA):
            assert doc["answerKey"].strip() in doc["choices"]["label"]
            assert len(doc["choices"]["text"]) == len(doc["choices"]["label"]) >= 3
    assert {len(doc["choices"]["text"]) for doc in load_local_docs("openbookqa", DATA)} == {4}
    boolq = [doc["label"] for doc in load_local_docs("boolq", DATA)]
    assert (boolq.count(1), boolq.count(0)) == (2033, 1237)
    assert {doc["label"] for doc in load_local_docs("piqa", DATA)} == {0, 1}


@needs_data
def test_winogrande_conversion_reproduces_the_partial_contexts():
    from rankcut.evaluation.tasks import utils

    records_path = DATA / "zeroshot" / "winogrande" / "winogrande_sample100.jsonl"
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    docs = load_local_docs("winogrande", DATA)
    if len(docs) != len(records):
        pytest.skip("the full WinoGrande dev set is present; this checks the sample")
    for doc, record in zip(docs, records):
        assert utils.winogrande_doc_to_choice(doc) == record["context_options"]
        assert utils.winogrande_doc_to_target(doc) == record["continuation"].strip()
        assert utils.winogrande_doc_to_text(doc) == record["gold"]


def test_hellaswag_context_split_restores_ctx_b():
    split = zeroshot._split_hellaswag_context
    assert split("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split("Men lift weights. A man watches. a man in a gray shirt") == (
        "Men lift weights. A man watches.", "a man in a gray shirt"
    )
    assert split("Preheat the oven. Take a bowl") == ("Preheat the oven. Take a bowl", "")
    assert split("then he") == ("", "then he")


@needs_data
def test_hellaswag_first_query_matches_the_harness():
    """lm-eval's query for Rowan/hellaswag validation item 0 (ctx_a "A man is sitting on a roof.", ctx_b "he")."""
    from datasets import Dataset

    from rankcut.evaluation.tasks import utils

    doc = utils.hellaswag_process_docs(Dataset.from_list(load_local_docs("hellaswag", DATA)[:1]))[0]
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["choices"][3] == "starts pulling up roofing on a roof."
    assert doc["gold"] == 3


def test_missing_data_folder_lists_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.delenv("RANKCUT_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="RANKCUT_DATA"):
        zeroshot.resolve_zeroshot_dir(None)
    with pytest.raises(DataNotFoundError, match=re.escape(str(tmp_path / "zeroshot"))):
        zeroshot.resolve_zeroshot_dir(tmp_path)
    with pytest.raises(ConfigError, match="no offline config"):
        load_local_docs("lambada", tmp_path)
    (tmp_path / "zeroshot" / "piqa").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="piqa: cannot read the local data"):
        load_local_docs("piqa", tmp_path)


@needs_data
def test_data_folder_from_environment(monkeypatch):
    monkeypatch.setenv("RANKCUT_DATA", str(DATA))
    assert zeroshot.resolve_zeroshot_dir() == DATA / "zeroshot"


# ------------------------------------------------------------------ source selection and errors


def test_source_selection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False
    assert zeroshot._choose_source("auto") == "local"
    assert zeroshot._choose_source("hub") == "hub"
    with pytest.raises(ConfigError, match="source must be one of"):
        zeroshot._choose_source("online")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert zeroshot._choose_source("auto") == "local"

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: Connection())
    assert zeroshot._choose_source("auto") == "hub"


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(RankcutError, match=re.escape("pip install 'rankcut[eval]'")):
        evaluate_zeroshot(None, None, ["piqa"], source="local", data_dir=DATA)


# ------------------------------------------------------------------ parity with the standard tasks


def _standard_module(relative: str):
    """A doc-processing module of the installed lm-eval's standard tasks, loaded by path as lm-eval does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("standard_utils", _standard_tasks_dir() / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_utils_mirror_the_standard_doc_processing():
    """On inputs that exercise every branch (WikiHow brackets, double spaces, "_" blanks, options)."""
    from datasets import Dataset

    from rankcut.evaluation.tasks import utils

    hellaswag = _standard_module("hellaswag/utils.py")
    texts = [" [header] How to  paint [title] Remove carpet. [step] Sand  it. ", "a [substeps]  b  [title]c", "plain"]
    assert [utils.hellaswag_preprocess(t) for t in texts] == [hellaswag.preprocess(t) for t in texts]
    docs = Dataset.from_list([
        {"activity_label": "Home and Garden", "ctx_a": "[header] How to paint [title] Sand it.", "ctx_b": "then You",
         "endings": [" [step] Paint  it.", "Wait [title] more."], "label": "1"},
        {"activity_label": "Roof", "ctx_a": "A man sits.", "ctx_b": "", "endings": ["a", "b"], "label": "0"},
    ])
    assert list(utils.hellaswag_process_docs(docs)) == list(hellaswag.process_docs(docs))

    winogrande = _standard_module("winogrande/preprocess_winogrande.py")
    for doc in ({"sentence": "Ann beat Bo so _ was glad.", "option1": "Ann", "option2": "Bo", "answer": "1"},
                {"sentence": "The (_ ) fit, it's big.", "option1": "cat", "option2": "the dog", "answer": "2"}):
        assert utils.winogrande_doc_to_text(doc) == winogrande.doc_to_text(doc)
        assert utils.winogrande_doc_to_target(doc) == winogrande.doc_to_target(doc)
        assert utils.winogrande_doc_to_choice(doc) == winogrande.doc_to_choice(doc)

    mathqa = _standard_module("mathqa/utils.py")
    for options in ("a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these",
                    "a ) 1 / 2 , b ) 3 : 4 , c ) rs . 5 , d ) 6 , e ) 7 , 8"):
        doc = {"options": options}
        assert utils.mathqa_doc_to_choice(doc) == mathqa.doc_to_choice(doc)


def _standard_task(name: str, data_file: Path, cache: Path):
    """lm-eval's own config for ``name``, reading ``data_file`` instead of the hub."""
    lm_eval = _lm_eval()
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        pytest.skip(f"this test reads standard task YAMLs with lm-eval>=0.4.10's loader (have {lm_eval.__version__})")
    from lm_eval.api.task import ConfigurableTask

    config = load_yaml(_standard_tasks_dir() / STANDARD_YAML[name])
    split = "test" if config.get("test_split") else "validation"
    config.pop("tag", None)
    config.update(
        task=f"standard_{name}",
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data_file)}, "cache_dir": str(cache)},
        training_split=None,
        validation_split=split if split == "validation" else None,
        test_split=split if split == "test" else None,
    )
    return ConfigurableTask(config=config)


@needs_data
def test_offline_tasks_match_the_standard_tasks(tmp_path):
    """Same documents through our configs and lm-eval's: identical requests, targets and metrics."""
    _lm_eval()
    with offline_hub(), local_tasks(DATA) as manager:
        ours = manager.load(list(DEFAULT_TASKS))["tasks"]
        for name in DEFAULT_TASKS:
            data_file = tmp_path / f"{name}.jsonl"
            data_file.write_text("".join(json.dumps(doc) + "\n" for doc in load_local_docs(name, DATA)))
            standard = _standard_task(name, data_file, tmp_path / "cache")
            task = ours[name]
            assert len(task.eval_docs) in EXPECTED_DOCS[name]
            assert len(task.eval_docs) == len(standard.eval_docs)
            for each in (task, standard):
                each.build_all_requests(limit=200, rank=0, world_size=1)
            assert [i.args for i in task.instances] == [i.args for i in standard.instances], name
            docs = list(task.eval_docs)[:200]
            assert [task.doc_to_target(d) for d in docs] == [standard.doc_to_target(d) for d in docs], name
            assert sorted(task._metric_fn_list) == sorted(standard._metric_fn_list), name


# ------------------------------------------------------------------ scoring by hand on a tiny model


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 2-layer LLaMA and a word-level tokenizer trained on the first items of every task."""
    if not (DATA / "zeroshot").is_dir():
        pytest.skip(f"shared zero-shot data not found at {DATA / 'zeroshot'}")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.dumps(doc, ensure_ascii=False) for task in DEFAULT_TASKS for doc in load_local_docs(task, DATA)[:8]]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def _hand_requests(task: str, doc: dict, raw: dict | None) -> tuple[list[tuple[str, str]], int]:
    """(context, continuation) pairs and gold index, written out from the standard prompt formats."""
    if task in ("arc_easy", "arc_challenge"):
        context = f"Question: {doc['question']}\nAnswer:"
        return [(context, " " + t) for t in doc["choices"]["text"]], doc["choices"]["label"].index(doc["answerKey"])
    if task == "piqa":
        context = f"Question: {doc['goal']}\nAnswer:"
        return [(context, " " + doc["sol1"]), (context, " " + doc["sol2"])], doc["label"]
    if task == "hellaswag":
        context = f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}".strip()
        return [(context, " " + ending) for ending in doc["endings"]], int(doc["label"])
    if task == "winogrande":  # partial evaluation: one context per option, the same continuation
        return [(context, " " + raw["continuation"]) for context in raw["context_options"]], raw["gold"]
    if task == "openbookqa":
        return [(doc["question_stem"], " " + t) for t in doc["choices"]["text"]], "ABCD".index(doc["answerKey"])
    if task == "boolq":
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return [(context, " no"), (context, " yes")], doc["label"]
    if task == "mathqa":
        options = [o.strip().rstrip(",").strip() for o in re.split(r"(?:^|, )[a-e] \) ", doc["options"])[1:]]
        return [(f"Question: {doc['Problem']}\nAnswer:", " " + o) for o in options], "abcde".index(doc["correct"])
    raise AssertionError(task)


def _hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids, continuation_ids = tokenizer.encode(context), tokenizer.encode(continuation)
    # With this tokenizer, encoding the pair whole splits exactly at the boundary, as the harness assumes.
    assert tokenizer.encode(context + continuation) == context_ids + continuation_ids
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].double().log_softmax(-1)
    start = len(context_ids)
    return sum(logprobs[start - 1 + i, token].item() for i, token in enumerate(continuation_ids))


@needs_data
def test_harness_scores_match_hand_computation(tiny_lm):
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_lm
    limit = 3
    with offline_hub(), local_tasks(DATA) as manager:
        results = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
            tasks=list(DEFAULT_TASKS), task_manager=manager, limit=limit, log_samples=True,
        )
    raw_winogrande = [
        json.loads(line)
        for line in (DATA / "zeroshot" / "winogrande" / "winogrande_sample100.jsonl").read_text().splitlines()[:limit]
    ]
    for task in DEFAULT_TASKS:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        docs = load_local_docs(task, DATA)[:limit]
        raws = raw_winogrande if task == "winogrande" else [None] * limit
        assert len(samples) == limit
        for sample, doc, raw in zip(samples, docs, raws):
            requests, gold = _hand_requests(task, doc, raw)
            assert [tuple(a) for a in sample["arguments"]] == requests, task
            hand = [_hand_loglikelihood(model, tokenizer, *request) for request in requests]
            harness = [resp[0][0] for resp in sample["resps"]]
            assert harness == pytest.approx(hand, rel=1e-5, abs=1e-3), task
            best = max(range(len(hand)), key=hand.__getitem__)
            assert sample["acc"] == float(best == gold), task
            if task in WITHOUT_ACC_NORM:
                assert "acc_norm" not in sample
            else:  # log-likelihood per character of the choice text (without the " " delimiter)
                best_norm = max(range(len(hand)), key=lambda i: hand[i] / len(requests[i][1][1:]))
                assert sample["acc_norm"] == float(best_norm == gold), task
        assert results["results"][task]["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / limit)
    assert all("acc_norm,none" not in results["results"][task] for task in WITHOUT_ACC_NORM)


@needs_data
def test_evaluate_zeroshot_summary(tiny_lm):
    _lm_eval()
    model, tokenizer = tiny_lm
    result = evaluate_zeroshot(model, tokenizer, ["arc_easy", "winogrande"], limit=4, source="local", data_dir=DATA)
    assert result["source"] == "local" and result["limit"] == 4 and result["averaged_metric"] == "acc"
    arc, wino = result["tasks"]["arc_easy"], result["tasks"]["winogrande"]
    assert arc["n"] == wino["n"] == 4
    assert set(arc) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert set(wino) == {"acc", "acc_stderr", "n"}
    assert all(0.0 <= value <= 1.0 for value in (arc["acc"], arc["acc_norm"], wino["acc"]))
    assert result["average_acc"] == pytest.approx((arc["acc"] + wino["acc"]) / 2)
    assert result["average_acc_stderr"] == pytest.approx((arc["acc_stderr"] ** 2 + wino["acc_stderr"] ** 2) ** 0.5 / 2)


# ------------------------------------------------------------------ real model


@needs_data
@pytest.mark.real_model
def test_smollm2_is_above_chance_on_arc_easy_and_piqa(smollm2):
    """Dense SmolLM2-135M on the first 50 items (measured: ARC-Easy 0.46, PIQA 0.68 with lm-eval 0.4.13);
    chance is about 0.25 and 0.5."""
    _lm_eval()
    model, tokenizer = smollm2
    result = evaluate_zeroshot(model, tokenizer, ["arc_easy", "piqa"], limit=50, source="local", data_dir=DATA)
    assert result["tasks"]["arc_easy"]["acc"] > 0.35
    assert result["tasks"]["piqa"]["acc"] > 0.55


def test_task_average_and_its_standard_error():
    from rankcut.evaluation.zeroshot import task_average

    per_task = {"a": {"acc": 0.5, "acc_stderr": 0.03, "n": 100}, "b": {"acc": 0.7, "acc_stderr": 0.04, "n": 100},
                "c": {"acc_norm": 0.1, "n": 5}}  # no acc: left out of the average
    mean, stderr = task_average(per_task)
    assert mean == pytest.approx(0.6) and stderr == pytest.approx(0.025)  # √(0.03² + 0.04²) / 2
    del per_task["b"]["acc_stderr"]
    assert task_average(per_task) == (pytest.approx(0.6), None)
    assert task_average({}) == (None, None)
