"""Resumable, verified downloads, bounded safe zip extraction, and source folders that say what they hold.

:func:`download` streams to ``dest.part``, resumes it with an HTTP ``Range`` request after an interruption (only
while the server's ``ETag`` / ``Last-Modified`` recorded in ``dest.part.json`` still holds: ``If-Range``),
retries connection errors with backoff, and renames the part file to ``dest`` only once every check passed:
size (``Content-Length`` / ``Content-Range`` total / ``expected_size``), ``Content-MD5`` (base64, as Azure blob
storage sends it), a pinned ``sha256`` or ``md5``, and the kind of body (never an HTML page; a zip when
``expect='zip'``). A body whose end cannot be checked (no length, no checksum) is refused, and so is a redirect
from https to http.

:func:`install_archive` gets a zip into a folder: download, extract into a sibling temporary folder (a corrupt
archive in the cache is evicted and fetched once more), check, write the folder's manifest ``SOURCE.json`` last,
then swap it in place of the previous folder: a failed fetch leaves the previous output as it was, and
:func:`reusable` trusts a folder only when its manifest matches the source asked for and says it is complete.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin

import requests

from pipelines.errors import PipelineError
from pipelines.reports import write_json

CHUNK = 1 << 16  # small enough that an interrupted transfer keeps most of what arrived
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_EXTRACT_BYTES = 64 << 30  # the most an archive may expand to (dataset_100000.zip: ~32 GB of PNGs)
MANIFEST = "SOURCE.json"  # a source folder's manifest: what it is, from where, verified how, complete
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_HTML_STARTS = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml")  # error pages (S3 and Azure send XML)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive's end record


class DownloadError(PipelineError):
    """A download that failed or did not verify; the message names the URL and what mismatched."""


class ArchiveError(PipelineError, ValueError):
    """An archive refused before or while extracting (unsafe member, duplicate, too large); names the member."""


class CorruptArchive(ArchiveError):
    """An archive that cannot be read (not a zip, bad CRC, truncated): a download cache may evict and refetch it."""


class _Retryable(Exception):
    """A transient failure (server error, short body): try again, resuming the part file."""


class _Restart(Exception):
    """The remote file changed under a resume: the part file was dropped, download again from byte 0."""


@dataclass(frozen=True)
class DownloadResult:
    """A verified file: where it is, where it came from, its size and sha256, and what it was checked against
    (``sha256`` / ``md5``: a pinned checksum; ``size-only``: no pin, the size and any server MD5 only)."""

    path: Path
    url: str
    size: int
    sha256: str
    verified: str


def file_digests(path: str | Path) -> tuple[str, str]:
    """``(sha256 hex, md5 hex)`` of a file, in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _check_kind(path: Path, url: str, expect: str | None) -> None:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_STARTS):
        raise DownloadError(f"{url}: the body is an HTML/XML page, not the file (an error, login, quota or "
                            f"confirmation page): {head[:60]!r}")
    if expect == "zip" and head[:4] not in _ZIP_MAGIC:
        raise DownloadError(f"{url}: not a zip archive (it starts with {head[:8]!r})")


def _verify(path: Path, url: str, expected_size: int | None, sha256: str | None, md5: str | None,
            expect: str | None, total: int | None = None, server_md5: str | None = None) -> tuple[int, str]:
    """Raise :class:`DownloadError` on any mismatch; return ``(size, sha256)``."""
    size = path.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: got {size} bytes, the server announced {total}")
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{url}: got {size} bytes, expected_size is {expected_size}")
    _check_kind(path, url, expect)
    digest, md5_hex = file_digests(path)
    if server_md5 is not None:
        got = base64.b64encode(bytes.fromhex(md5_hex)).decode()
        if got != server_md5.strip():
            raise DownloadError(f"{url}: Content-MD5 mismatch: server sent {server_md5.strip()}, file has {got}")
    if md5 is not None and md5_hex != md5.lower():
        raise DownloadError(f"{url}: md5 mismatch: expected {md5.lower()}, got {md5_hex}")
    if sha256 is not None and digest != sha256.lower():
        raise DownloadError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {digest}")
    return size, digest


