"""``segevo weights download`` against a local Hub stand-in: resume, checksums, offline failure."""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from segevo import hub
from segevo.errors import DownloadError

COMMIT = "516701d" + "0" * 33


class FakeHub:
    """Serves ``/BAAI/SegVol/resolve/<rev>/<file>`` like the Hub (HEAD metadata, ranged GET) on 127.0.0.1."""

    def __init__(self, files: dict[str, bytes], cut_first_get: str | None = None):
        self.files = files
        self.cut_first_get = cut_first_get
        self.requests: list[tuple[str, str, str | None]] = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _lookup(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 5 or parts[:3] != ["BAAI", "SegVol", "resolve"] or parts[4] not in hub_.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return None
                return parts[4], hub_.files[parts[4]]

            def _meta(self, name, data, length):
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")

            def do_HEAD(self):
                hub_.requests.append(("HEAD", self.path, None))
                found = self._lookup()
                if found:
                    self.send_response(200)
                    self._meta(*found, len(found[1]))
                    self.end_headers()

            def do_GET(self):
                rng = self.headers.get("Range")
                hub_.requests.append(("GET", self.path, rng))
                found = self._lookup()
                if not found:
                    return
                name, data = found
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self._meta(name, data, len(data) - start)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if name == hub_.cut_first_get:
                    hub_.cut_first_get = None
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def files() -> dict[str, bytes]:
    payload = {name: f"{name} contents\n".encode() for name in hub.FILES}
    payload["pytorch_model.bin"] = bytes(range(256)) * 4096  # 1 MiB
    payload[hub.VIT_FILE] = b"vit" * 1000
    return payload


@pytest.fixture(autouse=True)
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_download_resumes_a_cut_transfer_and_verifies(files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # the Hub's 10 MB chunks, scaled to 1 MiB
    monkeypatch.setitem(hub.SHA256, "pytorch_model.bin", hashlib.sha256(files["pytorch_model.bin"]).hexdigest())
    with FakeHub(files, cut_first_get="pytorch_model.bin") as fake:
        paths = hub.download_segvol(tmp_path / "w", endpoint=fake.url, include_vit=True)
    assert sorted(p.name for p in paths) == sorted([*hub.FILES, hub.VIT_FILE])
    for p in paths:
        assert p.read_bytes() == files[p.name]
    ranged = [r for r in fake.requests if r[0] == "GET" and "pytorch_model.bin" in r[1] and r[2]]
    assert ranged and ranged[0][2] != "bytes=0-", "the retry resumed from the bytes already on disk"

    with FakeHub(files) as fake:  # a rerun finds every file complete and fetches nothing
        hub.download_segvol(tmp_path / "w", endpoint=fake.url, include_vit=True)
    assert not [r for r in fake.requests if r[0] == "GET"]


def test_checksum_mismatch_deletes_the_file(files, tmp_path):
    with FakeHub(files) as fake, pytest.raises(DownloadError, match="SHA256 mismatch"):
        hub.download_segvol(tmp_path / "w", endpoint=fake.url)
    assert not (tmp_path / "w" / "pytorch_model.bin").exists()


def test_missing_remote_file_names_it(files, tmp_path):
    del files["merges.txt"]
    with FakeHub(files) as fake, pytest.raises(DownloadError, match="BAAI/SegVol/merges.txt"):
        hub.download_segvol(tmp_path / "w", endpoint=fake.url)


def test_unreachable_hub_fails_fast(tmp_path):
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        closed_port = probe.server_address[1]
    start = time.monotonic()
    with pytest.raises(DownloadError, match="looks offline"):
        hub.download_segvol(tmp_path / "w", endpoint=f"http://127.0.0.1:{closed_port}")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "w").exists()


def test_offline_mode_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        hub.download_segvol(tmp_path / "w", endpoint="http://127.0.0.1:9")
