"""Resumable verified downloads against a local HTTP server, and the fetch_facesynthetics stage."""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from conftest import committed_params

from pipelines.sources.downloads import DownloadError, download

BODY = bytes(range(256)) * 400  # 102,400 bytes
SHA = hashlib.sha256(BODY).hexdigest()


class Server:
    """A threaded http.server on 127.0.0.1 that records requests; ``mode`` picks a misbehaviour.

    It sends ``ETag: etag`` and honours ``If-Range`` (a validator other than the current ETag gets the whole body,
    200), as S3 and Azure do; ``ignore_if_range`` answers 206 regardless."""

    def __init__(self, body: bytes = BODY):
        self.body = body
        self.etag = '"v1"'
        self.requests: list[dict] = []
        self.mode = "ok"  # ok | md5 | bad_md5 | html | html_as_zip | long | no_range | no_length | ignore_if_range
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "if_range": self.headers.get("If-Range")})
                if server.mode in ("html", "html_as_zip"):
                    page = b"  \n<!DOCTYPE html><html>Google Drive - quota exceeded</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8" if server.mode == "html" else "application/zip")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                full = server.body
                body, status, start = full, 200, 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if_range = self.headers.get("If-Range")
                fresh = if_range in (None, server.etag) or server.mode == "ignore_if_range"
                if m and server.mode != "no_range" and fresh:
                    start, status = int(m.group(1)), 206
                    body = full[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/zip")
                self.send_header("ETag", server.etag)
                if server.mode != "no_length":
                    self.send_header("Content-Length", str(len(body) + (10 if server.mode == "long" else 0)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(full) - 1}/{len(full)}")
                if server.mode in ("md5", "bad_md5") and status == 200:
                    digest = hashlib.md5(full if server.mode == "md5" else b"other").digest()
                    self.send_header("Content-MD5", base64.b64encode(digest).decode())
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dataset_100.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _get(server, dest, **kw):
    return download(server.url, dest, progress=False, retries=0, timeout=5, **kw)


def _part(dest: Path, data: bytes, etag: str | None = '"v1"', url: str | None = None) -> None:
    """A part file as an interrupted download leaves it: the bytes, and the validator of its first response."""
    dest.with_name(dest.name + ".part").write_bytes(data)
    if etag is not None:
        dest.with_name(dest.name + ".part.json").write_text(json.dumps({"url": url, "etag": etag, "last_modified": None}))


def test_full_download(server, tmp_path):
    dest = tmp_path / "sub" / "f.zip"
    res = _get(server, dest, expected_size=len(BODY), sha256=SHA)
    assert dest.read_bytes() == BODY
    assert (res.path, res.url, res.size, res.sha256, res.verified) == (dest, server.url, len(BODY), SHA, "sha256")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.zip"]  # no part file, no part.json
    assert server.requests == [{"path": "/dataset_100.zip", "range": None, "if_range": None}]
    assert _get(server, tmp_path / "g.zip").verified == "size-only"


def test_resume_sends_range_and_if_range_and_appends(server, tmp_path):
    dest = tmp_path / "f.zip"
    _part(dest, BODY[:30000], url=server.url)
    res = _get(server, dest)
    assert (server.requests[-1]["range"], server.requests[-1]["if_range"]) == ("bytes=30000-", '"v1"')
    assert len(server.requests) == 1 and dest.read_bytes() == BODY and res.sha256 == SHA


def test_resume_ignored_by_server_starts_over(server, tmp_path):
    server.mode = "no_range"
    dest = tmp_path / "f.zip"
    _part(dest, b"garbage that must not stay in front", url=server.url)
    _get(server, dest)
    assert server.requests[-1]["range"] == "bytes=35-"
    assert dest.read_bytes() == BODY


def test_changed_etag_on_resume_starts_over(server, tmp_path):
    """The file changed on the server since the part file began: its old bytes must not prefix the new ones,
    whether the server honours If-Range (answers 200) or ignores it (206 with the new ETag)."""
    for mode in ("ok", "ignore_if_range"):
        server.mode, server.requests = mode, []
        dest = tmp_path / mode / "f.zip"
        dest.parent.mkdir()
        _part(dest, b"old version of the file " * 100, etag='"v0"', url=server.url)
        _get(server, dest)
        assert server.requests[0]["if_range"] == '"v0"'
        assert dest.read_bytes() == BODY, mode
    assert [r["range"] for r in server.requests] == ["bytes=2400-", None]  # ignored If-Range: asked again from 0


def test_part_file_without_validator_starts_over(server, tmp_path):
    dest = tmp_path / "f.zip"
    _part(dest, b"from an unknown version", etag=None)
    _get(server, dest)
    assert server.requests[-1]["range"] is None and dest.read_bytes() == BODY


def test_no_content_length_needs_a_checksum(server, tmp_path):
    server.mode = "no_length"  # HTTP/1.0: the body ends when the connection closes, truncated or not
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*no Content-Length and no checksum.*pin its sha256"):
        _get(server, tmp_path / "f.zip")
    assert list(tmp_path.iterdir()) == []
    assert _get(server, tmp_path / "f.zip", sha256=SHA).size == len(BODY)


def test_https_to_http_redirect_is_refused(server, tmp_path):
    """The https answer redirects to plain http: the http URL is never requested."""
    import io

    import requests

    class RedirectToHttp(requests.adapters.BaseAdapter):
        def send(self, request, **kwargs):
            r = requests.Response()
            r.status_code, r.reason, r.url, r.request = 302, "Found", request.url, request
            r.headers["Location"] = server.url
            r.raw = io.BytesIO(b"")
            return r

        def close(self):
            pass

    session = requests.Session()
    session.mount("https://", RedirectToHttp())
    with pytest.raises(DownloadError, match=r"https://host\.test/f\.zip: redirected to http://127.*downgrade"):
        download("https://host.test/f.zip", tmp_path / "f.zip", progress=False, retries=0, session=session)
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_content_md5_checked(server, tmp_path):
    server.mode = "md5"
    assert _get(server, tmp_path / "ok.zip").size == len(BODY)
    server.mode = "bad_md5"
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*Content-MD5 mismatch"):
        _get(server, tmp_path / "bad.zip")
    assert not (tmp_path / "bad.zip").exists() and not (tmp_path / "bad.zip.part").exists()


def test_sha256_mismatch_keeps_no_file(server, tmp_path):
    dest = tmp_path / "f.zip"
    with pytest.raises(DownloadError, match=r"dataset_100\.zip: sha256 mismatch: expected 0{64}, got " + SHA):
        _get(server, dest, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_expected_size_mismatch(server, tmp_path):
    with pytest.raises(DownloadError, match="expected_size is 5"):
        _get(server, tmp_path / "f.zip", expected_size=5)
    assert list(tmp_path.iterdir()) == []


def test_short_body_is_retried_and_reported(server, tmp_path):
    server.mode = "long"  # announces 10 bytes more than it sends: every attempt comes up short
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*failed after 2 attempts"):
        download(server.url, tmp_path / "f.zip", progress=False, retries=1, backoff=0.0, timeout=5)
    assert len(server.requests) == 2
    assert server.requests[1]["range"] is not None  # the retry resumed the part file
    assert not (tmp_path / "f.zip").exists()


def test_html_page_is_an_error(server, tmp_path):
    server.mode = "html"
    with pytest.raises(DownloadError, match="got an HTML page instead of the file: Google Drive quota"):
        _get(server, tmp_path / "f.zip")
    assert list(tmp_path.iterdir()) == []


def test_html_served_as_zip_is_caught(server, tmp_path):
    server.mode = "html_as_zip"
    with pytest.raises(DownloadError, match="the body is an HTML/XML page, not the file"):
        _get(server, tmp_path / "f.zip")
    assert list(tmp_path.iterdir()) == []
    server.mode = "ok"  # BODY is no zip: with expect='zip' its first bytes give it away
    with pytest.raises(DownloadError, match=r"not a zip archive \(it starts with b'\\x00\\x01"):
        _get(server, tmp_path / "f.zip", expect="zip")
    assert list(tmp_path.iterdir()) == []


def test_cached_html_page_is_evicted(server, tmp_path):
    dest = tmp_path / "f.zip"
    dest.write_bytes(b"<html><body>Sign in</body></html>")  # cached by an older version that trusted it
    _get(server, dest)
    assert len(server.requests) == 1 and dest.read_bytes() == BODY


def test_existing_valid_dest_makes_no_request(server, tmp_path):
    dest = tmp_path / "f.zip"
    dest.write_bytes(BODY)
    res = _get(server, dest, expected_size=len(BODY), sha256=SHA)
    assert server.requests == [] and res.sha256 == SHA and res.size == len(BODY)


def test_existing_invalid_dest_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "f.zip"
    dest.write_bytes(b"stale")
    _get(server, dest, sha256=SHA)
    assert len(server.requests) == 1 and dest.read_bytes() == BODY


def test_connection_refused_names_url(tmp_path):
    s = Server()
    url = s.url
    s.close()
    with pytest.raises(DownloadError, match=re.escape(url)):
        download(url, tmp_path / "f.zip", progress=False, retries=1, backoff=0.0, timeout=2)


# ------------------------------------------------------------------------------------------- stage

def _stage_dir(tmp_path: Path, repo_root: Path, monkeypatch, section_edit=None) -> Path:
    import yaml

    params = committed_params()
    params["fetch_facesynthetics"]["num_faces"] = 3
    if section_edit:
        section_edit(params["fetch_facesynthetics"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_embedded(tmp_path, repo_root, monkeypatch, capsys):
    from stages import fetch_facesynthetics as stage

    _stage_dir(tmp_path, repo_root, monkeypatch)
    out = tmp_path / "data" / "raw" / "facesynthetics"
    out.mkdir(parents=True)
    (out / "stale.png").write_bytes(b"old")  # the output is emptied first
    stage.main([])
    names = sorted(p.name for p in out.iterdir())
    assert "stale.png" not in names
    assert len([n for n in names if n.endswith("_ldmks.txt")]) == 3 + 4
    assert len([n for n in names if re.fullmatch(r"\d{6}\.png", n)]) == 3 + 3  # one broken sample has no image
    source = json.loads((out / "SOURCE.json").read_text())
    assert (source["source"], source["seed"], source["size"], source["num_faces"]) == ("embedded", 0, 512, 3)
    assert sorted(json.loads((out / "sample_poses.json").read_text())) == ["000000", "000001", "000002"]
    assert "3 faces + 4 broken" in capsys.readouterr().out


def test_stage_official_with_local_server(tmp_path, repo_root, monkeypatch):
    import zipfile

    from stages import fetch_facesynthetics as stage

    zbuf = tmp_path / "zip_src.zip"
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("dataset_100/000000.png", b"png")
        zf.writestr("dataset_100/000000_ldmks.txt", "1 2\n" * 70)
    payload = zbuf.read_bytes()
    srv = Server(payload)
    try:
        def edit(sec):
            sec["url"] = srv.url.replace("dataset_100", "{subset}")
            sec["subset"] = "dataset_100"
        work = tmp_path / "work"
        work.mkdir()
        _stage_dir(work, repo_root, monkeypatch, edit)
        stage.main(["--profile", "real"])
    finally:
        srv.close()
    out = work / "data" / "raw" / "facesynthetics"
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000000_ldmks.txt", "SOURCE.json"]
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["sha256"] == hashlib.sha256(payload).hexdigest() and source["size"] == len(payload)
    assert (source["verified"], source["complete"], source["files"], source["num_samples"]) == ("size-only", True, 2, 1)
    assert source["subset"] == "dataset_100" and "LICENSE.txt" in source["license"]
    assert (work / "data" / "cache" / "downloads" / "dataset_100.zip").read_bytes() == payload
    shutil.rmtree(out)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(source="ftp"), r"fetch_facesynthetics\.source: 'ftp' is not one of"),
    (lambda s: s.update(source="official", url="ftp://x/{subset}.zip"), r"fetch_facesynthetics\.url: expected an http\(s\) URL"),
    (lambda s: s.pop("num_faces"), r"fetch_facesynthetics\.num_faces: source 'embedded' needs num_faces"),
])
def test_stage_bad_params(tmp_path, repo_root, monkeypatch, edit, message):
    from stages import config as C
    from stages import fetch_facesynthetics as stage

    _stage_dir(tmp_path, repo_root, monkeypatch, edit)
    with pytest.raises(C.ParamError, match=message):
        stage.main([])
    assert not (tmp_path / "data").exists()  # parameters are checked before any work


def test_stage_official_needs_url(repo_root):
    from stages import config as C
    from stages.fetch_facesynthetics import FetchConfig

    with pytest.raises(C.ParamError, match=r"fetch_facesynthetics\.url: source 'official' needs url"):
        C.parse(FetchConfig, {"source": "official", "subset": "dataset_100"}, "fetch_facesynthetics")


# ------------------------------------------------------------------------------------------- archives in folders

def _zip_bytes(tmp_path: Path, files: dict[str, bytes]) -> bytes:
    import zipfile

    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    data = path.read_bytes()
    path.unlink()
    return data


def test_bad_cached_zip_is_evicted_and_fetched_once(tmp_path):
    """A truncated zip in the cache (an older run's) is dropped and fetched again; a server that keeps sending a
    broken zip ends in one DownloadError naming the cache file, and the output folder is left as it was."""
    from pipelines.sources.downloads import install_archive, reusable

    good = _zip_bytes(tmp_path, {"d/a.txt": b"a", "d/b.txt": b"b"})
    srv = Server(good)
    try:
        cache, out = tmp_path / "cache" / "d.zip", tmp_path / "out"
        cache.parent.mkdir()
        cache.write_bytes(good[: len(good) // 2])  # PK magic, no central directory
        manifest = install_archive(srv.url, cache, out, progress=False, retries=0)
        assert len(srv.requests) == 1 and sorted(p.name for p in out.iterdir()) == ["SOURCE.json", "a.txt", "b.txt"]
        assert manifest["complete"] is True and manifest["files"] == 2 and manifest["verified"] == "size-only"
        assert reusable(out, url=srv.url) == manifest and reusable(out, url="https://elsewhere/d.zip") is None
        srv.body = good[:-30]  # broken at every fetch: its end record is cut
        cache.unlink()
        with pytest.raises(DownloadError, match=r"d\.zip \(from http://127.*still not a readable zip"):
            install_archive(srv.url, cache, out, progress=False, retries=0)
        assert len(srv.requests) == 3  # the first fetch, then once more
        assert (out / "a.txt").read_bytes() == b"a" and reusable(out, url=srv.url) == manifest
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no partial folder left
    finally:
        srv.close()


def test_stage_failed_fetch_keeps_previous_output(tmp_path, repo_root, monkeypatch):
    from stages import fetch_facesynthetics as stage

    srv = Server(b"not a zip at all")
    try:
        def edit(sec):
            sec["url"] = srv.url.replace("dataset_100", "{subset}")
            sec["subset"] = "dataset_100"
        _stage_dir(tmp_path, repo_root, monkeypatch, edit)
        out = tmp_path / "data" / "raw" / "facesynthetics"
        out.mkdir(parents=True)
        (out / "000000.png").write_bytes(b"previous run")
        with pytest.raises(DownloadError, match="not a zip archive"):
            stage.main(["--profile", "real"])
    finally:
        srv.close()
    assert (out / "000000.png").read_bytes() == b"previous run"
