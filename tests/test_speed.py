"""Speed/memory probe: real cached greedy decoding, deterministic inputs, sane numbers, ratios."""

from __future__ import annotations

import math
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rankcut.errors import ConfigError
from rankcut.evaluation import speed
from rankcut import memory
from rankcut.evaluation.speed import compare_speed, measure_speed, weight_bytes
from rankcut.memory import peak_rss


def _tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def test_measure_speed_returns_positive_finite_numbers():
    model = _tiny_llama().train()  # the probe must run in eval mode and give the mode back
    result = measure_speed(model, prompt_tokens=48, decode_tokens=6, repeats=2)
    assert model.training
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert len(result["prefill_seconds"]) == len(result["decode_seconds"]) == 2
    assert all(s > 0 for s in result["prefill_seconds"] + result["decode_seconds"])
    assert result["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert result["peak_rss_method"] != "unavailable"
    assert result["peak_rss_bytes"] > result["weight_bytes"]
    assert result["peak_rss_increase_bytes"] >= 0
    assert result["prefill_logits"] == "last position"
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    assert result["cpu"] == speed.processor_name() and result["threads"] == torch.get_num_threads()


def test_decode_loop_is_greedy_generation_with_the_cache():
    model = _tiny_llama()
    ids = speed._random_ids(model, None, 20, seed=0)
    _, _, tokens = speed._prefill_and_decode(model, ids, 7, last_logits_only=True)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, reference[:, ids.shape[1] :])


def test_random_prompt_is_seeded_and_avoids_special_tokens():
    model = _tiny_llama()
    tokenizer = SimpleNamespace(all_special_ids=[0, 1, 2, 299])
    ids = speed._random_ids(model, tokenizer, 512, seed=0)
    assert torch.equal(ids, speed._random_ids(model, tokenizer, 512, seed=0))
    assert ids.shape == (1, 512)
    assert not set(ids.flatten().tolist()) & {0, 1, 2, 299}
    assert int(ids.max()) < 300


def test_weight_bytes_counts_tied_embeddings_once():
    untied, tied = _tiny_llama(tie=False), _tiny_llama(tie=True)
    embedding = 300 * 64 * 4
    assert weight_bytes(untied) - weight_bytes(tied) == embedding
    half = tied.half()
    assert weight_bytes(half) == sum(p.numel() * 2 for p in half.parameters()) + sum(
        b.numel() * b.element_size() for b in half.buffers()
    )


@pytest.mark.parametrize("kernel_peak", [True, False], ids=["kernel-hwm", "sampled"])
def test_peak_rss_sees_a_transient_allocation(monkeypatch, kernel_peak):
    if kernel_peak and not memory._kernel_peak_works():
        pytest.skip("this kernel does not track VmHWM after a reset; the sampled path is used here")
    monkeypatch.setattr(memory, "_kernel_peak_works", lambda: kernel_peak)
    before = memory.current_rss()
    with peak_rss() as peak:
        memory.touch_fresh_pages(200_000_000)  # new pages: a freed tensor's could be reused
    assert peak["method"] != "unavailable"
    assert peak["peak_bytes"] >= before + 150_000_000
    assert memory.current_rss() < peak["peak_bytes"]
    assert abs(peak["start_bytes"] - before) < 20_000_000  # nothing ran between the two readings
    assert peak["peak_bytes"] - peak["start_bytes"] >= 150_000_000


def test_measure_speed_rejects_bad_settings():
    model = _tiny_llama()
    with pytest.raises(ConfigError):
        measure_speed(model, prompt_tokens=0)
    with pytest.raises(ConfigError, match="move it first"):
        measure_speed(model, device="cuda")


def test_compare_speed_ratios():
    dense = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "weight_bytes": 1000,
             "peak_rss_bytes": 4000, "peak_rss_increase_bytes": 0}
    compressed = {"prefill_tokens_per_s": 150.0, "decode_tokens_per_s": 12.0, "weight_bytes": 600,
                  "peak_rss_bytes": 3000, "peak_rss_increase_bytes": 10}
    assert compare_speed(dense, compressed) == {
        "prefill_speedup": 1.5,
        "decode_speedup": pytest.approx(1.2),
        "weight_bytes_ratio": 0.6,
        "peak_rss_ratio": 0.75,
        "peak_rss_increase_ratio": None,  # dense value 0: no ratio
    }
    compressed["peak_rss_bytes"] = None  # not measurable on that platform
    assert compare_speed(dense, compressed)["peak_rss_ratio"] is None


def test_paired_ratios_report_the_median_its_range_and_whether_it_is_measurable():
    from rankcut.evaluation.speed import paired_ratios

    dense = [{"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0}] * 3
    compressed = [{"prefill_tokens_per_s": p, "decode_tokens_per_s": d} for p, d in ((120, 9.5), (130, 10.4), (125, 11))]
    ratios = paired_ratios(dense, compressed)
    assert ratios["rounds"] == 3
    assert ratios["prefill_speedup"] == pytest.approx(1.25) and ratios["prefill_speedup_range"] == pytest.approx([1.2, 1.3])
    assert ratios["prefill_speedup_measurable"]  # every round faster
    assert ratios["decode_speedup"] == pytest.approx(1.04) and not ratios["decode_speedup_measurable"]  # 0.95-1.1
    with pytest.raises(ConfigError):
        paired_ratios(dense, compressed[:2])


def test_processor_name_reads_the_first_core_and_falls_back_without_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    core = "processor\t: {}\ncpu family\t: 6\nmodel\t\t: 167\nmodel name\t: Example CPU @ 2.60GHz\ncpu MHz\t\t: {}\ncache size\t: 16384 KB\n"
    cpuinfo.write_text(core.format(0, "2600.000") + "\n" + core.format(1, "1200.000"))
    assert speed.processor_name(cpuinfo) == "Example CPU @ 2.60GHz (family 6 model 167, 2600.000 MHz, 16384 KB cache)"
    assert speed.processor_name(tmp_path / "absent")  # e.g. macOS: the platform's own name


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_of_others_subtracts_this_process_and_its_waited_children(tmp_path):
    """The machine's busy time comes from a fake /proc/stat that grows by 3 s during the block; the
    block itself burns CPU in this process and in a child it waits for: only the rest is others'."""
    import resource
    import subprocess

    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")

    def write_stat(busy_seconds: float) -> None:  # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {int(busy_seconds * tick)} 0 0 5000 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    def own() -> float:
        usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(u.ru_utime + u.ru_stime for u in usages)

    write_stat(100.0)
    before, start = own(), time.perf_counter()
    with speed.cpu_of_others(stat) as others:
        _busy(0.3)
        subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                        "while time.process_time() < end: pass"], check=True)
        write_stat(104.0)
        spent = own() - before
    assert spent > 0.7  # the block's own CPU, child included
    assert others["seconds"] == pytest.approx(4.0 - spent, abs=0.05)
    assert others["cores"] == pytest.approx(others["seconds"] / (time.perf_counter() - start), rel=0.05)
    with speed.cpu_of_others(tmp_path / "absent") as nothing:  # e.g. macOS
        pass
    assert nothing == {}
