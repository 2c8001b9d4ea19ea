"""PivGa: lossless gauge fixing of low-rank factors by pivoting (an interpolative decomposition).

A rank-``k`` factorization ``W_k = A B`` (``A``: ``m x k``, ``B``: ``k x n``) equals ``(A G)(G⁻¹ B)`` for
every invertible ``G``, so ``k²`` of its ``k(m+n)`` numbers are redundant. Choosing ``k`` pivots fixes
``G`` and drops them, without changing ``W_k``:

* **column variant** (pivot columns ``J`` of ``B``): ``W_k = A' [I  T] Pᵀ`` with ``A' = A B[:, J]``
  (``= W_k[:, J]``, ``m x k``) and ``T = B[:, J]⁻¹ B[:, Jc]`` (``k x (n-k)``); forward
  ``y = A' (x_J + T x_Jc)``: one gather of the input, two small matmuls.
* **row variant** (pivot rows ``I`` of ``A``, as in PIFA): ``W_k = P [I; T_r] C`` with ``C = A[I] B``
  (``= W_k[I, :]``, ``k x n``) and ``T_r = A[Ic] A[I]⁻¹`` (``(m-k) x k``); forward ``z = C x``, output
  rows ``I`` get ``z`` and rows ``Ic`` get ``T_r z``: two small matmuls, one gather of the output.

Both store ``k(m+n) - k²`` numbers plus one permutation. Pivots come from column-pivoted QR (rank
revealing), then maxvol swaps pivots until every ``|T| <= 1 + tol``: bounded coefficients make the
cast of ``T`` to float32/bfloat16 cost no more accuracy than the cast of ``W_k`` itself, however
ill-conditioned ``B[:, J]`` is. Everything is computed in float64 on the CPU and cast at the end.

**Rank-deficient factors.** If the pivot block has numerical rank ``r < k`` (pivoted-QR diagonal
``|R_ii| <= max(k, n) · eps64 · |R_00|``, the usual ``matrix_rank`` threshold), the ``r``
independent pivots carry the whole interpolation and the ``k - r`` others are kept verbatim in
``A'`` (or ``C``) with zero rows in ``T``. The result is still exact (up to the dropped ``~eps64``
part), keeps rank ``k`` (so the stored shape matches the rank plan), has no NaN, and reports ``r``
in :attr:`PivGaFactors.effective_rank`; no error is raised. A zero factor gives zero pivots and
``T = 0``. Non-finite factors raise ``ValueError``.

**Variant choice** (``variant="auto"``, :func:`choose_variant`): row variant when ``m <= n``, column
variant when ``m > n``. Both do the same FLOPs and store the same numbers; they differ in the
permutation (``n`` input vs ``m`` output indices) and in moving ``n`` vs ``2m`` elements per token
around the matmuls, which decides prefill speed; decode favours the row variant's fewer ops.

**Precision.** The stored numbers' rounding error is 2-4x that of the plain (balanced SVD) factors
in the same dtype (bfloat16: ~6e-3 vs ~2.4e-3 relative Frobenius; float32: ~1e-7 vs ~4e-8), because
``[I T]`` is far from orthogonal even with ``|T| <= 1`` (spectral norm ~33 for a 576x1536 module at
``k = 144``), so rounding ``A'`` and ``T`` is amplified more than rounding orthogonal SVD factors.
Refitting ``T`` to the rounded ``A'`` did not help (measured). The error stays far below any
truncation error a compressed model carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

Variant = Literal["column", "row"]
VARIANTS: tuple[str, ...] = ("column", "row")
DEFAULT_MAXVOL_TOL = 1e-6


@dataclass(frozen=True)
class PivGaFactors:
    """A gauge-fixed rank-``k`` factorization of an ``m x n`` matrix.

    ``column``: ``pivot`` is ``A'`` (``m x k``), ``coeff`` is ``T`` (``k x (n-k)``), ``perm`` lists the
    ``n`` input columns, pivots ``J`` first: ``W[:, perm] = pivot @ [I, coeff]``.
    ``row``: ``pivot`` is ``C`` (``k x n``), ``coeff`` is ``T_r`` (``(m-k) x k``), ``perm`` lists the
    ``m`` output rows, pivots ``I`` first: ``W[perm, :] = [I; coeff] @ pivot``.
    ``perm`` is int64 on the device of the factors.
    """

    variant: Variant
    pivot: Tensor
    coeff: Tensor
    perm: Tensor
    effective_rank: int

    @property
    def rank(self) -> int:
        return self.pivot.shape[1] if self.variant == "column" else self.pivot.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the represented matrix."""
        if self.variant == "column":
            return self.pivot.shape[0], self.perm.numel()
        return self.perm.numel(), self.pivot.shape[1]

    @property
    def num_parameters(self) -> int:
        """Stored numbers (the permutation excluded): ``k(m+n) - k²``."""
        return self.pivot.numel() + self.coeff.numel()

    def dense(self) -> Tensor:
        """The ``m x n`` matrix these factors represent (for checks, not for inference)."""
        identity = torch.eye(self.rank, dtype=self.pivot.dtype, device=self.pivot.device)
        dense = torch.empty(self.shape, dtype=self.pivot.dtype, device=self.pivot.device)
        if self.variant == "column":
            dense[:, self.perm] = self.pivot @ torch.cat([identity, self.coeff], dim=1)
        else:
            dense[self.perm, :] = torch.cat([identity, self.coeff], dim=0) @ self.pivot
        return dense


