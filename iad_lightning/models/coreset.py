"""Approximate greedy coreset subsampling of the PatchCore memory bank (paper Alg. 1).

Follows the official `patchcore.sampler.ApproximateGreedyCoresetSampler`:

1. random projection psi: bias-free ``Linear(D -> 128)`` with PyTorch's default init
   (uniform in +-1/sqrt(D)), used only for selection;
2. 10 random starting points (without replacement); every point's initial min-distance is its
   **mean** Euclidean distance to them (the starts are *not* added to the coreset);
3. ``int(N * ratio)`` times: m_i = argmax_n min-distance(n), then
   min-distance = min(min-distance, ||psi(x) - psi(m_i)||), distances computed as
   sqrt(clamp(|a|^2 - 2ab + |b|^2, 0));
4. the caller keeps the original full-dimensional features at the returned indices.

RNG: the projection and the starting points come from a seeded ``torch.Generator`` (CPU), not
from the global torch / numpy RNGs of the official code, so banks are deterministic for a seed
but not bit-identical to the official ones; the algorithm is the same.

Two implementations of step 3 select the same points (``method=``; ``"auto"``, the default,
takes ``"deferred"`` on CPU for N >= 16384 and p <= 0.5, ``"plain"`` otherwise):

``"plain"``: one (N, 128) mat-vec per selected point. The projection is stored column-major
(faster MKL gemv), squared norms are computed once, the loop keeps squared min-distances (no
per-step sqrt), writes into preallocated buffers and never syncs with the host (on CUDA it is
launch-bound, ~7 small kernels per step). On CPU it is memory-bound: ~16 ms per step for
N = 250,880, i.e. ~400 s for MVTec screw (Lite0) at p = 0.1 on a shared 2-core Xeon (2.5 GHz).

``"deferred"`` (CPU): exact lazy evaluation of the same loop. Only the *argmax* of the
min-distances must be exact at every step, and a min-distance only ever decreases, so the updates
of points that cannot be the argmax can wait:

* a phase starts from exact min-distances m: tau = the ``candidates``-th largest m (1024) and
  S = {m >= tau}; every point outside S has m < tau;
* within the phase the greedy loop runs on S only (a |S| x 128 mat-vec per step). While
  max_S m >= tau, the argmax over S is the global argmax (S is kept in index order, so ties go to
  the lowest index as with ``torch.argmax``); the phase ends when it drops below tau (on real
  features after ~600 steps);
* the L centres of the phase are then applied to all N points at once: one compute-bound
  (N, 128) x (128, L) GEMM on the projection itself (its column-major view, no copy) estimates
  every pair's |c|^2 - 2 x.c. A pair can lower m(x) only if that estimate is below
  m(x) - |x|^2 plus a rounding margin (a bound on the errors of the GEMM and of the exact
  arithmetic, ~3e-4 max|x|^2; see ``_apply_centres``), which keeps ~0.1-0.2 % of the pairs on
  real features; these are recomputed with the plain loop's exact arithmetic (a mat-vec against
  each centre over its gathered points, in blocks of ``_PAIR_BLOCK`` pairs) and min-reduced into
  m, exactly as the plain loop would have.

The work is the same N x 128 multiply-adds per selected point, but as a GEMM at ~80 GFLOP/s
instead of a memory-bound gemv at ~2-3 GFLOP/s. ``bench/coreset.py`` on real Lite0 patch features
of MVTec screw (N = 250,880 x 1024), shared 2-core Xeon 2.5 GHz: p = 0.1 takes 25-39 s instead of
211-359 s (8-9x), p = 0.01 4.5 s instead of 36 s (8x); the selections are identical. Its small
mat-vecs run single-threaded (on a busy box an OpenMP team makes each ~100x slower); only the
filter GEMM uses the caller's thread count.

Exactness: every distance that enters a min-distance is computed by both paths with the same
MKL gemv on a column-major matrix whose row count is a multiple of 64 (the plain loop pads N;
gathered groups are padded). MKL's sgemv gives a row the same bits whatever the other rows, the
row count and the thread count, except in the < 16 tail rows of a call (other instructions),
hence the padding; ``_gemv_rows_are_independent`` re-checks this on the actual data before the
deferred path runs and falls back to the plain loop (with a warning) if it does not hold. So the
selection equals the plain loop's index by index, exact ties included (both take the lowest index
among equal values): "up to floating-point ties" only in that this rests on the BLAS property
above. Finite features are assumed (with NaN/inf rows the two orders are undefined).

Rejected after measuring on the real features: triangle-inequality pruning with k-means blocks
(centre/radius bounds in the 128-d projection, also per point and in a PCA subspace): patch
features are not clustered enough in 128-d (block radii ~ nearest-neighbour distances), 45-75 %
of the (block, centre) pairs stayed active. Letting low-m points sleep through phases ("dormant"
points caught up only when tau nears them) saved ~30 % of the pairs but lost it again in gathers
and small GEMMs.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

# Row counts handed to gemv are multiples of this (MKL computes the < 16 tail rows of a call with
# other instructions, hence other roundings; 64 covers AVX2 / AVX-512 kernels).
_ROW_ALIGN = 64
# Below this many rows the plain loop is fast anyway (and S would be most of the data).
_DEFERRED_MIN_ROWS = 16384
# Rows on which _gemv_rows_are_independent checks the BLAS property (a random subset above it).
_CHECK_ROWS = 1 << 18
# Pairs recomputed exactly at a time by the deferred loop (gathered rows: (this + 64 L) x d floats,
# ~160 MB at d = 128): bounds its memory when many pairs pass the filter (e.g. on white noise).
_PAIR_BLOCK = 1 << 18


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _project(
    features: Tensor, weight: Tensor | None, device: torch.device, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """psi(x) for all rows, built chunk by chunk on ``device``; also returns |psi(x)|^2.

    The projection is stored transposed, (d, N_pad) contiguous with zero columns up to a multiple
    of ``_ROW_ALIGN``: the per-iteration mat-vec then reads it column-major, which MKL's gemv runs
    markedly faster than the row-major layout on CPU.
    """
    n = features.shape[0]
    dim = weight.shape[0] if weight is not None else features.shape[1]
    n_pad = _round_up(n, _ROW_ALIGN)
    projected_t = torch.zeros(dim, n_pad, dtype=torch.float32, device=device)
    sq_norms = torch.zeros(n_pad, dtype=torch.float32, device=device)
    for start in range(0, n, chunk_size):
        chunk = features[start : start + chunk_size].to(device=device, dtype=torch.float32)
        if weight is not None:
            chunk = chunk @ weight.t()  # psi(x) = W x, no bias
        projected_t[:, start : start + chunk.shape[0]] = chunk.t()
        sq_norms[start : start + chunk.shape[0]] = (chunk * chunk).sum(1)  # |a|^2
    return projected_t, sq_norms


@torch.no_grad()
def approximate_greedy_coreset(
    features: Tensor,
    ratio: float,
    projection_dim: int | None = 128,
    num_starts: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
    chunk_size: int = 65536,
    method: str = "auto",
    candidates: int = 1024,
) -> Tensor:
    """Indices of an approximate greedy (k-center) coreset of ``features``.

    Args:
        features: (N, D) patch features, on any device (CPU for millions of rows is fine: only
            the (N, projection_dim) projection and the (N,) min-distances live on ``device``).
        ratio: coreset fraction p; the coreset has ``int(N * p)`` rows; ``p >= 1`` keeps all rows.
        projection_dim: dimension of the random projection (128 officially); ``None`` or a value
            equal to D skips the projection, as the official code does when D == 128.
        num_starts: random starting points whose mean distance initialises the min-distances.
        seed: seed of the ``torch.Generator`` drawing the projection and the starting points.
        device: where the loop runs (default: ``features.device``).
        chunk_size: rows moved to ``device`` and projected at a time.
        method: ``"plain"`` (one full mat-vec per selected point), ``"deferred"`` (exact lazy
            variant, see the module docstring; same selection) or ``"auto"``: ``"deferred"`` on
            CPU for N >= 16384 and ratio <= 0.5, ``"plain"`` otherwise (on CUDA the plain loop
            is launch-bound and sync-free, which the deferred phases are not).
        candidates: size of the candidate set S of the deferred method (speed only).
    Returns:
        int64 tensor of ``int(N * ratio)`` unique indices into ``features`` in selection order,
        on ``features.device``.
    """
    if features.ndim != 2:
        raise ValueError(f"approximate_greedy_coreset: features must be (N, D), got {tuple(features.shape)}.")
    if method not in ("auto", "plain", "deferred"):
        raise ValueError(f"approximate_greedy_coreset: method must be 'auto', 'plain' or 'deferred', got {method!r}.")
    n, d = features.shape
    if ratio >= 1:
        return torch.arange(n, device=features.device)
    num_select = int(n * ratio)
    if num_select <= 0:
        raise ValueError(f"approximate_greedy_coreset: ratio={ratio} of {n} features selects 0 rows; "
                         "raise the coreset ratio or feed more images.")
    device = torch.device(device) if device is not None else features.device
    if method == "auto":
        method = "deferred" if device.type == "cpu" and n >= _DEFERRED_MIN_ROWS and ratio <= 0.5 else "plain"
    if method == "deferred" and device.type != "cpu":
        raise ValueError(f"approximate_greedy_coreset: method='deferred' runs on CPU, got device={device}.")

    generator, weight = coreset_projection(d, projection_dim, seed, device)
    projected_t, sq_norms = _project(features, weight, device, chunk_size)  # (d', N_pad), (N_pad,)
    selected = greedy_coreset_from_projection(projected_t, sq_norms, n, ratio, generator, num_starts, method,
                                              candidates, chunk_size)
    return selected.to(features.device)


def coreset_projection(dim: int, projection_dim: int | None, seed: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Generator, Tensor | None]:
    """The seeded generator and the random projection psi (``projection_dim`` x ``dim``, or None
    when no projection applies) of ``approximate_greedy_coreset``: its first draws. The starting
    points are drawn next from the same generator by ``greedy_coreset_from_projection``, so a
    caller that projects rows as they arrive (``methods/patchcore.py``) selects the same points."""
    generator = torch.Generator().manual_seed(seed)
    weight = None
    if projection_dim is not None and projection_dim != dim:
        # nn.Linear default init (kaiming_uniform_, a=sqrt(5)) == U(-1/sqrt(D), 1/sqrt(D)).
        bound = 1.0 / math.sqrt(dim)
        weight = torch.empty(projection_dim, dim).uniform_(-bound, bound, generator=generator).to(device)
    return generator, weight


@torch.no_grad()
def greedy_coreset_from_projection(
    projected_t: Tensor, sq_norms: Tensor, n: int, ratio: float, generator: torch.Generator,
    num_starts: int = 10, method: str = "auto", candidates: int = 1024, chunk_size: int = 65536,
) -> Tensor:
    """Steps 2-3 of ``approximate_greedy_coreset`` on projected rows in its layout:
    ``projected_t`` (d', N_pad) with zero columns from ``n`` up to a multiple of 64 and
    ``sq_norms`` (N_pad,) = |psi(x)|^2; ``generator`` is the one of ``coreset_projection``
    (after the projection's draw). Returns the selected indices on ``projected_t.device``."""
    if method not in ("auto", "plain", "deferred"):
        raise ValueError(f"greedy_coreset_from_projection: method must be 'auto', 'plain' or 'deferred', got {method!r}.")
    device = projected_t.device
    if ratio >= 1:
        return torch.arange(n, device=device)
    num_select = int(n * ratio)
    if num_select <= 0:
        raise ValueError(f"approximate_greedy_coreset: ratio={ratio} of {n} features selects 0 rows; "
                         "raise the coreset ratio or feed more images.")
    if method == "auto":
        method = "deferred" if device.type == "cpu" and n >= _DEFERRED_MIN_ROWS and ratio <= 0.5 else "plain"
    if method == "deferred" and device.type != "cpu":
        raise ValueError(f"approximate_greedy_coreset: method='deferred' runs on CPU, got device={device}.")
    starts = torch.randperm(n, generator=generator)[: min(num_starts, n)].to(device)

    # Initial min-distance: mean Euclidean distance to the starting points (starts not selected).
    anchors = projected_t[:, starts]  # (d', S)
    anchor_sq = sq_norms[starts]
    mean_dist = torch.full((projected_t.shape[1],), -1.0, dtype=torch.float32, device=device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        dist = torch.addmm(sq_norms[start:stop, None], projected_t[:, start:stop].t(), anchors, alpha=-2.0)
        mean_dist[start:stop] = dist.add_(anchor_sq).clamp_(min=0).sqrt_().mean(1)
    # The loop keeps *squared* min-distances: sqrt is monotone, so argmax and min select the same
    # points as the official sqrt-domain loop (up to float ties) while saving an (N,) sqrt per step.
    # Padding rows get -1: never the argmax, never lowered.
    min_sq = mean_dist.square_().masked_fill_(torch.arange(len(mean_dist), device=device) >= n, -1.0)

    if method == "deferred":
        # Its mat-vecs are small (|S| or ~100-200 rows): run them single-threaded (on a busy box an
        # OpenMP team makes each one ~1000x slower), only the filter GEMM uses the caller's threads.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if _gemv_rows_are_independent(projected_t, sq_norms, n, threads):
                return _greedy_deferred(projected_t, sq_norms, min_sq, n, num_select, candidates, threads)
        finally:
            torch.set_num_threads(threads)
        warnings.warn("approximate_greedy_coreset: this BLAS does not give a row of a mat-vec the same "
                      "bits in every call; using the plain loop.", RuntimeWarning, stacklevel=2)
    return _greedy_plain(projected_t, sq_norms, min_sq, num_select)


def _greedy_plain(projected_t: Tensor, sq_norms: Tensor, min_sq: Tensor, num_select: int) -> Tensor:
    """The plain loop: one full mat-vec per selected point (all rows, padding included)."""
    n_pad = projected_t.shape[1]
    dist_sq = torch.empty(n_pad, dtype=torch.float32, device=projected_t.device)  # reused every iteration
    selected = torch.empty(num_select, dtype=torch.long, device=projected_t.device)
    projected = projected_t.t()  # (N_pad, d') column-major view
    for i in range(num_select):
        # m_i = argmax_n min_j ||psi(x_n) - psi(m_j)||; kept as a 1-element tensor (no host sync).
        idx = torch.argmax(min_sq).view(1)
        selected[i : i + 1] = idx
        # ||a - b||^2 = |a|^2 - 2 a.b + |b|^2 for all N points in one mat-vec, no allocation.
        torch.addmv(sq_norms, projected, projected_t.index_select(1, idx).view(-1), alpha=-2.0, out=dist_sq)
        dist_sq.add_(sq_norms.index_select(0, idx)).clamp_(min=0.0)
        torch.minimum(min_sq, dist_sq, out=min_sq)
    return selected


def _gemv_rows_are_independent(projected_t: Tensor, sq_norms: Tensor, n: int, plain_threads: int,
                               seed: int = 0) -> bool:
    """Whether the mat-vec gives every row the same bits as in the full (N_pad-row) plain call with
    ``plain_threads`` threads when the rows are gathered into other calls of other sizes (multiples
    of ``_ROW_ALIGN``) run with the current thread count, as the deferred loop does. Checked on
    up to ``_CHECK_ROWS`` random rows (all N below it) for two centres (~2 full mat-vecs + one
    gather of those rows: bounded, so that the check does not copy a multi-GB projection)."""
    n_pad = projected_t.shape[1]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)[:_CHECK_ROWS].to(projected_t.device)
    m = perm.numel()
    # groups of 64..4096 rows (a few sizes), each padded with the zero padding row / row 0
    sizes, total = [], 0
    options = [64, 128, 192, 1024, 4096, 640]
    while total < m:
        size = min(options[len(sizes) % len(options)], m - total)
        sizes.append(size)
        total += size
    padded = [_round_up(s, _ROW_ALIGN) for s in sizes]
    index = torch.zeros(sum(padded), dtype=torch.long, device=projected_t.device)
    pos_real, offset, start = [], 0, 0
    for size, psize in zip(sizes, padded):
        index[offset : offset + size] = perm[start : start + size]
        pos_real.append(torch.arange(offset, offset + size, device=projected_t.device))
        offset, start = offset + psize, start + size
    pos_real = torch.cat(pos_real)
    gathered = projected_t.index_select(1, index)
    gathered_sq = sq_norms.index_select(0, index)
    full = torch.empty(n_pad, dtype=torch.float32, device=projected_t.device)
    part = torch.empty(len(index), dtype=torch.float32, device=projected_t.device)
    for centre_idx in torch.randint(n, (2,), generator=g).tolist():
        centre = projected_t[:, centre_idx].contiguous()
        threads = torch.get_num_threads()
        torch.set_num_threads(plain_threads)
        try:
            torch.addmv(sq_norms, projected_t.t(), centre, alpha=-2.0, out=full)
        finally:
            torch.set_num_threads(threads)
        offset = 0
        for psize in padded:
            torch.addmv(gathered_sq[offset : offset + psize], gathered[:, offset : offset + psize].t(), centre,
                        alpha=-2.0, out=part[offset : offset + psize])
            offset += psize
        if not torch.equal(part[pos_real], full[perm]):
            return False
    return True


def _greedy_deferred(
    projected_t: Tensor, sq_norms: Tensor, min_sq: Tensor, n: int, num_select: int, candidates: int,
    gemm_threads: int = 1, chunk_rows: int | None = None,
) -> Tensor:
    """The deferred (lazy) greedy loop, see the module docstring. Same selection as the plain loop."""
    d = projected_t.shape[0]
    if chunk_rows is None:  # rows per filter GEMM: bigger with threads (amortises their fork/join)
        chunk_rows = 2048 if gemm_threads == 1 else 8192 * gemm_threads
    sq = sq_norms[:n]
    m = min_sq[:n].clone()
    # Bound on the rounding errors of the filter (see _apply_centres: ~(7 d + 24) u max|x|^2 with
    # u = 2^-24), ~4.7x safety at d = 128. The filter GEMM reads projected_t itself (no copy).
    margin = 32.0 * (d + 8) * 2.0**-24 * float(sq.max()) + 1e-30
    selected: list[int] = []
    k = max(1, min(candidates, n))
    buffer = [torch.empty(0)]  # reused gather buffer (fresh large allocations cost page faults)
    while len(selected) < num_select:
        # -- phase start: candidate set S = {m >= tau}, in index order; all others have m < tau.
        tau = torch.topk(m, k, sorted=False).values.min()
        cand = torch.nonzero(m >= tau).view(-1)
        ns = cand.numel()
        cand_pad = torch.zeros(_round_up(ns, _ROW_ALIGN), dtype=torch.long)  # padding: row 0, ignored
        cand_pad[:ns] = cand
        cand_t = projected_t.index_select(1, cand_pad)  # (d, |S|_pad) column-major, as in the plain loop
        cand_rows = cand_t.t().contiguous()  # centre vectors, contiguous like the plain loop's
        cand_sq = sq_norms.index_select(0, cand_pad)
        cand_m = torch.full((len(cand_pad),), -1.0, dtype=torch.float32)
        cand_m[:ns] = m[cand]
        dist = torch.empty(len(cand_pad), dtype=torch.float32)
        tau_value = float(tau)
        phase = []
        while len(selected) + len(phase) < num_select:
            j = int(torch.argmax(cand_m))
            if float(cand_m[j]) < tau_value:
                break
            phase.append(j)
            torch.addmv(cand_sq, cand_t.t(), cand_rows[j], alpha=-2.0, out=dist)
            dist.add_(cand_sq[j : j + 1]).clamp_(min=0.0)
            torch.minimum(cand_m, dist, out=cand_m)
        m[cand] = cand_m[:ns]
        centres = cand.index_select(0, torch.tensor(phase, dtype=torch.long))
        selected.extend(centres.tolist())
        if len(selected) < num_select:  # -- phase end: apply the phase's centres to every point.
            _apply_centres(projected_t, sq, m, centres, margin, chunk_rows, buffer, gemm_threads)
    return torch.tensor(selected, dtype=torch.long)


def _apply_centres(
    projected_t: Tensor, sq: Tensor, m: Tensor, centres: Tensor, margin: float, chunk_rows: int,
    buffer: list[Tensor], gemm_threads: int = 1,
) -> None:
    """m(x) = min(m(x), min_c dist^2(x, c)) over ``centres``, with the plain loop's exact distances.

    Filter: E[x, c] = |c|^2 - 2 x.c, one GEMM (``addmm``) of the column-major view
    ``projected_t[:, chunk].t()`` (no row-major copy of the projection) by -2C^T, compared with
    t_x = (m(x) + margin) - |x|^2. Rounding (u = 2^-24, R^2 = max |x|^2 of the stored squared norms
    s_x, which both paths use; q = s_x + s_c - 2 x.c in exact arithmetic; m <= ~4 R^2):

    * the plain loop's D = clamp(fl(fl(s_x - 2 x.c) + s_c), 0) has |D' - q| <= (d + 2) u 4 R^2
      before the clamp (the clamp only raises it), so D < m implies q < m + 4 (d + 2) u R^2;
    * the GEMM's E has |E - (s_c - 2 x.c)| <= (d + 1) u 3 R^2 (d products, the beta add);
    * t_x (two float adds) is within 2 u (m + margin + s_x) <= ~10 u R^2 of m + margin - s_x.

    So D < m implies E < t_x whenever margin >= (7 d + 24) u R^2; ``margin`` is 32 (d + 8) u R^2.
    Pairs with E < t_x (~0.1 % of them) are recomputed exactly, grouped by centre (one mat-vec per
    centre over its gathered points, padded to a multiple of ``_ROW_ALIGN``) and min-reduced into
    m (exact and order-free). The comparison and pair extraction run in numpy (several times
    faster than torch's ``lt`` + ``nonzero`` on CPU). They are recomputed whenever
    ``_PAIR_BLOCK`` have accumulated (and in blocks of at most that many), so the memory stays
    bounded however many pass (the pairs are also extracted a few rows at a time).
    """
    n = m.shape[0]
    num = centres.numel()
    centre_rows = projected_t.index_select(1, centres).t().contiguous()  # (L, d)
    centre_m2 = centre_rows * -2.0  # (L, d) contiguous: its .t() is a column-major (d, L) operand
    centre_sq = sq.index_select(0, centres)[None, :]  # (1, L), broadcast as addmm's input
    thresh = ((m + margin) - sq).numpy()  # t_x per point
    gram = torch.empty(min(chunk_rows, n), num, dtype=torch.float32)
    gram_np = gram.numpy()
    below = np.empty(gram_np.shape, dtype=bool)
    pair_x, pair_c, pending = [], [], 0
    step = max(1, _PAIR_BLOCK // num)  # rows whose pairs are extracted at a time (bounded arrays)
    threads = torch.get_num_threads()

    def flush() -> None:  # exact recomputation of the pending pairs, in blocks of <= _PAIR_BLOCK
        xs, cs = np.concatenate(pair_x), np.concatenate(pair_c)
        for first in range(0, len(xs), _PAIR_BLOCK):
            _exact_pairs(projected_t, sq, m, centres, centre_rows, xs[first : first + _PAIR_BLOCK],
                         cs[first : first + _PAIR_BLOCK], buffer)
        pair_x.clear()
        pair_c.clear()

    torch.set_num_threads(gemm_threads)
    try:
        for start in range(0, n, chunk_rows):
            size = min(chunk_rows, n - start)
            torch.addmm(centre_sq, projected_t[:, start : start + size].t(), centre_m2.t(), out=gram[:size])
            np.less(gram_np[:size], thresh[start : start + size, None], out=below[:size])
            for row in range(0, size, step):
                flat = np.flatnonzero(below[row : min(row + step, size)])
                if flat.size:
                    pair_x.append(flat // num + (start + row))
                    pair_c.append(flat % num)
                    pending += flat.size
                if pending >= _PAIR_BLOCK:
                    # m of the rows still to come is not read by this pass (thresh is from the phase
                    # start), so recomputing mid-pass changes nothing
                    torch.set_num_threads(threads)
                    flush()
                    pending = 0
                    torch.set_num_threads(gemm_threads)
    finally:
        torch.set_num_threads(threads)
    if pending:
        flush()


def _exact_pairs(projected_t: Tensor, sq: Tensor, m: Tensor, centres: Tensor, centre_rows: Tensor,
                 pair_x: np.ndarray, pair_c: np.ndarray, buffer: list[Tensor]) -> None:
    """m(x) = min(m(x), D(x, c)) over the (point, centre-position) pairs, D the plain loop's exact
    squared distance; at most ``_PAIR_BLOCK`` pairs, so the gathered rows stay bounded."""
    d, num = projected_t.shape[0], centres.numel()
    # group the pairs by centre (stable: points ascending), each group padded to a multiple of _ROW_ALIGN
    order = np.argsort(pair_c, kind="stable")
    pair_x, pair_c = pair_x[order], pair_c[order]
    counts = np.bincount(pair_c, minlength=num)
    padded = (counts + _ROW_ALIGN - 1) // _ROW_ALIGN * _ROW_ALIGN
    group_start = np.cumsum(padded) - padded
    slot = group_start[pair_c] + np.arange(len(pair_c)) - (np.cumsum(counts) - counts)[pair_c]
    gather = np.zeros(int(padded.sum()), dtype=np.int64)  # padding: row 0, ignored
    gather[slot] = pair_x
    gather = torch.from_numpy(gather)
    if buffer[0].numel() < d * len(gather):
        buffer[0] = torch.empty(d * len(gather) * 5 // 4, dtype=torch.float32)
    gathered_t = buffer[0][: d * len(gather)].view(d, len(gather))
    torch.index_select(projected_t, 1, gather, out=gathered_t)  # (d, P) column-major
    gathered_sq = sq.index_select(0, gather)
    dist = torch.empty(len(gather), dtype=torch.float32)
    used = np.flatnonzero(counts)
    sizes = padded[used].tolist()
    centre_vecs = centre_rows.index_select(0, torch.from_numpy(used)).unbind(0)
    for out, mat, row_sq, centre in zip(dist.split(sizes), gathered_t.split(sizes, dim=1),
                                        gathered_sq.split(sizes), centre_vecs):
        torch.addmv(row_sq, mat.t(), centre, alpha=-2.0, out=out)
    # + |c|^2 and clamp, elementwise as in the plain loop, then an exact min-reduction into m
    slot, pair_x, pair_c = torch.from_numpy(slot), torch.from_numpy(pair_x), torch.from_numpy(pair_c)
    exact = dist.index_select(0, slot).add_(sq.index_select(0, centres.index_select(0, pair_c))).clamp_(min=0.0)
    m.scatter_reduce_(0, pair_x, exact, reduce="amin")
