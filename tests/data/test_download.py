"""Download stage: resumable HTTP with checksums against a local server, manual datasets, user datasets, demo."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from data_helpers import TINY, user_config

from duplus.data import builtin_datasets, download
from duplus.data.registry import DatasetSpec, Source
from duplus.data.transfer import download_file
from duplus.errors import ChecksumError, DownloadError


class _Server:
    """Serves ``files`` over HTTP on 127.0.0.1 with Range support and switchable faults."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate = 0  # how many next responses stop half-way
        self.ignore_range = False
        self.ranges: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = owner.files.get(self.path)
                owner.ranges.append(self.headers.get("Range"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                header = self.headers.get("Range")
                if header and not owner.ignore_range:
                    start = int(header.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.truncate:
                    owner.truncate -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


PAYLOAD = bytes(range(256)) * 400  # 100 kB


def test_good_download_verifies_md5_and_sha256(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    target = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5=hashlib.md5(PAYLOAD).hexdigest(),
                           sha256=hashlib.sha256(PAYLOAD).hexdigest(), retries=1, backoff=0)
    assert target.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()


def test_wrong_checksum_names_file_expected_and_got(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    with pytest.raises(ChecksumError) as caught:
        download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5="0" * 32, retries=1, backoff=0)
    message = str(caught.value)
    assert "f.bin" in message and "0" * 32 in message and hashlib.md5(PAYLOAD).hexdigest() in message
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_a_wrong_file_at_the_download_path_is_kept_and_the_error_says_what_to_do(server: _Server,
                                                                                tmp_path: Path) -> None:
    # A user may have put the file there to skip the download: it is never deleted, but without
    # being told to move it they would meet the same mismatch on every run.
    server.files["/f.bin"] = PAYLOAD
    placed = tmp_path / "f.bin"
    placed.write_bytes(b"another release")
    expected = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(ChecksumError) as caught:
        download_file(f"{server.url}/f.bin", placed, sha256=expected, retries=1, backoff=0)
    message = str(caught.value)
    assert str(placed) in message and "delete or move it" in message.lower()
    assert f"expected {expected[:12]}..." in message and hashlib.sha256(b"another release").hexdigest()[:12] in message
    assert expected not in message  # short digests: the message is read by a person
    assert placed.read_bytes() == b"another release" and server.ranges == []


def test_truncated_transfer_fails_without_a_final_file_then_resumes(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    server.truncate = 10
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        download_file(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                      retries=2, backoff=0)
    assert not (tmp_path / "f.bin").exists()
    part = tmp_path / "f.bin.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)
    server.truncate = 0
    server.ranges.clear()
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                  retries=1, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.ranges[0] is not None and server.ranges[0].startswith("bytes=")


def test_resume_of_a_part_file_requests_only_the_rest(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:30000])
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5=hashlib.md5(PAYLOAD).hexdigest(), retries=1,
                  backoff=0)
    assert server.ranges == ["bytes=30000-"]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(b"garbage" * 10)
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5=hashlib.md5(PAYLOAD).hexdigest(), retries=1,
                  backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_missing_url_is_a_permanent_error(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.url}/nope.tar", tmp_path / "nope.tar", retries=3, backoff=0)
    assert len(server.ranges) == 1  # no retries on a 404


def _msd_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("Task99_Toy/dataset.json", b'{"training": []}'), ("Task99_Toy/imagesTr/a.nii.gz", b"a")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_host_without_network_is_told_so_in_one_line(tmp_path: Path, monkeypatch) -> None:
    import socket
    import urllib.error
    import urllib.request

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DownloadError) as raised:
        download_file("https://example.org/data.zip", tmp_path / "data.zip", retries=2, backoff=0.0)
    message = str(raised.value)
    assert "\n" not in message and "finds no route to the server" in message and "where Snakemake runs" in message


def _serve_toy_msd(server: _Server, monkeypatch) -> tuple[bytes, DatasetSpec]:
    """A url dataset ``toy_msd`` whose archive the test server holds; returns (archive, spec)."""
    archive = _msd_tar()
    server.files["/Task99_Toy.tar"] = archive
    spec = DatasetSpec("toy_msd", "CT", None, "abdomen", {1: "spleen"}, "url",
                       Source(url=f"{server.url}/Task99_Toy.tar", filename="Task99_Toy.tar",
                              md5=hashlib.md5(archive).hexdigest(), subdir="Task99_Toy"))
    monkeypatch.setitem(builtin_datasets.BUILTIN, "toy_msd", spec)
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    return archive, spec


def test_url_dataset_downloads_extracts_and_records(server: _Server, tmp_path: Path, monkeypatch) -> None:
    _, spec = _serve_toy_msd(server, monkeypatch)
    record_path = tmp_path / "raw" / "toy_msd" / "download.json"
    record = download.run_download("toy_msd", {"datasets": {"toy_msd": {}}}, record_path)
    assert json.loads(record_path.read_text(encoding="utf-8")) == record
    root = Path(record["root"])
    assert root == (tmp_path / "raw" / "toy_msd" / "Task99_Toy").resolve()
    assert set(record["files"]) == {"dataset.json", "imagesTr/a.nii.gz"}
    assert record["files"]["imagesTr/a.nii.gz"] == hashlib.sha256(b"a").hexdigest()
    assert not (root / "imagesTr" / "a.nii.gz").stat().st_mode & 0o222  # raw data is read-only
    # A wrong checksum fails the stage and leaves no record.
    monkeypatch.setitem(builtin_datasets.BUILTIN, "toy_msd", replace(spec, source=replace(spec.source, md5="1" * 32)))
    with pytest.raises(ChecksumError, match="Task99_Toy.tar.*expected 1{32}"):
        download.run_download("toy_msd", {}, tmp_path / "raw2" / "toy_msd" / "download.json")
    assert not (tmp_path / "raw2" / "toy_msd" / "download.json").exists()


def test_a_wrong_archive_placed_by_hand_fails_the_url_dataset_with_advice(server: _Server, tmp_path: Path,
                                                                           monkeypatch) -> None:
    _serve_toy_msd(server, monkeypatch)
    placed = tmp_path / "raw" / download.DOWNLOADS / "toy_msd" / "Task99_Toy.tar"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"not the archive")
    with pytest.raises(ChecksumError, match="Task99_Toy.tar is already at the download path.*Delete or move it"):
        download.run_download("toy_msd", {}, tmp_path / "raw" / "toy_msd" / "download.json")
    assert placed.read_bytes() == b"not the archive" and server.ranges == []