def choose_variant(out_features: int, in_features: int) -> Variant:
    """The variant ``variant="auto"`` picks: ``"row"`` when ``out <= in``, ``"column"`` when ``out > in``.

    Measured (float32, one thread, SmolLM2-135M and Gemma-3-270M shapes at 25/50/75 % rank,
    interleaved repeats; ``benchmarks/pivga_layers.py`` reports the same comparison):

    * prefill (512 tokens) is decided by the permutation traffic: column gathers the ``in``-wide
      input, row concatenates and gathers the ``out``-wide output. Tall modules: column faster by
      13-64 % (2048x640, k=160: 15.9 vs 30.8 ms); wide modules: row faster by 18-52 % (640x2048,
      k=160: 10.6 vs 22.3 ms); square modules tie within noise.
    * decode (1 token) is dominated by per-op overhead: row was faster in 27/27 cases, by 4-25 %
      (5-30 µs), including the tall modules where the rule picks column.

    Row therefore wins or ties both regimes for ``out <= in``; for ``out > in`` the prefill gain
    outweighs the small decode loss. The rank did not change the winner, so it is not an input.
    With two threads (``benchmarks/results/pivga_layers.md``) the winners at these widths are the
    same. At LLaMA-7B widths decode still favours row (11 of 12 cases) and prefill mostly differs by a
    few percent either way; the two large gaps are 11008x4096 at k=2985 (column 269 vs row 410 ms, the
    rule's pick) and 4096x4096 at k=2047 (column 119 vs row 136 ms, against it).
    """
    return "row" if out_features <= in_features else "column"


