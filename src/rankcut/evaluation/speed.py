"""Inference speed and memory of a causal LM: what low-rank compression buys at run time.

:func:`measure_speed` times one ``prompt_tokens`` forward (prefill) and ``decode_tokens`` greedy
steps at batch 1 with the KV cache (decode), on seeded random token ids so that a dense and a
compressed model see identical inputs. :func:`compare_speed` turns two such results into ratios.

Peak memory is the peak resident set size (RSS) of the whole process during the timed runs
(:func:`rankcut.memory.peak_rss`). It includes the weights, the Python runtime and anything else
alive in the process (e.g. another model), so compare models measured in the same conditions, or
use ``peak_rss_increase_bytes`` (the peak above the RSS just before the runs: activations, KV
cache, temporaries).

On a busy or small machine one measurement of each model says little: :func:`paired_ratios` takes
interleaved rounds (dense, compressed, compressed, dense, …, each in a fresh process) and reports the
median ratio with its range over the rounds; a range that includes 1 is no measurable difference.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ConfigError
from ..memory import peak_rss


@functools.cache
def processor_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU as ``cpuinfo`` names its first core (where there is one): throughputs compare only
    between runs on the same processor, so every speed result names it."""
    try:
        first_core = cpuinfo.read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in first_core.splitlines() if ":" in line)}
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, "
            f"{fields.get('cpu MHz', '?')} MHz, {fields.get('cache size', '?')} cache)")


def _machine_busy_seconds(stat: Path) -> float | None:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``; None where there is none)."""
    try:
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


SHARED_CPU_CORES = 0.2  # other processes' mean use (cores) from which a timing counts as taken with company


@contextlib.contextmanager
def cpu_of_others(stat: Path = Path("/proc/stat")) -> Iterator[dict[str, float]]:
    """Measure the CPU the rest of the machine used while the block ran: on exit the yielded dict gets
    ``seconds`` (machine busy time less this process's and its waited-for children's) and ``cores``
    (those seconds over the wall time). A load average read before a timing only hints that it ran
    alone; this says whether it did. Children still running at exit count as others. Empty where the
    machine has no ``/proc/stat``."""
    measured: dict[str, float] = {}
    busy, own, start = _machine_busy_seconds(stat), _own_cpu_seconds(), time.perf_counter()
    try:
        yield measured
    finally:
        after, wall = _machine_busy_seconds(stat), time.perf_counter() - start
        if busy is not None and after is not None:
            others = max(0.0, (after - busy) - (_own_cpu_seconds() - own))
            measured.update(seconds=others, cores=others / wall if wall > 0 else 0.0)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all distinct parameters and buffers (tied weights counted once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _random_ids(model: torch.nn.Module, tokenizer: Any, length: int, seed: int) -> torch.Tensor:
    """``length`` seeded random token ids, avoiding the tokenizer's special tokens when it is given."""
    vocab = model.get_input_embeddings().num_embeddings
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (1, length), generator=generator)
    return allowed[picks]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _prefill_and_decode(
    model: torch.nn.Module, ids: torch.Tensor, decode_tokens: int, last_logits_only: bool
) -> tuple[float, float, torch.Tensor]:
    """Seconds for the prefill forward and for ``decode_tokens`` greedy cached steps after it, and the
    ``decode_tokens + 1`` greedy tokens produced (the first by the prefill)."""
    device = ids.device
    extra = {"logits_to_keep": 1} if last_logits_only else {}
    _synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **extra)
    _synchronize(device)
    prefill = time.perf_counter() - start
    # transformers renamed past_key_values to cache during 5.x (the old name goes in 5.40): use the model's
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, tokens = getattr(out, cache), [out.logits[:, -1:].argmax(-1)]
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=tokens[-1], use_cache=True, **{cache: past})
        past = getattr(out, cache)
        tokens.append(out.logits[:, -1:].argmax(-1))
    _synchronize(device)
    return prefill, time.perf_counter() - start, torch.cat(tokens, dim=1)


