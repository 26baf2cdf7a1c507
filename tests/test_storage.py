"""The object-store layer against a real S3 server (SeaweedFS, auth on; see s3server.py)."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from diffugts import __version__
from diffugts.errors import ConfigError, DiffugtsError, InputError
from diffugts.storage import (
    MANIFEST,
    AccessDenied,
    ObjectNotFound,
    ObjectStore,
    RetryPolicy,
    S3Settings,
    StoreUnavailable,
    default_bucket,
    is_s3_uri,
    join_uri,
    localize,
    parse_s3_uri,
    results_uri,
)


class Sleeps(list):
    """A RetryPolicy.sleep that records the delays instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fast_store(attempts: int = 4, **kwargs) -> tuple[ObjectStore, Sleeps]:
    sleeps = Sleeps()
    return ObjectStore(retry=RetryPolicy(attempts=attempts, base_delay=0.01, sleep=sleeps), **kwargs), sleeps


@pytest.fixture
def base(s3_env) -> str:
    """A fresh folder in the test bucket for each test."""
    return f"s3://{s3_env.bucket}/t-{uuid.uuid4().hex[:10]}"


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# --- URIs and settings (no server) -----------------------------------------------------


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/key/prefix") == ("bucket", "key/prefix")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://my.bucket-1/a/b/") == ("my.bucket-1", "a/b/")
    assert is_s3_uri("s3://b/k") and not is_s3_uri("/data/s3://x") and not is_s3_uri(Path("s3:/b"))
    assert join_uri("s3://bkt/a/", "b", "/c/d") == "s3://bkt/a/b/c/d"


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("/local/path", "expected s3://bucket"),
        ("S3://bucket/k", "expected s3://bucket"),
        ("s3:///key", "no bucket name"),
        ("s3://Bad_Bucket/key", "invalid bucket name 'Bad_Bucket'"),
        ("s3://ab/key", "invalid bucket name 'ab'"),
        ("s3://bucket/a\nb", "control character"),
        ("s3://bucket/study/../../etc", "'..' path segment"),
    ],
)
def test_parse_s3_uri_rejects_malformed(uri, reason):
    with pytest.raises(InputError, match="malformed S3 URI") as err:
        parse_s3_uri(uri)
    assert reason in str(err.value) and "\n" not in str(err.value)


ENV = {
    "DIFFUGTS_S3_ENDPOINT": "http://127.0.0.1:9000",
    "AWS_ACCESS_KEY_ID": "AKID",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
    "AWS_SESSION_TOKEN": "tok-value",
}


