"""Fixtures: real hosts on loopback ports with real data folders, always stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import paglets

ROOT = Path(__file__).resolve().parent.parent
PAGLETS_PY = ROOT / "paglets.py"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll an observable condition until it holds; fail the test if it does not in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """Whether a process has ended (a zombie waiting to be reaped counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[..., paglets.Host]]:
    """A factory of started hosts (port 0, data in tmp_path/<name>); all are stopped at the end."""
    hosts: list[paglets.Host] = []

    def make(name: str = "alpha", start: bool = True, **kwargs: Any) -> paglets.Host:
        kwargs.setdefault("data_dir", tmp_path / name)
        host = paglets.Host(name, **kwargs)
        hosts.append(host)
        return host.start_background() if start else host

    yield make
    for host in reversed(hosts):
        host.stop()


@pytest.fixture
def host(make_host: Callable[..., paglets.Host]) -> paglets.Host:
    """One started host."""
    return make_host("alpha")


class ServeProcess:
    """``python paglets.py serve`` as a real subprocess, on a free port."""

    def __init__(self, data_dir: Path, name: str = "svc", extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir, self.name = data_dir, name
        self.extra, self.env = list(extra or []), env
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, port: int = 0, timeout: float = 20.0) -> ServeProcess:
        args = [sys.executable, str(PAGLETS_PY), "serve", "--name", self.name, "--port", str(port), "--data-dir", str(self.data_dir),
                "--path", str(ROOT), "--allow", "paglets_tests", "--log-level", "warning", *self.extra]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT), **(self.env or {}))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            found = re.search(r"serving at (\S+)", line)
            if found:
                self.url = found.group(1)
                return self
        self.kill()
        raise AssertionError(f"serve did not start: {self.stderr()}")

    def stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def kill(self) -> None:
        """SIGKILL, as a power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a clean shutdown."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """A factory of ``serve`` subprocesses; all are killed at the end."""
    procs: list[ServeProcess] = []

    def make(name: str = "svc", data_dir: Path | None = None, **kwargs: Any) -> ServeProcess:
        proc = ServeProcess(data_dir or tmp_path / name, name, **kwargs)
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.kill()
