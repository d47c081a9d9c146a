"""Nearest-neighbour search over the memory bank: k-means cells or hnswlib (approximate), float32 BLAS (exact).

Every distance this module returns is Euclidean (not squared), float32, and computed by one function,
`row_distances`, from the query and the bank row it names. The first pass (cells or hnswlib) only chooses
*which* bank row; its own (squared, differently rounded) value is discarded. That makes "an approximate distance is never smaller
than the exact one" hold bit-for-bit in float32, which `scoring.image_scores` relies on for its re-rank proof.

Runs on the device: numpy and hnswlib, and the cells' first pass compiled (`patchcore_edge._cellscan`, built by
setup.py where a C compiler is present; numpy otherwise). threadpoolctl bounds BLAS threads.
"""

from __future__ import annotations

import math
import os
import struct
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, List, Optional, Tuple, Union

import hnswlib  # type: ignore[import-untyped]
import numpy as np
from .cpu import helper_thread
from .errors import FileProblem

try:  # optional: the install builds it where a C compiler is present (setup.py)
    from . import _cellscan  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the install
    _cellscan = None

# Chosen from benchmarks/results/search.md (real MobileNetV2 bottle features, 784 queries per image):
# M=16, ef_construction=200, ef=32 gives recall@1 0.998 (16k x 128), 0.992 (100k x 128), 0.998 (16k x 1024),
# worst over-estimate of a patch distance 8-19 %, while the search is 4.7x (16k), 13.6x (100k) and 6.5x
# (16k x 1024) cheaper than exact BLAS search. ef=16 is faster but some patches land in a wrong region
# (distances 22x too large at M=8 or 32); ef=64 halves the speed-up for little gain. Image scores are exact
# whatever ef is, through the re-rank in scoring.py.
DEFAULT_M = 16
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF = 32

# Distance blocks (queries x bank rows) are kept under this many float32 values (64 MiB) so that a 200k-row
# bank never needs an M x M or n x M matrix at once.
_BLOCK_VALUES = 16 * 1024 * 1024
_QUERY_BLOCK = 4096
_FEW_QUERIES = 16
_ONE_THREAD_QUERIES = 256  # the exact re-rank of 8 patches for a batch of up to 32 images
# Banks up to this size keep a centred copy for exact search (saves re-centring the bank on every call, which
# dominates small re-rank queries); larger banks are centred block by block to keep memory at ~2x the bank.
_CENTRED_COPY_BYTES = 64 * 1024 * 1024

# hnswlib's on-disk header (hnswalg.h saveIndex): offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData (size_t), maxlevel (int), enterpoint_node (uint),
# maxM, maxM0, M (size_t), mult (double), ef_construction (size_t).
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_LABEL_BYTES = 8

PathLike = Union[str, "os.PathLike[str]"]


class IndexFileError(FileProblem):
    """An hnswlib index file that cannot be used with this bank, with the reason."""



# --------------------------------------------------------------------------------------------- helpers


def as_bank(bank: np.ndarray, name: str = "memory bank") -> np.ndarray:
    """Check a memory bank and return it as float32 C-contiguous [M, D] (no copy when it already is)."""
    array = np.asarray(bank)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array [M, D], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must hold floating-point values, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    array = np.asarray(queries)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"query features must have shape [n, {dim}], got {np.asarray(queries).shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"query features must be floating-point, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("query features contain NaN or infinite values (broken model output?)")
    return array


