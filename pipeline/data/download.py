"""Fetching a dataset archive: resumable download, checksum, safe extraction.

SPair-71k is one ~220 MB tarball on a university server. A dropped connection should cost only the
missing bytes, a damaged or substituted archive should never be unpacked, and no archive, however
crafted, may write outside the destination or leave a half-extracted tree where a complete one is
expected.
"""

from __future__ import annotations

import gzip
import stat
import hashlib
import http.client
import shutil
import tarfile
import zipfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import PipelineError

TIMEOUT = 60  # seconds, for connecting and for each read: a stalled server fails instead of hanging
CHUNK = 1 << 20
MARKER = ".complete"  # written last into the extracted folder; holds the archive's sha256


@dataclass(frozen=True)
class Dataset:
    url: str
    archive: str  # file name under dest
    folder: str  # the top-level folder the archive unpacks to
    sha256: str | None = None


DATASETS = {
    # The SPair-71k authors publish no checksum, so none is pinned here: the first download prints the
    # digest of what it got, to pin with --sha256 (or download.<name>.sha256 in params.yaml).
    "spair71k": Dataset(url="http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz",
                        archive="SPair-71k.tar.gz", folder="SPair-71k", sha256=None),
    # The URL d2-net's hpatches_sequences/download.sh fetches (d2-net 0a3356c6991c634ef4cce3ea6e07115202fb99a1).
    "hpatches": Dataset(url="http://icvl.ee.ic.ac.uk/vbalnt/hpatches/hpatches-sequences-release.tar.gz",
                        archive="hpatches-sequences-release.tar.gz", folder="hpatches-sequences-release", sha256=None),
    # DAVIS-2017 train + val at 480p, the zip DIFT's README has davis-2017's data/get_davis.sh fetch
    # (davisvideochallenge/davis-2017 3226015); it unpacks to DAVIS/.
    "davis": Dataset(url="https://data.vision.ee.ethz.ch/jpont/davis/DAVIS-2017-trainval-480p.zip",
                     archive="DAVIS-2017-trainval-480p.zip", folder="DAVIS", sha256=None),
}


def download(name_or_dataset: str | Dataset, dest: Path, url: str | None = None,
             sha256: str | None = None) -> Path:
    """Fetch, verify and unpack one dataset under `dest`; return the extracted folder.

    Idempotent: a folder already extracted from the expected archive is returned without touching
    the network. The archive and its `.sha256` stay next to the folder, so a failed extraction is
    retried without downloading again.
    """
    dataset = _resolve(name_or_dataset)
    dataset = replace(dataset, url=url or dataset.url, sha256=_check_digest(sha256 or dataset.sha256))
    dest = Path(dest)
    folder = dest / dataset.folder
    if _already_extracted(folder, dataset.sha256):
        return folder
    archive = dest / dataset.archive
    if not archive.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        _fetch(dataset.url, archive)
    digest = _verify(archive, dataset.sha256)
    _extract(archive, folder, digest)
    return folder


