"""Resumable, verified downloads and safe zip extraction.

:func:`download` streams to ``dest.part``, resumes it with an HTTP ``Range`` request after an interruption,
retries connection errors with backoff, and renames the part file to ``dest`` only once every check
passed: size (``Content-Length`` / ``Content-Range`` total / ``expected_size``), ``Content-MD5`` (base64,
as Azure blob storage sends it) and ``sha256`` when given. An HTML page where a binary file was expected
(Google Drive quota or confirmation pages) is an error.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests

from pipelines.errors import PipelineError

CHUNK = 1 << 16  # small enough that an interrupted transfer keeps most of what arrived
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(PipelineError):
    """A download that failed or did not verify; the message names the URL and what mismatched."""


class _Retryable(Exception):
    """A transient failure (server error, short body): try again, resuming the part file."""


@dataclass(frozen=True)
class DownloadResult:
    """A verified file: where it is, where it came from, its size and sha256."""

    path: Path
    url: str
    size: int
    sha256: str


def file_digests(path: str | Path) -> tuple[str, str]:
    """``(sha256 hex, md5 base64)`` of a file, in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), base64.b64encode(md5.digest()).decode()


def _verify(path: Path, url: str, expected_size: int | None, sha256: str | None, total: int | None = None,
            md5_b64: str | None = None) -> tuple[int, str]:
    """Raise :class:`DownloadError` on any mismatch; return ``(size, sha256)``."""
    size = path.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: got {size} bytes, the server announced {total}")
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{url}: got {size} bytes, expected_size is {expected_size}")
    digest, md5 = file_digests(path)
    if md5_b64 is not None and md5 != md5_b64.strip():
        raise DownloadError(f"{url}: Content-MD5 mismatch: server sent {md5_b64.strip()}, file has {md5}")
    if sha256 is not None and digest != sha256.lower():
        raise DownloadError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {digest}")
    return size, digest


def _progress(total: int | None, initial: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not enabled, leave=False)


def download(url: str, dest: str | Path, expected_size: int | None = None, sha256: str | None = None,
             timeout: float = 60, retries: int = 3, progress: bool = True, backoff: float = 2.0,
             session: requests.Session | None = None) -> DownloadResult:
    """Download ``url`` to ``dest`` (resumable, verified) and return what was stored.

    An existing ``dest`` that passes the checks we can make offline (``expected_size``, ``sha256``) is returned
    without any request; one that fails them is downloaded again. Otherwise the body streams to
    ``dest.part``; when a part file exists the request carries ``Range: bytes=N-`` (``206`` appends,
    ``200`` starts over). Connection errors and 408/429/5xx are retried ``retries`` times, sleeping
    ``backoff * 2**attempt`` seconds. The part file becomes ``dest`` only when the size matches the
    server's total and ``expected_size``, ``Content-MD5`` (full-body responses) or ``x-ms-blob-content-md5``
    matches, and ``sha256`` matches; a mismatch deletes the part file and raises :class:`DownloadError`.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        try:
            size, digest = _verify(dest, url, expected_size, sha256)
            return DownloadResult(dest, url, size, digest)
        except DownloadError as exc:
            print(f"{dest} exists but does not verify ({exc}); downloading again")
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    http = session or requests.Session()
    attempt = 0
    while True:
        try:
            total, md5 = _fetch(http, url, part, timeout, progress, dest.name)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Retryable) as exc:
            if attempt >= retries:
                raise DownloadError(f"{url}: failed after {attempt + 1} attempts: {exc}") from exc
            time.sleep(backoff * 2 ** attempt)
            attempt += 1
    try:
        size, digest = _verify(part, url, expected_size, sha256, total, md5)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return DownloadResult(dest, url, size, digest)


def _fetch(http: requests.Session, url: str, part: Path, timeout: float, progress: bool,
           name: str) -> tuple[int | None, str | None]:
    """One request: stream into ``part`` (appending on 206). Returns (announced total, MD5 to check or None)."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with http.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True) as r:
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
        if r.status_code == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"unexpected Content-Range {r.headers.get('Content-Range')!r} for offset {offset}")
            total = None if m.group(3) == "*" else int(m.group(3))
            mode = "ab"
        else:
            offset, mode = 0, "wb"
            length = r.headers.get("Content-Length")
            total = int(length) if length is not None and not r.headers.get("Content-Encoding") else None
            md5 = r.headers.get("Content-MD5") or md5
        with open(part, mode) as fh, _progress(total, offset, name, progress) as bar:
            for block in r.iter_content(CHUNK):
                fh.write(block)
                bar.update(len(block))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Retryable(f"connection closed at {got} of {total} bytes")
    return total, md5


def _safe_member(name: str, dest: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ValueError(f"zip member {name!r} would be written outside {dest}: refusing the archive")
    return path


def extract_zip(zip_path: str | Path, dest: str | Path, strip_top_level: bool = True) -> list[Path]:
    """Extract ``zip_path`` into ``dest``; return the files written, sorted.

    Every member is checked before anything is written: absolute paths, ``..`` components, drive letters
    and symbolic links are refused (``ValueError``). With ``strip_top_level``, a single folder holding
    every member (``dataset_100/000000.png``) is dropped, giving ``dest/000000.png``. ``__MACOSX`` entries
    are skipped.
    """
    dest = Path(dest)
    with zipfile.ZipFile(zip_path) as zf:
        members = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        paths = []
        for info in members:
            path = _safe_member(info.filename, dest)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"zip member {info.filename!r} is a symbolic link: refusing the archive")
            paths.append(path)
        tops = {p.parts[0] for p in paths if p.parts}
        strip = strip_top_level and len(tops) == 1 and all(len(p.parts) > 1 or i.is_dir() for p, i in zip(paths, members, strict=True))
        root = dest.resolve()
        written = []
        for info, path in zip(members, paths, strict=True):
            parts = path.parts[1:] if strip else path.parts
            if not parts:
                continue
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise ValueError(f"zip member {info.filename!r} would be written outside {dest}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            written.append(target)
    return sorted(written)