def row_distances(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean distance between queries[i] and rows[i], float32 [n].

    Computed directly from the difference (no norm expansion), so there is no cancellation; the same
    function serves every path so that equal (query, row) pairs always give bit-identical distances.
    """
    diff = queries - rows
    squared: np.ndarray = np.einsum("ij,ij->i", diff, diff, dtype=np.float32, optimize=False)
    distances: np.ndarray = np.sqrt(squared)
    return distances


def bank_centre(bank: np.ndarray) -> np.ndarray:
    """The bank mean (accumulated in float64, stored float32) that the BLAS expansions centre on."""
    centre: np.ndarray = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    return centre


def squared_norms(bank: np.ndarray) -> np.ndarray:
    norms: np.ndarray = np.einsum("ij,ij->i", bank, bank, dtype=np.float32, optimize=False)
    return norms


_controller: Any = None


def blas_threads(threads: Optional[int]) -> ContextManager[Any]:
    """Context that bounds BLAS (OpenBLAS/MKL/BLIS) to `threads` threads; a no-op for None.

    Uses threadpoolctl when it is installed; without it the BLAS thread count stays as the environment
    (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS) set it. The limit is process-wide while the context is open.
    """
    global _controller
    if threads is None:
        return nullcontext()
    if _controller is None:
        try:
            import threadpoolctl  # type: ignore[import-untyped]
        except ImportError:
            _controller = False
        else:
            # Created lazily so that it sees the BLAS numpy loaded; one controller avoids a library scan
            # per call (0.01 ms instead of 0.2 ms).
            _controller = threadpoolctl.ThreadpoolController()
    if _controller is False:
        return nullcontext()
    limit: ContextManager[Any] = _controller.limit(limits=int(threads), user_api="blas")
    return limit


def _block_rows(n_queries: int, count: int) -> int:
    return int(max(256, min(count, _BLOCK_VALUES // max(1, n_queries))))


# ---------------------------------------------------------------------------------------------- index


def build_index(bank: np.ndarray, m: int = DEFAULT_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
                seed: int = 0, threads: int = 1) -> hnswlib.Index:
    """Build an hnswlib index (space "l2") over the bank rows, labels = row numbers.

    With threads=1 (the default) the index is a pure function of (bank, m, ef_construction, seed), so a
    re-export gives a byte-identical index.hnsw; more threads build faster but insert in a racy order.
    """
    data = as_bank(bank)
    if m < 2:
        raise ValueError(f"m must be >= 2, got {m}")
    if ef_construction < 1:
        raise ValueError(f"ef_construction must be >= 1, got {ef_construction}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    index = hnswlib.Index(space="l2", dim=data.shape[1])
    index.init_index(max_elements=data.shape[0], M=int(m), ef_construction=int(ef_construction),
                     random_seed=int(seed))
    index.add_items(data, np.arange(data.shape[0], dtype=np.int64), num_threads=int(threads))
    index.set_ef(DEFAULT_EF)
    return index


def save_index(index: hnswlib.Index, path: PathLike) -> None:
    index.save_index(str(path))


def load_index(path: PathLike, dim: int, count: int, bank: Optional[np.ndarray] = None) -> hnswlib.Index:
    """Load an hnswlib index after checking that it is well formed and belongs to a [count, dim] bank.

    hnswlib itself checks little (a wrong dim loads "fine" and a bad neighbour id crashes the process at
    query time), so the file is parsed first: header sizes, labels 0..count-1, every neighbour id in
    range. With `bank` the stored vectors must also equal the bank rows bit-for-bit.
    Raises IndexFileError naming the file and the problem.
    """
    file = Path(path)
    _validate_index_file(file, int(dim), int(count), bank)
    index = hnswlib.Index(space="l2", dim=int(dim))
    try:
        index.load_index(str(file), max_elements=int(count))
    except (RuntimeError, MemoryError) as error:
        raise IndexFileError(file, f"hnswlib could not load it ({error})") from None
    if index.element_count != count or index.dim != dim:
        raise IndexFileError(file, f"holds {index.element_count} vectors of dim {index.dim}, "
                                   f"expected {count} of dim {dim}")
    index.set_ef(DEFAULT_EF)
    return index


def _validate_index_file(file: Path, dim: int, count: int, bank: Optional[np.ndarray]) -> None:
    if not file.is_file():
        raise IndexFileError(file, "no such file")
    size = file.stat().st_size
    if size < _HEADER.size:
        raise IndexFileError(file, f"too short for an hnswlib index ({size} bytes)")
    with file.open("rb") as handle:
        header = _HEADER.unpack(handle.read(_HEADER.size))
    (offset_level0, max_elements, current, size_per_element, label_offset, offset_data, max_level,
     entry_point, max_m, max_m0, _m, _mult, _ef_construction) = header
    if offset_level0 != 0 or max_m == 0 or max_m0 < max_m or max_m0 > 65535:
        raise IndexFileError(file, "not an hnswlib index (unexpected header)")
    if current != count:
        raise IndexFileError(file, f"holds {current} vectors but the memory bank has {count}")
    links0 = max_m0 * 4 + 4
    stored_dim, remainder = divmod(size_per_element - links0 - _LABEL_BYTES, 4)
    if (offset_data != links0 or remainder != 0 or label_offset != links0 + stored_dim * 4
            or max_elements < current):
        raise IndexFileError(file, "not an hnswlib index (inconsistent header)")
    if stored_dim != dim:
        raise IndexFileError(file, f"holds vectors of dim {stored_dim} but the memory bank has dim {dim}")
    if not (0 <= max_level < 64 and entry_point < current):
        raise IndexFileError(file, "corrupt header (entry point or level out of range)")
    level0_end = _HEADER.size + current * size_per_element
    if size < level0_end + 4 * current:
        raise IndexFileError(file, f"truncated ({size} bytes, level-0 data alone needs {level0_end})")

    mapped = np.memmap(file, dtype=np.uint8, mode="r")
    try:
        level0 = mapped[_HEADER.size:level0_end].reshape(current, size_per_element)
        _check_level0(file, level0, links0, label_offset, dim, current, bank)
        _check_upper_levels(file, mapped, level0_end, size, max_m, max_level, current)
    finally:
        del mapped


def _check_level0(file: Path, level0: np.ndarray, links0: int, label_offset: int, dim: int, count: int,
                  bank: Optional[np.ndarray]) -> None:
    labels = np.ascontiguousarray(level0[:, label_offset:label_offset + _LABEL_BYTES]).view("<u8")[:, 0]
    if not np.array_equal(np.sort(labels), np.arange(count, dtype=np.uint64)):
        raise IndexFileError(file, "labels are not the bank row numbers 0..M-1")
    expected = None if bank is None else as_bank(bank)
    step = max(1, (1 << 24) // level0.shape[1])
    for start in range(0, count, step):
        block = np.ascontiguousarray(level0[start:start + step])
        links = block[:, :links0].view("<u4")
        counts = links[:, 0] & 0xFFFF
        if (links[:, 0] >> 16).any():
            raise IndexFileError(file, "has deleted or flagged elements; rebuild it")
        if (counts > links.shape[1] - 1).any():
            raise IndexFileError(file, "corrupt neighbour lists (count above the maximum)")
        used = np.arange(1, links.shape[1])[None, :] <= counts[:, None]
        if (links[:, 1:][used] >= count).any():
            raise IndexFileError(file, "corrupt neighbour lists (id out of range)")
        if expected is not None:
            vectors = block[:, links0:links0 + dim * 4].view("<f4")
            rows = labels[start:start + step].astype(np.int64)
            if not np.array_equal(vectors, expected[rows]):
                raise IndexFileError(file, "its vectors differ from the memory bank (index of another bank?)")


def _check_upper_levels(file: Path, mapped: np.memmap, offset: int, size: int, max_m: int, max_level: int,
                        count: int) -> None:
    block_bytes = max_m * 4 + 4
    buffer = memoryview(mapped)  # type: ignore[arg-type]
    lengths = struct.Struct("<I")
    for _ in range(count):
        if offset + 4 > size:
            raise IndexFileError(file, "truncated (upper-level neighbour lists)")
        (length,) = lengths.unpack_from(buffer, offset)
        offset += 4
        if length == 0:
            continue
        levels, remainder = divmod(length, block_bytes)
        if remainder or levels > max_level or offset + length > size:
            raise IndexFileError(file, "corrupt upper-level neighbour lists")
        links = np.frombuffer(buffer[offset:offset + length], dtype="<u4").reshape(levels, max_m + 1)
        counts = links[:, 0] & 0xFFFF
        if (counts > max_m).any():
            raise IndexFileError(file, "corrupt upper-level neighbour lists (count above the maximum)")
        used = np.arange(1, max_m + 1)[None, :] <= counts[:, None]
        if (links[:, 1:][used] >= count).any():
            raise IndexFileError(file, "corrupt upper-level neighbour lists (id out of range)")
        offset += length
    if offset != size:
        raise IndexFileError(file, f"{size - offset} unexpected trailing bytes (not written by hnswlib?)")


# ------------------------------------------------------------------------------------- exact searches


def bank_neighbours(bank: np.ndarray, b: int, threads: Optional[int] = None) -> np.ndarray:
    """Exact b nearest bank rows of every bank row, int32 [M, b], the row itself first, then by distance.

    Squared distances come from BLAS (||y||^2 - 2 x.y on mean-centred rows; the row's own norm is constant
    per row) in blocks of rows, never M x M at once; the b chosen rows are then ordered by their direct
    distance. Memory: one centred copy of the bank plus a block of at most 64 MiB.
    """
    data = as_bank(bank)
    count = data.shape[0]
    if not 1 <= b <= count:
        raise ValueError(f"need 1 <= b <= number of bank vectors ({count}), got b={b}")
    # Centred on the mean for a smaller cancellation error in the expansion (see PatchSearch).
    centred = data - bank_centre(data)
    norms = squared_norms(centred)
    result = np.empty((count, b), dtype=np.int32)
    rows_per_block = int(max(1, min(count, _BLOCK_VALUES // count)))
    with blas_threads(threads):
        for start in range(0, count, rows_per_block):
            stop = min(count, start + rows_per_block)
            block = centred[start:stop] @ centred.T
            block *= -2.0
            block += norms[None, :]
            own = np.arange(stop - start)
            # The row itself goes first even when duplicates tie with it at distance 0.
            block[own, own + start] = -np.inf
            if b < count:
                chosen = np.argpartition(block, b - 1, axis=1)[:, :b]
            else:
                chosen = np.broadcast_to(np.arange(count), (stop - start, count)).copy()
            queries = np.repeat(data[start:stop], b, axis=0)
            dist = row_distances(queries, data[chosen.ravel()]).reshape(stop - start, b)
            dist[chosen == (own + start)[:, None]] = -1.0
            # lexsort: last key is primary -> by distance, ties by row number.
            order = np.lexsort((chosen, dist), axis=1)
            result[start:stop] = np.take_along_axis(chosen, order, axis=1)
    return result


def validate_neighbours(neighbours: np.ndarray, count: int) -> np.ndarray:
    """Check a bank_neighbours array for a bank of `count` rows; return it as int32 C-contiguous."""
    array = np.asarray(neighbours)
    if array.ndim != 2 or array.shape[0] != count or not 1 <= array.shape[1] <= count:
        raise ValueError(f"bank neighbours must have shape [{count}, b] with 1 <= b <= {count}, "
                         f"got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"bank neighbours must be integers, got dtype {array.dtype}")
    if array.min() < 0 or array.max() >= count:
        raise ValueError(f"bank neighbours hold row numbers outside 0..{count - 1}")
    if not np.array_equal(array[:, 0], np.arange(count)):
        raise ValueError("bank neighbours: each row must list the row itself first")
    return np.ascontiguousarray(array, dtype=np.int32)


def check_neighbours_sample(bank: np.ndarray, neighbours: np.ndarray, rows: int = 32, seed: int = 0) -> None:
    """Check that sampled rows of bank_neighbours are their row's true b nearest bank rows (ValueError if not).

    Range checks alone let a re-hashed bundle carry arbitrary neighbours (wrong re-weighting, wrong scores). The
    sample costs one BLAS product of `rows` rows with the bank. Ties and rounding are allowed: a listed neighbour
    only has to be no farther than the b-th true distance, with a slack for the float32 expansion
    ||x||^2 + ||y||^2 - 2 x.y.
    """
    data = as_bank(bank)
    count, b = neighbours.shape
    picked = np.sort(np.random.default_rng(seed).choice(count, size=min(rows, count), replace=False))
    norms = squared_norms(data)
    squared = norms[None, :] + norms[picked][:, None] - 2.0 * (data[picked] @ data.T)
    limits = np.partition(squared, b - 1, axis=1)[:, b - 1]
    for i, row in enumerate(picked):
        listed = np.square(data[neighbours[row]] - data[row]).sum(axis=1)
        slack = 1e-3 * (float(norms[row]) + float(abs(limits[i]))) + 1e-6
        if len(set(neighbours[row].tolist())) != b or float(listed.max()) > float(limits[i]) + slack:
            raise ValueError(f"bank neighbours of row {row} are not its {b} nearest bank rows (sample check)")


# ---------------------------------------------------------------------------------------------- memory
# hnswlib's layout (hnswalg.h), for estimates before an index exists (devices fit, export size caps).
_HNSW_HEADER_BYTES = 96
_HNSW_LABEL_LOCKS = 65536
_MUTEX_BYTES = 40
_LABEL_MAP_ENTRY_BYTES = 40


def _hnsw_upper_levels(m: int) -> float:
    """Expected upper levels per element: level ~ floor(-ln(U) / ln(M)), so P(level >= l) = M^-l."""
    return 1.0 / (m - 1)


def index_file_bytes(count: int, dim: int, m: int) -> int:
    """Expected size of an hnswlib index file (saveIndex): header, level-0 block, per-element upper links."""
    level0 = 2 * m * 4 + 4 + dim * 4 + 8
    upper = (m * 4 + 4) * _hnsw_upper_levels(m)
    return int(_HNSW_HEADER_BYTES + count * (level0 + 4) + count * upper)


def index_resident_bytes(count: int, dim: int, m: int, search_threads: int = 1) -> int:
    level0 = 2 * m * 4 + 4 + dim * 4 + 8
    per_element = level0 + 8 + 4 + _MUTEX_BYTES + _LABEL_MAP_ENTRY_BYTES
    upper = (m * 4 + 4 + 16) * _hnsw_upper_levels(m)
    visited = 2 * count * max(1, search_threads)
    return int(count * (per_element + upper) + visited + _HNSW_LABEL_LOCKS * _MUTEX_BYTES)


# ----------------------------------------------------------------------------------------------- cells
# PatchCore's first pass (issue 13): k-means cells of the bank, derived from the bank when the bundle loads; each
# patch is compared with the rows of the `probes` cells whose centres are nearest, one BLAS call per cell for all
# the patches of a batch that probe it. Measured on the real bottle bank (16,386 x 96, 784 patches per image,
# 1 thread, CPU ms per image; benchmarks/results/search.md): 64 cells, 3 probes: 3.1 ms, recall@1 0.989, worst
# over-estimate 19 %; hnswlib (M 16) ef 32: 10.3 ms, 0.997, 25 %; ef 8: 4.3 ms, 0.985, 7.6x; faiss IVFFlat nprobe 8:
# 6.5 ms. With the exact re-rank: 4.6 ms against 18.4 ms (hnswlib ef 32); 100k bank 18.2 against 80.7 ms (brute
# force 409 ms). Like any first pass it only names a bank row: the image score is made exact by the re-rank
# (scoring.py), whatever it names.
DEFAULT_PROBES = 3
# ... and at least this many rows per query: on a small bank the probes then cover every cell (brute force, which is
# cheap there), so that its heat map is not an over-estimate where an exhaustive scan costs little.
_MIN_SCANNED_ROWS = 768
# Query x row products of a first pass above which a second thread pays for its hand-over: bottle bank, 2 cores,
# ms per image wall 2.55 -> 2.81 at batch 1 (0.6M), 2.23 -> 2.20 at 2, 2.02 -> 1.54 at 4, 1.92 -> 1.71 at 8.
_TWO_THREAD_WORK = 2_000_000
# ... and for the compiled pass, which holds no GIL while it runs and shares its cells through a counter: bottle bank,
# batch 1 (0.62M products), after a network run, ms: 2.58 on one thread, 2.09 on two (session 8).
_TWO_THREAD_COMPILED_WORK = 250_000
_KMEANS_ITERATIONS = 8
_KMEANS_SAMPLE = 65536  # training rows for the cells' centres (all rows are then assigned)


def first_pass_kernel() -> str:
    """The cells' first pass this install runs: "compiled (avx512)", "compiled (avx2)", "compiled (sse2)",
    "compiled (neon)", or "numpy" where patchcore_edge._cellscan was not built."""
    return "numpy" if _cellscan is None else f"compiled ({_cellscan.variant()})"


def default_cells(count: int) -> int:
    """Cells for a bank of `count` rows: about sqrt(count) / 2 (64 for 16k, 158 for 100k), so that a patch's
    probes scan ~3 * 2 sqrt(count) rows next to the sqrt(count) / 2 centres."""
    return int(max(1, min(count, round(np.sqrt(count) / 2.0))))


def nearest_centre(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre per row (k-means assignment): |c|^2 - 2 x.c orders the centres as |x - c|^2
    does (|x|^2 is the same for every centre); an approximate argmin only moves a border point."""
    values = rows @ centres.T
    values *= -2.0
    values += squared_norms(centres)[None, :]
    assigned: np.ndarray = values.argmin(axis=1)
    return assigned


def cell_index_resident_bytes(count: int, dim: int) -> int:
    """Memory of a `CellIndex` over `count` x `dim` rows: the reordered bank with a norm row (numpy pass) or its packed
    copy (compiled pass: each cell padded to at most 15 more columns, with the column order), the centres with their
    norm row, the row order."""
    cells = default_cells(count)
    shared = cells * (dim + 1) * 4 + count * 8
    if _cellscan is None:
        return shared + count * (dim + 1) * 4
    padded = count + 15 * cells
    return shared + padded * (dim + 1) * 4 + padded * 8


def search_bank_bytes(count: int, dim: int, cells: bool = False) -> int:
    """Memory `PatchSearch` keeps beside its index: the bank, its squared norms and, without a `CellIndex`
    (whose centred rows the exact search reads), a centred copy for banks up to 64 MiB."""
    bank = count * dim * 4
    return bank + count * 4 + (bank if bank <= _CENTRED_COPY_BYTES and not cells else 0)


def _first_per_group(groups: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Positions in `order` (a lexsort whose primary key is `groups`) that start a new group: the best of each."""
    first = np.ones(order.size, dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    return first


def _lifted(rows: np.ndarray, centre: Optional[np.ndarray] = None) -> np.ndarray:
    """[x - centre, 1] per row (float32 [n, D + 1]; centre None: rows already centred), the query side of
    `_augmented`; the subtraction writes into the result (no intermediate copy on the per-image path)."""
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.float32)
    if centre is None:
        out[:, :-1] = rows
    else:
        np.subtract(rows, centre, out=out[:, :-1])
    out[:, -1] = 1.0
    return out


def _augmented(rows: np.ndarray) -> np.ndarray:
    """[-2 x, ||x||^2] per row, transposed (float32 [D + 1, n]): one product with [q, 1] gives ||x||^2 - 2 q.x,
    which orders the rows by distance to q (||q||^2 is the same for every row)."""
    out = np.empty((rows.shape[1] + 1, rows.shape[0]), dtype=np.float32)
    np.multiply(rows.T, np.float32(-2.0), out=out[:-1])
    out[-1] = squared_norms(rows)
    return out


class CellIndex:
    """k-means cells of a bank: an approximate first pass that names, per query, a bank row among the rows of the
    `probes` cells with the nearest centres (an upper bound of the nearest distance once `row_distances` measures it).

    Built from the bank alone (seeded k-means, one BLAS thread), so a bundle needs no file for it and the same bank
    gives the same cells on a machine. Memory: one reordered copy of the bank (plus a row of norms), centred on the
    bank mean `centre`: `PatchSearch`'s exact search reads the same copy (one pass over memory the first pass has
    just warmed, instead of a second copy; issue 13).
    """

    def __init__(self, bank: np.ndarray, cells: Optional[int] = None, seed: int = 0,
                 compiled: Optional[bool] = None) -> None:
        if compiled and _cellscan is None:
            raise RuntimeError("the compiled first pass (patchcore_edge._cellscan) is not built in this install")
        data = as_bank(bank)
        count = data.shape[0]
        k = default_cells(count) if cells is None else int(cells)
        if not 1 <= k <= count:
            raise ValueError(f"cells must be in 1..{count}, got {cells}")
        rng = np.random.default_rng(seed)
        with blas_threads(1):
            sample = data if count <= _KMEANS_SAMPLE else data[np.sort(rng.choice(count, _KMEANS_SAMPLE, replace=False))]
            centres = sample[np.sort(rng.choice(sample.shape[0], k, replace=False))].copy()
            for _ in range(_KMEANS_ITERATIONS):
                assign = nearest_centre(sample, centres)
                sizes = np.bincount(assign, minlength=k)
                filled = sizes > 0  # an emptied cell keeps its centre
                starts = (np.cumsum(sizes) - sizes)[filled]
                sums = np.add.reduceat(sample[np.argsort(assign, kind="stable")], starts, axis=0)
                centres[filled] = sums / sizes[filled, None].astype(np.float32)
            assign = nearest_centre(data, centres)
        # Cells that end up empty are dropped (a probe must name rows); the others keep their order.
        used = np.flatnonzero(np.bincount(assign, minlength=k))
        if used.size < k:
            renumber = np.full(k, -1, dtype=np.int64)
            renumber[used] = np.arange(used.size)
            centres, assign, k = centres[used], renumber[assign], int(used.size)
        order = np.argsort(assign, kind="stable")
        self.cells = k
        self.rows = order.astype(np.int64)  # position in the cell order -> bank row
        self.bounds = np.searchsorted(assign[order], np.arange(k + 1)).astype(np.int64)
        # Centred as PatchSearch's exact search wants its rows (smaller norms, smaller cancellation error); the
        # order of distances to a query, and so the rows found, are those of the raw rows.
        self.centre = bank_centre(data)
        self.centres = _augmented(centres - self.centre)
        members = _augmented(data[order] - self.centre)
        self.count, self.dim = int(count), int(data.shape[1])
        # The compiled pass's copy (`_packed_cells`): packed rows, each cell's first column, each column's bank row.
        self.packed: Optional[np.ndarray] = None
        self.cell_cols = np.empty(0, dtype=np.int64)
        self.col_rows = np.empty(0, dtype=np.int64)
        # The numpy pass and its exact search read `members` ([D + 1, M], cell order); the compiled ones read only the
        # packed copy, so `members` is not kept beside it (one copy of the bank: 8 MB for bottle, 48 MB for 100k).
        self.members: Optional[np.ndarray] = members
        if compiled is not False and _cellscan is not None:
            self.packed, self.cell_cols, self.col_rows = _packed_cells(members, self.bounds, self.rows)
            self.members = None

    @property
    def kernel(self) -> str:
        """This index's first pass: `first_pass_kernel()`, or "numpy" when built with compiled=False."""
        return "numpy" if self.packed is None else first_pass_kernel()

    @property
    def packed_columns(self) -> int:
        return int(self.cell_cols[-1]) if self.packed is not None else 0

    def packed_rows(self, cols: np.ndarray) -> np.ndarray:
        """The bank row of each packed column (padding columns, never chosen, are -1)."""
        rows: np.ndarray = self.col_rows[cols]
        return rows

    def column_spans(self, most: int) -> List[Tuple[int, int]]:
        """The packed columns in spans of whole cells, each at most `most` columns (or one cell, if larger)."""
        spans: List[Tuple[int, int]] = []
        first = last = 0
        for end in self.cell_cols[1:].tolist():
            if end - first > most and last > first:
                spans.append((first, last))
                first = last
            last = end
        spans.append((first, last))
        return spans

    def expansion_fill(self, lifted: np.ndarray) -> Callable[[int, int, np.ndarray], None]:
        """fill(start, stop, block): block [n, stop - start] = lifted [n, D + 1] times the packed columns start..stop
        (a span of whole cells from `column_spans`), by the compiled products."""
        assert self.packed is not None
        n, dp = lifted.shape

        def fill(start: int, stop: int, block: np.ndarray) -> None:
            first, last = np.searchsorted(self.cell_cols, (start, stop)).tolist()  # span ends are cell starts
            _cellscan.values(lifted, n, dp, self.packed, self.cell_cols, self.cells, first, last, block)
        return fill

    def lift(self, queries: np.ndarray) -> np.ndarray:
        """[q - centre, 1] per query (float32 [n, D + 1]): its product with `members` (or `centres`) gives
        ||x - c||^2 - 2 (q - c).(x - c) per row, which orders the rows as their distances to q do."""
        return _lifted(queries, self.centre)

    def default_probes(self) -> int:
        """DEFAULT_PROBES cells, more when that scans fewer than _MIN_SCANNED_ROWS rows (all cells of a small bank)."""
        rows_per_cell = self.count / self.cells
        return int(min(self.cells, max(DEFAULT_PROBES, math.ceil(_MIN_SCANNED_ROWS / rows_per_cell))))

    @property
    def nbytes(self) -> int:
        packed = 0 if self.packed is None else int(self.packed.nbytes + self.cell_cols.nbytes + self.col_rows.nbytes)
        members = 0 if self.members is None else int(self.members.nbytes)
        return int(members + self.centres.nbytes + self.rows.nbytes + self.bounds.nbytes + packed)

    def nearest_rows(self, queries: np.ndarray, probes: int, threads: int = 1) -> np.ndarray:
        """The bank row (int64 [n]) with the smallest ||x||^2 - 2 q.x among the rows of each query's `probes`
        nearest cells (ties: the lower cell, then the lower position in it); float32 C-contiguous queries [n, D].

        `threads` 2 or more splits the probed cells between the calling thread and one worker when the batch has
        enough work to pay for the hand-over (numpy's products and reductions release the GIL, as the compiled scan
        does). The compiled pass follows the same rule with its own rounding (fused multiply-adds instead of BLAS), so
        where two rows are within rounding of each other it may name the other one; only which row is named can
        differ, never a reported distance (`PatchSearch.nearest` measures it with `row_distances`)."""
        n = queries.shape[0]
        probes = int(max(1, min(probes, self.cells)))
        lifted = self.lift(queries)
        with blas_threads(1):
            to_centres = lifted @ self.centres
        if self.packed is not None:
            return self._compiled_rows(lifted, to_centres, probes, threads)
        members = self.members
        assert members is not None  # kept whenever there is no packed copy
        with blas_threads(1):
            # Each query's probes in ascending cell order: column order is then the tie rule below.
            chosen = (to_centres.argmin(axis=1)[:, None] if probes == 1
                      else np.sort(np.argpartition(to_centres, probes - 1, axis=1)[:, :probes], axis=1))
            flat_cell = chosen.ravel()
            # Stable radix sort on 16-bit cell numbers (5x numpy's int64 sort); the order is the same.
            order = np.argsort(flat_cell.astype(np.int16) if self.cells <= 32767 else flat_cell, kind="stable")
            cell = flat_cell[order]
            grouped = lifted[order // probes]
            cuts = np.flatnonzero(cell[1:] != cell[:-1]) + 1
            starts = np.concatenate(([0], cuts))
            stops = np.concatenate((cuts, [cell.size]))
            cells = cell[starts]
            lows, highs = self.bounds[cells], self.bounds[cells + 1]
            values = np.empty(cell.size, dtype=np.float32)
            found = np.empty(cell.size, dtype=np.int64)

            def scan(first: int, last: int) -> None:
                # One product per probed cell, for every query of the batch that probes it.
                for start, stop, low, high in zip(starts[first:last].tolist(), stops[first:last].tolist(),
                                                  lows[first:last].tolist(), highs[first:last].tolist()):
                    block = grouped[start:stop] @ members[:, low:high]
                    local = block.argmin(axis=1)
                    values[start:stop] = block[np.arange(stop - start), local]
                    found[start:stop] = local + low

            work = (stops - starts) * (highs - lows)
            if threads >= 2 and int(work.sum()) >= _TWO_THREAD_WORK:
                half = int(np.searchsorted(np.cumsum(work), work.sum() / 2.0)) + 1
                pending = helper_thread().submit(scan, half, starts.size)
                scan(0, half)
                pending.result()
            else:
                scan(0, starts.size)
        # Back to query-major [n, probes]; argmin takes the first of equal values: the lower cell.
        by_query = np.empty(cell.size, dtype=np.float32)
        by_query[order] = values
        rows_at = np.empty(cell.size, dtype=np.int64)
        rows_at[order] = found
        pick = by_query.reshape(n, probes).argmin(axis=1)
        rows: np.ndarray = self.rows[rows_at.reshape(n, probes)[np.arange(n), pick]]
        return rows

    def _compiled_rows(self, lifted: np.ndarray, to_centres: np.ndarray, probes: int, threads: int) -> np.ndarray:
        """`nearest_rows` through patchcore_edge._cellscan: probe selection and grouping, then one fused product and
        running minimum per block of queries and columns (no product matrix written; search.md, session 8)."""
        assert self.packed is not None
        packed, cell_cols = self.packed, self.cell_cols
        n, dp = lifted.shape
        starts = np.empty(self.cells + 1, dtype=np.int64)
        grouped = np.empty(n * probes, dtype=np.int64)
        _cellscan.probe(to_centres, n, self.cells, probes, starts, grouped)
        value = np.full(n, np.inf, dtype=np.float32)
        col = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        next_cell = np.zeros(1, dtype=np.int64)  # the threads claim cells from it, so a late one takes fewer

        def scan(best: np.ndarray, at: np.ndarray) -> None:
            _cellscan.scan(lifted, n, dp, packed, cell_cols, self.cells, starts, grouped, next_cell, best, at)

        if threads >= 2 and int((np.diff(starts) * np.diff(cell_cols)).sum()) >= _TWO_THREAD_COMPILED_WORK:
            other_value, other_col = value.copy(), col.copy()
            pending = helper_thread().submit(scan, other_value, other_col)
            scan(value, col)
            pending.result()
            # The rule across the two threads' cells, as within one: the smaller value, then the lower column.
            better = (other_value < value) | ((other_value == value) & (other_col < col))
            col = np.where(better, other_col, col)
        else:
            scan(value, col)
        return self.packed_rows(col)


def _packed_cells(members: np.ndarray, bounds: np.ndarray, rows: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The compiled first pass's copy of the cells' rows: each cell padded to a multiple of 16 columns (padding: zeros
    with an infinite norm, so never the smallest) and cut into chunks of up to 64 columns stored [D + 1, width] each, so
    that a chunk is contiguous (read from L1 by every block of queries; the [D + 1, M] layout's row stride of M floats
    maps a column's values onto a few cache sets). Returns (packed float32 flat, cell_cols int64 [cells + 1]: each
    cell's first packed column, col_rows int64: the bank row of each packed column, -1 for padding)."""
    dp = members.shape[0]
    sizes = np.diff(bounds)
    widths = (sizes + 15) // 16 * 16
    cell_cols = np.concatenate(([0], np.cumsum(widths))).astype(np.int64)
    packed = np.empty(dp * int(cell_cols[-1]), dtype=np.float32)
    col_rows = np.full(int(cell_cols[-1]), -1, dtype=np.int64)
    for cell in range(sizes.size):
        low, high, first = int(bounds[cell]), int(bounds[cell + 1]), int(cell_cols[cell])
        block = np.zeros((dp, int(widths[cell])), dtype=np.float32)
        block[-1] = np.inf
        block[:, :high - low] = members[:, low:high]
        col_rows[first:first + high - low] = rows[low:high]
        for chunk in range(0, int(widths[cell]), 64):
            width = min(64, int(widths[cell]) - chunk)
            start = dp * (first + chunk)
            packed[start:start + dp * width] = block[:, chunk:chunk + width].ravel()
    return packed, cell_cols, col_rows


class PatchSearch:
    """Nearest bank vector of patch features: a first pass (cells or hnswlib) and the exact search (float32 BLAS).

    Holds the bank (float32 C-contiguous [M, D]), the bank mean `centre`, the squared norms of the centred
    rows and the first-pass index: a `CellIndex` (PatchCore; one reordered copy of the bank) or an hnswlib index
    (the trained methods; its own copy of the vectors and its graph). Banks up to 64 MiB also keep a centred copy.
    `ef`: the first pass's breadth: cells probed per query for a CellIndex, hnswlib's ef for an hnswlib index.
    `threads`: None leaves hnswlib on all cores and BLAS as configured; n bounds both to n threads.
    `index=None` gives an exact-only search (`nearest` is then `exact_nearest`), without the index's memory.
    """

    def __init__(self, bank: np.ndarray, index: Optional[Union[CellIndex, hnswlib.Index]], ef: int = DEFAULT_EF,
                 threads: Optional[int] = None) -> None:
        self.bank = as_bank(bank)
        count, dim = self.bank.shape
        if isinstance(index, CellIndex):
            if (index.count, index.dim) != (count, dim):
                raise ValueError(f"cell index holds {index.count} vectors of dim {index.dim}, bank is {count} x {dim}")
        elif index is not None and (index.dim != dim or index.element_count != count):
            raise ValueError(f"index holds {index.element_count} vectors of dim {index.dim}, "
                             f"bank is {count} x {dim}")
        self.index = index
        # The BLAS expansion runs on vectors centred on the bank mean: distances do not change, but the
        # norms shrink, and with them the cancellation error of ||b||^2 - 2 q.b (ReLU features share a
        # large positive mean).
        self.centre = bank_centre(self.bank)
        # A CellIndex already holds the centred rows (in its cell order, augmented with their norms): the exact
        # search reads them there. Otherwise banks up to 64 MiB keep a centred copy.
        self._cells = index if isinstance(index, CellIndex) else None
        if self._cells is not None and not np.array_equal(self._cells.centre, self.centre):
            raise ValueError("cell index is centred on another mean than the bank's (index of another bank?)")
        self._centred: Optional[np.ndarray] = None
        if self._cells is None and self.bank.nbytes <= _CENTRED_COPY_BYTES:
            self._centred = self.bank - self.centre
        self.norms = np.concatenate([squared_norms(self.bank[start:start + 65536] - self.centre)
                                     for start in range(0, count, 65536)])
        self._largest_norm = float(np.sqrt(self.norms.max(initial=0.0)))
        self.ef = DEFAULT_EF
        self.threads: Optional[int] = None
        self.set_ef(ef)
        self.set_threads(threads)

    @classmethod
    def from_bank(cls, bank: np.ndarray, m: int = DEFAULT_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
                  ef: int = DEFAULT_EF, seed: int = 0, threads: Optional[int] = None) -> PatchSearch:
        """An hnswlib-backed search built here (tests, benchmarks)."""
        data = as_bank(bank)
        index = build_index(data, m=m, ef_construction=ef_construction, seed=seed, threads=threads or 1)
        return cls(data, index, ef=ef, threads=threads)

    @classmethod
    def with_cells(cls, bank: np.ndarray, probes: Optional[int] = None, cells: Optional[int] = None,
                   threads: Optional[int] = None) -> PatchSearch:
        """A search whose first pass is the bank's k-means cells (PatchCore's runtime); probes None: the default."""
        data = as_bank(bank)
        index = CellIndex(data, cells)
        return cls(data, index, ef=probes or index.default_probes(), threads=threads)

    @property
    def is_exact(self) -> bool:
        """True when there is no index and every search is exact."""
        return self.index is None

    @property
    def count(self) -> int:
        return int(self.bank.shape[0])

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def set_ef(self, ef: int) -> None:
        """The first pass's breadth at query time (recall vs speed): cells probed, or hnswlib's candidate list."""
        if int(ef) < 1:
            raise ValueError(f"ef must be >= 1, got {ef}")
        self.ef = int(ef)
        if self.index is not None and not isinstance(self.index, CellIndex):
            self.index.set_ef(self.ef)

    def set_threads(self, threads: Optional[int]) -> None:
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.threads = None if threads is None else int(threads)

    def nearest(self, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Approximate nearest bank row per query: (distance float32 [n], row int64 [n]).

        The row is the first pass's answer; the distance is recomputed by `row_distances`, so it is an exact
        distance to a real bank row and therefore never below the exact nearest distance.
        """
        if self.index is None:
            return self.exact_nearest(queries)
        q = _as_queries(queries, self.dim)
        if q.shape[0] == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        if isinstance(self.index, CellIndex):
            idx = self.index.nearest_rows(q, self.ef, threads=self.threads or 1)
        else:
            labels, _ = self.index.knn_query(q, k=1, num_threads=-1 if self.threads is None else self.threads)
            idx = labels[:, 0].astype(np.int64)
        return row_distances(q, self.bank[idx]), idx

    def exact_nearest(self, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The exact nearest bank row per query: (distance float32 [n], row int64 [n]), by one rule: the smallest
        `row_distances` value, the lowest row number among equal ones.

        A function of the query and the bank alone (not of the index, ef, the batch, the other queries or BLAS's
        blocking), which is what makes the re-weighted image score the same in every mode (`scoring.image_scores`).
        BLAS only pre-selects: every row whose expanded value ||b-c||^2 - 2 (q-c).(b-c) (c: the bank mean) lies
        within a proven float32 error bound of the query's smallest is kept, and the direct distances of those
        decide.

        The bound: the expansion of a row differs from the true ||q-b||^2 - ||q-c||^2 by at most
        (3 gamma_D + 6 u) R^2 (u = 2^-24, gamma_D = D u / (1 - D u): dot products and norms of vectors of norm
        <= R = ||q-c|| + max ||b-c||, plus the centring and the two element-wise roundings); the direct squared
        distances err by at most (gamma_D + 3 u) R^2. A row whose direct distance is the smallest can therefore
        trail the smallest expanded value by no more than twice their sum, the margin used here (rounded up to
        float32). Rows are scanned in blocks; a block keeps the rows within the margin of its own smallest value
        (a superset of those within the margin of the overall smallest), filtered once all blocks are seen.
        """
        q = _as_queries(queries, self.dim)
        if q.shape[0] == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        best_idx = np.concatenate([self._canonical_rows(q[start:start + _QUERY_BLOCK])
                                   for start in range(0, q.shape[0], _QUERY_BLOCK)])
        return row_distances(q, self.bank[best_idx]), best_idx

    def _margins(self, centred_q: np.ndarray) -> np.ndarray:
        u = 2.0 ** -24
        gamma = self.dim * u / (1.0 - self.dim * u)
        reach = np.sqrt(np.einsum("ij,ij->i", centred_q, centred_q, dtype=np.float64)) + self._largest_norm
        return 2.0 * ((3.0 * gamma + 6.0 * u) + (gamma + 3.0 * u)) * reach * reach

    def _canonical_rows(self, q: np.ndarray) -> np.ndarray:
        n = q.shape[0]
        centred_q = q - self.centre
        margins = self._margins(centred_q)
        smallest = np.full(n, np.inf, dtype=np.float64)
        kept_query, kept_col, kept_value = [], [], []
        spans, fill, rows_of = self._expansion(centred_q)
        buffer = np.empty(n * max(stop - start for start, stop in spans), dtype=np.float32)
        # Re-rank-sized calls use one BLAS thread whatever `threads` says: a second one gains little on so few
        # queries, and OpenBLAS workers busy-wait after the call, taking a core from the stages that follow
        # (2 cores, batch 1: 19 -> 13 ms per image end to end; benchmarks/results/runtime.md).
        with blas_threads(1 if n <= _ONE_THREAD_QUERIES else self.threads):
            for start, stop in spans:
                block = buffer[:n * (stop - start)].reshape(n, stop - start)
                fill(start, stop, block)
                low = block.min(axis=1).astype(np.float64)
                query, col = np.nonzero(block <= _float32_up(low + margins)[:, None])
                kept_value.append(block[query, col])
                kept_query.append(query)
                kept_col.append(col + start)
                np.minimum(smallest, low, out=smallest)
        query, col, value = np.concatenate(kept_query), np.concatenate(kept_col), np.concatenate(kept_value)
        near = value <= _float32_up(smallest + margins)[query]
        query, row = query[near], rows_of(col[near].astype(np.int64))  # columns -> bank rows, before the tie rule
        distances = row_distances(q[query], self.bank[row])
        # Per query: the smallest direct distance, then the lowest row (lexsort: the last key is the primary one).
        order = np.lexsort((row, distances, query))
        first = _first_per_group(query, order)
        best = np.empty(n, dtype=np.int64)
        best[query[order][first]] = row[order][first]
        return best

    def _expansion(self, centred_q: np.ndarray) -> Tuple[List[Tuple[int, int]], Callable[[int, int, np.ndarray], None],
                                                         Callable[[np.ndarray], np.ndarray]]:
        """The expanded values ||x - c||^2 - 2 (q - c).(x - c) in column spans: (spans [(start, stop)], fill(start, stop,
        block [n, stop - start]), the bank row of each column). Columns: the compiled cells' packed columns (padding
        gives +inf: never kept), else the cells' positions, else the bank rows; a span holds at most ~64 MiB of values."""
        n = centred_q.shape[0]
        cells = self._cells
        if cells is not None and cells.packed is not None:
            spans = cells.column_spans(_block_rows(n, cells.packed_columns))
            return spans, cells.expansion_fill(_lifted(centred_q)), cells.packed_rows
        rows = min(_block_rows(n, self.count), self.count)
        spans = [(start, min(self.count, start + rows)) for start in range(0, self.count, rows)]
        if cells is not None:
            return spans, self._expansion_from_cells(centred_q), cells.rows.__getitem__
        return spans, self._expansion_from_rows(centred_q, rows), _same_rows

    def _expansion_from_cells(self, centred_q: np.ndarray) -> Callable[[int, int, np.ndarray], None]:
        """Writes ||x - c||^2 - 2 (q - c).(x - c) for the positions start..stop of the cells' centred rows with their
        norms ([D + 1, M], cell order) into block [n, stop - start]: one product (the scaling by -2 is exact and the
        norm enters as one more term of the sum, so the rounding stays within the bound above)."""
        assert self._cells is not None
        members, lifted = self._cells.members, _lifted(centred_q)
        assert members is not None  # kept whenever the pass is numpy's (`_expansion` chooses)

        def fill(start: int, stop: int, block: np.ndarray) -> None:
            np.matmul(lifted, members[:, start:stop], out=block)
        return fill

    def _expansion_from_rows(self, centred_q: np.ndarray, rows: int) -> Callable[[int, int, np.ndarray], None]:
        """The same expansion from the bank rows start..stop: the centred copy, else rows centred block by block."""
        n = centred_q.shape[0]
        # A few queries (re-rank rounds) run faster as bank @ q.T: the product is then bound by one pass over the
        # bank instead of OpenBLAS packing it (measured 1.2-1.7x for 8 queries); numpy's reductions along the rows
        # of that [rows, n] product are strided and slow (0.5 ms for n = 2 on the bottle bank), so it is copied to
        # query-major (0.02-0.2 ms) and one layout serves what follows.
        tall = np.empty((rows, n), dtype=np.float32) if n <= _FEW_QUERIES else None
        scratch = np.empty((rows, self.dim), dtype=np.float32) if self._centred is None else None

        def fill(start: int, stop: int, block: np.ndarray) -> None:
            if scratch is None:
                assert self._centred is not None
                centred = self._centred[start:stop]
            else:
                centred = np.subtract(self.bank[start:stop], self.centre, out=scratch[:stop - start])
            if tall is None:
                np.matmul(centred_q, centred.T, out=block)
            else:
                np.matmul(centred, centred_q.T, out=tall[:stop - start])
                np.copyto(block, tall[:stop - start].T)
            block *= -2.0
            block += self.norms[None, start:stop]
        return fill


def _same_rows(rows: np.ndarray) -> np.ndarray:
    return rows


def _float32_up(values: np.ndarray) -> np.ndarray:
    """float64 values rounded up to float32, so that `x <= result` holds for every float32 x <= value."""
    down = values.astype(np.float32)
    return np.where(down.astype(np.float64) < values, np.nextafter(down, np.float32(np.inf)), down)
