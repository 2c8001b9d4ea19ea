"""Checkpoints of a compression run, so that a run stopped at any point resumes where it stopped.

A work folder holds::

    run.json                        what the run is: settings, model fingerprint, calibration hash
    lock                            flock-ed while a process uses the folder
    spectra/block-NNNN.safetensors  open-loop pass: u, sigma, b_full per module of block N, and the
                                    block's whitening diagnostics (JSON, in the file's metadata)
    spectra/activations-P.safetensors the inputs of the next block to run and its index (metadata; P
                                    its parity: the state one block back stays, so the ranks of a
                                    distributed run can resume at the block they all reached); no
                                    tensors once every block is done (folders made before this pair
                                    hold one activations.safetensors, which is read too)
    plan.json                       the rank plan, once allocated
    sequential/..., compensate/...  the closed-loop factorize pass, laid out like spectra/ (factors
    refine/...                      cut to the planned ranks, none for refine/, which factorizes from
                                    the fitted spectra; refined parameters; the paired passes'
                                    activations hold the dense path's batches, then the compressed
                                    path's)
    allocator/                      free for the allocator's own checkpoints (AllocationContext.work_dir)
    sweep/block-NNNN.safetensors    each block's saved inputs while a streamed allocator's gradient sweep
                                    runs (rankcut.sweep); each file is deleted once read back

Every file is written under a temporary name and moved into place with ``os.replace``, so a process
killed at any moment leaves the previous or the next consistent state, never a half-written file.
Checkpoints hold exact copies of the tensors, so a resumed run gives a bit-identical result on the
same device. They survive a killed process, not a power cut (files are not fsync-ed).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import ResidentWeights
from .decomposition import RemoteSpectrum, Spectrum
from .errors import ConfigError, RankcutError
from .plan import RankPlan
from .targets import TargetModule

WORKDIR_FORMAT = 1
RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
LOCK_FILE = "lock"
ACTIVATIONS = "activations-{parity}.safetensors"
LEGACY_ACTIVATIONS = "activations.safetensors"  # the one file of folders made before the parity pair (fba9bd0)
REFINED = "refined:"  # key prefix of a block checkpoint's refined parameters


def is_disk_full(error: BaseException) -> bool:
    """True for "no space left on device", also when safetensors wraps the OS error in its own type."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(error) or "StorageFull" in str(error)


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def run_record(settings: Mapping[str, Any], model: nn.Module, weights: ResidentWeights,
               targets: Sequence[TargetModule], calibration: torch.Tensor | None) -> dict[str, Any]:
    """What makes two runs the same: settings, model (config + a few target weights), calibration ids."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    digest = hashlib.sha256()
    for target in {t.name: t for t in (targets[0], targets[len(targets) // 2], targets[-1])}.values():
        digest.update(target.name.encode())
        _hash_tensor(digest, weights.tensor(f"{target.name}.weight"))
    ids = None
    if calibration is not None:
        ids_digest = hashlib.sha256()
        _hash_tensor(ids_digest, calibration)
        ids = ids_digest.hexdigest()
    record = {
        "format": WORKDIR_FORMAT,
        "settings": dict(settings),
        "model": {"class": type(model).__name__,
                  "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
                  "weights_sha256": digest.hexdigest()},
        "calibration_sha256": ids,
    }
    return json.loads(json.dumps(record, default=str))  # the form it takes in run.json (lists, not tuples)


def record_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two run records (:func:`run_record`) differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [difference for key in sorted(set(saved) | set(current), key=str)
                for difference in record_differences(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def write_atomically(path: Path, write: Callable[[Path], None], *, what: str = "file",
                     elsewhere: str = "choose another folder", unique: bool = False) -> None:
    """Call ``write`` on a temporary file next to ``path``, then move it into place with ``os.replace``:
    a reader (or a process killed meanwhile) sees the previous file or the whole new one, never a
    partial one. On failure the temporary file is removed, the previous file (or none) stays, and the
    :class:`RankcutError` says what was being written (``what``: "checkpoint", "cache", ...) and what
    else to try (``elsewhere``: "pass another --work-dir", ...).

    The temporary file is ``.NAME.tmp``. With ``unique`` it is ``.NAME.PID.tmp``: for files that several
    processes may write at once (a shared cache), so no writer writes into, or moves, another's
    half-written temporary; the last ``os.replace`` wins. Work folders are locked to one process, so
    they use the fixed name (a leftover of a killed run is simply overwritten).
    """
    suffix = f".{os.getpid()}.tmp" if unique else ".tmp"
    temporary = path.with_name(f".{path.name}{suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except (OSError, SafetensorError) as error:
        temporary.unlink(missing_ok=True)
        hint = "the disk is full: free some space" if is_disk_full(error) else "check the folder"
        raise RankcutError(f"could not write the {what} {path} ({error}); {hint} or {elsewhere}") from error


def write_json(path: Path, data: Any, *, indent: int | None = 2, what: str = "file",
               elsewhere: str = "choose another folder", unique: bool = False) -> None:
    """``data`` as JSON, written atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=indent)),
                     what=what, elsewhere=elsewhere, unique=unique)


