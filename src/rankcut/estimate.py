"""Predict a compression run's peak memory and disk from the model's config alone, before any work.

The model is built on the meta device (no weight is read), so every shape is the real one. The terms
follow the streamed pipeline (``compress_checkpoint``) stage by stage; the peak is the runtime plus the
largest stage:

- **calibrate**: one decoder block's weights, the calibration activations entering and leaving it
  (``2 x nsamples x seqlen x hidden``, compute dtype), one batch's intermediate tensors inside the
  block, the block's input Grams (float64 totals, float32 batch sums), and the float64 workspace of the
  largest whitened SVD;
- **allocate**: nothing for the spectral allocators (singular values only); an allocator that runs the
  model does so one block at a time (:mod:`rankcut.sweep`): one block with its weight gradients
  (zerosum), its probes (strs) or its gated factors and one batch's autograd tensors (ara, fermigrad,
  dobi), or the head and one chunk of logits, whichever is larger;
- **factorize and write**: one block's weights and float64 factors, or the embeddings and head when the
  last shard is written; a refitting closed loop adds the calibration stream again (``compensate``: two
  of them, dense and compressed, and one input group's cross-Gram; with an anchor its dense Gram too),
  and refinement both streams with the block's factors, their Adam moments and one batch's autograd;
- **correct** (``closed_loop="correct"``), each round: a gradient sweep of the truncated model over the
  correction windows (as zerosum's), then the calibration stream again, with one block's pulled weights
  beside the decompositions. On disk: the planned modules' gradients (float32) and each round's spectra.

On CUDA the blocks, activations and allocator work are on the device; Grams and decompositions stay on
the host. Disk: the spectra (``U`` and ``Bfull`` in float32), two blocks' activations, what an
allocator leaves on disk (every block's saved inputs; strs: every probe's activations), and the
artifact. Across ``world_size`` processes each holds its share of the calibration batches, and the
owner of an input group receives one float32 batch sum from every process at a time.
The per-token activation factors were measured on the synthetic LLaMA checkpoints of
``benchmarks/scale.py``; ``benchmarks/RESULTS-scale.md`` compares predictions with measured peaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .allocation import create_allocator
from .errors import ConfigError
from .sweep import LOGITS_BYTES

GiB = 2**30
# Python, torch, transformers, tokenizers, rankcut, the skeleton and the heap a run leaves behind: 0.32 GiB
# after import; 0.54 GiB between the stages of a streamed run and 0.7-0.75 GiB under the modelled terms
# during calibration (the depth benchmark's 4-block model, VmHWM reset around each stage)
RUNTIME_BYTES = int(0.65 * GiB)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """``"12GiB"``, ``"500MB"``, ``"1.5 TB"``, ``"4096"`` (bytes) -> bytes. Decimal units are powers of
    1000, ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"memory size {text!r} is not a positive amount such as 12GiB, 500MB or 64G")
    return int(float(match.group(1)) * _UNITS[unit])