def _resolve(name_or_dataset: str | Dataset) -> Dataset:
    if isinstance(name_or_dataset, Dataset):
        return name_or_dataset
    if name_or_dataset not in DATASETS:
        raise PipelineError(None, "dataset", f"unknown dataset {name_or_dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name_or_dataset]


def _check_digest(sha256: str | None) -> str | None:
    """Refuse a malformed digest up front: otherwise a typo costs a full download and then its deletion."""
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise PipelineError(None, "sha256", f"expected 64 hexadecimal digits, got {sha256!r}")
    return digest


def _already_extracted(folder: Path, sha256: str | None) -> bool:
    """True when `folder` is a finished extraction of the expected archive.

    A folder we did not finish (no marker) or that came from another archive is not ours to delete:
    the user decides.
    """
    if not folder.exists():
        return False
    marker = folder / MARKER
    if not marker.is_file():
        raise PipelineError(folder, None, f"exists but is not a finished download (no {MARKER} marker); "
                                          "remove it to download again")
    found = marker.read_text().strip()
    if sha256 is not None and found != sha256:
        raise PipelineError(folder, "sha256", f"extracted from an archive with sha256 {found}, expected {sha256}; "
                                              "remove it to download again")
    return True


def _fetch(url: str, archive: Path) -> None:
    """Download `url` into `<archive>.partial`, resuming it if present; rename when complete."""
    partial = archive.with_name(archive.name + ".partial")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The partial is as long as the file or longer (a different file?): its bytes cannot be trusted.
            partial.unlink()
            return _fetch(url, archive)
        raise PipelineError(url, None, f"HTTP {exc.code} {_why(exc)}") from None
    except OSError as exc:
        raise PipelineError(url, None, f"cannot connect ({_why(exc)}); run again once the server is reachable, or "
                                       f"put the archive (fetched elsewhere) at {archive} and run again") from None
    with response:
        if response.status != 206:
            offset = 0  # the server ignored Range: it sends the whole file, so start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with partial.open("ab" if offset else "wb") as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=archive.name) as bar:
            try:
                # read1, not read: read waits for a full chunk and loses what it got if the connection dies.
                while chunk := response.read1(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _dropped(url, out.tell(), total, f" ({_why(exc)})") from None
            # http.client ends a body cut short by the server silently: only the count tells.
            # Without a Content-Length the end of the stream is all there is to go by.
            if total is not None and out.tell() < total:
                raise _dropped(url, out.tell(), total, "")
    partial.replace(archive)


def _dropped(url: str, done: int, total: int | None, why: str) -> PipelineError:
    of = f" of {_mib(total)}" if total is not None else ""
    return PipelineError(url, None, f"connection dropped after {_mib(done)}{of}{why}; run again to resume")


def _verify(archive: Path, expected: str | None) -> str:
    """The archive's sha256, checked against `expected`; a mismatch deletes the archive."""
    digest = hashlib.sha256()
    with archive.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    found = digest.hexdigest()
    if expected is not None and found != expected:
        archive.unlink()
        raise PipelineError(archive, "sha256", f"expected {expected}, found {found}; the archive was deleted")
    if expected is None:
        print(f"{archive}: sha256 {found} (nothing to check it against; pin it with --sha256)")
    archive.with_name(archive.name + ".sha256").write_text(f"{found}  {archive.name}\n")  # `sha256sum -c` format
    return found


def _extract(archive: Path, folder: Path, digest: str) -> None:
    """Unpack into a sibling temporary folder, then move the dataset folder into place.

    Whatever stops the extraction (unsafe member, corrupt data, Ctrl-C), the final location either
    holds a complete tree with its marker or nothing.
    """
    staging = folder.with_name(f".{folder.name}.extracting")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir()
    try:
        if zipfile.is_zipfile(archive):  # DAVIS ships zips
            _extract_zip(archive, staging)
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter=_member_filter)
        unpacked = staging / folder.name
        if not unpacked.is_dir():
            raise PipelineError(archive, None, f"has no top-level folder {folder.name!r}")
        (unpacked / MARKER).write_text(digest + "\n")
        unpacked.rename(folder)
    except tarfile.FilterError as exc:
        raise PipelineError(archive, exc.tarinfo.name, f"unsafe member: {_unsafe(exc)}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        archive.unlink()
        archive.with_name(archive.name + ".sha256").unlink(missing_ok=True)
        raise PipelineError(archive, None, f"corrupt archive ({_why(exc)}); it was deleted, "
                                           "run again to download it afresh") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_zip(archive: Path, staging: Path) -> None:
    """A zip's members, each checked as tar members are: no absolute path, no `..`, no link."""
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            parts = Path(member.filename).parts
            if member.filename.startswith(("/", "\\")) or ".." in parts or ":" in member.filename:
                raise PipelineError(archive, member.filename, "unsafe member: a path outside the destination")
            if stat.S_ISLNK(member.external_attr >> 16):
                raise PipelineError(archive, member.filename, "unsafe member: a link")
        bundle.extractall(staging)


def _member_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, made stricter in two ways.

    It silently strips a leading "/" and extracts the member anyway; an archive with absolute names is
    broken or hostile, so refuse it. And it lets links through when their target resolves inside the
    destination, a check that Python before 3.11.13 gets wrong for crafted symlink chains
    (CVE-2025-4517); a dataset of images and annotations needs no links, so refuse them all.
    """
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    if member.issym() or member.islnk():
        raise _LinkError(member)
    return tarfile.data_filter(member, path)


class _LinkError(tarfile.FilterError):
    def __init__(self, tarinfo: tarfile.TarInfo):
        self.tarinfo = tarinfo
        super().__init__(f"{tarinfo.name!r} is a link")


_UNSAFE = {
    tarfile.AbsolutePathError: "absolute path",
    tarfile.OutsideDestinationError: "path outside the destination",
    tarfile.SpecialFileError: "device or other special file",
    _LinkError: "link (a dataset archive needs none)",
}


def _unsafe(exc: tarfile.FilterError) -> str:
    return _UNSAFE.get(type(exc), _why(exc))


def _why(exc: BaseException) -> str:
    """An exception's reason on one line (URLError keeps it in `.reason`)."""
    text = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
    return " ".join(text.split())


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