def _write_checkpoint(path: Path, write: Callable[[Path], None]) -> None:
    write_atomically(path, write, what="checkpoint", elsewhere="pass another --work-dir")


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, what="checkpoint", elsewhere="pass another --work-dir")


def _unreadable(path: Path, error: Exception) -> RankcutError:
    return RankcutError(f"checkpoint {path} is unreadable ({error}); delete the work folder it is in to start over")


@dataclass
class Resumed:
    """Where a pass over the blocks stands: the next block, its inputs, and what the blocks before it gave."""

    next_block: int = 0
    hidden: list[torch.Tensor] | None = None  # inputs of next_block, one tensor per batch
    spectra: dict[str, Spectrum] = field(default_factory=dict)
    diagnostics: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)  # module -> rank that decomposed it


class BlockCheckpoints:
    """One pass over the decoder blocks: spectra per block and the activations entering the next."""

    def __init__(self, folder: Path, blocks: int) -> None:
        self.folder, self.blocks = folder, blocks
        folder.mkdir(exist_ok=True)

    def _block_file(self, index: int) -> Path:
        return self.folder / f"block-{index:04d}.safetensors"

    def save_block(self, index: int, spectra: Mapping[str, Spectrum], diagnostics: Mapping[str, dict],
                   refined: Mapping[str, torch.Tensor] | None = None, owners: Mapping[str, int] | None = None) -> None:
        """The block's spectra (of a :class:`RemoteSpectrum`, only its singular values) and diagnostics;
        ``refined``: parameters (by full name) trained after the factors were cut, which a resumed run
        puts back (:meth:`refined`); ``owners``: the rank that decomposed each module (several processes)."""
        tensors = {f"{REFINED}{name}": t.detach().contiguous() for name, t in (refined or {}).items()}
        for name, spectrum in spectra.items():
            tensors[f"{name}/sigma"] = spectrum.sigma.contiguous()
            if not isinstance(spectrum, RemoteSpectrum):
                tensors.update({f"{name}/u": spectrum.u.contiguous(), f"{name}/b_full": spectrum.b_full.contiguous()})
        remote = {name: s.owner for name, s in spectra.items() if isinstance(s, RemoteSpectrum)}
        metadata = {"block": str(index), "modules": json.dumps(list(spectra)),  # forward order
                    "diagnostics": json.dumps(dict(diagnostics)), "remote": json.dumps(remote),
                    "owners": json.dumps(dict(owners or {}))}
        _write_checkpoint(self._block_file(index), lambda path: save_file(tensors, path, metadata))

    def save_activations(self, next_block: int, hidden: Sequence[torch.Tensor]) -> None:
        """Record that blocks before ``next_block`` are done; keep ``hidden`` only if a block remains."""
        tensors = {f"batch.{i}": h.contiguous() for i, h in enumerate(hidden)} if next_block < self.blocks else {}
        _write_checkpoint(self._activations(next_block),
                          lambda path: save_file(tensors, path, {"next_block": str(next_block)}))

    def _activations(self, next_block: int) -> Path:
        return self.folder / ACTIVATIONS.format(parity=next_block % 2)

    def stored(self, index: int) -> tuple[dict[str, "StoredSpectrum"], dict[str, dict[str, Any]]]:
        """Block ``index``'s spectra with only ``sigma`` in memory (``u`` and ``b_full`` are read from the
        file when used), and its whitening diagnostics."""
        return self._stored(index)[:2]

    def _stored(self, index: int) -> tuple[dict[str, Spectrum], dict[str, dict[str, Any]], dict[str, int]]:
        path = self._block_file(index)
        try:
            with safe_open(path, "pt") as handle:
                metadata = handle.metadata()
                names = json.loads(metadata["modules"])
                remote = json.loads(metadata.get("remote", "{}"))
                spectra = {name: RemoteSpectrum(handle.get_tensor(f"{name}/sigma").clone(), remote[name])
                           if name in remote else StoredSpectrum(path, name, handle.get_tensor(f"{name}/sigma").clone())
                           for name in names}
                return spectra, json.loads(metadata["diagnostics"]), json.loads(metadata.get("owners", "{}"))
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as error:
            raise _unreadable(path, error) from error

    def refined(self, index: int) -> dict[str, torch.Tensor]:
        """The refined parameters saved with block ``index`` (empty when it was not refined)."""
        path = self._block_file(index)
        try:
            with safe_open(path, "pt") as handle:
                return {key[len(REFINED):]: handle.get_tensor(key).clone() for key in handle.keys()
                        if key.startswith(REFINED)}
        except (OSError, SafetensorError) as error:
            raise _unreadable(path, error) from error

    def resume(self, device: torch.device, agree: Callable[[int], int] = lambda next_block: next_block) -> Resumed:
        """The saved state, or a fresh start. Tensors are copied into torch's own (aligned) memory so
        kernels take the same paths, and give the same bits, as in an uninterrupted run. ``agree`` turns
        the block this folder reached into the one every process of the run reached (the smallest); the
        state one block back is kept for that."""
        saved = {}
        for name in (LEGACY_ACTIVATIONS, *(ACTIVATIONS.format(parity=parity) for parity in (0, 1))):
            path = self.folder / name
            if path.is_file():
                try:
                    with safe_open(path, "pt") as handle:
                        saved[int(handle.metadata()["next_block"])] = path
                except (OSError, SafetensorError, KeyError, ValueError, TypeError) as error:
                    raise _unreadable(path, error) from error
        next_block = agree(max(saved, default=0))
        state = Resumed(next_block)
        if next_block == 0:
            return state
        if next_block not in saved:
            raise RankcutError(f"{self.folder} holds no activations for block {next_block}, where the other processes "
                               "of this run stopped; delete the work folders to start over")
        try:
            with safe_open(saved[next_block], "pt") as handle:
                if next_block < self.blocks:
                    state.hidden = [handle.get_tensor(f"batch.{i}").to(device, copy=True)
                                    for i in range(len(list(handle.keys())))]
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as error:
            raise _unreadable(saved[next_block], error) from error
        for index in range(next_block):
            spectra, diagnostics, owners = self._stored(index)
            state.spectra.update(spectra)
            state.diagnostics.update(diagnostics)
            state.owners.update(owners)
        return state