def measure_speed(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    prompt_tokens: int = 512,
    decode_tokens: int = 32,
    repeats: int = 3,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Prefill and decode throughput, peak RSS and weight bytes of ``model`` (batch 1, greedy).

    Each repeat runs one prefill of ``prompt_tokens`` then ``decode_tokens`` cached decode steps;
    throughputs are medians over ``repeats`` after one untimed warm-up. The prefill computes only the
    last position's logits when the model accepts ``logits_to_keep`` (as ``generate`` does), so the
    vocabulary projection of the whole prompt does not dilute differences between models. ``device``
    defaults to the model's and must match it. ``tokenizer`` only keeps special tokens out of the
    random prompt.
    """
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise ConfigError("prompt_tokens, decode_tokens and repeats must all be >= 1")
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    if device != model_device:
        raise ConfigError(f"model is on {model_device}, not {device}: move it first")
    was_training = model.training
    model.eval()
    last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters
    ids = _random_ids(model, tokenizer, prompt_tokens, seed=0).to(device)
    try:
        _prefill_and_decode(model, ids[:, : min(prompt_tokens, 16)], 2, last_logits_only)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with peak_rss() as peak:
            runs = [_prefill_and_decode(model, ids, decode_tokens, last_logits_only) for _ in range(repeats)]
    finally:
        model.train(was_training)
    prefill_s = [run[0] for run in runs]
    decode_s = [run[1] for run in runs]
    result: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prefill_tokens_per_s": prompt_tokens / statistics.median(prefill_s),
        "decode_tokens_per_s": decode_tokens / statistics.median(decode_s),
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "weight_bytes": weight_bytes(model),
        "peak_rss_bytes": peak["peak_bytes"],
        "peak_rss_increase_bytes": (
            peak["peak_bytes"] - peak["start_bytes"] if peak["peak_bytes"] is not None else None
        ),
        "peak_rss_method": peak["method"],
        "prefill_logits": "last position" if last_logits_only else "all positions",
        "cpu": processor_name(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


_RATIOS = {
    "prefill_speedup": "prefill_tokens_per_s",
    "decode_speedup": "decode_tokens_per_s",
    "weight_bytes_ratio": "weight_bytes",
    "peak_rss_ratio": "peak_rss_bytes",
    "peak_rss_increase_ratio": "peak_rss_increase_bytes",
    "peak_cuda_allocated_ratio": "peak_cuda_allocated_bytes",
}


def compare_speed(dense_result: dict[str, Any], compressed_result: dict[str, Any]) -> dict[str, float | None]:
    """Compressed / dense for each measure: speedups above 1 and memory ratios below 1 are gains.

    A ratio is None when either side lacks the measure or the dense value is zero; measures neither
    result has (CUDA memory on CPU runs) are left out.
    """
    ratios: dict[str, float | None] = {}
    for name, key in _RATIOS.items():
        if key not in dense_result and key not in compressed_result:
            continue
        dense, compressed = dense_result.get(key), compressed_result.get(key)
        ratios[name] = compressed / dense if dense and compressed is not None else None
    return ratios


_THROUGHPUTS = {"prefill_speedup": "prefill_tokens_per_s", "decode_speedup": "decode_tokens_per_s"}


def paired_ratios(dense_runs: list[dict[str, Any]], compressed_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Compressed / dense throughput per round (``dense_runs[i]`` measured beside ``compressed_runs[i]``):
    for prefill and decode the median ratio, its ``[min, max]`` range over the rounds, and whether the
    difference is measurable (the range excludes 1)."""
    if not dense_runs or len(dense_runs) != len(compressed_runs):
        raise ConfigError(f"need the same number (>= 1) of dense and compressed runs, got {len(dense_runs)} "
                          f"and {len(compressed_runs)}")
    result: dict[str, Any] = {"rounds": len(dense_runs)}
    for name, key in _THROUGHPUTS.items():
        ratios = [compressed[key] / dense[key] for dense, compressed in zip(dense_runs, compressed_runs)]
        low, high = min(ratios), max(ratios)
        result.update({name: statistics.median(ratios), f"{name}_range": [low, high],
                       f"{name}_measurable": not low <= 1.0 <= high})
    return result
