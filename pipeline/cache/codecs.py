"""How a features store keeps its `features` arrays: the `storage` knob of a backbone (params.yaml).

Every choice is a chain of Zarr v3 codecs, so the store stays a plain Zarr store: its readers (StoreMaps,
`xr.open_datatree`, any Zarr client with this package installed) decode chunks on read and see float16
`features (image, timestep, y, x, channel)` whatever the choice.

- `float16`: float16, zstd level 3 (what every store held before the knob existed; the default).
- `float16-shuffle`: the same float16 values, byte-shuffled before zstd (Blosc): lossless, smaller.
- `int8`: per chunk (one image, one timestep), each channel scaled by its largest |x|, then each cell by its
  largest scaled |x|, and rounded to int8 (`dift_cache.channel_int8`), then zstd: about half the bytes
  before compression. A value's error is at most half a step, 1/254 of its cell's range in its channel's
  units, so massive channels keep their own range and neither small channels nor small cells are
  rounded away.
- `pca:K`: per chunk, the K principal components of its cells (`dift_cache.cell_pca`): the basis (float16)
  and each cell's K coefficients (int8, a scale per component), with what the feature transforms need kept
  exactly: the channels of outsized magnitude (massive activations of diffusion transformers, up to
  EXACT_CHANNELS, float16) and each cell's mean and standard deviation over its channels (float32; on
  decoding the other channels are shifted and scaled to give them back), so LayerNorm, AdaLN and
  `drop:auto` see what they would see in the float16 store. Self-contained chunks: no basis outside them,
  nothing to fit before extraction starts, any chunk decodes alone.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.numcodecs import FixedScaleOffset
from zarr.core.common import parse_named_configuration

STORAGE = ("float16", "float16-shuffle", "int8", "pca:K")
STORAGE_CHOICES = ("float16", "float16-shuffle", "int8", "pca:256", "pca:128", "pca:64")  # what `plan` prices
EXACT_CHANNELS = 16  # pca: at most this many outsized channels kept exactly
EXACT_RATIO = 10.0  # pca: a channel is outsized when its median |x| is this many times the channels' median


def parse_storage(storage: str) -> tuple[str, int | None]:
    """("float16" | "float16-shuffle" | "int8" | "pca", K or None); ValueError naming the choices."""
    kind, _, components = storage.partition(":")
    if kind == "pca" and components.isdigit() and int(components) > 0:
        return kind, int(components)
    if storage in STORAGE[:3]:
        return storage, None
    raise ValueError(f"unknown storage {storage!r}; expected one of {', '.join(STORAGE)} (K a positive integer)")


def check_storage(storage: str, backbone: str) -> str:
    """A backbone's `storage`, or a one-line error naming the parameter."""
    from pipeline.errors import PipelineError

    try:
        parse_storage(storage)
    except ValueError as exc:
        raise PipelineError("params.yaml", f"backbones.{backbone}.storage", str(exc)) from None
    return storage


def is_lossy(storage: str) -> bool:
    return parse_storage(storage)[0] in ("int8", "pca")


@dataclass(frozen=True)
class ChannelInt8(ArrayBytesCodec):
    """float chunk (..., C) <-> float32 channel scales (C), float32 cell scales (N), then int8 levels (N, C)."""

    name = "dift_cache.channel_int8"
    is_fixed_size = True

    @classmethod
    def from_dict(cls, data):
        parse_named_configuration(data, cls.name, require_configuration=False)
        return cls()

    def to_dict(self):
        return {"name": self.name}

    def evolve_from_array_spec(self, array_spec):
        return self

    def compute_encoded_size(self, input_byte_length: int, chunk_spec) -> int:
        return chunk_bytes("int8", chunk_spec.shape)

    def _encode_sync(self, chunk_array, chunk_spec):
        channel, cell, levels = quantise(np.asarray(chunk_array.as_numpy_array()))
        return chunk_spec.prototype.buffer.from_bytes(channel.astype("<f4").tobytes() + cell.astype("<f4").tobytes()
                                                      + levels.tobytes())

    def _decode_sync(self, chunk_bytes, chunk_spec):
        raw = chunk_bytes.as_numpy_array().view(np.uint8)
        c = chunk_spec.shape[-1]
        n = int(np.prod(chunk_spec.shape)) // c
        channel = raw[: 4 * c].view("<f4")
        cell = raw[4 * c: 4 * (c + n)].view("<f4")
        levels = raw[4 * (c + n):].view(np.int8).reshape(n, c)
        values = (levels * cell[:, None]) * channel
        return chunk_spec.prototype.nd_buffer.from_numpy_array(values.reshape(chunk_spec.shape).astype(chunk_spec.dtype.to_native_dtype()))

    # In a worker thread, as zarr's own codecs do: chunks written or read together encode in parallel.
    async def _encode_single(self, chunk_array, chunk_spec):
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes, chunk_spec):
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)