def test_settings_from_env():
    s = S3Settings.from_env(ENV)
    assert (s.endpoint, s.secure, s.region, s.session_token) == ("127.0.0.1:9000", False, None, "tok-value")
    assert "s3cr3t-value" not in repr(s) and "tok-value" not in repr(s)
    # Without a scheme TLS is on; the AWS fallbacks are read in order.
    env = {
        **ENV,
        "DIFFUGTS_S3_ENDPOINT": "",
        "AWS_ENDPOINT_URL_S3": "minio.kubeflow:9000",
        "AWS_ENDPOINT_URL": "http://other:1",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    s = S3Settings.from_env(env)
    assert (s.endpoint, s.secure, s.region) == ("minio.kubeflow:9000", True, "eu-west-1")
    assert S3Settings.from_env({**env, "AWS_ENDPOINT_URL_S3": "", "AWS_REGION": "x"}).url == "http://other:1"


@pytest.mark.parametrize("missing", ["DIFFUGTS_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_missing_setting_names_the_variable(missing):
    with pytest.raises(ConfigError) as err:
        S3Settings.from_env({k: v for k, v in ENV.items() if k != missing})
    message = str(err.value)
    assert message.startswith(missing) and "\n" not in message and "s3cr3t-value" not in message


def test_missing_setting_from_process_env(monkeypatch):
    for var in ("DIFFUGTS_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DIFFUGTS_S3_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="^AWS_ACCESS_KEY_ID is not set"):
        ObjectStore()
    monkeypatch.delenv("DIFFUGTS_BUCKET", raising=False)
    with pytest.raises(ConfigError, match="^DIFFUGTS_BUCKET is not set"):
        default_bucket()
    monkeypatch.setenv("DIFFUGTS_BUCKET", "results")
    assert default_bucket() == "results"
    assert results_uri("run-1", "study/") == "s3://results/run-1/study"


@pytest.mark.parametrize("value", ["ftp://host:21", "http://user:pw@host:9000", "http://host:9000/path"])
def test_bad_endpoint_is_a_config_error_without_echoing_it(value):
    with pytest.raises(ConfigError, match="^DIFFUGTS_S3_ENDPOINT: ") as err:
        S3Settings.from_env({**ENV, "DIFFUGTS_S3_ENDPOINT": value})
    assert "pw" not in str(err.value)


def test_retry_delays_grow_exponentially_with_bounded_jitter():
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    for retry, step in enumerate([1, 2, 4, 8, 8]):
        delays = [policy.delay(retry) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 1  # jittered
    with pytest.raises(ConfigError, match="DIFFUGTS_S3_ATTEMPTS"):
        RetryPolicy.from_env({"DIFFUGTS_S3_ATTEMPTS": "0"})
    assert RetryPolicy.from_env({"DIFFUGTS_S3_ATTEMPTS": "2", "DIFFUGTS_S3_BACKOFF_S": "0.1"}).attempts == 2


# --- round trips -----------------------------------------------------------------------


def test_bytes_round_trip_and_listing(base):
    store = ObjectStore()
    store.put_bytes(f"{base}/a.txt", b"alpha")
    store.put_bytes(f"{base}/deep/nested/key with space.bin", b"\x00\x01" * 1000)
    store.put_bytes(f"{base}2/other.txt", b"not under base/")
    assert store.get_bytes(f"{base}/a.txt") == b"alpha"
    assert store.get_bytes(f"{base}/deep/nested/key with space.bin") == b"\x00\x01" * 1000
    assert store.list(base) == [f"{base}/a.txt", f"{base}/deep/nested/key with space.bin"]
    assert store.list(base + "/") == store.list(base)
    assert store.exists(f"{base}/a.txt") and not store.exists(f"{base}/nope.txt")
    assert not store.exists(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/k")
    assert store.list(f"{base}/empty") == []


def test_list_entries_one_level_or_all_and_stat(base):
    store = ObjectStore()
    for key in ("a/1.bin", "a/sub/2.bin", "b.zip"):
        store.put_bytes(f"{base}/{key}", b"12345")
    store.put_bytes(f"{base}2/other.txt", b"not under base/")
    _, key = parse_s3_uri(base)
    top = sorted(store.list_entries(base), key=lambda e: e.key)
    assert [(e.key, e.is_dir) for e in top] == [(f"{key}/a/", True), (f"{key}/b.zip", False)]
    assert top[1].size == 5 and top[1].etag
    assert store.list_entries(base + "/") == store.list_entries(base)
    every = sorted(e.key for e in store.list_entries(base, recursive=True))
    assert every == [f"{key}/a/1.bin", f"{key}/a/sub/2.bin", f"{key}/b.zip"]
    stat = store.stat(f"{base}/b.zip")
    assert (stat.key, stat.is_dir, stat.size, stat.etag) == (f"{key}/b.zip", False, 5, top[1].etag)
    with pytest.raises(ObjectNotFound):
        store.stat(f"{base}/nope.zip")
    assert store.list_entries(f"{base}/empty") == []


def test_ensure_bucket(s3_env):
    store = ObjectStore()
    bucket = f"dgts-{uuid.uuid4().hex[:10]}"
    with pytest.raises(ObjectNotFound, match=f"no such bucket '{bucket}'"):
        store.put_bytes(f"s3://{bucket}/k", b"v")
    store.ensure_bucket(bucket)
    store.ensure_bucket(bucket)  # idempotent
    store.put_bytes(f"s3://{bucket}/k", b"v")
    assert store.get_bytes(f"s3://{bucket}/k") == b"v"


def test_file_round_trip_multipart_with_sha256_metadata(base, s3_env, tmp_path):
    store = ObjectStore()
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (6 * 4096 + 7))  # > 5 MiB: a multipart upload
    digest = store.upload_file(big, f"{base}/big.bin")
    bucket, key = parse_s3_uri(f"{base}/big.bin")
    stat = s3_env.admin_client().stat_object(bucket, key)
    assert stat.size == big.stat().st_size and stat.metadata["x-amz-meta-sha256"] == digest

    out = store.download_file(f"{base}/big.bin", tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == big.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.bin"]  # no temp files left


def test_download_of_missing_object_leaves_nothing(base, tmp_path):
    store = ObjectStore()
    with pytest.raises(ObjectNotFound, match=r": no such object$"):
        store.download_file(f"{base}/missing.dcm", tmp_path / "x.dcm")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ObjectNotFound, match="no such bucket 'no-such-bucket-zz'"):
        store.get_bytes("s3://no-such-bucket-zz/k")


def test_upload_dir_and_download_prefix_mirror_nested_keys(base, tmp_path):
    store = ObjectStore()
    files = {"study/1.dcm": b"one", "study/series2/2.dcm": b"two" * 100, "top.json": b"{}"}
    src = make_tree(tmp_path / "src", files)
    uris = store.upload_dir(src, f"{base}/in")
    assert uris == [f"{base}/in/{rel}" for rel in sorted(files)]
    paths = store.download_prefix(f"{base}/in/study", tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in paths) == ["1.dcm", "series2/2.dcm"]
    assert (tmp_path / "dst/series2/2.dcm").read_bytes() == b"two" * 100


def test_object_metadata_mismatch_is_detected(base, s3_env, tmp_path):
    bucket, key = parse_s3_uri(f"{base}/lying.bin")
    s3_env.admin_client().put_object(bucket, key, io.BytesIO(b"data"), 4, metadata={"sha256": "0" * 64})
    with pytest.raises(InputError, match=r"lying.bin: sha256 mismatch"):
        ObjectStore().download_file(f"{base}/lying.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- artifacts --------------------------------------------------------------------------

ARTIFACT = {
    "volume.nii.gz": b"\x1f\x8b" + b"v" * 5000,
    "series.json": b'{"uid": "1.2.3"}',
    "headers/0001.dcm": b"DICM" * 50,
}


def test_publish_and_fetch_artifact(base, tmp_path):
    store = ObjectStore()
    src = make_tree(tmp_path / "src", ARTIFACT)
    assert not store.artifact_complete(base)
    manifest = store.publish_dir(src, base, meta={"stage": "ingest"})
    assert store.artifact_complete(base)
    assert [f["path"] for f in manifest["files"]] == sorted(ARTIFACT)
    assert {f["path"]: f["size"] for f in manifest["files"]} == {k: len(v) for k, v in ARTIFACT.items()}
    assert manifest["diffugts_version"] == __version__ and manifest["meta"] == {"stage": "ingest"}
    assert json.loads(store.get_bytes(f"{base}/{MANIFEST}")) == manifest

    paths = store.fetch_artifact(base, tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in paths) == sorted(ARTIFACT)
    for rel, data in ARTIFACT.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data
    assert json.loads((tmp_path / "dst" / MANIFEST).read_text()) == manifest


def test_publish_withdraws_old_manifest_before_uploading_and_writes_it_last(base, tmp_path):
    seen = []

    class Watching(ObjectStore):
        def _upload(self, path, uri):
            seen.append((uri, self.artifact_complete(base)))
            return super()._upload(path, uri)

    store = Watching(workers=1)
    store.publish_dir(make_tree(tmp_path / "v1", {"a.txt": b"1"}), base)
    store.publish_dir(make_tree(tmp_path / "v2", {"a.txt": b"2", "b.txt": b"2"}), base)
    assert [complete for _, complete in seen] == [False, False, False]  # never while uploading
    assert store.artifact_complete(base)
    paths = store.fetch_artifact(base, tmp_path / "dst")
    assert [p.read_bytes() for p in paths] == [b"2", b"2"]


def test_prefix_without_manifest_is_refused(base, tmp_path):
    store = ObjectStore()
    store.upload_dir(make_tree(tmp_path / "src", ARTIFACT), base)  # files, but never published
    assert not store.artifact_complete(base)
    with pytest.raises(InputError) as err:
        store.fetch_artifact(base, tmp_path / "dst")
    assert str(err.value) == f"{base}: incomplete artifact: no {MANIFEST}"
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (b"\x1f\x8b" + b"X" * 5000, "sha256 mismatch"),  # same size, other bytes
        (b"truncated", "size mismatch"),
    ],
)
def test_corruption_after_publish_is_detected(base, tmp_path, tamper, reason):
    store = ObjectStore()
    store.publish_dir(make_tree(tmp_path / "src", ARTIFACT), base)
    # Rewritten through the store, so the object's own sha256 metadata is consistent:
    # only the manifest can tell.
    store.put_bytes(f"{base}/volume.nii.gz", tamper)
    with pytest.raises(InputError) as err:
        store.fetch_artifact(base, tmp_path / "dst")
    assert str(err.value).startswith(f"{base}/volume.nii.gz: {reason}")
    assert not (tmp_path / "dst" / MANIFEST).exists()  # nothing locally looks complete


def test_object_listed_in_manifest_but_missing(base, s3_env, tmp_path):
    store = ObjectStore()
    store.publish_dir(make_tree(tmp_path / "src", ARTIFACT), base)
    bucket, key = parse_s3_uri(f"{base}/series.json")
    s3_env.admin_client().remove_object(bucket, key)
    with pytest.raises(InputError, match=r"series.json: listed in _manifest.json but missing"):
        store.fetch_artifact(base, tmp_path / "dst")


# --- localize ----------------------------------------------------------------------------


def test_localize(base, tmp_path):
    store = ObjectStore()
    assert localize(tmp_path / "local", tmp_path / "work") == tmp_path / "local"
    assert localize("rel/dir", tmp_path / "work") == Path("rel/dir")
    store.put_bytes(f"{base}/study.zip", b"PK\x03\x04zip")
    store.upload_dir(make_tree(tmp_path / "src", {"s1/1.dcm": b"a", "s1/2.dcm": b"b"}), f"{base}/dicom")

    zip_path = localize(f"{base}/study.zip", tmp_path / "work")
    bucket, key = parse_s3_uri(f"{base}/study.zip")
    assert zip_path == tmp_path / "work" / bucket / key and zip_path.read_bytes() == b"PK\x03\x04zip"
    folder = localize(f"{base}/dicom/", tmp_path / "work")
    assert sorted(p.name for p in folder.rglob("*.dcm")) == ["1.dcm", "2.dcm"]

    store.publish_dir(make_tree(tmp_path / "art", {"x.bin": b"x"}), f"{base}/artifact")
    art = localize(f"{base}/artifact", tmp_path / "work")
    assert (art / "x.bin").read_bytes() == b"x" and (art / MANIFEST).exists()

    with pytest.raises(InputError, match="no such object, and no objects under this prefix"):
        localize(f"{base}/nothing-here", tmp_path / "work")
    with pytest.raises(InputError, match="unsupported URI scheme"):
        localize("gs://bucket/x", tmp_path / "work")


# --- errors and retries ------------------------------------------------------------------


def test_wrong_credentials_fail_fast_with_one_line(base, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    store, sleeps = fast_store()
    with pytest.raises(AccessDenied) as err:
        store.get_bytes(f"{base}/x")
    message = str(err.value)
    assert message == (
        f"{base}/x: access denied (SignatureDoesNotMatch; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )
    assert isinstance(err.value, DiffugtsError) and sleeps == []  # not retried

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEYID")
    with pytest.raises(AccessDenied, match=r"access denied \(InvalidAccessKeyId; check AWS_ACCESS_KEY_ID"):
        fast_store()[0].put_bytes(f"{base}/x", b"x")


def test_read_only_identity_cannot_publish(base, s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.reader_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.reader_secret)
    with pytest.raises(AccessDenied, match=r"access denied \(AccessDenied;"):
        ObjectStore().publish_dir(make_tree(tmp_path / "src", {"a": b"a"}), base)


def test_server_down_is_retried_with_backoff_then_fails(s3_env, monkeypatch, caplog):
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("DIFFUGTS_S3_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        store, sleeps = fast_store(attempts=4)
        caplog.set_level(logging.WARNING, logger="diffugts.storage")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            store.get_bytes("s3://diffugts-test/k")
    message = str(err.value)
    assert message.startswith("s3://diffugts-test/k: object store at http://127.0.0.1:")
    assert "failed after 4 attempts: Connection refused" in message and "\n" not in message
    assert len(sleeps) == 3 and all(0.01 * 2**i / 2 <= d <= 0.01 * 2**i for i, d in enumerate(sleeps))
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 3
    assert s3_env.secret_key not in caplog.text
    assert time.monotonic() - started < 5


class FlakyProxy:
    """A TCP proxy in front of the real server whose first connections fail as scripted:
    "drop" reads the request and hangs up, "slowdown" answers 503 SlowDown."""

    SLOWDOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message><RequestId>flaky</RequestId></Error>"
    )

    def __init__(self, target_port: int, script: list[str]):
        self.target, self.script = target_port, list(script)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            action = self.script.pop(0) if self.script else "forward"
            self.sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn, action), daemon=True).start()

    def _serve(self, conn: socket.socket, action: str) -> None:
        if action == "forward":
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets.append(upstream)
            threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
            self._pipe(conn, upstream)
            return
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        header, _, body = head.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in header.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        while len(body) < length:
            body += conn.recv(65536)
        if action == "slowdown":
            conn.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.SLOWDOWN) + self.SLOWDOWN
            )
        conn.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def flaky(s3_env, monkeypatch):
    proxies = []

    def make(script: list[str]) -> FlakyProxy:
        proxy = FlakyProxy(s3_env.port, script)
        proxies.append(proxy)
        monkeypatch.setenv("DIFFUGTS_S3_ENDPOINT", f"http://127.0.0.1:{proxy.port}")
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def test_transient_failures_are_retried_until_success(base, flaky, tmp_path, caplog):
    flaky(["drop", "slowdown"])
    store, sleeps = fast_store(attempts=4)
    store.put_bytes(f"{base}/x.txt", b"made it")
    assert len(sleeps) == 2  # one dropped connection, one SlowDown, then through
    assert "Remote end closed connection without response" in caplog.text
    flaky(["slowdown"])
    store, sleeps = fast_store(attempts=4)
    store.publish_dir(make_tree(tmp_path / "src", {"a": b"a"}), base)
    assert store.fetch_artifact(base, tmp_path / "dst")[0].read_bytes() == b"a"
    assert store.get_bytes(f"{base}/x.txt") == b"made it" and len(sleeps) == 1


def test_persistent_slowdown_exhausts_retries(base, flaky):
    flaky(["slowdown"] * 3)
    store, sleeps = fast_store(attempts=3)
    with pytest.raises(StoreUnavailable, match=r"failed after 3 attempts: SlowDown: Please reduce"):
        store.get_bytes(f"{base}/x")
    assert len(sleeps) == 2


def test_a_prefix_holding_both_x_and_x_slash_y_is_one_line(base, tmp_path):
    """S3 allows an object "x" beside objects "x/y"; a folder cannot hold both (issue #23)."""
    store = ObjectStore()
    store.put_bytes(f"{base}/in/x", b"a file")
    store.put_bytes(f"{base}/in/x/y", b"under x")
    with pytest.raises(InputError, match="both an object and a folder") as err:
        store.download_prefix(f"{base}/in", tmp_path / "dst")
    assert str(err.value).startswith(f"{base}/in:")
    assert not (tmp_path / "dst").exists()
