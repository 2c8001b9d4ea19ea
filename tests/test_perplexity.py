import math

import pytest
import torch

from conftest import ARCHS, plain_window_nll, tiny_model
from rankcut.data import TextCorpus, load_text, split_windows, tokenize_text
from rankcut.errors import ConfigError
from rankcut.evaluation.perplexity import evaluate_perplexity


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_a_plain_per_window_loop(arch, word_tokenizer, data_dir):
    model = tiny_model(arch)
    corpus = load_text("wikitext2", "test", data_dir=data_dir)
    result = evaluate_perplexity(model, word_tokenizer, corpus, seqlen=64, batch_size=3, max_windows=7, show_progress=False)
    windows = split_windows(tokenize_text(word_tokenizer, corpus.joined()), 64, None)[:7]
    reference = plain_window_nll(model, windows)
    assert result.windows == 7 and result.tokens == 7 * 64 and result.nonfinite_windows == 0
    assert abs(result.mean_nll - reference) / reference <= 1e-4
    assert math.isclose(result.perplexity, math.exp(reference), rel_tol=1e-4)


def test_bos_on_every_window(word_tokenizer):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import processors

    backend = word_tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    corpus = TextCorpus("t", "test", ["the of and in to"] * 60, False, "memory")
    result = evaluate_perplexity(tiny_model(), with_bos, corpus, seqlen=16, show_progress=False)
    assert result.bos_per_window and result.tokens == result.windows * 15
    backend.post_processor = None


def test_nonfinite_windows_are_reported_not_dropped(word_tokenizer):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    corpus = TextCorpus("t", "test", ["the of and in to a"] * 40, False, "memory")
    result = evaluate_perplexity(model, word_tokenizer, corpus, seqlen=16, show_progress=False)
    assert result.nonfinite_windows == result.windows > 0
    assert math.isnan(result.perplexity)


def test_bad_requests(word_tokenizer):
    corpus = TextCorpus("t", "test", ["a b"], False, "memory")
    with pytest.raises(ConfigError, match="shorter than one window"):
        evaluate_perplexity(tiny_model(), word_tokenizer, corpus, seqlen=64, show_progress=False)
    with pytest.raises(ConfigError, match="beyond the model's context length 256"):
        evaluate_perplexity(tiny_model(), word_tokenizer, corpus, seqlen=1024, show_progress=False)