def _progress(total: int | None, initial: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not enabled, leave=False)


def _refuse_downgrade(r: requests.Response, *args, **kwargs) -> requests.Response:
    """A requests response hook: refuse a redirect from https to anything else before it is followed."""
    if r.is_redirect and r.url.startswith("https://"):
        target = urljoin(r.url, r.headers["Location"])
        if not target.startswith("https://"):
            r.close()
            raise DownloadError(f"{r.url}: redirected to {target}: refusing an https -> http downgrade")
    return r


def download(url: str, dest: str | Path, expected_size: int | None = None, sha256: str | None = None,
             md5: str | None = None, expect: str | None = None, timeout: float = 60, retries: int = 3,
             progress: bool = True, backoff: float = 2.0, session: requests.Session | None = None) -> DownloadResult:
    """Download ``url`` to ``dest`` (resumable, verified) and return what was stored.

    An existing ``dest`` that passes the checks we can make offline (``expected_size``, ``sha256``, ``md5``, the
    kind of body) is returned without any request; one that fails them is downloaded again. Otherwise the body
    streams to ``dest.part``; when a part file exists and ``dest.part.json`` holds the ``ETag`` (or
    ``Last-Modified``) its first response carried, the request carries ``Range: bytes=N-`` and ``If-Range``
    (``206`` with the same validator appends; ``200`` or a changed ``ETag`` starts over); a part file without a
    validator starts over. Connection errors and 408/429/5xx are retried ``retries`` times, sleeping
    ``backoff * 2**attempt`` seconds. The part file becomes ``dest`` only when the size matches the server's
    total and ``expected_size``, ``Content-MD5`` / ``x-ms-blob-content-md5``, ``sha256`` and ``md5`` match, and
    the body is no HTML page (and a zip for ``expect='zip'``); a body with no announced length needs a checksum
    or ``expected_size``. A mismatch deletes the part file and raises :class:`DownloadError`.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    verified = "sha256" if sha256 else "md5" if md5 else "size-only"
    if dest.is_file():
        try:
            size, digest = _verify(dest, url, expected_size, sha256, md5, expect)
            return DownloadResult(dest, url, size, digest, verified)
        except DownloadError as exc:
            print(f"{dest} exists but does not verify ({exc}); downloading again")
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    http = session or requests.Session()
    attempt = restarts = 0
    while True:
        try:
            total, server_md5 = _fetch(http, url, part, meta, timeout, progress, dest.name)
            break
        except _Restart as exc:
            if restarts >= 1:
                raise DownloadError(f"{url}: the file changed on the server twice during the download") from exc
            restarts += 1
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Retryable) as exc:
            if attempt >= retries:
                raise DownloadError(f"{url}: failed after {attempt + 1} attempts: {exc}") from exc
            time.sleep(backoff * 2 ** attempt)
            attempt += 1
    try:
        if total is None and not (sha256 or md5 or server_md5 or expected_size is not None):
            raise DownloadError(f"{url}: the server sent no Content-Length and no checksum, so a truncated body "
                                f"cannot be told from a complete one: pin its sha256")
        size, digest = _verify(part, url, expected_size, sha256, md5, expect, total, server_md5)
    except DownloadError:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    return DownloadResult(dest, url, size, digest, verified)


def _validator(meta: Path, url: str) -> str | None:
    """The ``If-Range`` value recorded when the part file was started for ``url`` (strong ETag, else
    Last-Modified), or None."""
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("url") != url:
        return None
    return recorded.get("etag") or recorded.get("last_modified")


def _fetch(http: requests.Session, url: str, part: Path, meta: Path, timeout: float, progress: bool,
           name: str) -> tuple[int | None, str | None]:
    """One request: stream into ``part`` (appending on 206). Returns (announced total, MD5 to check or None)."""
    offset = part.stat().st_size if part.is_file() else 0
    validator = _validator(meta, url) if offset else None
    if offset and validator is None:  # nothing tells whether the remote file is still the one begun
        part.unlink()
        offset = 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers.update({"Range": f"bytes={offset}-", "If-Range": validator})
    with http.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True,
                  hooks={"response": _refuse_downgrade}) as r:
        if r.status_code == 416 and offset:
            m = re.match(r"bytes\s+\*/(\d+)", r.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:  # the part file was already complete
                return offset, r.headers.get("x-ms-blob-content-md5")
            part.unlink()
            raise _Retryable(f"HTTP 416 for a {offset}-byte part file: starting over")
        if r.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {r.status_code}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
        ctype = r.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() == "text/html":
            raise DownloadError(f"{url}: got an HTML page instead of the file: Google Drive quota or confirmation page?")
        md5 = r.headers.get("x-ms-blob-content-md5")
        etag = r.headers.get("ETag")
        if r.status_code == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"unexpected Content-Range {r.headers.get('Content-Range')!r} for offset {offset}")
            if etag is not None and validator.startswith('"') and etag != validator:
                part.unlink()  # a server that ignored If-Range: the bytes on disk belong to another version
                raise _Restart(f"ETag {validator} became {etag}")
            total = None if m.group(3) == "*" else int(m.group(3))
            mode = "ab"
        else:
            offset, mode = 0, "wb"
            length = r.headers.get("Content-Length")
            total = int(length) if length is not None and not r.headers.get("Content-Encoding") else None
            md5 = r.headers.get("Content-MD5") or md5
            strong = etag if etag and not etag.startswith("W/") else None
            meta.write_text(json.dumps({"url": url, "etag": strong, "last_modified": r.headers.get("Last-Modified")}))
        with open(part, mode) as fh, _progress(total, offset, name, progress) as bar:
            for block in r.iter_content(CHUNK):
                fh.write(block)
                bar.update(len(block))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Retryable(f"connection closed at {got} of {total} bytes")
    return total, md5


# ------------------------------------------------------------------------------------------- extraction

def _safe_member(name: str, dest: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"zip member {name!r} would be written outside {dest}: refusing the archive")
    return path


def _free_bytes(dest: Path) -> int:
    probe = dest.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def extract_zip(zip_path: str | Path, dest: str | Path, strip_top_level: bool = True,
                max_bytes: int = MAX_EXTRACT_BYTES) -> list[Path]:
    """Extract ``zip_path`` into ``dest``; return the files written, sorted.

    Every member is checked before anything is written (:class:`ArchiveError`): absolute paths, ``..``
    components, drive letters, symbolic links and duplicate names are refused, and so is a total declared size
    over ``max_bytes`` or over the free space where ``dest`` lives. A member holding more than its declared size
    is cut there by zipfile and fails its CRC: that, and any unreadable archive, raises :class:`CorruptArchive`. With ``strip_top_level``, a
    single folder holding every member (``dataset_100/000000.png``) is dropped, giving ``dest/000000.png``.
    ``__MACOSX`` entries are skipped.
    """
    dest = Path(dest)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            return _extract(zf, dest, strip_top_level, max_bytes)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise CorruptArchive(f"{zip_path}: not a readable zip archive ({exc})") from exc


def _extract(zf: zipfile.ZipFile, dest: Path, strip_top_level: bool, max_bytes: int) -> list[Path]:
    members = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
    paths = []
    for info in members:
        path = _safe_member(info.filename, dest)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise ArchiveError(f"zip member {info.filename!r} is a symbolic link: refusing the archive")
        paths.append(path)
    tops = {p.parts[0] for p in paths if p.parts}
    strip = strip_top_level and len(tops) == 1 and all(len(p.parts) > 1 or i.is_dir() for p, i in zip(paths, members, strict=True))
    targets, seen = [], set()
    for info, path in zip(members, paths, strict=True):
        parts = path.parts[1:] if strip else path.parts
        key = "/".join(parts)
        if parts and not info.is_dir():
            if key in seen:
                raise ArchiveError(f"zip member {info.filename!r} appears twice: refusing the archive")
            seen.add(key)
        targets.append(dest.joinpath(*parts) if parts else None)
    declared = sum(i.file_size for i in members)
    if declared > max_bytes:
        raise ArchiveError(f"{zf.filename}: declares {declared:,} uncompressed bytes, over the limit of {max_bytes:,}")
    free = _free_bytes(dest)
    if declared > free:
        raise ArchiveError(f"{zf.filename}: declares {declared:,} uncompressed bytes, only {free:,} free at {dest}")
    root = dest.resolve()
    written = []
    for info, target in zip(members, targets, strict=True):
        if target is None:
            continue
        if not target.resolve().is_relative_to(root):
            raise ArchiveError(f"zip member {info.filename!r} would be written outside {dest}")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:  # zipfile stops at the declared size (then: bad CRC)
            shutil.copyfileobj(src, out, CHUNK)
        written.append(target)
    return sorted(written)


# ------------------------------------------------------------------------------------------- source folders

def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def replace_dir(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out``, removing the previous ``out`` only once ``new`` is in place."""
    old = out.with_name(f".{out.name}.old")
    _rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    _rmtree(old)


