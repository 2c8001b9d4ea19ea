"""``compress(model, config)``: calibrate, decompose, allocate ranks, factorize — one verb.

Phases (each timed in the report):
1. **calibrate**: stream the calibration windows block by block, accumulating each target's input Gram;
   whiten and decompose every module as soon as its block is done (``whitened_svd``).
2. **allocate**: the configured allocator turns spectra and the budget into a :class:`RankPlan`.
3. **factorize**: replace each target by a factorized layer at its planned rank. Closed loop
   (``closed_loop``): ``sequential`` collects the statistics again block by block from the outputs of
   the already-compressed blocks and fits each module to those inputs; ``compensate`` runs the dense and
   the compressed model side by side, input group by input group in the order the data flows, and fits
   each module's compressed-path output to the dense model's output (``whitened_svd`` with the
   cross-Gram), so the error upstream is compensated rather than inherited; ``compensation`` below 1
   compensates only that share of it (the rest of the fit is to the module's own weight on the
   compressed inputs), and ``anchor`` adds the dense fit on the dense inputs, which keeps the weight
   where the compressed inputs lost a direction instead of amplifying its remnant
   (:meth:`PairedStatistics.fit_grams`). ``correct`` keeps the open-loop fit and applies ZS-SVD's weight
   correction to the plan (:mod:`rankcut.correction`): rounds of a gradient sweep of the truncated
   model and a decomposition of each weight pulled back towards the dense one along its gradient.
   ``refine_steps`` then trains each block's factors (after the compensating fit, the correction or the
   open-loop fit) towards the dense block's outputs on the compressed model's inputs (:mod:`rankcut.refine`),
   the dense and the compressed model running side by side.

With a work folder (:mod:`rankcut.workdir`) each block's spectra and the activations entering the next
block are checkpointed as the passes go, and the plan once allocated, so a rerun after an interruption
picks up at the first block not yet done and gives a bit-identical result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import resource
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
from torch import nn

from ._settings import cache_dir
from .allocation import AllocationContext, create_allocator
from .artifacts import ArtifactWriter, check_output_folder
from .calibration import BlockRun, BlockStream, InputStatistics, PairedStatistics
from .checkpoint import CheckpointSource, ResidentWeights, outer_modules, tensor_names
from .correction import pulled_weight, truncation_gradients
from .data import load_text, sample_calibration, select_windows
from .decomposition import RemoteSpectrum, Spectrum, whitened_svd
from .distributed import Ranks
from .errors import ConfigError, FactorizationError
from .estimate import GiB, MemoryEstimate, available_memory, estimate_compression
from .evaluation.perplexity import model_context_length
from .evaluation.speed import weight_bytes
from .layers import LowRankLinear, PivGaLinear, build_layer, describe_layer
from .memory import peak_rss
from .models import load_tokenizer
from .plan import DENSE, FACTOR_FORMATS, Budget, RankPlan
from .progress import progress_bar
from .refine import refine_block
from .registry import PluginConfig
from .sweep import ActivationStore, ModelStream
from .targets import TargetModule, find_decoder_blocks, find_targets, set_submodule
from .whitening import Whitening, create_whitener
from .workdir import BlockCheckpoints, Resumed, WorkDir, record_differences, run_record

# 2: closed_loop replaces the sequential flag; 3: anchor, 1 by default with compensate (earlier: 0); 4: closed_loop
# correct, with correction_rounds and correction_windows; 5: correction_step (earlier: the whole step, 1); 6: closed_loop
# correct by default with a whitening (earlier: none). Older configs still read, with what they meant.
CONFIG_VERSION = 6
CLOSED_LOOPS = ("none", "sequential", "compensate", "correct")
REFITTING = ("sequential", "compensate")  # closed loops that decompose every module again, block by block
# The allocator with the best quality for its cost in benchmarks/RESULTS.md (SmolLM2, keep 0.8, PivGa, first
# 100 WikiText-2 test windows: zerosum 36.88 in 2.5 min of allocation; ARA 37.51 in 10-18 min; uniform 49.89).
DEFAULT_ALLOCATOR = "zerosum"


@dataclass
class CalibrationConfig(PluginConfig):
    dataset: str = "c4"  # a dataset name (wikitext2, ptb, c4) or a .txt/.jsonl/.parquet path
    split: str = "validation"
    nsamples: int = 256
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None

    def validate(self) -> None:
        for name, least in (("nsamples", 1), ("seqlen", 2), ("batch_size", 1), ("seed", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
                bound = "" if least is None else f" >= {least}"
                raise ConfigError(f"calibration {name} must be an integer{bound}, got {value!r}")


@dataclass
class CompressionConfig:
    """Everything that defines a compression run; saved in every artifact (versioned, JSON)."""

    keep_ratio: float = 0.8
    allocator: str = DEFAULT_ALLOCATOR
    allocator_options: dict[str, Any] = field(default_factory=dict)
    whitening: str = "cholesky"
    whitening_options: dict[str, Any] = field(default_factory=dict)
    # PivGa by default: the same budget buys more rank (SmolLM2 keep 0.8: perplexity 92.9 -> 53.9, benchmarks/)
    factor_format: Literal["plain", "pivga"] = "pivga"
    # None: "correct" with a whitening, else "none". The half-step correction wins at both keeps measured (SmolLM2,
    # zerosum, PivGa: WikiText-2 / C4 32.80 / 41.39 against 36.88 / 44.18 open loop at keep 0.8, 65.41 / 141.24
    # against 78.85 / 172.60 at 0.6) for one gradient sweep and calibration pass more (+7 min of a 10-min
    # calibration and 2.5-min allocation)
    closed_loop: Literal["none", "sequential", "compensate", "correct"] | None = None
    compensation: float = 1.0  # closed_loop "compensate": share of the upstream error each module compensates
    # closed_loop "compensate": weight of the dense fit ‖(W − W_k) X‖² beside the compensating one. None: 1 with
    # compensate (SmolLM2 uniform keep 0.8: WikiText-2 42.54, C4 68.88 against 54.11 / 104.10 unanchored), else 0
    anchor: float | None = None
    refine_steps: int = 0  # Adam steps per block on its factors once fitted (none, correct, compensate; 0: none)
    refine_lr: float = 1e-4
    correction_rounds: int = 1  # closed_loop "correct": rounds of gradient sweep and decomposition
    correction_windows: int = 32  # closed_loop "correct": calibration windows of the mean gradient (zerosum's 32)
    # closed_loop "correct": share of ZS-SVD's step each round takes, in (0, 1]. The whole step overshoots at keep
    # 0.6 (89.71 / 204.67); half of it gains there and matches it at 0.8; a quarter: 65.16 / 141.53 at 0.6
    correction_step: float = 0.5
    exclude: list[str] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.calibration, Mapping):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        if self.closed_loop is None:
            self.closed_loop = "none" if self.whitening == "none" else "correct"
        if self.anchor is None:
            self.anchor = 1.0 if self.closed_loop == "compensate" else 0.0
        self.validate()

    def validate(self) -> None:
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.factor_format not in FACTOR_FORMATS:
            raise ConfigError(f"factor_format must be one of {list(FACTOR_FORMATS)}, got {self.factor_format!r}")
        if self.closed_loop not in CLOSED_LOOPS:
            raise ConfigError(f"closed_loop must be one of {list(CLOSED_LOOPS)}, got {self.closed_loop!r}")
        if self.closed_loop != "none" and self.whitening == "none":
            raise ConfigError(f"closed_loop {self.closed_loop!r} fits modules to calibration statistics; "
                              "it needs a whitening other than 'none'")
        if isinstance(self.compensation, bool) or not isinstance(self.compensation, (int, float)) \
                or not 0.0 <= self.compensation <= 1.0:
            raise ConfigError(f"compensation must be in [0, 1], got {self.compensation!r}")
        if self.compensation != 1.0 and self.closed_loop != "compensate":
            raise ConfigError("compensation blends the compensating fit: it needs closed_loop 'compensate'")
        if isinstance(self.anchor, bool) or not isinstance(self.anchor, (int, float)) \
                or not 0.0 <= self.anchor < float("inf"):
            raise ConfigError(f"anchor must be a finite number >= 0, got {self.anchor!r}")
        if self.anchor and self.closed_loop != "compensate":
            raise ConfigError("anchor weighs the dense fit within the compensating one: it needs closed_loop "
                              "'compensate'")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError(f"refine_steps must be an integer >= 0, got {self.refine_steps!r}")
        if isinstance(self.refine_lr, bool) or not isinstance(self.refine_lr, (int, float)) or not self.refine_lr > 0:
            raise ConfigError(f"refine_lr must be > 0, got {self.refine_lr!r}")
        if self.refine_steps and self.closed_loop == "sequential":
            raise ConfigError("refine_steps trains each block towards the dense model's outputs, which the sequential "
                              "pass does not carry: use closed_loop 'none', 'correct' or 'compensate'")
        if self.refine_steps and self.whitening == "none":
            raise ConfigError("refine_steps trains each block on calibration data: it needs a whitening other than "
                              "'none'")
        for name in ("correction_rounds", "correction_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.correction_step, bool) or not isinstance(self.correction_step, (int, float)) \
                or not 0.0 < self.correction_step <= 1.0:
            raise ConfigError(f"correction_step must be in (0, 1], got {self.correction_step!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.closed_loop != "correct" and any(getattr(self, name) != defaults[name] for name in
                                                  ("correction_rounds", "correction_windows", "correction_step")):
            raise ConfigError("correction_rounds, correction_windows and correction_step set the weight correction: "
                              "they need closed_loop 'correct'")
        if self.version > CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is newer than this rankcut supports ({CONFIG_VERSION})")
        self.calibration.validate()
        # Unknown plug-ins or options fail here, before any expensive work.
        create_allocator(self.allocator, self.allocator_options)
        create_whitener(self.whitening, self.whitening_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if "sequential" in data and "closed_loop" not in data:  # a version 1 config
            data = {**data, "closed_loop": "sequential" if data["sequential"] else "none"}
            data.pop("sequential")
        if data.get("version", CONFIG_VERSION) < 6 and "closed_loop" not in data:  # the open loop was the default
            data = {**data, "closed_loop": "none"}
        if data.get("version", CONFIG_VERSION) < 3 and "anchor" not in data:  # before anchors: none
            data = {**data, "anchor": 0.0}
        if data.get("version", CONFIG_VERSION) < 5 and data.get("closed_loop") == "correct" \
                and "correction_step" not in data:  # before the step's share: the whole step
            data = {**data, "correction_step": 1.0}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown compression setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


@dataclass
class CompressionReport:
    config: dict[str, Any]
    plan: RankPlan
    timings: dict[str, float]
    peak_memory_bytes: int
    measured: dict[str, int | float]
    diagnostics: dict[str, dict[str, Any]]
    memory: dict[str, Any] = field(default_factory=dict)  # host / CUDA peaks of this call and how they were measured

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "plan": self.plan.to_dict(), "timings": self.timings,
                "peak_memory_bytes": self.peak_memory_bytes, "memory": self.memory, "measured": self.measured,
                "diagnostics": self.diagnostics}

    def _peak_memory_text(self) -> str:
        text = f"{self.peak_memory_bytes / 2**30:.2f} GiB"
        start = self.memory.get("host_start_bytes")
        if start is not None and self.memory.get("cuda_peak_bytes") is None:
            text += f" ({start / 2**30:.2f} GiB held when the call began)"
        return text

    def markdown(self) -> str:
        lines = ["| quantity | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in self.summary_rows()]
        lines += ["", "| module | shape | rank | whitening |", "|---|---|---|---|"]
        for name, rank in self.plan.ranks.items():
            m, n = self.plan.shapes[name]
            path = self.diagnostics.get(name, {}).get("path", "")
            lines.append(f"| {name} | {m}x{n} | {rank} | {path} |")
        return "\n".join(lines) + "\n"

    def model_card(self, base_model: str | None) -> str:
        config = self.config
        return f"""---