@dataclass(frozen=True)
class CellPCA(ArrayBytesCodec):
    """float chunk (..., C) <-> its cells' K principal components, with exact outsized channels and exact
    per-cell mean and standard deviation. Layout (little-endian): int32 K, M; int32 exact channel ids (M);
    float32 centre (C - M); float16 basis (K, C - M); float32 coefficient scales (K); int8 coefficients
    (N, K); float16 exact channels (N, M); float32 cell means (N); float32 cell standard deviations (N)."""

    components: int
    name = "dift_cache.cell_pca"
    is_fixed_size = False

    def __init__(self, *, components: int):
        object.__setattr__(self, "components", int(components))

    @classmethod
    def from_dict(cls, data):
        _, configuration = parse_named_configuration(data, cls.name)
        return cls(**configuration)

    def to_dict(self):
        return {"name": self.name, "configuration": {"components": self.components}}

    def evolve_from_array_spec(self, array_spec):
        return self

    def compute_encoded_size(self, input_byte_length: int, chunk_spec) -> int:
        raise NotImplementedError  # variable: as many exact channels as the chunk has outsized ones

    def _encode_sync(self, chunk_array, chunk_spec):
        return chunk_spec.prototype.buffer.from_bytes(pca_encode(np.asarray(chunk_array.as_numpy_array()), self.components))

    def _decode_sync(self, chunk_bytes, chunk_spec):
        values = pca_decode(chunk_bytes.to_bytes(), chunk_spec.shape).astype(chunk_spec.dtype.to_native_dtype())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(values)

    async def _encode_single(self, chunk_array, chunk_spec):
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes, chunk_spec):
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)


for _codec in (ChannelInt8, CellPCA):
    zarr.registry.register_codec(_codec.name, _codec)


def outsized_channels(cells: np.ndarray) -> np.ndarray:
    """Channels whose median |x| over the cells is EXACT_RATIO x the channels' median, at most EXACT_CHANNELS
    (the largest), sorted."""
    magnitudes = np.median(np.abs(cells), axis=0)
    ratio = magnitudes / max(float(np.median(magnitudes)), 1e-12)
    candidates = np.flatnonzero(ratio > EXACT_RATIO)
    return np.sort(candidates[np.argsort(-ratio[candidates], kind="stable")][:EXACT_CHANNELS])


def pca_encode(values: np.ndarray, components: int) -> bytes:
    import torch

    cells = values.reshape(-1, values.shape[-1]).astype(np.float32)
    n, c = cells.shape
    exact = outsized_channels(cells)
    rest = np.setdiff1d(np.arange(c), exact)
    other = cells[:, rest]
    centre = other.mean(axis=0)
    k = min(components, len(rest), n)
    # In float64: LAPACK and BLAS may sum in another order from one call to the next (threads, alignment),
    # and float64's last bits never reach the float16 basis or the int8 levels, so the bytes stay the same.
    centred = (other - centre).astype(np.float64)
    basis = principal_axes(torch.from_numpy(centred), k).numpy().astype(np.float16)
    scales, levels = _component_quantise(centred @ basis.astype(np.float64).T)
    return b"".join([
        np.array([k, len(exact)], "<i4").tobytes(), exact.astype("<i4").tobytes(), centre.astype("<f4").tobytes(),
        basis.astype("<f2").tobytes(), scales.astype("<f4").tobytes(), levels.tobytes(),
        cells[:, exact].astype("<f2").tobytes(), cells.mean(axis=1).astype("<f4").tobytes(),
        cells.std(axis=1).astype("<f4").tobytes(),
    ])


def principal_axes(cells: torch.Tensor, k: int, oversample: int = 8, iterations: int = 2) -> torch.Tensor:
    """The k leading right singular vectors of centred (N, C) cells as (k, C): a randomised SVD (Halko et al.,
    as torch.svd_lowrank) whose random projection comes from its own seeded generator, not torch's global
    one, so that a chunk encodes the same bytes whatever other chunks encode beside it in other threads."""
    import torch

    q = min(k + oversample, *cells.shape)
    projection = torch.randn(cells.shape[1], q, generator=torch.Generator().manual_seed(0), dtype=cells.dtype)
    basis = torch.linalg.qr(cells @ projection).Q
    for _ in range(iterations):  # power iterations sharpen the spectrum
        basis = torch.linalg.qr(cells @ (cells.T @ basis)).Q
    _, _, axes = torch.linalg.svd(basis.T @ cells, full_matrices=False)
    return axes[:k]


