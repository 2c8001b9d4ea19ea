"""End-to-end checks on the bundled SmolLM2-135M (LLaMA architecture, GGUF dequantized to float32)."""

import pytest
import torch

import rankcut
from conftest import plain_window_nll
from rankcut.data import load_text, split_windows, tokenize_text

pytestmark = pytest.mark.real_model


def test_loads_and_generates_sane_text(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert len(rankcut.find_targets(model)) == 210
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, prompt.input_ids.shape[1]:])


def test_perplexity_matches_a_plain_loop(smollm2, data_dir):
    model, tokenizer = smollm2
    corpus = load_text("wikitext2", "test", data_dir=data_dir)
    result = rankcut.evaluate_perplexity(model, tokenizer, corpus, seqlen=512, max_windows=4, show_progress=False)
    windows = split_windows(tokenize_text(tokenizer, corpus.joined()), 512, None)[:4]
    reference = plain_window_nll(model, windows)
    assert abs(result.mean_nll - reference) / reference <= 1e-4
    assert 10 < result.perplexity < 60  # full split: 30.21


def test_compress_save_reload(smollm2, data_dir, tmp_path):
    _, tokenizer = smollm2
    model, _ = rankcut.load_model("smollm2-135m", device="cpu")  # a fresh copy: compress works in place
    corpus = load_text("wikitext2", "test", data_dir=data_dir)
    dense = rankcut.evaluate_perplexity(model, tokenizer, corpus, seqlen=512, max_windows=6, show_progress=False)
    config = rankcut.CompressionConfig(keep_ratio=0.8, allocator="uniform", closed_loop="none",  # the open-loop fit
                                       calibration=rankcut.CalibrationConfig(dataset="wikitext2", split="validation",
                                                                             nsamples=32, seqlen=256))
    model, report = rankcut.compress(model, config, tokenizer=tokenizer, show_progress=False)
    assert report.measured["target_params"] <= report.measured["budget"]
    assert report.measured["budget_slack"] < 1e-3
    compressed = rankcut.evaluate_perplexity(model, tokenizer, corpus, seqlen=512, max_windows=6, show_progress=False)
    # whitened SVD at keep 0.8 on this model: about 3x dense; plain SVD would be ~1e7
    assert dense.perplexity < compressed.perplexity < 6 * dense.perplexity
    out = rankcut.save(model, tokenizer, tmp_path / "smol", report, base_model="smollm2-135m")
    reloaded, _ = rankcut.load(out, device="cpu")
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog").input_ids])
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_streamed_compression_equals_in_memory(smollm2, data_dir, tmp_path):
    """The bundled model through compress_checkpoint (its converted safetensors cache, one block at a
    time) and through compress in memory: the same plan and bit-identical artifact tensors."""
    from safetensors.torch import load_file

    from rankcut.compress import compress_checkpoint
    from rankcut.models import checkpoint_folder

    _, tokenizer = smollm2
    model, _ = rankcut.load_model("smollm2-135m", device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    config = rankcut.CompressionConfig(keep_ratio=0.8, allocator="energy", closed_loop="none")
    model, report = rankcut.compress(model, config, calibration=ids, show_progress=False)
    rankcut.save(model, tokenizer, tmp_path / "in-memory", report)
    streamed = compress_checkpoint(checkpoint_folder("smollm2-135m"), config, tmp_path / "streamed", calibration=ids,
                                   show_progress=False, work_dir=tmp_path / "work")
    assert streamed.plan.ranks == report.plan.ranks

    def tensors(folder):
        return {k: v for shard in sorted(folder.glob("model-*.safetensors")) for k, v in load_file(shard).items()}

    expected, got = tensors(tmp_path / "in-memory"), tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