def test_manual_dataset_lists_what_is_missing_and_where(tmp_path: Path) -> None:
    record = tmp_path / "raw" / "structseg_thorax" / "download.json"
    with pytest.raises(DownloadError) as caught:
        download.run_download("structseg_thorax", {}, record)
    message = str(caught.value)
    assert str(tmp_path / "raw" / "structseg_thorax" / "Thoracic_OAR" / "*" / "data.nii.gz") in message
    assert "found 0 file(s), need at least 50" in message and "grand-challenge" in message
    assert not record.exists()


def test_manual_dataset_in_place_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "raw" / "brain_structures"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        (root / folder / "s1.nii.gz").write_bytes(folder.encode())
    record = download.run_download("brain_structures", {}, root / "download.json")
    assert set(record["files"]) == {"imagesTr/s1.nii.gz", "labelsTr/s1.nii.gz"}


def test_user_msd_dataset_is_recorded_not_copied_or_written(msd_folder, tmp_path: Path) -> None:
    root = msd_folder(n=2)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    record_path = tmp_path / "raw" / "mydata" / "download.json"
    record = download.run_download("mydata", user_config(root), record_path)
    assert record["root"] == str(root.resolve()) and record["kind"] == "msd"
    assert "imagesTr/case00.nii.gz" in record["files"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert sorted(p.name for p in record_path.parent.iterdir()) == ["download.json"]


def test_demo_download_generates_and_reruns_identically(tmp_path: Path) -> None:
    config = {**TINY, "demo": {"cases_per_center": 1, "headneck_patients": 2}}
    record_path = tmp_path / "raw" / "demo_abdomen_mri" / "download.json"
    first = download.run_download("demo_abdomen_mri", config, record_path)
    record_path.unlink()
    second = download.run_download("demo_abdomen_mri", config, record_path)
    assert first == second and len(first["files"]) == 5  # 2 images, 2 labels, dataset.json
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no leftovers


def test_datasets_cut_from_one_archive_download_and_extract_it_once(server: _Server, tmp_path: Path, monkeypatch) -> None:
    archive = _msd_tar()
    server.files["/Shared.tar"] = archive
    source = Source(url=f"{server.url}/Shared.tar", filename="Shared.tar", md5=hashlib.md5(archive).hexdigest(),
                    subdir="Task99_Toy")
    for name in ("toy_ct", "toy_mr"):
        monkeypatch.setitem(builtin_datasets.BUILTIN, name,
                            DatasetSpec(name, "CT", None, "abdomen", {1: "spleen"}, "url", source))
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    raw = tmp_path / "raw"
    extracted = (raw / download.SHARED / "Shared" / "Task99_Toy").resolve()
    # The first extraction fails midway: nothing half-extracted is left to pass for complete.
    real_extract = download.safe_extract

    def failing_extract(archive_path, destination, **kwargs):
        real_extract(archive_path, destination, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(download, "safe_extract", failing_extract)
    with pytest.raises(OSError, match="disk full"):
        download.run_download("toy_ct", {"datasets": {"toy_ct": {}}}, raw / "toy_ct" / "download.json")
    assert not (raw / download.SHARED / "Shared").exists()
    assert [p.name for p in (raw / download.SHARED).iterdir()] == []
    monkeypatch.setattr(download, "safe_extract", real_extract)
    # Earlier versions extracted the archive into each dataset's own folder (read-only, like all raw data).
    old_copy = raw / "toy_ct" / "Task99_Toy" / "imagesTr"
    old_copy.mkdir(parents=True)
    (old_copy / "a.nii.gz").write_bytes(b"a")
    download._make_read_only(raw / "toy_ct")
    records = {}
    for name in ("toy_ct", "toy_mr"):
        records[name] = download.run_download(name, {"datasets": {name: {}}}, raw / name / "download.json")
        assert Path(records[name]["root"]) == extracted
        assert sorted(p.name for p in (raw / name).iterdir()) == ["download.json"]  # no copy of its own (any more)
    assert records["toy_ct"]["files"] == records["toy_mr"]["files"]
    assert len(server.ranges) == 1  # the failed extraction kept the verified archive; the second dataset fetched nothing
    assert not (raw / download.DOWNLOADS / "Shared.tar").exists()  # extracted once, the archive has gone
    assert not (extracted / "imagesTr" / "a.nii.gz").stat().st_mode & 0o222  # read-only like any raw data
    # A rerun of one dataset (snakemake --forcerun download) reuses the extraction, fetching nothing.
    saved = dict(server.files)
    server.files.clear()
    assert download.run_download("toy_mr", {"datasets": {"toy_mr": {}}}, raw / "toy_mr" / "download.json") == records["toy_mr"]
    # Another archive under the same name (a new release in the registry): extracted afresh.
    server.files.update(saved)
    newer = replace(source, url=f"{server.url}/Shared.tar?v=2")
    server.files["/Shared.tar?v=2"] = archive
    monkeypatch.setitem(builtin_datasets.BUILTIN, "toy_mr",
                        DatasetSpec("toy_mr", "CT", None, "abdomen", {1: "spleen"}, "url", newer))
    monkeypatch.setitem(builtin_datasets.BUILTIN, "toy_ct",
                        DatasetSpec("toy_ct", "CT", None, "abdomen", {1: "spleen"}, "url", newer))
    before = len(server.ranges)
    download.run_download("toy_mr", {"datasets": {"toy_mr": {}}}, raw / "toy_mr" / "download.json")
    assert len(server.ranges) == before + 1


@pytest.mark.parametrize("stale", [b"garbage" * 10, b"x" * (len(PAYLOAD) + 5)], ids=["prefix", "too-long"])
def test_a_stale_part_file_is_downloaded_again_from_the_start(server: _Server, tmp_path: Path, stale: bytes) -> None:
    # A .part left by an earlier run (another version of the archive, or damaged by a crash) resumes
    # into a file that fails its checksum: the download starts over instead of failing the run.
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(stale)
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(), retries=1,
                  backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.ranges[0] is not None and server.ranges[-1] is None  # resumed first, then from the first byte
    assert not (tmp_path / "f.bin.part").exists()


def test_a_published_file_that_never_matches_fails_after_one_fresh_download(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:100])
    with pytest.raises(ChecksumError, match=r"f\.bin: md5 mismatch: expected 0{32}, got .* the second time from the start"):
        download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5="0" * 32, retries=1, backoff=0)
    assert server.ranges == ["bytes=100-", None]
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_rerun_of_a_url_dataset_reuses_its_extraction(server: _Server, tmp_path: Path, monkeypatch) -> None:
    # The archive is deleted once extracted; a rerun of the stage (a changed datasets.<name> entry, or
    # a job killed while hashing the files) must not fetch it again: it may be tens of gigabytes.
    archive, spec = _serve_toy_msd(server, monkeypatch)
    record_path = tmp_path / "raw" / "toy_msd" / "download.json"
    first = download.run_download("toy_msd", {"datasets": {"toy_msd": {}}}, record_path)
    record_path.unlink()
    saved = dict(server.files)
    server.files.clear()
    server.ranges.clear()
    assert download.run_download("toy_msd", {"datasets": {"toy_msd": {}}}, record_path) == first
    assert server.ranges == []
    # Another archive under the same name (a new release in the registry): extracted afresh.
    newer = archive
    server.files.update(saved)
    server.files["/Task99_Toy.tar?v=2"] = newer
    monkeypatch.setitem(builtin_datasets.BUILTIN, "toy_msd", replace(spec, source=replace(
        spec.source, url=f"{server.url}/Task99_Toy.tar?v=2", md5=hashlib.md5(newer).hexdigest())))
    download.run_download("toy_msd", {"datasets": {"toy_msd": {}}}, record_path)
    assert server.ranges == [None]
