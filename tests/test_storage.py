"""Folder sync against a real S3 server: checksums, skipping unchanged files, failures mid-upload."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import s3fs

from helpers.servers import S3_ENV
from vlm_core.checkpoints import (
    COMPLETE_MARKER,
    CheckpointUploader,
    fetch_latest_checkpoint,
    mark_complete,
    upload_new_checkpoints,
)
from vlm_core.storage import (
    CHECKSUMS,
    StorageError,
    download_folder,
    is_complete,
    local_checksums,
    upload_folder,
)


def _folder(root: Path, n: int = 6, size: int = 50_000, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / ("sub" if i % 2 else ".")
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.bin").write_bytes(bytes([(i + seed) % 256]) * (size + i))
    return root


def _bucket(name: str) -> None:
    fs = s3fs.S3FileSystem()
    if not fs.exists(name):
        fs.mkdir(name)


@pytest.mark.integration
def test_round_trip_and_unchanged_upload_sends_nothing(s3_server, tmp_path):
    _bucket("rt-bucket")
    src = _folder(tmp_path / "src")
    first = upload_folder(src, "s3://rt-bucket/run/ckpt")
    assert first.files_sent == 6 and first.bytes_sent == sum(p.stat().st_size for p in src.rglob("*.bin"))
    assert is_complete("s3://rt-bucket/run/ckpt")
    again = upload_folder(src, "s3://rt-bucket/run/ckpt")
    assert (again.files_sent, again.bytes_sent, again.files_skipped) == (0, 0, 6)
    (src / "f0.bin").write_bytes(b"changed")
    third = upload_folder(src, "s3://rt-bucket/run/ckpt")
    assert (third.files_sent, third.bytes_sent) == (1, 7)
    dst = tmp_path / "dst"
    got = download_folder("s3://rt-bucket/run/ckpt", dst)
    assert got.files_sent == 6 and local_checksums(dst) == local_checksums(src)
    assert download_folder("s3://rt-bucket/run/ckpt", dst).files_sent == 0  # already there, verified


@pytest.mark.integration
def test_corrupt_or_partial_remote_is_refused(s3_server, tmp_path):
    _bucket("bad-bucket")
    src = _folder(tmp_path / "src", n=2)
    upload_folder(src, "s3://bad-bucket/x")
    fs = s3fs.S3FileSystem()
    fs.pipe_file("bad-bucket/x/f0.bin", b"tampered")
    with pytest.raises(StorageError, match="checksum mismatch"):
        download_folder("s3://bad-bucket/x", tmp_path / "d")
    fs.rm_file(f"bad-bucket/x/{CHECKSUMS}")
    with pytest.raises(StorageError, match="upload is missing or incomplete"):
        download_folder("s3://bad-bucket/x", tmp_path / "d2")


@pytest.mark.integration
def test_clear_errors_for_missing_bucket_and_bad_credentials(s3_server, tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", n=1)
    with pytest.raises(StorageError) as e:
        upload_folder(src, "s3://no-such-bucket/run")
    assert "s3://no-such-bucket/run" in str(e.value) and "bucket or path does not exist" in str(e.value)


@pytest.fixture
def fail_fast(monkeypatch):
    """Fewer botocore retries, so failure tests take seconds (our own retries still run)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_unreachable_endpoint_names_url_not_secret(tmp_path, fail_fast):
    from helpers.servers import free_port, s3_env

    src = _folder(tmp_path / "src", n=1)
    with s3_env(f"http://127.0.0.1:{free_port()}"):
        s3fs.S3FileSystem.clear_instance_cache()
        t = time.time()
        with pytest.raises(StorageError) as e:
            upload_folder(src, "s3://any/run", retries=1)
        assert time.time() - t < 60
    s3fs.S3FileSystem.clear_instance_cache()
    msg = str(e.value)
    assert "s3://any/run" in msg and "cannot be reached" in msg and S3_ENV["AWS_SECRET_ACCESS_KEY"] not in msg


@pytest.mark.integration
def test_server_stopped_mid_upload_then_retry_completes(own_s3_server, tmp_path, fail_fast):
    _bucket("mid-bucket")
    src = _folder(tmp_path / "big", n=40, size=400_000)
    errors: list[BaseException] = []

    def run():
        try:
            upload_folder(src, "s3://mid-bucket/run/checkpoint-5", workers=2, retries=1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    log = Path(own_s3_server.log_path)
    deadline = time.time() + 30
    while time.time() < deadline and log.read_text().count("PUT /mid-bucket/run/checkpoint-5/") < 3:
        time.sleep(0.02)
    own_s3_server.stop()
    th.join(120)
    assert errors and isinstance(errors[0], StorageError), errors
    assert "s3://mid-bucket/run/checkpoint-5" in str(errors[0])
    assert f"PUT /mid-bucket/run/checkpoint-5/{CHECKSUMS}" not in log.read_text()  # never marked complete
    own_s3_server.start()  # moto keeps no state across restarts: the bucket comes back empty
    s3fs.S3FileSystem.clear_instance_cache()
    _bucket("mid-bucket")
    assert not is_complete("s3://mid-bucket/run/checkpoint-5")
    report = upload_folder(src, "s3://mid-bucket/run/checkpoint-5")
    assert report.files_sent == 40 and is_complete("s3://mid-bucket/run/checkpoint-5")
    download_folder("s3://mid-bucket/run/checkpoint-5", tmp_path / "back")
    assert local_checksums(tmp_path / "back") == local_checksums(src)


def _ckpt(out: Path, step: int, complete: bool = True) -> Path:
    ck = _folder(out / f"checkpoint-{step}", n=3, size=1000, seed=step)
    if complete:
        mark_complete(ck, step)
    return ck


@pytest.mark.integration
def test_only_complete_checkpoints_upload_and_resume_fetches_newest(s3_server, tmp_path):
    _bucket("ck-bucket")
    out = tmp_path / "train"
    _ckpt(out, 5)
    _ckpt(out, 10)
    _ckpt(out, 15, complete=False)  # still being written
    assert upload_new_checkpoints(out, "s3://ck-bucket", "run1") == ["checkpoint-5", "checkpoint-10"]
    assert upload_new_checkpoints(out, "s3://ck-bucket", "run1") == []
    assert not s3fs.S3FileSystem().exists("ck-bucket/runs/run1/checkpoint-15")
    fresh = tmp_path / "fresh"
    got = fetch_latest_checkpoint("s3://ck-bucket", "run1", fresh)
    assert got == fresh / "checkpoint-10" and (got / COMPLETE_MARKER).is_file()
    assert local_checksums(got) == local_checksums(out / "checkpoint-10")
    assert fetch_latest_checkpoint("s3://ck-bucket", "run-none", tmp_path / "none") is None


@pytest.mark.integration
def test_uploader_thread_uploads_while_training_writes(s3_server, tmp_path):
    _bucket("up-bucket")
    out = tmp_path / "train"
    out.mkdir()
    up = CheckpointUploader(out, "s3://up-bucket", "r", interval=0.2).start()
    _ckpt(out, 1)
    deadline = time.time() + 20
    while time.time() < deadline and "checkpoint-1" not in up.uploaded:
        time.sleep(0.1)
    assert up.uploaded == ["checkpoint-1"]  # uploaded while "training" goes on
    _ckpt(out, 2)
    assert up.stop() == ["checkpoint-1", "checkpoint-2"]
    assert is_complete("s3://up-bucket/runs/r/checkpoint-2")