def pca_decode(data: bytes, shape) -> np.ndarray:
    c = int(shape[-1])
    n = int(np.prod(shape)) // c
    k, m = np.frombuffer(data, "<i4", 2)
    sizes = [("<i4", m), ("<f4", c - m), ("<f2", k * (c - m)), ("<f4", k), ("i1", n * k), ("<f2", n * m), ("<f4", n), ("<f4", n)]
    parts, offset = [], 8
    for dtype, count in sizes:
        parts.append(np.frombuffer(data, dtype, count, offset))
        offset += np.dtype(dtype).itemsize * count
    exact, centre, basis, scales, levels, kept, means, stds = parts
    other = (levels.reshape(n, k) * scales) @ basis.reshape(k, c - m).astype(np.float32) + centre
    # Shift and scale the reconstructed channels so that each cell's mean and std over all C are exact.
    kept = kept.reshape(n, m).astype(np.float32)
    rest = c - m
    total = c * means - kept.sum(axis=1)
    squares = c * (stds**2 + means**2) - (kept**2).sum(axis=1)
    offset_ = total / rest
    spread = other.var(axis=1) * rest
    gain = np.sqrt(np.maximum(squares - rest * offset_**2, 0.0) / np.maximum(spread, 1e-30))
    other = (other - other.mean(axis=1, keepdims=True)) * gain[:, None] + offset_[:, None]
    cells = np.empty((n, c), np.float32)
    cells[:, np.setdiff1d(np.arange(c), exact)] = other
    cells[:, exact] = kept
    return cells.reshape(shape)


def quantise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., C) floats -> (C,) channel scales, (N,) cell scales and (N, C) int8 levels: x ~ level x cell x
    channel. Each channel is first scaled by its largest |x|, then each cell by its largest scaled |x|, so
    a level step is 1/127 of the cell's own range in the channel's own units: massive channels keep their
    range, and cells of small norm are not rounded away. Chunks never hold NaN: a chunk of fill values is
    not stored at all."""
    cells = values.reshape(-1, values.shape[-1]).astype(np.float32)
    channel = np.abs(cells).max(axis=0)
    channel[channel == 0] = 1.0
    scaled = cells / channel
    cell = np.abs(scaled).max(axis=1) / 127.0
    cell[cell == 0] = 1.0
    levels = np.clip(np.rint(scaled / cell[:, None]), -127, 127).astype(np.int8)
    return channel, cell, levels


def _component_quantise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) coefficients -> (K,) float32 scales and int8 levels, per component symmetric."""
    scales = (np.abs(values).max(axis=0) / 127.0).astype(np.float32)
    scales[scales == 0] = 1.0
    return scales, np.clip(np.rint(values / scales), -127, 127).astype(np.int8)


# A pixels encoder's canvas is v / 127.5 - 1 for bytes v, computed in float64 and rounded to float32
# (pipeline/cache/encode.py): these filters keep it, and its std of 0, as uint8, and decode (in float64, then
# float32) exactly the same float32 values: a quarter of the bytes, lossless.
# zarr warns, on every open, that numcodecs' filters are not in the v3 spec: every zarr-python reads them.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)
UINT8_LOSSLESS = {"canvas": FixedScaleOffset(offset=-1.0, scale=127.5, dtype="<f4", astype="|u1"),
                  "zero": FixedScaleOffset(offset=0.0, scale=1.0, dtype="<f4", astype="|u1")}


def codecs(storage: str) -> dict:
    """`create_array` keywords (filters, serializer, compressors) for an array kept as `storage`: a
    features array's choice, or a pixels store's `canvas` or `zero` (UINT8_LOSSLESS)."""
    if storage in UINT8_LOSSLESS:
        return {"filters": UINT8_LOSSLESS[storage], "compressors": ZstdCodec(level=3)}
    kind, components = parse_storage(storage)
    if kind == "float16-shuffle":
        return {"compressors": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)}
    if kind == "int8":
        return {"serializer": ChannelInt8(), "compressors": ZstdCodec(level=3)}
    if kind == "pca":
        return {"serializer": CellPCA(components=components), "compressors": ZstdCodec(level=3)}
    return {"compressors": ZstdCodec(level=3)}


def chunk_bytes(storage: str, shape) -> int:
    """Bytes of one chunk of `shape` (..., C) as `storage` keeps it, before compression (pca: with
    EXACT_CHANNELS exact channels, the most it keeps)."""
    kind, components = parse_storage(storage)
    c = int(shape[-1])
    n = int(np.prod(shape)) // c
    if kind == "int8":
        return n * c + 4 * c + 4 * n
    if kind == "pca":
        m = min(EXACT_CHANNELS, c)
        k = min(components, c - m, n)
        return 8 + 4 * m + 4 * (c - m) + 2 * k * (c - m) + 4 * k + n * k + 2 * n * m + 8 * n
    return 2 * n * c
