"""Zarr v3 stores: one per backbone run (features) and one per VAE x canvas (latents). `FeatureStore` is
every access to one: create or resume, lock, write an image, mark it done, read its tables and nodes.

Layout (docs/reference/store.md): root attrs describe the run and carry a fingerprint of every
parameter that determines the contents; root coordinates `image` and `timestep`; an `images` node
with one row per image (category, original size, valid region on the canvas, completion flag,
seconds, peak memory); one node per layer named by its module path, holding `features` with dims
`(image, timestep, y, x, channel)` and, for transformer blocks, `shift`/`scale`.

Writing discipline: an image's arrays are written first and its `done` flag last, so an interrupted
run leaves at worst unflagged data that the next run rewrites. Every per-image array is chunked one
image (and one timestep) per chunk: reading one map is one read, and no two images share a chunk, so
workers that own disjoint images never write the same file. Zarr's local store writes each chunk to a
temporary file and renames it into place, so a chunk is never half-written; the temporaries a killed
run leaves behind are removed when the store is next opened for writing. One writer at a time holds
`<store>.lock` (an advisory `flock`, released by the kernel even on kill -9); distributed workers
write under their driver's lock.

An image that fails under `on_error: skip` is not done: its reason is in `images/error`, and the
next run tries it again.

Every chunk ends with its crc32c (pipeline/cache/codecs.py, `CHECKSUM`): reading a damaged chunk is an
error, never a value. A run that resumes a store first checks the chunks of its done images
(`damaged_chunks`: the stored bytes against their checksums, and no chunk missing) and does again the
images with a damaged or missing one (`redo`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import google_crc32c
import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm
from zarr.core.sync import sync

from pipeline.cache import codecs
from pipeline.cache.provenance import differences
from pipeline.errors import CHECKSUM_MISMATCH, PipelineError

SCHEMA_VERSION = 3  # 2: layers carry `overflow` counts; 3: every chunk ends with a crc32c checksum
IMAGE_COLUMNS = ("category", "width", "height", "valid_x0", "valid_y0", "valid_x1", "valid_y1")
LARGE_ROW = 1 << 20  # bytes: write_image writes the rows of arrays this large at most one per core

# When a store is already at the path and was not built with these determinants:
# never: refuse (the CLI without --overwrite); outdated: replace a dift-cache store built with other
# parameters, model or code, refuse anything else (DVC stages: a changed dependency means "rebuild");
# any: replace whatever is there, readable or not (the CLI with --overwrite).
REPLACE = ("never", "outdated", "any")


def fingerprint(determinants: dict) -> str:
    """A short hash of everything that determines a store's contents."""
    text = json.dumps(determinants, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> str:
    changes = ", ".join(differences(old, new))
    return f"other parameters, model or code ({changes})" if changes else "other parameters"


class FeatureStore:
    """One store on disk (`path`) and its open Zarr group (`root`). Open it with `open` (to read: a local
    path or any fsspec URL), `open_latents` (a finished latents store, to extract from), `create` (to
    write: creates or resumes) or `for_writing` (a worker writing into a store its driver created)."""

    def __init__(self, path: str | Path, root: zarr.Group):
        self.path, self.root = location(path), root

    # ---- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a store for reading: a local path or any fsspec URL."""
        path = location(path)
        try:
            root = zarr.open_group(path, mode="r")
            _ = root.attrs["fingerprint"]
        except Exception:  # noqa: BLE001
            raise PipelineError(path, None, "not a dift-cache store (missing, unreadable or without a fingerprint)") from None
        return cls(path, root)

    @classmethod
    def open_latents(cls, path: str | Path) -> FeatureStore:
        """A latents store every image of which is encoded (or skipped)."""
        path = Path(path)
        try:
            root = zarr.open_group(path, mode="r")
        except Exception:  # noqa: BLE001
            raise PipelineError(path, None, "latents store is missing or unreadable; run the encode stage first") from None
        if root.attrs.get("kind") != "latents":
            raise PipelineError(path, "kind", "not a latents store")
        latents = cls(path, root)
        table = latents.images()
        pending = int((~table["done"] & (table["error"] == "")).sum())
        if pending:
            raise PipelineError(path, "images/done", f"{pending} images not encoded yet; finish the encode stage first")
        return latents

    @classmethod
    def for_writing(cls, path: str | Path) -> FeatureStore:
        """A store already created, opened to write into (never through consolidated metadata, which only
        `finish` refreshes)."""
        return cls(path, zarr.open_group(local(path), mode="r+", use_consolidated=False))

    @classmethod
    def as_written(cls, path: str | Path) -> FeatureStore:
        """A local store opened to read as last written (not through consolidated metadata, which only
        `finish` refreshes): while it is being written."""
        return cls(path, zarr.open_group(local(path), mode="r", use_consolidated=False))

    @classmethod
    def create(cls, path: str | Path, attrs: dict, images: pd.DataFrame, timesteps: list[int] | None,
               replace: str = "never") -> FeatureStore:
        """Create a store, or reopen it to resume one built with the same determinants. Another store at the
        path is replaced only as `replace` allows (REPLACE), saying what it replaced; a store that cannot be
        read is left as it is unless `replace` is "any".

        `attrs["determinants"]` holds what the fingerprint is computed from; `images` has `image` plus
        IMAGE_COLUMNS.
        """
        if replace not in REPLACE:
            raise ValueError(f"replace must be one of {REPLACE}, got {replace!r}")
        path = local(path)
        attrs = {"schema_version": SCHEMA_VERSION, **attrs, "fingerprint": fingerprint(attrs["determinants"])}
        if path.exists():
            try:
                # Never trust consolidated metadata while writing: it is only refreshed by `finish`.
                root = zarr.open_group(path, mode="r+", use_consolidated=False)
                found = dict(root.attrs)
            except Exception as exc:  # noqa: BLE001 - an NFS hiccup or a newer format: never a reason to delete
                if replace != "any":
                    raise PipelineError(path, None, f"cannot read this store ({type(exc).__name__}: {exc}); it was left as "
                                                    "it is: fix access to it, or replace it with --overwrite") from None
                found, what = None, f"unreadable ({type(exc).__name__})"
            if found is not None and "fingerprint" in found and \
                    fingerprint(found.get("determinants", {})) != found["fingerprint"]:
                if replace != "any":
                    raise PipelineError(path, "fingerprint", f"{found['fingerprint']} does not match the parameters recorded "
                                                             "in the store (its attributes were edited or damaged); it was left "
                                                             "as it is: `cli.py verify` checks it, --overwrite rebuilds it")
                what = "attributes edited or damaged"
            elif found is not None and found.get("fingerprint") == attrs["fingerprint"]:
                for leftover in path.rglob("*.partial"):  # a killed writer's unfinished chunk
                    leftover.unlink()
                return cls(path, root)
            elif found is not None and "fingerprint" not in found:
                if replace != "any":
                    raise PipelineError(path, "fingerprint", "not a dift-cache store; it was left as it is "
                                                             "(--overwrite replaces it)")
                what = "not a dift-cache store"
            elif found is not None:
                what = f"built with {_differences(found.get('determinants', {}), attrs['determinants'])}"
                if replace == "never":
                    raise PipelineError(path, "fingerprint", f"store was {what}; pass --overwrite to rebuild it or "
                                                             "choose another --store")
            print(f"{path}: replacing the store there ({what})", file=sys.stderr)
            shutil.rmtree(path)

        root = zarr.open_group(path, mode="w-", zarr_format=3)
        root.attrs.update(attrs)
        _array(root, "image", (len(images),), str, ["image"], chunks=(len(images),))[:] = images["image"].to_numpy(str)
        if timesteps is not None:
            _array(root, "timestep", (len(timesteps),), "int32", ["timestep"])[:] = np.asarray(timesteps, "int32")
        node = root.create_group("images")
        for column in IMAGE_COLUMNS:
            values = images[column].to_numpy(str if column == "category" else "float64" if column.startswith("valid") else "int32")
            _array(node, column, values.shape, values.dtype if column != "category" else str, ["image"], chunks=values.shape)[:] = values
        count = (len(images),)
        _array(node, "done", count, "bool", ["image"], fill_value=False)
        _array(node, "seconds", count, "float64", ["image"], fill_value=np.nan)
        _array(node, "peak_memory", count, "int64", ["image"], fill_value=0)
        _array(node, "error", count, str, ["image"], fill_value="")
        return cls(path, root)

    @staticmethod
    def pending_count(path: str | Path, determinants: dict, images: int) -> int:
        """How many of `images` a run with `determinants` still has to write into `path`: all of them, unless
        a store built with the same determinants is there to resume (a store that cannot be read, or that
        was built otherwise, is not resumed)."""
        try:
            found = FeatureStore.as_written(path)
            if found.root.attrs.get("fingerprint") == fingerprint(determinants):
                return images - int(found.done_mask().sum())
        except Exception:  # noqa: BLE001 - absent or unreadable: opening it for writing reports that
            pass
        return images

    # ---- what it holds ---------------------------------------------------------------------------

    def __getitem__(self, node: str):
        """A node or array by its path in the store (`store["up_blocks.1/features"]`)."""
        return self.root[node]

    def __contains__(self, node: str) -> bool:
        return node in self.root

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def kind(self) -> str | None:
        return self.root.attrs.get("kind")

    @property
    def fingerprint(self) -> str:
        return self.root.attrs["fingerprint"]

    def keys(self) -> np.ndarray:
        """The image keys (`<category>/<name>`), one per row."""
        return self.root["image"][:]

    def timesteps(self) -> list[int]:
        return [int(t) for t in self.root["timestep"][:]]

    def done_mask(self) -> np.ndarray:
        return self.root["images/done"][:]

    def errors(self) -> np.ndarray:
        """Per image, why it was skipped ("" where it was not)."""
        node = self.root["images"]
        return node["error"][:] if "error" in node else np.full(node["done"].shape, "", dtype=object)

    def images(self) -> pd.DataFrame:
        node = self.root["images"]
        table = {"image": self.keys()}
        for column in (*IMAGE_COLUMNS, "done", "seconds", "peak_memory"):
            table[column] = node[column][:]
        table["error"] = self.errors()
        return pd.DataFrame(table)

    def layers(self) -> list[str]:
        return sorted(name for name, node in self.root.groups() if name != "images" and "features" in node)

    def overflow(self) -> dict[str, int]:
        """Per layer, how many values were beyond float16's range and stored as +-65504 (layers with none
        are left out)."""
        counts = {name: int(self.root[name]["overflow"][:].sum()) for name in self.layers() if "overflow" in self.root[name]}
        return {name: count for name, count in counts.items() if count}

    def data_nodes(self) -> list[str]:
        """The nodes holding per-image data: a features store's layers, a latents store's posterior."""
        return self.layers() if self.kind == "features" else [n for n in ("posterior",) if n in self.root]

    def per_image_arrays(self) -> list[zarr.Array]:
        """Every array of the data nodes with a row per image (not their coordinates)."""
        root = self.root
        return [root[name][key] for name in self.data_nodes() for key in sorted(root[name].array_keys())
                if tuple(root[name][key].metadata.dimension_names or ())[:1] == ("image",)]

    def size_on_disk(self) -> int:
        return size_on_disk(self.path)

    # ---- writing ---------------------------------------------------------------------------------

    def ensure_layer(self, name: str, arrays: dict[str, tuple[tuple[str, ...], tuple[int, ...]]],
                     coords: dict[str, np.ndarray], attrs: dict, dtype="float16", storage: dict | None = None,
                     basis: codecs.Basis | None = None) -> zarr.Group:
        """The node for one layer, created on first use with the given per-image arrays.

        `arrays` maps an array name to (dims after image, shape after image) of `dtype`, or to (dims, shape,
        its own dtype) for an integer array, which is filled with 0. Each chunk holds one image and one
        timestep, except for arrays of (image, timestep) alone: one image per chunk. `storage` maps an array
        name to its encoding (pipeline/cache/codecs.py; float16 if not given); `basis`: the layer's fitted axes,
        for an array kept as `pca:K`.
        """
        root = self.root
        if name in root:
            return root[name]
        node = root.create_group(name)
        node.attrs.update(attrs)
        images = root["image"].shape[0]
        for array, (dims, shape, *own_dtype) in arrays.items():
            chunks = (1, 1, *shape[1:]) if dims[0] == "timestep" and len(dims) > 1 else (1, *shape)
            kind = own_dtype[0] if own_dtype else dtype
            _array(node, array, (images, *shape), kind, ["image", *dims], chunks=chunks,
                   fill_value=0 if np.dtype(kind).kind in "iu" else np.nan, storage=(storage or {}).get(array, "float16"),
                   basis=basis)
        for dim, values in coords.items():
            _array(node, dim, values.shape, values.dtype, [dim], chunks=values.shape)[:] = values
        return node

    @staticmethod
    def write_image(index: int, writes: list[tuple[zarr.Array, np.ndarray]]) -> None:
        """Write one image's row of each array in one trip to Zarr's event loop, their chunks encoded (zstd, and
        a lossy storage's codec) in Zarr's worker threads. Small chunks all at once: their cost is hand-offs
        between threads, which overlap. Large ones (LARGE_ROW) one per core: their cost is encoding, and more
        at once only fight over caches."""

        async def write_all():
            cores = asyncio.Semaphore(os.cpu_count() or 1)

            async def write(array, values):
                if values.nbytes < LARGE_ROW:
                    return await array.async_array.setitem(index, values)
                async with cores:
                    await array.async_array.setitem(index, values)

            # Every write ends before a failure is raised: none is left running under a released lock.
            for outcome in await asyncio.gather(*(write(array, values) for array, values in writes), return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome

        sync(write_all())

    def mark_done(self, index: int, seconds: float, peak_memory: int) -> None:
        """Flag image `index` complete: called only after all of its arrays are written."""
        root = self.root
        root["images/seconds"][index] = seconds
        root["images/peak_memory"][index] = peak_memory
        if "error" in root["images"] and root["images/error"][index]:
            root["images/error"][index] = ""  # an earlier run skipped it
        root["images/done"][index] = True

    def mark_skipped(self, index: int, reason: str) -> None:
        """Record why image `index` was skipped (`on_error: skip`); it stays not done."""
        self.root["images/error"][index] = reason

    def set_attrs(self, **values) -> None:
        """Record attributes (a lossy store's fit and fidelity figures)."""
        self.root.attrs.update(values)

    def consolidate(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr notes that consolidated metadata is a v3 extension
            zarr.consolidate_metadata(self.root.store)

    def finish(self) -> None:
        """Once every image is done, consolidate the metadata so that readers open the store in one read."""
        if self.done_mask().all():
            self.consolidate()

    # ---- damage ----------------------------------------------------------------------------------

    def damaged_chunks(self, indices) -> dict[int, list[str]]:
        """Per image of `indices`, its chunks that fail their checksum or are missing from an array that no
        image leaves empty (float arrays: their fill value, NaN, is never a value), as `<key>: <reason>`. The
        stored bytes are checked, not decoded: a scan at disk speed. A local store's only; {} for a URL."""
        path = self.path
        if is_url(path):
            return {}
        arrays = [(array, has_checksums(array), np.isnan(array.metadata.fill_value)
                   if np.dtype(array.dtype).kind == "f" else False) for array in self.per_image_arrays()]
        found: dict[int, list[str]] = {}
        indices = list(indices)
        for index in tqdm(indices, unit="img", desc=f"check {Path(str(path)).name}", disable=len(indices) < 100):
            for array, checksummed, never_empty in arrays:
                for key in chunk_keys(array, index):
                    try:
                        data = (Path(path) / key).read_bytes()
                    except FileNotFoundError:
                        if never_empty:
                            found.setdefault(index, []).append(f"{key}: missing")
                        continue
                    if checksummed and not _sound(data):
                        found.setdefault(index, []).append(f"{key}: checksum mismatch")
        return found

    def damaged_chunks_of(self, array: zarr.Array) -> list[str]:
        """Every stored chunk of `array` (of a local store) that fails its checksum, as `<key>: checksum mismatch`."""
        path = self.path
        if is_url(path) or not has_checksums(array):
            return []
        return [f"{chunk.relative_to(path).as_posix()}: checksum mismatch"
                for chunk in sorted((Path(path) / array.path / "c").rglob("*")) if chunk.is_file() and not _sound(chunk.read_bytes())]

    def redo(self) -> list[str]:
        """Flag not done the done images with a damaged or missing chunk, so that this run extracts (encodes)
        them again, and say so; their keys."""
        path, root = self.path, self.root
        try:
            done = np.flatnonzero(self.done_mask())
        except ValueError as exc:
            if not str(exc).startswith(CHECKSUM_MISMATCH):
                raise
            chunks = self.damaged_chunks_of(root["images/done"])
            raise PipelineError(path, chunks[0].split(":")[0] if chunks else "images/done",
                                "damaged chunk of the store's per-image table (checksum mismatch); it was left as it is: "
                                "--overwrite rebuilds the store") from None
        damaged = self.damaged_chunks(done)
        if not damaged:
            return []
        keys = self.keys()
        print(f"{path}: {len(damaged)} done image(s) have a damaged or missing chunk; computing them again:", file=sys.stderr)
        for index, chunks in sorted(damaged.items()):
            print(f"  {keys[index]}: {'; '.join(chunks[:3])}" + (f" (+{len(chunks) - 3} more)" if len(chunks) > 3 else ""),
                  file=sys.stderr)
            root["images/done"][index] = False
        return [str(keys[index]) for index in sorted(damaged)]


_held = threading.local()  # the locks this thread holds: taken again inside (one extraction's steps) they nest


@contextlib.contextmanager
def writer_lock(path: str | Path):
    """Hold `<store>.lock` while writing `path`; a second writer is refused, not queued. Nested in this
    process (a lossy store's fidelity steps inside its extraction), it is the one lock, held throughout."""
    lock = Path(f"{local(path)}.lock").resolve()
    held = _held.__dict__.setdefault("locks", set())
    if lock in held:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise PipelineError(path, None, f"another process is writing this store (it holds {lock}); "
                                                "wait for it to finish or stop it") from None
            raise
        # The holder before us may have unlinked the file between our open and our flock.
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    held.add(lock)
    try:
        yield
    finally:
        held.discard(lock)
        lock.unlink(missing_ok=True)
        handle.close()


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a full disk into a one-line error. The image being written stays unflagged, so a re-run
    after freeing space redoes just that image."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise PipelineError(path, "disk", "no space left on device; free space and re-run to resume "
                                          "(finished work is kept)") from None


def _array(group, name, shape, dtype, dims, chunks=None, fill_value=None, storage="float16", basis=None):
    return group.create_array(
        name, shape=shape, dtype=dtype, chunks=chunks or (1,) * len(shape), dimension_names=dims,
        fill_value=fill_value, **codecs.codecs(storage, basis),
    )


def has_checksums(array: zarr.Array) -> bool:
    return any(codec.to_dict().get("name") == "crc32c" for codec in array.metadata.codecs)


def chunk_keys(array: zarr.Array, index: int) -> list[str]:
    """The keys (`<array path>/c/...`) of the chunks that hold image `index` of `array`."""
    grid = [-(-size // chunk) for size, chunk in zip(array.shape, array.chunks)]
    return [f"{array.path}/{array.metadata.encode_chunk_key((index, *rest))}"
            for rest in itertools.product(*(range(n) for n in grid[1:]))]


def _sound(data: bytes) -> bool:
    """Do a stored chunk's bytes end with the crc32c of the rest (codecs.CHECKSUM's layout)?"""
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def is_url(path) -> bool:
    """An fsspec URL (s3://, gs://, memory://...): read-only here, see docs/guides/distributed.md, "Object storage"."""
    return "://" in str(path)


def location(path: str | Path) -> str | Path:
    """A store's address as given: a URL stays a string, a local path becomes a Path."""
    return str(path) if is_url(path) else Path(path)


def local(path: str | Path) -> Path:
    """The local path of a store about to be written; URLs are refused in one line."""
    if is_url(path):
        raise PipelineError(path, None, "stores are written to a local or shared filesystem (the writer lock and "
                                        "atomic renames need one); write locally, then `dvc push` or sync it")
    return Path(path)


def size_on_disk(path: str | Path) -> int:
    if is_url(path):
        import fsspec  # optional: only object-store URLs need it

        filesystem, root = fsspec.core.url_to_fs(str(path))
        return int(filesystem.du(root))
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