library_name: transformers
tags: [rankcut, low-rank, svd, compression]
---
# Low-rank compressed model

Compressed with [rankcut](https://pypi.org/project/rankcut/) from `{base_model or 'unknown base model'}`:
keep ratio {config['keep_ratio']} of the decoder linear parameters, allocator `{config['allocator']}`,
whitening `{config['whitening']}`, {config['factor_format']} factors, calibration on
`{config['calibration']['dataset']}` ({config['calibration']['nsamples']} x {config['calibration']['seqlen']} tokens).

Load it with `import rankcut` followed by `rankcut.load(path)` or
`transformers.AutoModelForCausalLM.from_pretrained(path)`. No custom code runs on load.

{self.markdown()}"""

    def files(self, base_model: str | None) -> dict[str, str]:
        """What an artifact carries beside its weights: the model card and this report (JSON, Markdown)."""
        return {"README.md": self.model_card(base_model),
                "rankcut_report.json": json.dumps(self.to_dict(), indent=2, default=str),
                "rankcut_report.md": self.markdown()}

    def summary_rows(self) -> list[tuple[str, str]]:
        m = self.measured
        rows = [
            ("allocator", f"{self.plan.allocator} ({self.plan.factor_format} factors)"),
            ("keep ratio (target / achieved)", f"{self.plan.keep_ratio:.4f} / {m['target_keep_ratio']:.6f}"),
            ("target params (budget / measured / dense)",
             f"{m['budget']:,} / {m['target_params']:,} / {m['target_params_dense']:,}"),
            ("model params (dense -> compressed)", f"{m['model_params_dense']:,} -> {m['model_params']:,}"),
            ("weight bytes (dense -> compressed)", f"{m['weight_bytes_dense']:,} -> {m['weight_bytes']:,}"),
            ("dense modules kept", str(sum(1 for r in self.plan.ranks.values() if r == DENSE))),
            ("peak memory", self._peak_memory_text()),
        ]
        rows += [(f"time: {phase}", f"{seconds:.1f} s") for phase, seconds in self.timings.items()]
        return rows


def _peak_memory_bytes(memory: dict[str, Any]) -> int:
    """The larger of the host and CUDA peaks; the process-lifetime peak where the host peak cannot be scoped."""
    host = memory["host_peak_bytes"]
    if host is None:
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        memory["host_method"] = "process lifetime maximum (getrusage)"
    return max(host, memory["cuda_peak_bytes"] or 0)


def _factor_params(module: nn.Module) -> int:
    """Stored numbers of a (possibly factorized) target module, bias excluded."""
    return sum(p.numel() for name, p in module.named_parameters() if name != "bias")


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class _Decomposer:
    """Whitens each shared input once and decomposes every module that reads it. With several processes
    (``ranks``) each input group is decomposed by the rank that owns its statistics (``owners``), which
    shares what the others need: singular values, factors or factorized layers, and diagnostics."""

    def __init__(self, model: nn.Module, whitening: str, options: Mapping[str, Any], ranks: Ranks | None = None) -> None:
        self.model = model
        self.whitener = create_whitener(whitening, options)
        self.diagnostics: dict[str, dict[str, Any]] = {}
        self.ranks = ranks or Ranks()
        self.owners: dict[str, int] = {}  # module -> the rank holding its factors (absent: every rank)

    def owns(self, name: str) -> bool:
        return self.owners.get(name, self.ranks.rank) == self.ranks.rank

    def share(self, names: list[str], spectra: Mapping[str, Spectrum], full: bool) -> dict[str, Spectrum]:
        """Every rank's view of these modules' spectra: its own, and the others' singular values (with
        ``full``, their factors too: allocators that run the model gate every module), and diagnostics."""
        if not self.ranks.distributed:
            return dict(spectra)
        out = {}
        for name in names:
            owner, what = self.owners[name], f"sharing the spectrum of {name}"
            mine = spectra.get(name)
            parts = None if mine is None else {"sigma": mine.sigma, **({"u": mine.u, "b_full": mine.b_full} if full else {})}
            got = self.ranks.broadcast_tensors(parts, owner, what)
            out[name] = mine if mine is not None else (Spectrum(got["u"], got["sigma"], got["b_full"]) if full
                                                       else RemoteSpectrum(got["sigma"], owner))
        self.share_diagnostics(names)
        return out

    def share_diagnostics(self, names: list[str]) -> None:
        for name in names:
            if self.ranks.distributed and name in self.owners:
                self.diagnostics[name] = self.ranks.broadcast_object(
                    self.diagnostics.get(name), self.owners[name], f"sharing the diagnostics of {name}")

    def share_layers(self, names: list[str], plan: RankPlan) -> None:
        """The factorized layers of ``names`` from their owners into every rank's model."""
        for name in names:
            if not self.ranks.distributed or name not in self.owners or plan.ranks[name] == DENSE:
                continue
            owner, what = self.owners[name], f"sharing the factors of {name}"
            layer = self.model.get_submodule(name)
            description = self.ranks.broadcast_object(describe_layer(layer), owner, what)
            tensors = self.ranks.broadcast_tensors(layer.state_dict() if self.owns(name) else None, owner, what,
                                                   device=next(layer.parameters()).device)
            if not self.owns(name):
                built = build_layer(description, layer.in_features, layer.out_features, layer.bias is not None,
                                    dtype=layer.weight.dtype, device=layer.weight.device)
                built.load_state_dict(tensors)
                set_submodule(self.model, name, built)

    def spectra(self, run: BlockRun) -> dict[str, Spectrum]:
        cache: dict[int, Whitening] = {}
        out = {}
        for target in (t for t in run.targets if t.name in run.statistics):  # the input groups this rank owns
            statistics: InputStatistics = run.statistics[target.name]
            whitening = cache.get(id(statistics))
            if whitening is None:
                try:
                    whitening = cache[id(statistics)] = self.whitener.whiten(statistics)
                except FactorizationError as error:
                    raise FactorizationError(f"{target.name}: {error}") from error
            spectrum = whitened_svd(self.model.get_submodule(target.name).weight, whitening, target.name)
            # contiguous, like a spectrum read back from a checkpoint: same layout, same kernels, same bits
            out[target.name] = Spectrum(spectrum.u.contiguous(), spectrum.sigma, spectrum.b_full.contiguous())
            self.diagnostics[target.name] = {**whitening.diagnostics, "shared_input": statistics.modules,
                                             "calibration_tokens": statistics.tokens}
        return out


    def compensating(self, statistics: PairedStatistics, compensation: float = 1.0,
                     anchor: float = 0.0) -> dict[str, Spectrum]:
        """The compensating fit of one input group's modules: ``whitened_svd`` of the Gram and cross-Gram
        of :meth:`PairedStatistics.fit_grams` (``compensation`` blends in the group's own Gram, ``anchor``
        the dense inputs' Gram)."""
        gram, cross = statistics.fit_grams(compensation, anchor)
        try:
            whitening = self.whitener.whiten(dataclasses.replace(statistics, gram=gram))
        except FactorizationError as error:
            raise FactorizationError(f"{statistics.modules[0]}: {error}") from error
        out = {}
        for name in statistics.modules:
            spectrum = whitened_svd(self.model.get_submodule(name).weight, whitening, name, cross=cross)
            out[name] = Spectrum(spectrum.u.contiguous(), spectrum.sigma, spectrum.b_full.contiguous())
            self.diagnostics[name] = {**whitening.diagnostics, "shared_input": statistics.modules,
                                      "calibration_tokens": statistics.tokens, "fit": "compensating",
                                      "compensation": compensation, "anchor": anchor}
        return out


