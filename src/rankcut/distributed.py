"""The processes of one compression run (``torch.distributed``, launched by ``torchrun``), or one alone.

:class:`Ranks` is this process's place among them and the few collectives the pipeline uses. One
process is the world of size one: every collective is then the identity, so a single process runs the
very same code path. What the ranks share, and how:

- calibration batches are dealt round-robin (batch ``b`` to rank ``b mod N``); each batch's Gram goes to
  the rank that owns its input group (:meth:`gather`), which adds them in batch order, so the sums are
  bit-identical whatever ``N``;
- input groups are owned by the rank with the least SVD work so far (:meth:`assign`);
- decompositions and factorized layers travel from their owner to every rank (:meth:`broadcast_tensors`);
- the allocators' gradients and losses are averaged over the ranks' windows (:meth:`all_reduce`).

A collective that fails (a rank died, a connection closed, a timeout) raises :class:`RankcutError`
naming this rank and what it was doing.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError, RankcutError

DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)  # a rank may wait this long for another's largest SVD


@dataclass
class Ranks:
    """Rank and world size of this process, with the collectives over all ranks (identity when alone)."""

    rank: int = 0
    world_size: int = 1
    in_group: bool = False  # a process group is initialized (a world of one under torchrun included)
    loads: list[float] = field(init=False)  # SVD work assigned to each rank so far (:meth:`assign`)

    def __post_init__(self) -> None:
        self.loads = [0.0] * self.world_size

    @classmethod
    def current(cls) -> "Ranks":
        """The default process group's ranks when one is initialized, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), in_group=True)
        return cls()

    @property
    def distributed(self) -> bool:
        """Whether the collectives run (through the process group), else they are the identity."""
        return self.in_group

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes the artifact and reports."""
        return self.rank == 0

    def batch_indices(self, count: int) -> list[int]:
        """The calibration batches this rank runs, of ``count``: every ``world_size``-th from its rank."""
        if count < self.world_size:
            raise ConfigError(f"{count} calibration batch(es) cannot be shared by {self.world_size} processes; "
                              "use more samples, a smaller batch size, or fewer processes")
        return list(range(self.rank, count, self.world_size))

    def window_share(self, count: int, what: str = "the allocator's batch") -> slice:
        """This rank's contiguous share of ``count`` windows (the allocators' data parallelism)."""
        if count < self.world_size:
            raise ConfigError(f"{what} of {count} window(s) cannot be shared by {self.world_size} processes; "
                              "give it at least one window per process (a larger batch_size)")
        return slice(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def assign(self, groups: Sequence[Sequence[str]], shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        """Owner ranks of input groups: each group, largest SVD work first, goes to the rank with the
        least work so far (the same on every rank: it depends on shapes alone)."""
        def work(group: Sequence[str]) -> float:
            return float(sum(m * n * min(m, n) for m, n in (shapes[name] for name in group)))

        owners: dict[str, int] = {}
        for group in sorted(groups, key=lambda g: (-work(g), g[0])):
            owner = min(range(self.world_size), key=lambda r: (self.loads[r], r))
            self.loads[owner] += work(group)
            owners.update({name: owner for name in group})
        return owners

    def gather(self, tensor: torch.Tensor, owner: int, what: str) -> list[torch.Tensor] | None:
        """Every rank's ``tensor`` (same shape everywhere) at ``owner``, in rank order, on the
        communication device; None elsewhere."""
        if not self.distributed:
            return [tensor]
        tensor = tensor.to(self._device()).contiguous()
        received = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.rank == owner else None
        self._call(what, dist.gather, tensor, received, dst=owner)
        return received

    def broadcast_tensors(self, tensors: Mapping[str, torch.Tensor] | None, owner: int, what: str,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``owner``'s named tensors on every rank (received ones on ``device``): names, shapes and dtypes
        first, then each tensor."""
        if not self.distributed:
            return dict(tensors or {})
        header = [[(name, tuple(t.shape), t.dtype) for name, t in tensors.items()] if self.rank == owner else None]
        self._call(what, dist.broadcast_object_list, header, src=owner)
        out = {}
        for name, shape, dtype in header[0]:
            if self.rank == owner:
                self._call(what, dist.broadcast, tensors[name].to(self._device()).contiguous(), src=owner)
                out[name] = tensors[name]
            else:
                tensor = torch.empty(shape, dtype=dtype, device=self._device())
                self._call(what, dist.broadcast, tensor, src=owner)
                out[name] = tensor.to(device)
        return out

    def broadcast_object(self, value: Any, owner: int, what: str) -> Any:
        """``owner``'s picklable ``value`` (internal messages only, never files) on every rank."""
        if not self.distributed:
            return value
        box = [value if self.rank == owner else None]
        self._call(what, dist.broadcast_object_list, box, src=owner)
        return box[0]

    def all_gather_object(self, value: Any, what: str) -> list[Any]:
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        self._call(what, dist.all_gather_object, values, value)
        return values

    def all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (on ``tensor``'s device)."""
        if not self.distributed:
            return tensor
        total = tensor.to(self._device())
        self._call(what, dist.all_reduce, total)
        return total.to(tensor.device)

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here."""
        self.all_min(0, what)

    def all_min(self, value: int, what: str) -> int:
        """The smallest ``value`` over the ranks."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._device())
        self._call(what, dist.all_reduce, tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def check_same(self, record: Mapping[str, Any], what: str,
                   differences: Callable[[Any, Any], list[str]]) -> None:
        """Refuse ranks that disagree on ``record`` (settings, model, calibration data): each rank
        raises naming the ranks that differ from rank 0 and in what (``differences(a, b)``: the keys)."""
        if not self.distributed:
            return
        records = self.all_gather_object(dict(record), f"comparing {what}")
        different = {rank: differences(records[0], other) for rank, other in enumerate(records)}
        different = {rank: fields for rank, fields in different.items() if fields}
        if different:
            listed = "; ".join(f"rank {rank} differs from rank 0 in {', '.join(fields[:4])}"
                               for rank, fields in different.items())
            raise ConfigError(f"the processes of this run disagree on {what}: {listed}; start every rank with the "
                              "same command, model and data")

    def _device(self) -> torch.device:
        """Where collectives run: the current GPU under NCCL, the host under gloo."""
        backend = dist.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _call(self, what: str, collective, *args, **kwargs) -> Any:
        try:
            return collective(*args, **kwargs)
        except (RuntimeError, dist.DistError) as error:
            raise RankcutError(f"rank {self.rank} of {self.world_size}: the processes lost contact while {what} "
                               f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); another "
                               "rank has died or stalled (its own error names it). Rerun the same command: "
                               "it resumes from the work folders") from error


def init_from_environment(device: torch.device, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Ranks:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...): NCCL on CUDA, gloo on CPU. A world of one joins too, so its collectives run
    through the backend (what ``benchmarks/gpu_check.sh`` checks of NCCL on one GPU). Without
    ``WORLD_SIZE``, alone: nothing to join."""
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return Ranks.current()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    atexit.register(dist.destroy_process_group)
    return Ranks.current()
