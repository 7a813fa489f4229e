"""How a features store keeps its `features` arrays: the `storage` knob of a backbone (params.yaml).

Every choice is a chain of Zarr v3 codecs, so the store stays a plain Zarr store: its readers (StoreMaps,
`xr.open_datatree`, any Zarr client with this package installed) decode chunks on read and see float16
`features (image, timestep, y, x, channel)` whatever the choice.

- `float16`: float16, zstd level 3 (what every store held before the knob existed; the default).
- `float16-shuffle`: the same float16 values, byte-shuffled before zstd (Blosc): lossless, smaller.
- `pca:K`: each cell's coordinates on K axes fitted per layer, before extraction, on a sample of images
  (`LayerMoments`, `Basis`: in the array's codec configuration, `dift_cache.layer_pca`), as int16 with a
  scale per component, with what the feature transforms need kept exactly: the channels of outsized
  magnitude (massive activations of diffusion transformers, up to EXACT_CHANNELS, float16) and the mean
  and standard deviation of each cell's other channels (float32; decoding shifts and scales them back), so
  each cell's statistics over all channels are exact and LayerNorm, AdaLN and `drop:auto` see what they
  would see in the float16 store. Every image shares its layer's axes, so a decoded cell is its orthogonal
  projection onto one subspace (rescaled to its exact std), and the cosine of two decoded cells errs by
  about the product of their two residuals: second order in what the axes leave out, where rounding each
  value (int8 with per-channel and per-cell scales, measured and dropped; bfloat16) errs to first order
  (docs/measured/storage.md has the measurements).

Whatever the choice, every chunk of every array (features, latents and the per-image tables alike) ends
with its crc32c (`CHECKSUM`, Zarr v3's standard `crc32c` codec, last in the chain): any Zarr v3 reader
verifies it on read, so a damaged chunk is an error, never a value (store schema 3; stores of schema 2
have none, see docs/reference/store.md).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import zarr
from threadpoolctl import ThreadpoolController
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import FixedScaleOffset
from zarr.core.common import parse_named_configuration

from pipeline.config import parse_storage

STORAGE_CHOICES = ("float16", "float16-shuffle", "pca:256", "pca:128", "pca:64")  # what `plan` prices
EXACT_CHANNELS = 16  # pca: at most this many outsized channels kept exactly
EXACT_RATIO = 10.0  # pca: a channel is outsized when its median |x| is this many times the channels' median


TORCH_GRAIN = 32768  # torch's intra-op grain (at::internal::GRAIN_SIZE): a cast of at most this many values is serial


def cast(values: np.ndarray, dtype) -> np.ndarray:
    """`values.astype(dtype)`; between float16 and float32 through torch's vectorised casts (the same
    round-to-nearest-even values, several times faster than numpy's on x86), a grain at a time. Zarr codes chunks
    in worker threads, and a torch cast over more values than a grain would start an OpenMP team in each of
    them, whose spinning threads take the cores of the rest (benchmarks/extract.py measures the writes)."""
    import torch  # not at import: Zarr loads these codecs to open any store

    dtype = np.dtype(dtype)
    if {values.dtype, dtype} != {np.dtype(np.float16), np.dtype(np.float32)}:
        return values.astype(dtype)
    source = torch.from_numpy(np.ascontiguousarray(values).reshape(-1))
    result = np.empty(values.shape, dtype)
    target = torch.from_numpy(result.reshape(-1))
    for start in range(0, len(source), TORCH_GRAIN):
        target[start:start + TORCH_GRAIN] = source[start:start + TORCH_GRAIN]
    return result


class OneBlasThread:
    """numpy's BLAS on one thread while any chunk is being coded. Zarr codes an image's chunks in parallel,
    one per worker thread; BLAS threads on top of them only compete for the same cores, and OpenBLAS's
    threads spin after each call, taking cores from the model's next forward pass (benchmarks/extract.py
    measures what they cost a pca:K write). Reference-counted, as threadpoolctl's limits are per
    process; the extraction loop holds it throughout (a restored limit wakes the threads that spin)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._coding = 0
        self._limits = None

    def __enter__(self):
        with self._lock:
            if not self._coding:
                self._limits = _blas_threads().limit(limits=1, user_api="blas")
            self._coding += 1

    def __exit__(self, *exc):
        with self._lock:
            self._coding -= 1
            if not self._coding:
                self._limits.restore_original_limits()