def _factorized_layer(linear: nn.Linear, spectrum: Spectrum, rank: int, factor_format: str) -> nn.Module:
    a, b = spectrum.factors(rank, dtype=torch.float64)
    bias = linear.bias.detach() if linear.bias is not None else None
    if factor_format == "pivga":
        layer = PivGaLinear.from_factors(a, b, None if bias is None else bias.double())
    else:
        layer = LowRankLinear.from_factors(a, b, None if bias is None else bias.double())
    return layer.to(dtype=linear.weight.dtype, device=linear.weight.device)


@dataclass
class _Job:
    """What every pass of one compression reads: the model and how its blocks come into memory, the
    targets, the calibration ids, the settings, the decomposer (with the process group), whether progress
    shows, the work folder (None: not resumable) and where each finished block goes (None: nowhere)."""

    model: nn.Module
    weights: ResidentWeights
    targets: list[TargetModule]
    calibration: torch.Tensor | None
    config: CompressionConfig
    decomposer: _Decomposer
    show_progress: bool
    work: WorkDir | None
    hand_over: Callable[[str], None] | None

    def block_stream(self) -> BlockStream:
        """The calibration windows through the model, one block resident at a time."""
        return BlockStream(self.model, self.targets, self.calibration, self.config.calibration.batch_size,
                           weights=self.weights, ranks=self.decomposer.ranks)