def available_memory() -> int:
    """Memory the kernel can give a new process now (``MemAvailable``), else psutil's figure."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass
class MemoryEstimate:
    host_bytes: int
    device_bytes: int  # 0 on CPU
    disk_bytes: int
    stages: dict[str, int] = field(default_factory=dict)  # each stage's memory beside the runtime
    terms: dict[str, int] = field(default_factory=dict)  # what the largest stage is made of

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    def rows(self) -> list[tuple[str, str]]:
        rows = [("peak host memory", f"{self.host_bytes / GiB:.2f} GiB")]
        if self.device_bytes:
            rows.append(("peak device memory", f"{self.device_bytes / GiB:.2f} GiB"))
        rows.append(("disk (work folder + artifact)", f"{self.disk_bytes / GiB:.2f} GiB"))
        rows += [(f"stage: {stage}", f"{size / GiB:.2f} GiB") for stage, size in self.stages.items()]
        rows += [(f"  {term}", f"{size / GiB:.2f} GiB") for term, size in self.terms.items()]
        return rows


def estimate_compression(model_config, config, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", world_size: int = 1) -> MemoryEstimate:
    """Predicted peak host and device memory and disk of ``compress_checkpoint`` for ``config`` (a
    :class:`CompressionConfig`) on a model of ``model_config`` (a transformers config), per process
    when ``world_size`` processes share the run (each holds its share of the calibration batches)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .checkpoint import outer_modules, stored_names
    from .targets import find_decoder_blocks, find_targets

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    model.tie_weights()
    prefix, blocks = find_decoder_blocks(model)
    targets = find_targets(model, config.exclude)
    size = torch.finfo(dtype).bits // 8
    shapes = {name: tuple(shape) for name, shape in stored_names(model).items()}
    numel = {name: _product(shape) for name, shape in shapes.items()}
    total = sum(numel.values())
    block = max(sum(n for name, n in numel.items() if name.startswith(f"{prefix}.{i}.")) for i in range(len(blocks)))
    outer = sum(numel[name] for module in outer_modules(model, prefix) for name in numel
                if name == module or name.startswith(f"{module}."))
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, vocab = text.hidden_size, text.vocab_size
    intermediate = getattr(text, "intermediate_size", 4 * hidden)
    heads = getattr(text, "num_attention_heads", 1)
    calibration = config.calibration
    batches = -(-calibration.nsamples // calibration.batch_size)
    tokens = min(calibration.nsamples, -(-batches // world_size) * calibration.batch_size) * calibration.seqlen
    batch_tokens = min(calibration.batch_size, calibration.nsamples) * calibration.seqlen

    # Grams of one block: a float64 total per shared input, and the float32 batch sums of one input
    # (one per process, gathered at its owner). Which modules
    # share an input shows only in a forward pass; modules of one parent (attention, MLP) with the same
    # input width stand for one input (q/k/v, gate/up; o_proj joins q/k/v, one Gram too few).
    first = [t for t in targets if t.block == targets[0].block]
    inputs = {(t.name.rsplit(".", 2)[0], t.in_features) for t in first}
    grams = sum(8 * width ** 2 for _, width in inputs) + 4 * world_size * max(width for _, width in inputs) ** 2
    # float64: the weight and its whitened copy, U, Vᵀ and Bfull, the damped Gram and its Cholesky
    # factor; the largest over the targets
    svd = max(8 * (2 * t.out_features * t.in_features + t.out_features * min(t.shape)
                   + 2 * min(t.shape) * t.in_features + 2 * t.in_features ** 2) for t in targets)
    block_spectra = 4 * sum(t.out_features * min(t.shape) + min(t.shape) * t.in_features
                            for t in targets if t.block == 0)
    spectra_disk = 4 * sum(t.out_features * min(t.shape) + min(t.shape) * t.in_features for t in targets)
    activations = 2 * tokens * hidden * size
    workspace = batch_tokens * (3 * intermediate + 6 * hidden) * size + batch_tokens * heads * calibration.seqlen * 4

    on_device = torch.device(device).type != "cpu"
    # The block's forward (workspace) is over before its decompositions start; the spectra are copied
    # once more when the block's checkpoint is serialized. Grams, decompositions and factors are on the
    # host; blocks, activations and the allocators' work on the device when there is one.
    decomposition = max(svd + block_spectra, 2 * block_spectra)
    run_side = {"calibrate": {"block weights": block * size, "calibration activations": activations,
                              "block forward workspace": workspace},
                "allocate": _allocator_terms(config, targets, total, block, outer, size, hidden, intermediate, vocab,
                                             heads, len(blocks)),
                "factorize": {"block weights": block * size, "embeddings and head": outer * size}}
    host_side = {"calibrate": {"Grams": grams, "decompositions": decomposition},
                 "allocate": {},
                 "factorize": {"block factors (float64)": 2 * block * 8}}
    correction_disk = 0
    if config.closed_loop == "correct":
        batch = min(calibration.batch_size, calibration.nsamples)
        windows = min(config.correction_windows, calibration.nsamples)
        autograd_block = _autograd_block(batch, calibration.seqlen, hidden, intermediate, heads, size)
        sweep, sweep_disk = _gradient_sweep_terms(windows * calibration.seqlen, batch * (calibration.seqlen - 1),
                                                  targets, block, outer, size, hidden, vocab, len(blocks), autograd_block,
                                                  scores=False)
        run_side["correct: gradients"], host_side["correct: gradients"] = sweep, {}
        run_side["correct: decompose"] = {**run_side["calibrate"], "pulled weights of one block": block * size}
        # W, T, g, W − T and W' of the largest module in float64, before its decomposition
        pulled = max(5 * 8 * t.out_features * t.in_features for t in targets)
        host_side["correct: decompose"] = {**host_side["calibrate"],
                                           "decompositions": max(decomposition, pulled)}
        # the planned modules' gradients (at most every module's), each round's spectra (at most the full ones:
        # they are cut at the planned ranks)
        correction_disk = 4 * sum(t.out_features * t.in_features for t in targets) + sweep_disk \
            + config.correction_rounds * spectra_disk
    # the calibration data streams again, block by block: the dense and the compressed path where the pass
    # pairs them (the compensating fit, refinement)
    paired = config.closed_loop == "compensate" or config.refine_steps > 0
    streams = 2 if paired else int(config.closed_loop == "sequential")
    if streams:
        run_side["factorize"].update({"calibration activations": streams * activations,
                                      "block forward workspace": workspace})
    if config.closed_loop in ("sequential", "compensate"):  # every module is decomposed again
        widest = max(t.in_features for t in targets)
        # compensate: one group's cross-Gram X X̃ᵀ (float64 total, float32 batch products: one per rank at
        # the owner) beside the Grams, and with an anchor the dense inputs' Gram X Xᵀ as well
        cross_grams = (1 + (config.anchor > 0)) * (8 + 4 * world_size) * widest ** 2 \
            if config.closed_loop == "compensate" else 0
        host_side["factorize"].update({"Grams": grams + cross_grams,
                                       "decompositions": decomposition})
    if config.refine_steps:  # the block's factors with Adam's two moments, one batch's autograd tensors
        run_side["factorize"]["refinement"] = 3 * block * size + _autograd_block(
            min(calibration.batch_size, calibration.nsamples), calibration.seqlen, hidden, intermediate, heads, size)
    if on_device:
        host = {stage: host_side[stage] for stage in run_side}
        device_terms = run_side
    else:  # one memory: the forward's workspace is gone before the decompositions start
        host = {stage: {**run_side[stage], **host_side[stage]} for stage in run_side}
        for terms in host.values():
            if "decompositions" in terms:
                terms["block forward or decompositions"] = max(terms.pop("block forward workspace"),
                                                               terms.pop("decompositions"))
        device_terms = {stage: {} for stage in run_side}
    host_stages = {stage: sum(terms.values()) for stage, terms in host.items()}
    device_stages = {stage: sum(terms.values()) for stage, terms in device_terms.items()}
    shown = device_terms if on_device else host
    peak = max(device_stages if on_device else host_stages, key=(device_stages if on_device else host_stages).get)
    targets_dense = sum(t.out_features * t.in_features for t in targets)
    artifact = int(config.keep_ratio * targets_dense + total - targets_dense) * size
    allocator = create_allocator(config.allocator, config.allocator_options)
    sweep = 0
    if allocator.needs_model:
        batch = min(allocator.config.batch_size, calibration.nsamples)
        sweep = _streamed_terms(config, allocator.config, targets, block, outer, size, hidden, intermediate, vocab,
                                len(blocks), 0, batch, calibration.seqlen)[1]
    return MemoryEstimate(
        host_bytes=RUNTIME_BYTES + max(host_stages.values()),
        device_bytes=max(device_stages.values()) if on_device else 0,
        disk_bytes=spectra_disk + 2 * tokens * hidden * size + sweep + correction_disk + artifact,  # + two blocks' inputs
        stages=device_stages if on_device else host_stages,
        terms={k: v for k, v in shown[peak].items() if v},
    )


def _allocator_terms(config, targets, total: int, block: int, outer: int, size: int, hidden: int,
                     intermediate: int, vocab: int, heads: int, blocks: int) -> dict[str, int]:
    """The allocation stage: zero for spectral allocators; for those that run the model, one block at a
    time (:func:`_streamed_terms`)."""
    allocator = create_allocator(config.allocator, config.allocator_options)
    if not allocator.needs_model:
        return {}
    options = allocator.config
    batch = min(getattr(options, "batch_size", 2), config.calibration.nsamples)
    seqlen = getattr(options, "seqlen", None) or config.calibration.seqlen
    seqlen = min(seqlen, config.calibration.seqlen)
    autograd_block = _autograd_block(batch, seqlen, hidden, intermediate, heads, size)
    return _streamed_terms(config, options, targets, block, outer, size, hidden, intermediate, vocab, blocks,
                           autograd_block, batch, seqlen)[0]


def _autograd_block(batch: int, seqlen: int, hidden: int, intermediate: int, heads: int, size: int) -> int:
    """What autograd keeps for one batch through a block: per token about 12 hidden-wide tensors (norms,
    projections' inputs and outputs, rotary, attention) and 4 intermediate-wide (gate, up, activation,
    product), plus the attention probabilities."""
    return batch * seqlen * (12 * hidden + 4 * intermediate) * size + batch * heads * seqlen * seqlen * 4


def _gradient_sweep_terms(tokens: int, batch_tokens: int, targets, block: int, outer: int, size: int, hidden: int,
                          vocab: int, blocks: int, autograd_block: int, scores: bool) -> tuple[dict[str, int], int]:
    """The largest stage of a gradient sweep over ``tokens`` (zerosum's ``scores``, or the correction's
    gradients): one block with its weight gradients and saved inputs, or the head; and its disk (every
    block's saved inputs)."""
    saved = tokens * hidden * size
    chunk_logits = 5 * 4 * vocab * min(LOGITS_BYTES // (4 * vocab), batch_tokens)
    # the float64 projection of the largest module's gradient onto its spectrum: G, U, Bfull, G Bfullᵀ
    projection = max(8 * (2 * t.out_features * t.in_features + t.out_features * min(t.shape)
                          + min(t.shape) * t.in_features) for t in targets) if scores else 0
    stages = [{"block weights and gradient sums": block * (size + max(size, 4)),
               "saved inputs and their gradients": 3 * saved, "block autograd": autograd_block,
               "score projection (float64)": projection},
              {"embeddings and head": outer * size, "last outputs and their gradient": 2 * saved,
               "logits of one chunk": chunk_logits}]
    return max(stages, key=lambda terms: sum(terms.values())), blocks * saved


def _streamed_terms(config, options, targets, block: int, outer: int, size: int, hidden: int, intermediate: int,
                    vocab: int, blocks: int, autograd_block: int, batch: int, seqlen: int) -> tuple[dict[str, int], int]:
    """An allocator's largest stage (one block, or the head) and its disk: zerosum's gradient sweep
    (every block's saved inputs on disk), strs's probe pass (every probe's activations), or one training
    step of ara, fermigrad or dobi (a sweep over one batch with the block's targets gated)."""
    # one chunk's logits, their float32 copy, log-softmax and two gradients (as for the whole-model allocators)
    chunk_logits = 5 * 4 * vocab * min(LOGITS_BYTES // (4 * vocab), batch * (seqlen - 1))
    largest = max(8 * (t.out_features * min(t.shape) + min(t.shape) * t.in_features) for t in targets)
    if config.allocator == "strs":  # forward only: one chunk's logits and log-softmax
        length = min(options.tokens or seqlen, seqlen)
        tokens = min(options.windows, config.calibration.nsamples) * length
        chunk_logits = 2 * 4 * vocab * min(LOGITS_BYTES // (4 * vocab), options.batch_size * (length - 1))
        probe = tokens * hidden * size  # one probe's activations
        per_block = max(sum(1 for t in targets if t.block == index) for index in range(blocks)) * len(options.keep_ratios)
        stages = [{"block weights": block * size, "one block's probes, in and out": 2 * per_block * probe,
                   "block forward workspace": tokens * (3 * intermediate + 6 * hidden) * size,
                   "a truncated module's factors": largest},
                  {"embeddings and head": outer * size, "one block's probes": per_block * probe,
                   "logits of one chunk": chunk_logits}]
        return max(stages, key=lambda terms: sum(terms.values())), blocks * per_block * probe
    if config.allocator != "zerosum":  # a training step: one batch through the gated blocks
        saved = batch * seqlen * hidden * size
        widest = max(sum(min(t.shape) for t in targets if t.block == index) for index in range(blocks))
        # the block's candidates as read from the spectra store (float32), their float64 scaled copy while it
        # is made, and the gated factors kept in the compute dtype
        factors = max(sum((t.out_features + t.in_features) * min(t.shape) for t in targets if t.block == index)
                      for index in range(blocks))
        reference = saved if getattr(options, "objective", "ce") == "kl" else 0
        stages = [{"block weights": block * size, "gated factors of one block": factors * (4 + size) + largest,
                   "saved inputs and their gradients": 3 * saved,
                   "block autograd": autograd_block + batch * seqlen * 2 * widest * size},
                  {"embeddings and head": outer * size, "last outputs and their gradient": 2 * saved + reference,
                   "logits of one chunk": chunk_logits}]
        return max(stages, key=lambda terms: sum(terms.values())), blocks * saved
    windows = min(options.windows or config.calibration.nsamples, config.calibration.nsamples)
    return _gradient_sweep_terms(windows * config.calibration.seqlen, batch * (seqlen - 1), targets, block, outer,
                                 size, hidden, vocab, blocks, autograd_block, scores=True)


def _product(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out
