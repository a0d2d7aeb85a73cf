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
    """A threaded http.server on 127.0.0.1 that records requests; ``mode`` picks a misbehaviour."""

    def __init__(self, body: bytes = BODY):
        self.body = body
        self.requests: list[dict] = []
        self.mode = "ok"  # ok | md5 | bad_md5 | html | long | no_range
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if server.mode == "html":
                    page = b"<html>Google Drive - quota exceeded</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                full = server.body
                body, status, start = full, 200, 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and server.mode != "no_range":
                    start, status = int(m.group(1)), 206
                    body = full[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/zip")
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


def test_full_download(server, tmp_path):
    dest = tmp_path / "sub" / "f.zip"
    res = _get(server, dest, expected_size=len(BODY), sha256=SHA)
    assert dest.read_bytes() == BODY
    assert (res.path, res.url, res.size, res.sha256) == (dest, server.url, len(BODY), SHA)
    assert not (tmp_path / "sub" / "f.zip.part").exists()
    assert server.requests == [{"path": "/dataset_100.zip", "range": None}]


def test_resume_sends_range_and_appends(server, tmp_path):
    dest = tmp_path / "f.zip"
    (tmp_path / "f.zip.part").write_bytes(BODY[:30000])
    res = _get(server, dest)
    assert server.requests[-1]["range"] == "bytes=30000-"
    assert dest.read_bytes() == BODY and res.sha256 == SHA


def test_resume_ignored_by_server_starts_over(server, tmp_path):
    server.mode = "no_range"
    dest = tmp_path / "f.zip"
    (tmp_path / "f.zip.part").write_bytes(b"garbage that must not stay in front")
    _get(server, dest)
    assert server.requests[-1]["range"] == "bytes=35-"
    assert dest.read_bytes() == BODY


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