def fetch_and_extract(url: str, cache_file: Path, dest: Path, sha256: str | None = None, md5: str | None = None,
                      max_bytes: int = MAX_EXTRACT_BYTES, **download_kw) -> tuple[DownloadResult, list[Path]]:
    """Download the zip at ``url`` into ``cache_file`` (verified) and extract it into a fresh ``dest``.

    A cached archive that cannot be read is evicted and fetched once more; a second failure is a
    :class:`DownloadError` naming the file."""
    for attempt in range(2):
        result = download(url, cache_file, sha256=sha256, md5=md5, expect="zip", **download_kw)
        _rmtree(dest)
        try:
            return result, extract_zip(result.path, dest, max_bytes=max_bytes)
        except CorruptArchive as exc:
            _rmtree(dest)
            result.path.unlink(missing_ok=True)
            if attempt:
                raise DownloadError(f"{result.path} (from {url}) is still not a readable zip after fetching it "
                                    f"again: {exc}") from exc
            print(f"{result.path}: {exc}; evicted from the download cache, fetching it again")


def install_archive(url: str, cache_file: Path, out: Path, sha256: str | None = None, md5: str | None = None,
                    check: Callable[[Path], dict] | None = None, info: dict | None = None,
                    max_bytes: int = MAX_EXTRACT_BYTES, **download_kw) -> dict:
    """Make ``out`` hold the zip at ``url``; return its manifest (also written to ``out/SOURCE.json``).

    The archive is extracted into the sibling ``.{out.name}.partial``; ``check(folder)`` may raise or return
    fields for the manifest (``info`` adds more); the manifest (source ``official``, url, size, sha256,
    ``verified``, file count, ``complete: true``) is written last, then the folder replaces ``out``: until then
    the previous ``out`` is untouched."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        result, files = fetch_and_extract(url, cache_file, tmp, sha256=sha256, md5=md5, max_bytes=max_bytes, **download_kw)
        extra = check(tmp) if check is not None else {}
        manifest = {"source": "official", "url": url, "size": result.size, "sha256": result.sha256,
                    "verified": result.verified, "files": len(files), **(info or {}), **extra, "complete": True}
        write_json(tmp / MANIFEST, manifest)
    except BaseException:
        _rmtree(tmp)
        raise
    replace_dir(tmp, out)
    return manifest


def reusable(out: Path, **expected) -> dict | None:
    """``out``'s manifest when it says complete, has every ``expected`` key and value, and the folder holds the
    number of files it lists; else None (a half-extracted folder, another source, a sample)."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    count = sum(1 for p in Path(out).rglob("*") if p.is_file() and p.name != MANIFEST)
    return manifest if count == manifest.get("files") else None