@functools.cache
def _blas_threads() -> ThreadpoolController:
    return ThreadpoolController()  # inspects every loaded library: once


one_blas_thread = OneBlasThread()


@dataclass(frozen=True, eq=False)
class Basis:
    """A layer's fitted `pca:K` basis: its exact (outsized) channels and K float16 axes over the others."""

    exact: tuple[int, ...]
    axes: np.ndarray  # (K, C - len(exact)) float16

    def others(self, channels: int) -> np.ndarray:
        """A mask of the channels the axes cover (all but the exact ones)."""
        mask = np.ones(channels, bool)
        mask[list(self.exact)] = False
        return mask

    @functools.cached_property
    def projection(self) -> np.ndarray:
        """(C - M, K) float64: least-squares coefficients on the stored float16 axes, so that decoding is the
        orthogonal projection onto their span even though rounding left them not quite orthonormal."""
        axes = self.axes.astype(np.float64)
        return axes.T @ np.linalg.inv(axes @ axes.T)

    @functools.cached_property
    def encoder(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, K) float32 least-squares coefficients over every channel (zero rows for the exact ones, so a
        chunk is projected without copying out its other channels) and their (K) float64 column sums."""
        full = np.zeros((self.axes.shape[1] + len(self.exact), len(self.axes)), np.float32)
        full[self.others(len(full))] = self.projection
        return full, full.sum(axis=0, dtype=np.float64)

    @functools.cached_property
    def axes32(self) -> np.ndarray:
        """The axes as float32, once per basis rather than once per decoded chunk."""
        return self.axes.astype(np.float32)


@dataclass(frozen=True)
class LayerPCA(ArrayBytesCodec):
    """float chunk (..., C) <-> each cell's coefficients on the layer's fitted axes (`Basis`, kept in the
    codec's configuration), with exact outsized channels and exact per-cell mean and standard deviation.
    Chunk layout (little-endian): float32 coefficient scales (K); int16 coefficients (N, K); float16 exact
    channels (N, M); float32 means (N) and standard deviations (N) of each cell's other channels."""

    basis: Basis
    name = "dift_cache.layer_pca"
    is_fixed_size = True

    @classmethod
    def from_dict(cls, data):
        _, configuration = parse_named_configuration(data, cls.name)
        return cls(_basis(tuple(int(c) for c in configuration["exact"]), configuration["axes"],
                          int(configuration["components"])))

    def to_dict(self):
        axes = np.ascontiguousarray(self.basis.axes, "<f2")
        return {"name": self.name, "configuration": {"components": int(axes.shape[0]), "exact": list(self.basis.exact),
                                                     "axes": base64.b64encode(axes.tobytes()).decode("ascii")}}

    def __hash__(self):
        return hash((self.basis.exact, self.basis.axes.tobytes()))

    def __eq__(self, other):
        return isinstance(other, LayerPCA) and self.to_dict() == other.to_dict()

    def evolve_from_array_spec(self, array_spec):
        return self

    def compute_encoded_size(self, input_byte_length: int, chunk_spec) -> int:
        c = chunk_spec.shape[-1]
        return layer_pca_bytes(int(np.prod(chunk_spec.shape)) // c, len(self.basis.axes), len(self.basis.exact))

    def _encode_sync(self, chunk_array, chunk_spec):
        return chunk_spec.prototype.buffer.from_bytes(pca_encode(np.asarray(chunk_array.as_numpy_array()), self.basis))

    def _decode_sync(self, chunk_bytes, chunk_spec):
        values = cast(pca_decode(chunk_bytes.to_bytes(), chunk_spec.shape, self.basis), chunk_spec.dtype.to_native_dtype())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(values)

    # In a worker thread, as zarr's own codecs do: chunks written or read together encode in parallel.
    async def _encode_single(self, chunk_array, chunk_spec):
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes, chunk_spec):
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)


@functools.lru_cache(maxsize=256)
def _basis(exact: tuple[int, ...], axes: str, components: int) -> Basis:
    """One `Basis` (and its projection, computed once) per layer's configuration: Zarr parses an array's
    codecs again for every chunk it writes."""
    return Basis(exact, np.frombuffer(base64.b64decode(axes), "<f2").reshape(components, -1))


