"""k-nearest-neighbour search over a PatchCore memory bank.

Semantics follow the official `patchcore.common.FaissNN`: distances are **squared** L2
(what faiss ``IndexFlatL2`` returns), sorted ascending. Backends:

- faiss ``IndexFlatL2`` (exact, default) or ``IndexIVFPQ`` (approximate, the official
  ``ApproximateFaissNN``: 512 lists, 64 sub-quantisers, 8 bits), on CPU or on GPU when GPU faiss
  is installed and the caller asks for it;
- a pure-torch chunked exact search (``|a|^2 - 2ab + |b|^2`` then ``topk``), used when faiss is not
  importable or when the queries are on a CUDA device and faiss has no GPU support.

The index is built lazily on the first ``search`` and rebuilt whenever the bank tensor changes
(another tensor, another shape, or an in-place write).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# faiss's loader logs at INFO each CPU-specific build it tries (AVX512-SPR, AVX512, AVX2), with a
# ModuleNotFoundError for each one this wheel lacks, before the one that loads: noise that says
# nothing about the run. Its warnings and errors still show.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

try:  # faiss is optional: the torch backend covers every case, only slower for big banks.
    import faiss

    _FAISS_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None
    _FAISS_AVAILABLE = False

log = logging.getLogger(__name__)

_INDEXES = ("flat", "ivfpq")
_DEVICES = ("auto", "cpu", "cuda")
_BACKENDS = ("auto", "faiss", "torch")


def faiss_available() -> bool:
    """Whether the faiss python package could be imported."""
    return _FAISS_AVAILABLE


def faiss_num_gpus() -> int:
    """Number of GPUs usable by faiss (0 for faiss-cpu or no faiss)."""
    if not _FAISS_AVAILABLE:
        return 0
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds may lack the symbol
        return 0


def torch_knn(queries: Tensor, bank: Tensor, k: int, chunk_size: int = 4096,
              dtype: torch.dtype = torch.float32, query_owner: Tensor | None = None,
              bank_owner: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact k-NN in torch: squared L2 = clamp(|q|^2 - 2 q.b + |b|^2, 0), then the k smallest.

    Queries are processed in chunks so that the (chunk, M) distance matrix stays below ~64 MB.
    ``dtype=torch.float16`` computes the distances in half precision (a GPU lever: half the bank
    memory and tensor-core matmuls; slower than float32 on CPU); the caller re-ranks the returned
    candidates exactly in float32 (``NearestNeighbourSearch(precision="float16")`` does).
    ``query_owner`` (Q,) and ``bank_owner`` (M,) (integer ids, e.g. the image each row comes from):
    a query never matches a bank row of its own owner (leave-one-image-out calibration); a query
    with fewer than ``k`` other rows gets ``inf`` distances.
    Returns (squared distances (Q, k) float32, indices (Q, k) int64), both on ``queries.device``.
    """
    if (query_owner is None) != (bank_owner is None):
        raise ValueError("torch_knn: give both query_owner and bank_owner, or neither")
    if bank_owner is not None:
        query_owner, bank_owner = query_owner.to(queries.device), bank_owner.to(queries.device)
    bank = bank.to(device=queries.device, dtype=dtype)
    queries = queries.to(dtype)
    bank_sq = (bank.float() * bank.float()).sum(1).to(dtype)  # |b|^2, (M,)
    rows = max(1, min(chunk_size, (1 << 24) // max(1, bank.shape[0])))
    dists, idxs = [], []
    for start in range(0, queries.shape[0], rows):
        q = queries[start : start + rows]
        d2 = torch.addmm(bank_sq.unsqueeze(0), q, bank.t(), alpha=-2.0)  # |b|^2 - 2 q.b
        d2.add_((q * q).sum(1, keepdim=True)).clamp_(min=0.0)  # + |q|^2, clamp like faiss
        if bank_owner is not None:
            d2.masked_fill_(query_owner[start : start + rows, None] == bank_owner[None], float("inf"))
        d, i = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        dists.append(d.float())
        idxs.append(i)
    if not dists:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(dists), torch.cat(idxs)


class NearestNeighbourSearch:
    """k-NN over a memory bank with faiss semantics (squared L2 distances).

    Args:
        index: ``"flat"`` (exact ``IndexFlatL2``, as the official code) or ``"ivfpq"``
            (approximate ``IndexIVFPQ`` for very large banks, trained on the bank).
        device: ``"auto"`` searches where the queries are (GPU faiss for CUDA queries if
            available), ``"cpu"`` forces CPU faiss, ``"cuda"`` forces the GPU.
        backend: ``"auto"`` (faiss if importable, else torch), ``"faiss"`` or ``"torch"``.
        nlist, num_subquantizers, nbits, nprobe: IVF-PQ settings (official: 512, 64, 8, faiss
            default nprobe 1).
        chunk_size: query rows per chunk in the torch backend.
        refine_distances: recompute the squared distances of the k returned neighbours directly as
            sum((q - b)^2) and re-sort them. The expansion |q|^2 - 2 q.b + |b|^2 used by faiss
            (IndexFlatL2 with >= 20 queries) and by the torch backend loses ~1e-7 |q|^2 to
            cancellation, e.g. ~2e-3 instead of 0 for a query equal to a bank row of norm ~45; the
            refined values are the same squared L2 distances without that error (and exact ones for
            the approximate IVF-PQ codes). The neighbours found are unchanged (flat index).
        num_threads: OpenMP threads of a CPU faiss search (``None``: faiss' default, all cores).
            On a machine shared with other jobs 1 thread was 2.4x faster than 2 on 2 cores
            (docs/methods/patchcore.md, "Scaling: memory, DDP, search"); restored after each search.
        precision: ``"float32"`` (default) or ``"float16"``: the torch backend keeps the bank in
            half precision and computes distances in it, then re-ranks ``rerank`` candidates per
            query exactly in float32 (``refine_squared_distances``) and keeps the k best. For a GPU
            (half the bank memory, tensor cores); on CPU half-precision matmuls are slower. The
            result equals the float32 search unless the true neighbour falls outside the
            candidates (fp16 rounding of ~1e-3 relative); faiss searches use float32 regardless.
        rerank: candidates per query re-ranked in float32 with ``precision="float16"`` (>= k).
    """

    def __init__(
        self,
        index: str = "flat",
        device: str = "auto",
        backend: str = "auto",
        nlist: int = 512,
        num_subquantizers: int = 64,
        nbits: int = 8,
        nprobe: int = 1,
        chunk_size: int = 4096,
        refine_distances: bool = True,
        num_threads: int | None = None,
        precision: str = "float32",
        rerank: int = 16,
    ) -> None:
        if index not in _INDEXES:
            raise ValueError(f"NearestNeighbourSearch: index={index!r}, expected one of {_INDEXES}.")
        if device not in _DEVICES:
            raise ValueError(f"NearestNeighbourSearch: device={device!r}, expected one of {_DEVICES}.")
        if backend not in _BACKENDS:
            raise ValueError(f"NearestNeighbourSearch: backend={backend!r}, expected one of {_BACKENDS}.")
        if backend == "faiss" and not _FAISS_AVAILABLE:
            raise ImportError("NearestNeighbourSearch: backend='faiss' but faiss is not installed; "
                              "pip install faiss-cpu (or faiss-gpu), or use backend='torch'.")
        if precision not in ("float32", "float16"):
            raise ValueError(f"NearestNeighbourSearch: precision={precision!r}, expected 'float32' or 'float16'.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"NearestNeighbourSearch: num_threads={num_threads} must be >= 1 or None.")
        self.num_threads = num_threads
        self.precision = precision
        self.rerank = rerank
        self.index = index
        self.device = device
        self.backend = backend
        self.nlist = nlist
        self.num_subquantizers = num_subquantizers
        self.nbits = nbits
        self.nprobe = nprobe
        self.chunk_size = chunk_size
        self.refine_distances = refine_distances
        self._bank: Tensor | None = None
        self._built: Any = None  # faiss index or torch bank copy
        self._built_key: tuple | None = None
        self._gpu_resources: Any = None
        self._warned = False

    @property
    def exact(self) -> bool:
        """True for the exact flat index (and for the torch backend, always exact)."""
        return self.index == "flat"

    # ------------------------------------------------------------------ bank
    def fit(self, bank: Tensor) -> "NearestNeighbourSearch":
        """Set the memory bank (M, D); the index is (re)built lazily on the next search."""
        if bank.ndim != 2:
            raise ValueError(f"NearestNeighbourSearch.fit: bank must be (M, D), got shape {tuple(bank.shape)}.")
        self._bank = bank
        return self

    @staticmethod
    def _bank_key(bank: Tensor) -> tuple:
        # Identity of the bank's content: another tensor, shape or any in-place write changes it.
        # Inference tensors (made under torch.inference_mode) have no version counter; they cannot
        # be written in place outside inference mode anyway.
        version = -1 if bank.is_inference() else bank._version
        return (bank.data_ptr(), tuple(bank.shape), bank.dtype, str(bank.device), version)

    def __getstate__(self) -> dict:
        # faiss indexes do not pickle/deepcopy: drop the built index, it is rebuilt lazily.
        state = self.__dict__.copy()
        state.update(_built=None, _built_key=None, _gpu_resources=None)
        return state

    # ---------------------------------------------------------------- search
    def _plan(self, queries: Tensor) -> tuple[str, torch.device]:
        """Choose (backend, device) for these queries."""
        if self.device == "cpu":
            target = torch.device("cpu")
        elif self.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("NearestNeighbourSearch: device='cuda' but CUDA is not available; use device='auto'.")
            target = queries.device if queries.device.type == "cuda" else torch.device("cuda")
        else:
            target = queries.device
        use_faiss = self.backend != "torch" and _FAISS_AVAILABLE
        if use_faiss and target.type == "cuda" and faiss_num_gpus() == 0:
            if self.backend == "faiss" and self.device == "cuda":
                raise RuntimeError("NearestNeighbourSearch: backend='faiss', device='cuda' but faiss has no GPU "
                                   "support; install faiss-gpu or use backend='auto'.")
            use_faiss = False  # CUDA queries, CPU-only faiss: exact torch search on the GPU instead.
        if not use_faiss and self.index != "flat" and not self._warned:
            self._warned = True
            log.warning("NearestNeighbourSearch: index=%r needs faiss; using the exact torch search.", self.index)
        if use_faiss:
            return "faiss", target
        return "torch", target

    def _build(self, backend: str, target: torch.device) -> None:
        assert self._bank is not None
        key = (backend, str(target), self._bank_key(self._bank))
        if key == self._built_key:
            return
        bank = self._bank.detach()
        if backend == "torch":
            dtype = torch.float16 if self.precision == "float16" else torch.float32
            self._built = bank.to(device=target, dtype=dtype).contiguous()
        else:
            data = np.ascontiguousarray(bank.to("cpu", torch.float32).numpy())
            n, dim = data.shape
            if self.index == "flat":
                index = faiss.IndexFlatL2(dim)
            else:
                minimum = max(self.nlist, 2**self.nbits)
                if n < minimum:
                    raise ValueError(
                        f"NearestNeighbourSearch: index='ivfpq' needs at least {minimum} bank rows to train "
                        f"{self.nlist} lists / 2**{self.nbits} PQ centroids, got {n}; use index='flat'."
                    )
                if dim % self.num_subquantizers:
                    raise ValueError(f"NearestNeighbourSearch: bank dim {dim} is not divisible by "
                                     f"num_subquantizers={self.num_subquantizers}.")
                index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, self.nlist, self.num_subquantizers, self.nbits)
                index.nprobe = self.nprobe
            if target.type == "cuda":
                if self._gpu_resources is None:
                    self._gpu_resources = faiss.StandardGpuResources()
                options = faiss.GpuClonerOptions()
                options.useFloat16 = self.index != "flat"  # official ApproximateFaissNN uses fp16 on GPU
                gpu_id = target.index if target.index is not None else torch.cuda.current_device()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu_id, index, options)
            if self.index != "flat":
                index.train(data)
            index.add(data)
            self._built = index
        self._built_key = key

    @torch.no_grad()
    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """The k nearest bank rows of each query.

        Args:
            queries: (Q, D) tensor, any device.
            k: number of neighbours, 1 <= k <= bank size.
        Returns:
            (squared L2 distances (Q, k) float32 ascending, indices (Q, k) int64) on ``queries.device``.
        """
        if self._bank is None or self._bank.shape[0] == 0:
            raise RuntimeError("NearestNeighbourSearch.search: the memory bank is empty; call fit(bank) first.")
        if queries.ndim != 2 or queries.shape[1] != self._bank.shape[1]:
            raise ValueError(f"NearestNeighbourSearch.search: queries must be (Q, {self._bank.shape[1]}), "
                             f"got {tuple(queries.shape)}.")
        if not 1 <= k <= self._bank.shape[0]:
            raise ValueError(f"NearestNeighbourSearch.search: k={k} must be in [1, bank size {self._bank.shape[0]}].")
        backend, target = self._plan(queries)
        self._build(backend, target)
        half = backend == "torch" and self.precision == "float16"
        if backend == "torch":
            candidates = min(max(k, self.rerank), self._bank.shape[0]) if half else k
            d, i = torch_knn(queries.to(target), self._built, candidates, self.chunk_size, self._built.dtype)
        else:
            q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
            previous = faiss.omp_get_max_threads() if self.num_threads is not None else None
            if previous is not None:
                faiss.omp_set_num_threads(self.num_threads)
            try:
                d_np, i_np = self._built.search(q, k)
            finally:
                if previous is not None:
                    faiss.omp_set_num_threads(previous)
            d, i = torch.from_numpy(d_np), torch.from_numpy(i_np).long()
        d, i = d.to(queries.device, torch.float32), i.to(queries.device)
        if self.refine_distances or half:  # half: the exact float32 re-ranking of the candidates
            d, i = refine_squared_distances(queries, self._bank, d, i)
            d, i = d[:, :k].contiguous(), i[:, :k].contiguous()
        return d, i


def refine_squared_distances(queries: Tensor, bank: Tensor, dist: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Squared L2 distances of the found neighbours computed as sum((q - b)^2), re-sorted ascending.

    Avoids the cancellation of |q|^2 - 2 q.b + |b|^2; works chunk-wise (<= 2^24 gathered values).
    Entries with index -1 (faiss: fewer than k results) keep their distance.
    """
    bank = bank.detach().to(device=queries.device, dtype=torch.float32)
    queries = queries.to(torch.float32)
    k, dim = index.shape[1], bank.shape[1]
    rows = max(1, (1 << 24) // max(1, k * dim))
    refined = torch.empty_like(dist)
    for start in range(0, queries.shape[0], rows):
        idx = index[start : start + rows]
        diff = queries[start : start + rows, None, :] - bank[idx.clamp(min=0)]  # (r, k, D)
        refined[start : start + rows] = torch.where(idx >= 0, diff.square_().sum(-1), dist[start : start + rows])
    refined, order = refined.sort(dim=1, stable=True)
    return refined, index.gather(1, order)


def exportable_knn(queries: Tensor, bank_t_chunks: Sequence[Tensor], bank_sq_chunks: Sequence[Tensor], k: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Exact k-NN as plain tensor ops that ONNX / TorchScript export.

    The bank comes as chunks of its transpose, (D, m_j) each, with their squared row norms. Per
    chunk: squared L2 ``|q|^2 - 2 q.b + |b|^2`` (one matmul, clamped at 0) and its k smallest; the
    rows found are gathered from the same chunk and their distances recomputed as sum((q - b)^2)
    (as ``NearestNeighbourSearch(refine_distances=True)`` does); then the k smallest of all
    chunks' candidates. The loop unrolls into one matmul per chunk, so the peak is one
    (Q, m_j) block instead of (Q, M). The chunks are separate tensors (buffers of the export
    module), not slices of one: the ONNX exporter's constant folding would otherwise write every
    folded slice once per use, doubling the bank in the file.

    Returns (squared distances (Q, k) ascending, bank indices (Q, k) int64, the rows (Q, k, D)).
    """
    q_sq = (queries * queries).sum(1, keepdim=True)
    cand_d, cand_i, cand_rows = [], [], []
    start = 0
    for block, block_sq in zip(bank_t_chunks, bank_sq_chunks):  # (D, m), (m,)
        d2 = (q_sq - 2.0 * (queries @ block) + block_sq).clamp(min=0.0)
        _, i = torch.topk(d2, min(k, block.shape[1]), dim=1, largest=False, sorted=True)
        rows = block[:, i].permute(1, 2, 0)  # (Q, kk, D)
        cand_d.append((queries.unsqueeze(1) - rows).square().sum(-1))
        cand_i.append(i + start)
        cand_rows.append(rows)
        start += block.shape[1]
    d, i, rows = torch.cat(cand_d, 1), torch.cat(cand_i, 1), torch.cat(cand_rows, 1)
    d, pos = torch.topk(d, k, dim=1, largest=False, sorted=True)  # ascending (ONNX has no stable sort)
    return d, i.gather(1, pos), rows.gather(1, pos.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