def pivga_factors(
    a: Tensor,
    b: Tensor,
    *,
    variant: Variant | Literal["auto"] = "auto",
    maxvol: bool = True,
    maxvol_tol: float = DEFAULT_MAXVOL_TOL,
    dtype: torch.dtype | None = None,
) -> PivGaFactors:
    """Gauge-fix the factors ``a`` (``m x k``) and ``b`` (``k x n``) of ``W_k = a @ b``.

    Exact: ``result.dense()`` equals ``a @ b`` up to rounding to ``dtype`` (default: ``a.dtype``).
    ``maxvol=False`` keeps the pivoted-QR pivots (``|T|`` then typically reaches 1.1-1.4; the QR alone
    bounds it only by ``~2^k``).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"expected factors of shapes (m, k) and (k, n), got {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[1]
    if not 0 < k <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m} x {n} matrix, got {k}")
    if variant == "auto":
        variant = choose_variant(m, n)
    if variant not in VARIANTS:
        raise ValueError(f"unknown PivGa variant {variant!r}; expected 'auto' or one of {VARIANTS}")
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise ValueError("the factors contain NaN or infinite values")

    if variant == "column":
        perm, coeff, effective_rank = interpolative_decomposition(b64, maxvol=maxvol, maxvol_tol=maxvol_tol)
        pivot = a64 @ b64[:, perm[:k]]
    else:
        perm, coeff_t, effective_rank = interpolative_decomposition(a64.T, maxvol=maxvol, maxvol_tol=maxvol_tol)
        coeff = coeff_t.T
        pivot = a64[perm[:k]] @ b64
    if not (torch.isfinite(pivot).all() and torch.isfinite(coeff).all()):
        raise ValueError("gauge fixing overflowed; the factors are too badly scaled for float64")
    target = {"dtype": dtype or a.dtype, "device": a.device}
    return PivGaFactors(
        variant=variant,
        pivot=pivot.to(**target).contiguous(),
        coeff=coeff.to(**target).contiguous(),
        perm=perm.to(a.device),
        effective_rank=effective_rank,
    )


def interpolative_decomposition(
    b: Tensor, *, maxvol: bool = True, maxvol_tol: float = DEFAULT_MAXVOL_TOL
) -> tuple[Tensor, Tensor, int]:
    """Column interpolative decomposition of a ``k x n`` float64 matrix, ``k <= n``.

    Returns ``(perm, coeff, effective_rank)`` with ``b[:, perm[k:]] == b[:, perm[:k]] @ coeff``
    (``coeff``: ``k x (n-k)``). Rows of ``coeff`` beyond the effective rank are zero (module doc).
    """
    k, n = b.shape
    r_factor, qr_perm = scipy.linalg.qr(b.numpy(), mode="r", pivoting=True, check_finite=False)
    diagonal = np.abs(np.diag(r_factor))
    negligible = diagonal <= max(k, n) * np.finfo(np.float64).eps * diagonal[0]
    effective_rank = int(np.argmax(negligible)) if negligible.any() else k
    r11 = torch.from_numpy(r_factor[:effective_rank, :effective_rank])
    r12 = torch.from_numpy(r_factor[:effective_rank, effective_rank:])
    coeff = torch.linalg.solve_triangular(r11, r12, upper=True)  # B[:, J]⁻¹ B[:, Jc] = R11⁻¹ R12
    perm = torch.from_numpy(qr_perm).long()
    if maxvol:
        coeff, perm, _ = maxvol_refine(coeff, perm, tol=maxvol_tol)
    # The k - r surplus pivots (the first non-pivot columns) are stored verbatim: zero coefficients.
    full_coeff = torch.zeros(k, n - k, dtype=torch.float64)
    full_coeff[:effective_rank] = coeff[:, k - effective_rank :]
    return perm, full_coeff, effective_rank


def maxvol_refine(
    coeff: Tensor, perm: Tensor, *, tol: float = DEFAULT_MAXVOL_TOL, max_swaps: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """Swap pivots until every ``|coeff| <= 1 + tol`` (a dominant, locally maximal-volume pivot set).

    ``coeff`` (``r x (n-r)``, float64) interpolates the columns ``perm[r:]`` from the pivots
    ``perm[:r]``. Each swap of pivot ``i`` with column ``j`` where ``|coeff[i, j]| > 1 + tol`` grows
    ``|det B[:, J]|`` by that factor and updates ``coeff`` by a rank-one (Gauss-Jordan) step, so the
    loop terminates; it stops after ``max_swaps`` (default ``4r + 100``) anyway, which leaves a valid,
    exact decomposition with a looser bound. Returns new ``(coeff, perm, swaps)``.
    """
    coeff, perm = coeff.clone(memory_format=torch.contiguous_format), perm.clone()
    rank, others = coeff.shape
    if rank == 0 or others == 0:
        return coeff, perm, 0
    max_swaps = 4 * rank + 100 if max_swaps is None else max_swaps
    flat = coeff.view(-1)
    swaps = 0
    while swaps < max_swaps:
        largest, smallest = int(torch.argmax(flat)), int(torch.argmin(flat))  # no |coeff| temporary
        i, j = divmod(largest if flat[largest] >= -flat[smallest] else smallest, others)
        pivot = float(coeff[i, j])
        if abs(pivot) <= 1.0 + tol:
            break
        # Column j enters the pivots at position i; the leaving pivot's column is the unit vector e_i.
        entering = coeff[:, j].clone()
        entering[i] -= 1.0
        coeff[:, j] = 0.0
        coeff[i, j] = 1.0
        coeff.addr_(entering, coeff[i].clone(), alpha=-1.0 / pivot)
        perm[[i, rank + j]] = perm[[rank + j, i]]
        swaps += 1
    return coeff, perm, swaps