zarr.registry.register_codec(LayerPCA.name, LayerPCA)


class LayerMoments:
    """What fitting a layer's `Basis` needs from a sample of images, gathered chunk by chunk (image,
    timestep): each chunk's median |x| per channel over its cells, and the channels' second moments, summed
    in float64."""

    def __init__(self):
        self.medians: list[np.ndarray] = []
        self.products: np.ndarray | None = None
        self.cells = 0

    def add(self, values: np.ndarray) -> None:
        """One image's (..., C) float16 values, as the store would encode them."""
        cells = values.reshape(-1, values.shape[-1]).astype(np.float64)
        self.medians.append(np.median(np.abs(cells), axis=0))
        products = cells.T @ cells
        self.products = products if self.products is None else self.products + products
        self.cells += len(cells)

    def fit(self, components: int) -> Basis:
        """The exact channels (as `outsized_channels`, on the median over images of the per-image medians) and
        the K leading eigenvectors of the other channels' second moments once each cell's mean is removed:
        the K-dimensional subspace that keeps most of what the encoding leaves after the mean (uncentred PCA,
        so the decoded cell is an orthogonal projection, and cosines between two decoded cells err by about
        the product of their two residuals). Where K exceeds the cells' rank (the demo's tiny models) the
        extra axes are whatever `eigh` returns: the same on one machine, maybe not on another build."""
        exact = outsized_channels(np.median(np.stack(self.medians), axis=0))
        rest = np.setdiff1d(np.arange(len(self.products)), exact)
        n = len(rest)
        centring = np.eye(n) - 1.0 / n  # v = u - mean(u) for every cell: sum v v^T = Z (sum u u^T) Z
        moments = centring @ self.products[np.ix_(rest, rest)] @ centring
        _, vectors = np.linalg.eigh(moments)
        axes = vectors[:, ::-1][:, :min(components, n)].T
        signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])  # eigh leaves signs arbitrary
        return Basis(tuple(int(c) for c in exact), (axes * signs[:, None]).astype(np.float16))


def outsized_channels(magnitudes: np.ndarray) -> np.ndarray:
    """Channels whose median |x| is EXACT_RATIO x the channels' median, at most EXACT_CHANNELS (the largest),
    sorted: a lower bar and a higher cap than `drop:auto`'s (pipeline/matching/transforms.py), so in practice
    the channels it zeroes are among them."""
    ratio = magnitudes / max(float(np.median(magnitudes)), 1e-12)
    candidates = np.flatnonzero(ratio > EXACT_RATIO)
    return np.sort(candidates[np.argsort(-ratio[candidates], kind="stable")][:EXACT_CHANNELS])


def layer_pca_bytes(cells: int, components: int, exact: int) -> int:
    return 4 * components + 2 * cells * components + 2 * cells * exact + 8 * cells


def pca_encode(values: np.ndarray, basis: Basis) -> bytes:
    cells16 = values.reshape(-1, values.shape[-1])
    cells = cast(cells16, np.float32)
    encoder, column_sums = basis.encoder
    # The other channels' sums are all channels' less the exact ones', in float64: float16 values multiply
    # exactly there, and the outsized channels' squares (at most 65504^2) leave ~1e-16 of themselves behind
    # when subtracted. No copy of the other channels is made.
    exact = cells[:, list(basis.exact)].astype(np.float64)
    others = cells.shape[1] - exact.shape[1]
    means = (cells.sum(axis=1, dtype=np.float64) - exact.sum(axis=1)) / others
    squares = (np.einsum("ij,ij->i", cells, cells, dtype=np.float64) - np.einsum("ij,ij->i", exact, exact)) / others
    stds = np.sqrt(np.maximum(squares - means**2, 0.0))
    # A float32 product (float16 values, int16 levels: ~1/65,000 of a component's range, far above float32's
    # rounding); BLAS splits a product's rows and columns among threads, never a sum, so the bytes are the
    # same whatever the threads (here one: `one_blas_thread`). Each cell's mean over the other channels is
    # taken out of its coefficients (the axes are orthogonal to it up to their float16 rounding).
    with one_blas_thread:
        coefficients = cells @ encoder - np.outer(means, column_sums)
    scales = (np.abs(coefficients).max(axis=0) / 32767.0).astype(np.float32)
    scales[scales == 0] = 1.0
    levels = np.clip(np.rint(coefficients / scales), -32767, 32767).astype("<i2")
    return b"".join([scales.astype("<f4").tobytes(), levels.tobytes(), cells16[:, list(basis.exact)].astype("<f2").tobytes(),
                     means.astype("<f4").tobytes(), stds.astype("<f4").tobytes()])