class StoredSpectrum(Spectrum):
    """A spectrum in a block checkpoint: ``sigma`` held, ``u`` and ``b_full`` read from the file at each
    use, so allocators that read only singular values, and factorization one block at a time, never
    hold every module's factors at once."""

    def __init__(self, path: Path, name: str, sigma: torch.Tensor) -> None:  # noqa: D107 (no dataclass init)
        self.path, self.name, self.sigma = path, name, sigma

    def _read(self, part: str) -> torch.Tensor:
        try:
            with safe_open(self.path, "pt") as handle:
                return handle.get_tensor(f"{self.name}/{part}").clone()
        except (OSError, SafetensorError) as error:
            raise _unreadable(self.path, error) from error

    @property
    def u(self) -> torch.Tensor:  # type: ignore[override]
        return self._read("u")

    @property
    def b_full(self) -> torch.Tensor:  # type: ignore[override]
        return self._read("b_full")


class WorkDir:
    """A run's work folder, locked while in use. Refuses a folder left by a different run."""

    def __init__(self, path: Path, lock: Any) -> None:
        self.path, self._lock = path, lock

    @classmethod
    def open(cls, path: str | os.PathLike, record: Mapping[str, Any]) -> "WorkDir":
        """Create ``path`` or resume from it. ``record`` comes from :func:`run_record`."""
        path = Path(path)
        retry = "delete it or pass another --work-dir"
        if path.exists() and not path.is_dir():
            raise ConfigError(f"work folder {path} is a file; {retry}")
        run_file = path / RUN_FILE
        # a run killed before writing run.json leaves at most these behind
        if path.is_dir() and not run_file.is_file() and any(p.name not in {LOCK_FILE, f".{RUN_FILE}.tmp"}
                                                              for p in path.iterdir()):
            raise ConfigError(f"{path} is not empty and is not a rankcut work folder (no {RUN_FILE}); {retry}")
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = (path / LOCK_FILE).open("a")
        except OSError as error:
            raise ConfigError(f"cannot use {path} as a work folder ({error}); pass another --work-dir") from error
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ConfigError(f"work folder {path} is in use by another rankcut process; wait for it or pass "
                              "another --work-dir") from None
        work = cls(path, lock)
        try:
            if run_file.is_file():
                work._check_same_run(run_file, record)
            else:
                _write_json(run_file, record)
        except BaseException:
            work.close()
            raise
        return work

    @staticmethod
    def _check_same_run(run_file: Path, record: Mapping[str, Any]) -> None:
        try:
            saved = json.loads(run_file.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{run_file} is unreadable ({error}); delete {run_file.parent} or pass "
                              "another --work-dir") from error
        different = record_differences(saved, dict(record))
        if different:
            raise ConfigError(
                f"work folder {run_file.parent} was made by a different run (it differs in "
                f"{', '.join(different[:6])}); delete it or pass another --work-dir"
            )

    def close(self) -> None:
        self._lock.close()  # releases the flock

    def __enter__(self) -> "WorkDir":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def blocks(self, stage: str, count: int) -> BlockCheckpoints:
        """Checkpoints of one pass (``spectra``, ``sequential``, ``compensate``, ``refine``, ``correct-N``) over
        ``count`` decoder blocks."""
        return BlockCheckpoints(self.path / stage, count)

    @property
    def allocator_dir(self) -> Path:
        folder = self.path / "allocator"
        folder.mkdir(exist_ok=True)
        return folder

    def save_plan(self, plan: RankPlan) -> None:
        _write_json(self.path / PLAN_FILE, plan.to_dict())

    def load_plan(self) -> RankPlan | None:
        path = self.path / PLAN_FILE
        if not path.is_file():
            return None
        try:
            return RankPlan.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise _unreadable(path, error) from error
