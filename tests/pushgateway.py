"""A real Prometheus Pushgateway for the tests (Debian ``prometheus-pushgateway``).

One per test session on a free loopback port, killed at the end. Its persistence file is
in the test's tmp dir: Debian's build defaults to /var/lib/prometheus/pushgateway.data,
which would carry metrics from one test session into the next. Without the binary the
tests that use it skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 20.0


def find_pushgateway() -> str | None:
    return shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux: killed with pytest
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1.0) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def pushgateway(binary: str, log: Path) -> Iterator[str]:
    for attempt in range(3):  # the port may be taken between picking and binding it
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                    f"--persistence.file={log.parent / 'pushgateway.data'}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not _ready(url):
            time.sleep(0.05)
        if proc.poll() is None and _ready(url):
            break
        proc.kill()
        proc.wait(timeout=10)
        if attempt == 2 or "address already in use" not in log.read_text(errors="replace"):
            raise RuntimeError(f"pushgateway did not start:\n{log.read_text(errors='replace')[-2000:]}")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def pushgateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = find_pushgateway()
    if binary is None:
        message = "prometheus-pushgateway not found (Debian package prometheus-pushgateway)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    with pushgateway(binary, tmp_path_factory.mktemp("pushgateway") / "pushgateway.log") as url:
        yield url