def pca_decode(data: bytes, shape, basis: Basis) -> np.ndarray:
    c = int(shape[-1])
    n = int(np.prod(shape)) // c
    k, m = len(basis.axes), len(basis.exact)
    parts, offset = [], 0
    for dtype, count in [("<f4", k), ("<i2", n * k), ("<f2", n * m), ("<f4", n), ("<f4", n)]:
        parts.append(np.frombuffer(data, dtype, count, offset))
        offset += np.dtype(dtype).itemsize * count
    scales, levels, kept, means, stds = parts
    with one_blas_thread:
        other = (levels.reshape(n, k) * scales) @ basis.axes32
    # Shift and scale the reconstructed channels to their exact mean and std: with the exact channels kept
    # as they are, each cell's mean and std over all C (LayerNorm's) are exact too.
    centre = other.mean(axis=1)
    spread = np.sqrt(np.maximum(np.einsum("ij,ij->i", other, other) / (c - m) - centre**2, 0.0))
    other -= centre[:, None]
    other *= (stds / np.maximum(spread, 1e-30))[:, None]
    other += means[:, None]
    kept = kept.reshape(n, m).astype(np.float32)
    if not m:
        return other.reshape(shape)
    cells = np.empty((n, c), np.float32)
    cells[:, basis.others(c)] = other
    cells[:, list(basis.exact)] = kept
    return cells.reshape(shape)


# A pixels encoder's canvas is v / 127.5 - 1 for bytes v, computed in float64 and rounded to float32
# (pipeline/cache/encode.py): these filters keep it, and its std of 0, as uint8, and decode (in float64, then
# float32) exactly the same float32 values: a quarter of the bytes, lossless.
# zarr warns, on every open, that numcodecs' filters are not in the v3 spec: every zarr-python reads them.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)
UINT8_LOSSLESS = {"canvas": FixedScaleOffset(offset=-1.0, scale=127.5, dtype="<f4", astype="|u1"),
                  "zero": FixedScaleOffset(offset=0.0, scale=1.0, dtype="<f4", astype="|u1")}


CHECKSUM = Crc32cCodec()


def codecs(storage: str, basis: Basis | None = None) -> dict:
    """`create_array` keywords (filters, serializer, compressors) for an array kept as `storage`: a
    features array's choice (`pca:K` with its layer's fitted `basis`), or a pixels store's `canvas` or
    `zero` (UINT8_LOSSLESS)."""
    zstd = ZstdCodec(level=3)
    if storage in UINT8_LOSSLESS:
        return {"filters": UINT8_LOSSLESS[storage], "compressors": (zstd, CHECKSUM)}
    kind, components = parse_storage(storage)
    if kind == "float16-shuffle":
        return {"compressors": (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2), CHECKSUM)}
    if kind == "pca":
        if basis is None or len(basis.axes) != min(components, basis.axes.shape[1]):
            raise ValueError(f"{storage} needs its layer's fitted basis of {components} axes")
        return {"serializer": LayerPCA(basis), "compressors": (zstd, CHECKSUM)}
    return {"compressors": (zstd, CHECKSUM)}


def chunk_bytes(storage: str, shape) -> int:
    """Bytes of one chunk of `shape` (..., C) as `storage` keeps it, before compression (pca: the most it
    keeps, whatever number of exact channels up to EXACT_CHANNELS the fit finds)."""
    kind, components = parse_storage(storage)
    c = int(shape[-1])
    n = int(np.prod(shape)) // c
    if kind == "pca":
        kept = min(components + EXACT_CHANNELS, c)  # coefficients and exact channels: K + M <= C
        return 4 * min(components, c) + 2 * n * kept + 8 * n
    return 2 * n * c