def compress(
    model: nn.Module,
    config: CompressionConfig | Mapping[str, Any] | None = None,
    *,
    tokenizer=None,
    calibration: torch.Tensor | None = None,
    show_progress: bool = True,
    output_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    spectra_cache: str | Path | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` (held in memory) in place and return it with a report.

    ``calibration`` (``nsamples x seqlen`` token ids) overrides sampling from ``config.calibration``,
    which needs ``tokenizer``.

    ``work_dir`` makes the run resumable: expensive intermediate results are checkpointed there (see
    :mod:`rankcut.workdir`) and the same call after an interruption continues from them, with a
    bit-identical result. A folder left by a different run (settings, model or calibration data) is
    refused with :class:`ConfigError`. Delete it once the result is saved (the CLI does). With a work
    folder the spectra live on disk and only singular values stay in memory.

    ``spectra_cache`` keeps the open-loop spectra in a folder keyed by what they depend on (model,
    calibration ids, whitening settings, exclusions), so runs that differ only in keep ratio, allocator
    or factor format skip calibration. Use it from one process at a time.

    :func:`compress_checkpoint` runs the same pipeline on a checkpoint folder, one block in memory at a
    time, writing the artifact as it goes.
    """
    config = _as_config(config)
    report = _measured(config, lambda: _conduct(
        model, ResidentWeights(model), config, tokenizer=tokenizer, calibration=calibration,
        show_progress=show_progress, output_dir=output_dir, work_dir=work_dir, spectra_cache=spectra_cache))
    return model, report


def compress_checkpoint(
    folder: str | Path,
    config: CompressionConfig | Mapping[str, Any] | None,
    out_dir: str | Path,
    *,
    tokenizer=None,
    calibration: torch.Tensor | None = None,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    show_progress: bool = True,
    work_dir: str | Path | None = None,
    spectra_cache: str | Path | None = None,
    trust_remote_code: bool = False,
    max_memory: int | None = None,
) -> CompressionReport:
    """Compress the safetensors checkpoint in ``folder`` into an artifact at ``out_dir``, streaming.

    The model is a skeleton without weights (:class:`CheckpointSource`); each decoder block is read
    from disk when the pipeline reaches it and dropped after, the spectra stay in the work folder, and
    each block's factors go straight into the artifact's shard, so host memory holds one block (plus the
    calibration activations) whatever the depth; allocators that run the model (``needs_model``) run it
    block by block too (:class:`~rankcut.sweep.ModelStream`). The same stages as :func:`compress` run, so plans and factors are
    the same bit for bit on the same device. ``work_dir`` makes the run resumable (see :func:`compress`);
    without it a temporary folder beside ``out_dir`` holds the spectra and is removed at the end.

    Before any work, the run's peak host memory is predicted from the config
    (:func:`rankcut.estimate.estimate_compression`); a prediction over ``max_memory`` bytes (default:
    the memory available now) is refused with :class:`ConfigError`.
    """
    config = _as_config(config)
    check_output_folder(Path(out_dir), overwrite)  # on every rank: none starts work another refuses
    source = CheckpointSource.open(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model = source.skeleton()
    find_targets(model, config.exclude)  # a model with nothing to compress fails here
    tokenizer = load_tokenizer(folder) if tokenizer is None else tokenizer
    if tokenizer is None and calibration is None and _needs_calibration(config):
        raise ConfigError(f"{folder} holds no tokenizer (tokenizer.json or tokenizer_config.json), which sampling "
                          "calibration text needs")
    _check_seqlen(model, config.calibration.seqlen if calibration is None else calibration.shape[1])
    ranks = Ranks.current()
    _check_memory(estimate_compression(source.config, config, dtype=dtype, device=source.device,
                                       world_size=ranks.world_size), max_memory)
    leader = ranks.leader  # with several processes, rank 0 writes the artifact
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ArtifactWriter(out_dir, len(find_decoder_blocks(model)[1]) + 1,
                                                    overwrite=overwrite)) if leader else None
        if work_dir is None:  # the spectra live on disk in any case: a temporary folder beside the output
            Path(out_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=".rankcut-work-",
                                                                       dir=Path(out_dir).resolve().parent))
        report = _measured(config, lambda: _conduct(
            model, source.stream(model), config, tokenizer=tokenizer, calibration=calibration,
            show_progress=show_progress, output_dir=Path(out_dir).parent if leader else None, work_dir=work_dir,
            spectra_cache=spectra_cache, writer=writer))
        if writer is not None:
            writer.finish(model, tokenizer, plan=report.plan.to_dict(),
                          settings={**report.config, "base_model": base_model}, diagnostics=report.diagnostics,
                          measured=report.measured, extra_files=report.files(base_model))
    return report


def _check_memory(estimate: MemoryEstimate, limit: int | None) -> None:
    """Refuse a run predicted to need more host memory than ``limit`` (default: available now)."""
    limit = available_memory() if limit is None else limit
    if estimate.host_bytes <= limit:
        return
    advice = {"calibrate": "fewer calibration tokens (--nsamples, --seqlen) or a smaller --batch-size",
              "allocate": "an allocator that does not run the model (uniform, energy), a streamed one "
                          "(zerosum), or a smaller batch_size / windows (-a KEY=VALUE)",
              "factorize": "a machine with more memory",
              "correct: gradients": "fewer --correction-windows or a smaller --batch-size",
              "correct: decompose": "fewer calibration tokens (--nsamples, --seqlen) or a smaller --batch-size"
              }[estimate.peak_stage]
    raise ConfigError(f"this run is predicted to peak at {estimate.host_bytes / GiB:.1f} GiB of host memory (stage "
                      f"{estimate.peak_stage}), over the limit of {limit / GiB:.1f} GiB (--max-memory, default: "
                      f"the memory available now); try {advice}, or see `rankcut compress --dry-run`")


def _as_config(config: CompressionConfig | Mapping[str, Any] | None) -> CompressionConfig:
    if config is None:
        return CompressionConfig()
    return CompressionConfig.from_dict(config) if isinstance(config, Mapping) else config


def _measured(config: CompressionConfig, run) -> CompressionReport:
    """Run ``run()`` (the plan, timings, sizes and diagnostics) and report it with its peak memory."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with peak_rss() as host:
        plan, timings, measured, diagnostics = run()
    memory = {"host_peak_bytes": host["peak_bytes"], "host_start_bytes": host["start_bytes"],
              "host_method": host["method"],
              "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    return CompressionReport(config.to_dict(), plan, timings, _peak_memory_bytes(memory), measured, diagnostics, memory)


def _conduct(
    model: nn.Module,
    weights: ResidentWeights,
    config: CompressionConfig,
    *,
    tokenizer,
    calibration: torch.Tensor | None,
    show_progress: bool,
    output_dir: str | Path | None,
    work_dir: str | Path | None,
    spectra_cache: str | Path | None,
    writer: ArtifactWriter | None = None,
) -> tuple[RankPlan, dict[str, float], dict[str, int | float], dict[str, dict[str, Any]]]:
    """The stages: calibrate and decompose (spectra to the store), allocate, factorize block by block
    (each block handed to ``writer`` when there is one). Returns the plan, phase timings, measured sizes
    and whitening diagnostics."""
    timings: dict[str, float] = {}
    model.eval()
    ranks = Ranks.current()
    show_progress = show_progress and ranks.leader
    targets = find_targets(model, config.exclude)
    budget = Budget({t.name: t.shape for t in targets}, config.keep_ratio, config.factor_format)
    allocator = create_allocator(config.allocator, config.allocator_options)
    decomposer = _Decomposer(model, config.whitening, config.whitening_options, ranks)
    dense_params, dense_bytes = sum(p.numel() for p in model.parameters()), weight_bytes(model)
    needs_data = _needs_calibration(config)

    if needs_data:
        if calibration is None:
            if tokenizer is None:
                raise ConfigError("compress needs a tokenizer to sample calibration data (or pass calibration=ids)")
            _check_seqlen(model, config.calibration.seqlen)  # before reading any data
            with _phase(timings, "load calibration data"):
                corpus = load_text(config.calibration.dataset, config.calibration.split,
                                   data_dir=config.calibration.data_dir)
                calibration = sample_calibration(tokenizer, corpus, config.calibration.nsamples,
                                                 config.calibration.seqlen, config.calibration.seed)
        _check_calibration(model, calibration)
    if ranks.distributed:
        ranks.check_same(run_record(_settings_record(config), model, weights, targets,
                                    calibration if needs_data else None), "the run (settings, model, data)",
                          record_differences)

    calibration = calibration if needs_data else None
    hand_over = (lambda block: writer.write(model, tensor_names(model, block))) if writer is not None else None
    with _work_dir(work_dir, config, model, weights, targets, calibration, ranks) as work:
        job = _Job(model, weights, targets, calibration, config, decomposer, show_progress, work, hand_over)
        plan = work.load_plan() if work is not None else None
        if plan is not None and dict(plan.shapes) != dict(budget.shapes):
            raise ConfigError(f"the rank plan in {work.path} does not match this model; delete the work folder")
        if ranks.all_min(int(plan is not None), "agreeing whether the plan is made") == 0:
            plan = None  # a rank stopped before saving it: every rank allocates again
        spectra: dict[str, Spectrum] = {}
        refits = config.closed_loop in REFITTING
        # every rank truncates every module: for the allocators that run the model, and for the correction
        full = allocator.needs_model or config.closed_loop == "correct"
        # a refitting closed loop decomposes again anyway: spectra only if the allocator needs them
        if not refits or (plan is None and allocator.needs_spectra):
            with _phase(timings, "calibrate + decompose"):
                checkpoints = _spectra_checkpoints(job, spectra_cache, full=full)
                curves = _collect_spectra(job, spectra, checkpoints, full=full)
            if output_dir is not None and curves:
                _plot_whitening(curves, targets, Path(output_dir))

        if plan is None:
            with _phase(timings, "allocate"):
                stream = ModelStream(model, targets, weights, work.path / "sweep" if work is not None else None,
                                     ranks=ranks)
                # Across processes, allocators keep no caches or checkpoints of their own: the ranks could
                # find different ones and part ways. Every rank allocates (the model-running allocators
                # data parallel, through the stream); rank 0's plan is the one all use.
                context = AllocationContext(
                    budget, targets, spectra, calibration=calibration,
                    seed=config.calibration.seed, show_progress=show_progress,
                    output_dir=Path(output_dir) if output_dir else None,
                    cache_dir=None if ranks.distributed else cache_dir() / "allocators",
                    work_dir=work.allocator_dir if work is not None and not ranks.distributed else None,
                    stream=stream if allocator.needs_model else None)
                plan = allocator.allocate(context)
                if ranks.distributed:
                    plan = RankPlan.from_dict(ranks.broadcast_object(plan.to_dict(), 0, "sharing the rank plan"))
            if work is not None:
                work.save_plan(plan)

        with _phase(timings, "factorize"):
            if refits:
                spectra.clear()  # re-decomposed block by block against the compressed upstream blocks
                factorize = _factorize_sequential if config.closed_loop == "sequential" else _factorize_compensating
                factorize(job, plan)
            elif config.closed_loop == "correct":
                _factorize_corrected(job, spectra, plan)
            else:
                _factorize_fitted(job, spectra, plan)
            if writer is not None:
                outer = outer_modules(model, find_decoder_blocks(model, with_linears=False)[0])
                weights.onload(outer)
                writer.write(model, [name for module in outer for name in tensor_names(model, module)])
                weights.offload(outer)

    ranks.barrier("finishing")  # every rank is done with its work folder
    measured = _measure(model, targets, budget, plan, dense_params, dense_bytes)
    return plan, timings, measured, decomposer.diagnostics


def _needs_calibration(config: CompressionConfig) -> bool:
    """Whitening and the allocators that run the model need calibration text."""
    return config.whitening != "none" or create_allocator(config.allocator, config.allocator_options).needs_model


def _settings_record(config: CompressionConfig) -> dict[str, Any]:
    """The settings that make two runs the same: all but where the calibration data was read from (the
    ids, hashed, are recorded)."""
    settings = config.to_dict()
    settings["calibration"].pop("data_dir")
    return settings


@contextmanager
def _work_dir(path: str | Path | None, config: CompressionConfig, model: nn.Module, weights: ResidentWeights,
              targets: list[TargetModule], calibration: torch.Tensor | None, ranks: Ranks) -> Iterator[WorkDir | None]:
    """The run's work folder (None without ``path``), locked while the run uses it; with several
    processes, each rank's own ``rank-R-of-N`` subfolder."""
    if path is None:
        yield None
        return
    if ranks.distributed:
        path = Path(path) / f"rank-{ranks.rank}-of-{ranks.world_size}"
    with WorkDir.open(path, run_record(_settings_record(config), model, weights, targets, calibration)) as work:
        yield work


def _check_seqlen(model: nn.Module, seqlen: int) -> None:
    context = model_context_length(model)
    if context is not None and seqlen > context:
        raise ConfigError(f"calibration seqlen {seqlen} is beyond the model's context length {context}")


def _check_calibration(model: nn.Module, ids: torch.Tensor) -> None:
    """Token ids the model can run: a wrong shape, dtype or vocabulary would fail deep in the model."""
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel() and ids.dtype in (torch.long, torch.int)):
        raise ConfigError("calibration must be a non-empty nsamples x seqlen tensor of token ids (torch.long)")
    _check_seqlen(model, ids.shape[1])
    vocabulary = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocabulary:
        raise ConfigError(f"calibration token ids span [{int(ids.min())}, {int(ids.max())}], outside the model's "
                          f"vocabulary of {vocabulary}; the tokenizer does not match the model")


def _resume(checkpoints: BlockCheckpoints | None, device: torch.device, decomposer: _Decomposer) -> Resumed:
    if checkpoints is None:
        return Resumed()
    ranks = decomposer.ranks
    state = checkpoints.resume(device, agree=lambda reached: ranks.all_min(reached, "agreeing where to resume"))
    decomposer.diagnostics.update(state.diagnostics)
    decomposer.owners.update(state.owners)
    return state


def _spectra_checkpoints(job: _Job, spectra_cache: str | Path | None, full: bool) -> BlockCheckpoints | None:
    """Where the open-loop pass keeps its per-block spectra: the shared cache under a key of what the
    spectra depend on, else the run's work folder, else nowhere."""
    blocks = len(find_decoder_blocks(job.model)[1])
    config, ranks = job.config, job.decomposer.ranks
    if spectra_cache is not None and job.calibration is not None:
        depends_on = {"whitening": config.whitening, "whitening_options": config.whitening_options,
                      "batch_size": config.calibration.batch_size, "exclude": config.exclude}
        if ranks.distributed:  # each rank keeps its own modules' spectra (with ``full``, the others' too)
            depends_on["ranks"] = [ranks.rank, ranks.world_size, full]
        record = run_record(depends_on, job.model, job.weights, job.targets, job.calibration)
        key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
        Path(spectra_cache).mkdir(parents=True, exist_ok=True)
        return BlockCheckpoints(Path(spectra_cache) / key, blocks)
    return job.work.blocks("spectra", blocks) if job.work is not None else None


Curves = dict[str, tuple[list[float], list[float]]]


def _collect_spectra(job: _Job, spectra: dict[str, Spectrum], checkpoints: BlockCheckpoints | None,
                     full: bool) -> Curves:
    """Fill ``spectra`` (with checkpoints: singular values in memory, factors on disk) and return the
    middle block's singular values before and after whitening, for the plot (empty if not computed).
    With several processes each rank decomposes the groups it owns and receives the others' singular
    values, and with ``full`` their factors too."""
    model, weights, targets, decomposer = job.model, job.weights, job.targets, job.decomposer
    prefix, blocks = find_decoder_blocks(model)
    middle = targets[len(targets) // 2].block
    curves: Curves = {}
    if job.config.whitening == "none":  # no calibration: cheap, nothing to checkpoint
        from .whitening.base import IdentityWhitening

        identity = IdentityWhitening({"path": "identity"})
        for index in range(len(blocks)):
            weights.onload([f"{prefix}.{index}"])
            for target in (t for t in targets if t.block == index):
                spectra[target.name] = whitened_svd(model.get_submodule(target.name).weight, identity, target.name)
                decomposer.diagnostics[target.name] = dict(identity.diagnostics)
            weights.offload([f"{prefix}.{index}"])
        return curves
    stream = job.block_stream()
    state = _resume(checkpoints, stream.device, decomposer)
    spectra.update(state.spectra)

    def decompose_block(run: BlockRun) -> None:
        decomposer.owners.update(run.owners)
        names = [t.name for t in run.targets]
        block_spectra = decomposer.share(names, decomposer.spectra(run), full)
        if run.index == middle and decomposer.ranks.leader:
            curves.update({name.split(f".{middle}.", 1)[-1]: (
                torch.linalg.svdvals(model.get_submodule(name).weight.detach().double().cpu()).tolist(),
                spectrum.sigma.tolist()) for name, spectrum in block_spectra.items()})
        if checkpoints is None:
            spectra.update(block_spectra)
            return
        checkpoints.save_block(run.index, block_spectra, {n: decomposer.diagnostics[n] for n in block_spectra},
                               owners=run.owners)
        spectra.update(checkpoints.stored(run.index)[0])  # the factors stay on disk

    with progress_bar("calibrate + decompose blocks", total=len(stream.blocks), enabled=job.show_progress) as advance:
        advance(state.next_block)
        if state.next_block < len(stream.blocks):
            stream.run(decompose_block, progress=advance, start_block=state.next_block, hidden=state.hidden,
                       on_outputs=checkpoints.save_activations if checkpoints is not None else None)
    return curves


def _plot_whitening(curves: Curves, targets: list[TargetModule], output_dir: Path) -> None:
    """``spectra_whitening.png``: singular values of the middle block's targets before and after
    whitening, next to the output (skipped without matplotlib, an optional extra)."""
    from .plots import plot_spectra

    middle = targets[len(targets) // 2].block
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        plot_spectra(curves, output_dir / "spectra_whitening.png",
                     title=f"block {middle}: singular values before and after whitening")
    except ImportError:
        pass


def _replace(model: nn.Module, target: TargetModule, spectra: dict[str, Spectrum], plan: RankPlan,
             factor_format: str) -> None:
    """Swap ``target`` for its factors at the planned rank (the spectrum leaves ``spectra``); dense: keep."""
    rank = plan.ranks[target.name]
    if rank == DENSE:
        return
    layer = _factorized_layer(model.get_submodule(target.name), spectra.pop(target.name), rank, factor_format)
    set_submodule(model, target.name, layer)


def _replace_block(job: _Job, targets: list[TargetModule], spectra: dict[str, Spectrum], plan: RankPlan) -> None:
    """Replace one block's ``targets`` by their factors from ``spectra`` at the planned ranks, each by the
    rank holding its factors, and share the layers with the other ranks."""
    for target in targets:
        if job.decomposer.owns(target.name):
            _replace(job.model, target, spectra, plan, job.config.factor_format)
        else:
            spectra.pop(target.name, None)
    job.decomposer.share_layers([t.name for t in targets], plan)


def _factorize_open_loop(job: _Job, spectra: dict[str, Spectrum], plan: RankPlan, blocks: range | None = None,
                         restore: Callable[[int], None] | None = None) -> None:
    """Replace the targets of ``blocks`` (all by default) by their factors at the planned rank, one block
    resident at a time, each handed over once done (after ``restore(index)``, which may put back what a
    resumed pass had trained). Each module is factorized by the rank holding its factors and shared."""
    prefix, decoder_blocks = find_decoder_blocks(job.model, with_linears=False)
    for index in blocks if blocks is not None else range(len(decoder_blocks)):
        block = f"{prefix}.{index}"
        job.weights.onload([block])
        _replace_block(job, [t for t in job.targets if t.block == index], spectra, plan)
        if restore is not None:
            restore(index)
        if job.hand_over is not None:
            job.hand_over(block)
        job.weights.offload([block])


def _closed_loop_pass(job: _Job, kind: str, plan: RankPlan, spectra: dict[str, Spectrum] | None = None
                      ) -> tuple[BlockStream, BlockCheckpoints | None, Resumed]:
    """The block stream of a closed-loop pass, its checkpoints in the work folder's ``kind`` subfolder,
    and where an interrupted pass stopped: the blocks it had done are factorized again, from ``spectra``
    when given, else from their checkpointed factors, and get their refined parameters back before the
    pass resumes at the next one."""
    stream = job.block_stream()
    checkpoints = job.work.blocks(kind, len(stream.blocks)) if job.work is not None else None
    state = _resume(checkpoints, stream.device, job.decomposer)

    def restore(index: int) -> None:
        with torch.no_grad():
            for name, tensor in checkpoints.refined(index).items():
                job.model.get_parameter(name).copy_(tensor)

    _factorize_open_loop(job, state.spectra if spectra is None else spectra, plan, range(state.next_block),
                         restore if checkpoints is not None else None)
    return stream, checkpoints, state


def _factorize_sequential(job: _Job, plan: RankPlan) -> None:
    """Decompose each block again from the statistics of its inputs on the compressed model so far and
    factorize it at the planned rank; each block's cut factors are checkpointed."""
    stream, checkpoints, state = _closed_loop_pass(job, "sequential", plan)
    decomposer = job.decomposer
    by_name = {t.name: t for t in job.targets}

    def factorize_block(run: BlockRun) -> None:
        decomposer.owners.update(run.owners)
        names = [t.name for t in run.targets]
        block_spectra = decomposer.spectra(run)  # the groups this rank owns
        decomposer.share_diagnostics(names)
        if checkpoints is not None:  # only what the plan uses: the factors at the planned rank
            kept = {name: spectrum.leading(plan.ranks[name]) for name, spectrum in block_spectra.items()
                    if plan.ranks[name] != DENSE}
            checkpoints.save_block(run.index, kept, {n: decomposer.diagnostics[n] for n in names}, owners=run.owners)
        for name in list(block_spectra):
            _replace(job.model, by_name[name], block_spectra, plan, job.config.factor_format)
        decomposer.share_layers(names, plan)
        if job.hand_over is not None:
            job.hand_over(stream.block_name(run.index))

    with progress_bar("factorize blocks (closed loop)", total=len(stream.blocks), enabled=job.show_progress) as advance:
        advance(state.next_block)
        if state.next_block < len(stream.blocks):
            stream.run(factorize_block, closed_loop=True, progress=advance, start_block=state.next_block,
                       hidden=state.hidden,
                       on_outputs=checkpoints.save_activations if checkpoints is not None else None)


BlockFit = Callable[[int, nn.Module, Mapping[str, nn.Module], list, list, list], None]


def _factorize_paired(job: _Job, kind: str, plan: RankPlan, fit_block: Callable[[BlockStream], BlockFit],
                      kept: dict[str, Spectrum], spectra: dict[str, Spectrum] | None = None) -> None:
    """The dense and the compressed model side by side (:meth:`BlockStream.run_paired`): ``fit_block``
    (made for the pass's stream) replaces each block's targets, leaving in ``kept`` the factors to
    checkpoint, then ``refine_steps`` of :func:`refine_block` train them when asked. Each block's
    checkpoint holds those factors and the refined parameters, so a rerun resumes at the first block not
    done (done blocks come back from ``spectra`` when given, else from their checkpointed factors). With
    several processes refinement is data parallel."""
    stream, checkpoints, state = _closed_loop_pass(job, kind, plan, spectra)
    model, targets, config, decomposer = job.model, job.targets, job.config, job.decomposer
    refined: dict[str, torch.Tensor] = {}

    def refine(index: int, block: nn.Module, inputs, outputs, kwargs) -> None:
        names = [t.name for t in targets if t.block == index and plan.ranks[t.name] != DENSE]
        report = refine_block(block, [model.get_submodule(name) for name in names], inputs, outputs, kwargs,
                              steps=config.refine_steps, lr=config.refine_lr, seed=config.calibration.seed + index,
                              batches=stream.batch_indices, ranks=decomposer.ranks)
        for name in names:
            decomposer.diagnostics.setdefault(name, {})["refinement"] = report
            refined.update({f"{name}.{key}": p for key, p in model.get_submodule(name).named_parameters()
                            if key != "bias"})

    def block_done(index: int) -> None:
        if checkpoints is not None:
            names = [t.name for t in targets if t.block == index]
            checkpoints.save_block(index, {n: kept[n] for n in names if n in kept},
                                   {n: decomposer.diagnostics.get(n, {}) for n in names}, refined,
                                   owners={n: decomposer.owners[n] for n in names if n in decomposer.owners})
        kept.clear()
        refined.clear()
        if job.hand_over is not None:
            job.hand_over(stream.block_name(index))

    with progress_bar(f"factorize blocks (closed loop, {kind})", total=len(stream.blocks),
                      enabled=job.show_progress) as advance:
        advance(state.next_block)
        if state.next_block < len(stream.blocks):
            stream.run_paired(fit_block(stream), block_done, refine=refine if config.refine_steps else None,
                              progress=advance, start_block=state.next_block, hidden=state.hidden,
                              on_outputs=checkpoints.save_activations if checkpoints is not None else None)


def _factorize_compensating(job: _Job, plan: RankPlan) -> None:
    """Factorize every target by the compensating fit (:meth:`BlockStream.fit_compensating`), group by
    group, in a paired pass (:func:`_factorize_paired`: refined when asked, checkpointed with the cut
    factors). With several processes each group is fitted by the rank owning its statistics, which
    shares the layers."""
    model, config, decomposer = job.model, job.config, job.decomposer
    by_name = {t.name: t for t in job.targets}
    kept: dict[str, Spectrum] = {}

    def factorize_group(_block: int, group: tuple[str, ...], owner: int, statistics: PairedStatistics | None) -> None:
        decomposer.owners.update({name: owner for name in group})
        if statistics is not None:  # this rank owns the group
            group_spectra = decomposer.compensating(statistics, config.compensation, config.anchor)
            kept.update({name: spectrum.leading(plan.ranks[name]) for name, spectrum in group_spectra.items()
                         if plan.ranks[name] != DENSE})
            for name in list(group_spectra):
                _replace(model, by_name[name], group_spectra, plan, config.factor_format)
        decomposer.share_diagnostics(list(group))
        decomposer.share_layers(list(group), plan)

    _factorize_paired(job, "compensate", plan,
                      lambda stream: stream.fit_compensating(factorize_group, dense_gram=config.anchor > 0), kept)


def _factorize_fitted(job: _Job, spectra: dict[str, Spectrum], plan: RankPlan) -> None:
    """Factorize from the ``spectra`` fitted before (open loop, or corrected): refined block by block when
    ``refine_steps`` asks for it, else each block directly."""
    if job.config.refine_steps:
        _factorize_refined(job, spectra, plan)
    else:
        _factorize_open_loop(job, spectra, plan)


def _factorize_refined(job: _Job, spectra: dict[str, Spectrum], plan: RankPlan) -> None:
    """Factorize each block from ``spectra`` (the open-loop or the corrected ones) at the planned ranks,
    then refine its factors towards the dense block's outputs on the compressed path's inputs, in a
    paired pass (:func:`_factorize_paired`); a resumed pass factorizes the blocks done from ``spectra``
    again and puts their refined parameters back."""

    def replace(index: int, *_block_and_streams) -> None:
        _replace_block(job, [t for t in job.targets if t.block == index], spectra, plan)

    _factorize_paired(job, "refine", plan, lambda _stream: replace, {}, spectra)


def _factorize_corrected(job: _Job, spectra: dict[str, Spectrum], plan: RankPlan) -> None:
    """Correct the planned modules' spectra for ``correction_rounds`` rounds (:mod:`rankcut.correction`),
    starting from the open-loop ``spectra``, then factorize from the last round's. Each round's spectra, cut
    at the planned ranks, are checkpointed block by block in the work folder (without one, in a
    temporary folder), so a rerun skips the rounds done and resumes the one it stopped in at its first
    block not done; that round's gradient sweep runs again, and gives the same bits. The gradients wait
    on disk between the sweep and the decomposition pass."""
    config, ranks = job.config, job.decomposer.ranks
    planned = {name: int(rank) for name, rank in plan.ranks.items() if rank != DENSE}
    windows = select_windows(job.calibration, config.correction_windows, config.calibration.seed)
    blocks = len(find_decoder_blocks(job.model)[1])
    with tempfile.TemporaryDirectory(prefix=".rankcut-correct-",
                                     dir=job.work.path if job.work is not None else None) as scratch:
        stream = ModelStream(job.model, job.targets, job.weights, Path(scratch) / "sweep", ranks=ranks)
        gradients = ActivationStore(Path(scratch) / "gradients")
        current: Mapping[str, Spectrum] = spectra
        for round_ in range(1, config.correction_rounds + 1):
            checkpoints = (job.work.blocks(f"correct-{round_}", blocks) if job.work is not None
                           else BlockCheckpoints(Path(scratch) / f"round-{round_}", blocks))
            current = _correction_round(job, stream, current, planned, windows, gradients, checkpoints, round_)
        _factorize_fitted(job, dict(current), plan)


def _correction_round(job: _Job, stream: ModelStream, spectra: Mapping[str, Spectrum], planned: Mapping[str, int],
                      windows: torch.Tensor, gradients: ActivationStore, checkpoints: BlockCheckpoints,
                      round_: int) -> dict[str, Spectrum]:
    """One round: the gradients of the model truncated by ``spectra`` at the ``planned`` ranks, then the
    calibration pass in which each planned module's pulled weight is decomposed under its whitening;
    returns the new spectra (cut at the planned ranks, read from ``checkpoints``)."""
    model, decomposer = job.model, job.decomposer
    state = _resume(checkpoints, stream.device, decomposer)
    corrected = dict(state.spectra)
    passes = job.block_stream()
    if state.next_block == len(passes.blocks):
        return corrected
    label = f"correct, round {round_}/{job.config.correction_rounds}"
    with progress_bar(f"{label}: gradients of the truncated model", total=2 * stream.blocks,
                      enabled=job.show_progress) as advance:
        truncation_gradients(stream, spectra, planned, windows, job.config.calibration.batch_size, gradients,
                             from_block=state.next_block, progress=advance)

    def correct_block(run: BlockRun) -> None:
        decomposer.owners.update(run.owners)
        names = [t.name for t in run.targets]
        block_gradients = gradients.take(run.index, torch.device("cpu"))
        steps, swapped = {}, []
        try:
            for name in (n for n in names if n in planned):
                weight = model.get_submodule(name).weight
                pulled, steps[name] = pulled_weight(weight.detach().cpu(), spectra[name].truncation(planned[name]),
                                                    block_gradients[name], job.config.correction_step)
                swapped.append((weight, weight.data))
                weight.data = pulled.to(dtype=weight.dtype, device=weight.device)
            earlier = {name: decomposer.diagnostics.get(name, {}).get("correction", []) for name in steps}
            local = decomposer.spectra(run)  # the groups this rank owns, decomposed from the pulled weights
        finally:
            for weight, original in swapped:
                weight.data = original
        for name in local:
            if name in steps:
                decomposer.diagnostics[name]["correction"] = earlier[name] + [steps[name]]
        block_spectra = decomposer.share(names, local, full=True)
        kept = {name: spectrum.leading(planned[name]) for name, spectrum in block_spectra.items() if name in planned}
        checkpoints.save_block(run.index, kept, {n: decomposer.diagnostics[n] for n in names}, owners=run.owners)
        corrected.update(checkpoints.stored(run.index)[0])

    with progress_bar(f"{label}: decompose the corrected weights", total=len(passes.blocks),
                      enabled=job.show_progress) as advance:
        advance(state.next_block)
        passes.run(correct_block, progress=advance, start_block=state.next_block, hidden=state.hidden,
                   on_outputs=checkpoints.save_activations)
    return corrected


def _measure(model, targets, budget, plan, dense_params, dense_bytes) -> dict[str, int | float]:
    target_params = sum(_factor_params(model.get_submodule(t.name)) for t in targets)
    if target_params != plan.total_cost:
        raise FactorizationError(f"built model has {target_params} target parameters, the plan says {plan.total_cost}")
    if target_params > budget.target:
        raise FactorizationError(f"built model has {target_params} target parameters, over the budget {budget.target}")
    return {
        "budget": budget.target,
        "target_params": target_params,
        "target_params_dense": budget.dense_total,
        "target_keep_ratio": target_params / budget.dense_total,
        "budget_slack": (budget.target - target_params) / budget.target,
        "model_params_dense": dense_params,
        "model_params": sum(p.numel() for p in model.parameters()),
        "weight_bytes_dense": dense_bytes,
        "weight_bytes": weight_bytes(model),
    }
