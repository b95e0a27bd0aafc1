"""Mobility across hosts (issue 5): dispatch, clone, retract; exactly once under crashes and cut
connections; files and artifacts; the mesh; itineraries.

Real hosts on loopback ports (in-process ``Host`` objects, and ``python paglets.py serve`` processes
for the crash tests), real SIGKILL / os._exit, a real TCP proxy that cuts connections.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import cbor2
import psutil
import pytest

import paglets
from paglets import (
    ArrivalMode,
    ArtifactRef,
    ForbiddenError,
    HostClient,
    HostError,
    InvalidAgentError,
    ItineraryPlan,
    LifecycleError,
    Message,
    PagletError,
    PagletProxy,
    RemoteHostError,
    StorageQuotaError,
    TransferError,
    TransferTicket,
)
from paglets_tests import agents, agents_mobility
from paglets_tests.agents_mobility import Mover, MoverState, sha256_of
from paglets_tests.conftest import PAGLETS_PY, ROOT, ServeProcess, wait_until

HostFactory = Callable[..., paglets.Host]
ServeFactory = Callable[..., ServeProcess]
MESH = {"gossip_interval": 0.3, "offline_after": 1.0}


# -- helpers ------------------------------------------------------------------------------------------
@pytest.fixture
def client() -> Iterator[HostClient]:
    """A bare HTTP client, as another program on the LAN would use."""
    c = HostClient(timeout=30)
    yield c
    c.close()


def connect(*hosts: paglets.Host) -> None:
    """Make every host know every other by name (wait_for_host with a URL contacts it directly)."""
    for x in hosts:
        for y in hosts:
            if x is not y:
                assert x.wait_for_host(y.address, timeout=10).name == y.name


def ids(host: paglets.Host, state: str = "all") -> list[str]:
    return [row["agent_id"] for row in host.list_agents(state)]


def live_copies(client: HostClient, url: str, agent_id: str) -> list[dict[str, Any]]:
    """Rows of GET /agents?state=all for one paglet that are alive (active or inactive)."""
    return [row for row in client.agents(url, "all") if row["agent_id"] == agent_id and row["status"] in ("active", "inactive")]


def assert_active_at(host: paglets.Host, agent_id: str) -> None:
    info = host.agent_info(host.address, agent_id)
    assert info["active"] is True and info["host_url"] == host.address, info


def assert_absent(host: paglets.Host, agent_id: str) -> None:
    assert agent_id not in ids(host)
    with pytest.raises(InvalidAgentError):
        host.agent_info(host.address, agent_id)


def write_random(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def assert_seen_in_hook(proxy: PagletProxy, name: str, digest: str, host: paglets.Host) -> None:
    """The paglet's on_arrival / on_clone found the file in its folder on ``host``, intact."""
    checks = proxy.send("checks")
    assert f"{host.name}/{name}" in checks, checks
    path, seen = checks[f"{host.name}/{name}"]
    assert seen == digest, f"inside the hook, {path} was {seen}"
    assert Path(path).resolve().is_relative_to(host.data_dir.resolve()), f"inside the hook, {name} was at {path}, not on {host.name}"


def port_of(url: str) -> int:
    return int(urllib.parse.urlsplit(url).port or 0)


def raw_request(
    url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (a client that is not ours); returns status, headers, body."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


class TransferSaboteur:
    """A TCP proxy on loopback in front of a host.  It passes everything through, except the
    envelopes (``POST /transfers``), ``times`` times (None: always), as ``mode`` says:

    - "cut": forward the headers and half the body, then close both sockets;
    - "hold": forward nothing and never answer;
    - "lose-answer": forward the whole envelope, drop the host's answer, and cut the network
      (close every socket and stop listening) until ``restore()``.

    Counts the envelopes it saw."""

    MARKER = b"POST /transfers HTTP/1.1\r\n"

    def __init__(self, mode: str = "cut", times: int | None = None) -> None:
        self.mode, self.left = mode, times
        self.upstream_port = 0
        self.seen = self.sabotaged = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut_network(self) -> None:
        """Every connection closes and new ones are refused (the port is not listening)."""
        with self._lock:
            socks, self._sockets = [self._listener, *self._sockets], []
        self._close(*socks)

    close = cut_network

    def restore(self) -> None:
        """Listen again on the same port."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [downstream, upstream]
            doomed = threading.Event()
            threading.Thread(target=self._answers, args=(upstream, downstream, doomed), daemon=True).start()
            threading.Thread(target=self._requests, args=(downstream, upstream, doomed), daemon=True).start()

    def _answers(self, upstream: socket.socket, downstream: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := upstream.recv(1 << 16):
                if doomed.is_set():
                    self.cut_network()  # the answer to the envelope is lost, and the line goes down
                    return
                downstream.sendall(data)
        except OSError:
            pass
        self._close(upstream, downstream)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _take(self) -> bool:
        with self._lock:
            self.seen += 1
            if self.left is not None and self.left <= 0:
                return False
            if self.left is not None:
                self.left -= 1
            self.sabotaged += 1
            return True

    def _requests(self, downstream: socket.socket, upstream: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := downstream.recv(1 << 16):
                at = data.find(self.MARKER)
                if at < 0 or not self._take():
                    upstream.sendall(data)
                    continue
                if self.mode == "lose-answer":
                    doomed.set()
                    upstream.sendall(data)
                    continue
                upstream.sendall(data[:at])
                request = data[at:]
                if self.mode == "hold":
                    while downstream.recv(1 << 16):
                        pass  # swallowed: the envelope never reaches the host, no answer ever comes
                    break
                while b"\r\n\r\n" not in request:
                    request += downstream.recv(1 << 16)
                head, _, _ = request.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                keep = len(head) + 4 + length // 2
                while len(request) < keep:
                    more = downstream.recv(1 << 16)
                    if not more:
                        break
                    request += more
                upstream.sendall(request[:keep])
                break  # and cut: both sockets close below, mid-body
        except OSError:
            pass
        self._close(downstream, upstream)


@pytest.fixture
def saboteur() -> Iterator[Callable[..., TransferSaboteur]]:
    made: list[TransferSaboteur] = []

    def make(mode: str = "cut", times: int | None = None) -> TransferSaboteur:
        proxy = TransferSaboteur(mode, times)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def behind(make_host: HostFactory, saboteur: Callable[..., TransferSaboteur], name: str, mode: str, times: int | None = None,
           **kwargs: Any) -> tuple[paglets.Host, TransferSaboteur]:  # fmt: skip
    """A host that the mesh reaches only through a saboteur (its public URL is the proxy's)."""
    proxy = saboteur(mode, times)
    host = make_host(name, public_url=proxy.url, **kwargs)
    proxy.upstream_port = host.port
    return host, proxy


# == 1. dispatch, clone, retract ==============================================================================
def test_dispatch_by_host_runs_hooks_on_each_side_and_moves_the_state(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta")
    mover = a.create(Mover, MoverState(count=7))
    moved = a.dispatch(mover.agent_id, b.address)
    assert (moved.host_url, moved.agent_id) == (b.address, mover.agent_id)
    assert moved.send("log") == [
        "creation@alpha",
        f"dispatching@alpha:alpha->beta:{b.address}:dispatch",
        "arrival@beta:dispatch:alpha->beta",
    ]
    assert moved.send("add") == 8  # the state came along
    assert_active_at(b, mover.agent_id)
    assert_absent(a, mover.agent_id)
    assert moved.send("where") == "beta"


def test_proxy_dispatch_over_http_and_old_proxies_forward(make_host: HostFactory, client: HostClient) -> None:
    a, b = make_host("alpha"), make_host("beta")
    remote = client.create(a.address, Mover, MoverState(count=1))
    local_old = a.get_proxy(remote.agent_id)
    assert local_old is not None
    moved = remote.dispatch(b.address)
    assert moved.host_url == b.address and moved.is_remote()
    wait_until(lambda: remote.agent_id in ids(b, "active"))
    assert_absent(a, remote.agent_id)
    # Proxies that still point at alpha reach the paglet on beta: alpha forwards.
    assert remote.send("add") == 2
    assert local_old.send(Message("add", {"by": 10})) == 12
    remote.send_oneway("add")
    wait_until(lambda: moved.send("get") == 13)
    assert moved.send("where") == "beta"


def test_retract_runs_on_reverting_there_and_on_arrival_here(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta")
    mover = b.create(Mover, MoverState(count=3))
    back = a.retract(b.address, mover.agent_id)
    assert (back.host_url, back.agent_id) == (a.address, mover.agent_id)
    assert back.send("log") == ["creation@beta", "reverting@beta:beta->alpha", "arrival@alpha:retract:beta->alpha"]
    assert back.send("add") == 4
    assert_absent(b, mover.agent_id)
    # The proxy form: a proxy held by beta's host pointing at alpha brings it back to beta.
    again = PagletProxy(a.address, mover.agent_id, b).retract()
    assert again.host_url == b.address
    assert again.send("log")[-2:] == ["reverting@alpha:alpha->beta", "arrival@beta:retract:alpha->beta"]
    assert again.send("add") == 5
    assert_absent(a, mover.agent_id)


def test_proxy_clone_to_another_host(make_host: HostFactory, client: HostClient) -> None:
    a, b = make_host("alpha"), make_host("beta")
    original = client.create(a.address, Mover, MoverState(count=5))
    copy = original.clone(b.address)
    assert copy.host_url == b.address and copy.agent_id != original.agent_id
    before = ["creation@alpha", "cloning@alpha:beta"]
    assert original.send("log") == [*before, f"cloned@alpha:{copy.agent_id}"]
    assert copy.send("log") == [*before, "clone@beta:alpha->beta:True"]
    # Two independent paglets with the same state, one on each host.
    assert copy.send("add") == 6 and original.send("add") == 6 and copy.send("add") == 7
    assert_active_at(a, original.agent_id)
    assert_active_at(b, copy.agent_id)
    assert original.agent_id not in ids(b)


def test_clone_on_the_same_host_needs_no_http(make_host: HostFactory) -> None:
    # alpha advertises a URL where nothing listens: any HTTP call to itself would fail.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        a = make_host("alpha", public_url=f"http://127.0.0.1:{dead.getsockname()[1]}")
        original = a.create(Mover, MoverState(count=2))
        copy = original.clone()
        assert copy.host_url == a.address and copy.agent_id != original.agent_id
        assert copy.send("log")[-1] == "clone@alpha:alpha->alpha:True"
        assert original.send("log")[-1] == f"cloned@alpha:{copy.agent_id}"
        assert copy.send("add") == 3 and original.send("add") == 3
        assert sorted(ids(a, "active")) == sorted([original.agent_id, copy.agent_id])
        # Dispatching to where it already is leaves it in place.
        assert a.dispatch(original.agent_id, a.address).host_url == a.address
        assert original.send("add") == 4
    finally:
        dead.close()


def test_on_dispatching_that_raises_vetoes_the_move(make_host: HostFactory, client: HostClient) -> None:
    a, b = make_host("alpha"), make_host("beta")
    vetoer = a.create(agents.VetoDispatch, init=5)
    with pytest.raises(LifecycleError, match="I stay here"):
        a.dispatch(vetoer.agent_id, b.address)
    with pytest.raises(LifecycleError, match="I stay here"):
        PagletProxy(a.address, vetoer.agent_id, client).dispatch(b.address)
    assert_active_at(a, vetoer.agent_id)
    assert vetoer.send("add") == 6
    assert ids(b) == []


def test_a_veto_of_its_own_move_leaves_the_paglet_answering(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta")
    vetoer = a.create(agents_mobility.VetoMover)
    with pytest.raises((LifecycleError, PermissionError)):
        vetoer.send(Message("go", {"target": b.address}))
    assert ids(b) == []
    assert_active_at(a, vetoer.agent_id)
    assert vetoer.send("add", timeout=5) == 1  # the paglet still takes messages after its vetoed move


def test_dispatch_and_clone_from_inside_a_handler(make_host: HostFactory) -> None:
    a, b, c = make_host("alpha"), make_host("beta"), make_host("gamma")
    connect(a, b, c)
    mover = a.create(Mover, MoverState(count=1))
    # clone(target) and clone() from a handler: the original stays and goes on.
    remote_url, remote_id = mover.send(Message("clone", {"target": c.address}))
    local_url, local_id = mover.send("clone")
    assert (remote_url, local_url) == (c.address, a.address)
    remote_copy, local_copy = PagletProxy(c.address, remote_id, a), PagletProxy(a.address, local_id, a)
    assert remote_copy.send("log")[-1] == "clone@gamma:alpha->gamma:True"
    assert local_copy.send("log")[-1] == "clone@alpha:alpha->alpha:True"
    assert mover.send("log")[-4:] == ["cloning@alpha:gamma", f"cloned@alpha:{remote_id}", "cloning@alpha:alpha", f"cloned@alpha:{local_id}"]
    # dispatch_to("beta") from a handler: the reply is the new address, and the paglet lives there.
    assert mover.send(Message("go", {"target": "beta", "how": "dispatch_to"})) == b.address
    wait_until(lambda: mover.agent_id in ids(b, "active"))
    assert_absent(a, mover.agent_id)
    moved = PagletProxy(b.address, mover.agent_id, a)
    assert moved.send("log")[-2:] == [f"dispatching@alpha:alpha->beta:{b.address}:dispatch", "arrival@beta:dispatch:alpha->beta"]
    assert moved.send("add") == 2 and remote_copy.send("add") == 2 and local_copy.send("add") == 2
    # A move that cannot happen raises TransferError inside the handler; the paglet goes on where it was.
    answer = moved.send(Message("go", {"target": "http://127.0.0.1:9"}))
    assert answer.startswith("stayed:TransferError"), answer
    assert moved.send("add") == 3
    assert_active_at(b, mover.agent_id)


def test_dispatch_from_run(make_host: HostFactory) -> None:
    a, b, c = make_host("alpha"), make_host("beta"), make_host("gamma")
    connect(a, b, c)
    mover = a.create(Mover, MoverState(count=4, route=["beta", c.address]))  # run() starts after creation and each arrival
    wait_until(lambda: mover.agent_id in ids(c, "active"))
    moved = PagletProxy(c.address, mover.agent_id, a)
    assert moved.send("log") == [
        "creation@alpha", "run-dispatch@alpha", f"dispatching@alpha:alpha->beta:{b.address}:dispatch", "arrival@beta:dispatch:alpha->beta",
        "run-dispatch@beta", f"dispatching@beta:beta->gamma:{c.address}:dispatch", "arrival@gamma:dispatch:beta->gamma",
    ]  # fmt: skip
    assert moved.send("add") == 5
    assert mover.agent_id not in ids(a) + ids(b)


def test_state_of_one_mib_travels_intact(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta")
    blob = os.urandom(1 << 20)
    mover = a.create(Mover, MoverState(blob=blob))
    moved = mover.dispatch(b.address)
    assert moved.send("blob") == [len(blob), hashlib.sha256(blob).hexdigest()]
    assert b.get_state(mover.agent_id).blob == blob
    back = moved.dispatch(a.address)
    assert back.send("blob") == [len(blob), hashlib.sha256(blob).hexdigest()]
    assert a.get_state(back.agent_id).blob == blob


def test_a_paglet_is_visible_on_its_target_as_soon_as_dispatch_returns(make_host: HostFactory, client: HostClient) -> None:
    a, b = make_host("alpha"), make_host("beta")
    slow = a.create(agents_mobility.SlowArrival, MoverState(count=3))  # its on_arrival takes a second
    a.dispatch(slow.agent_id, b.address)
    # The move is done: the target answers for the paglet while on_arrival still runs.
    assert slow.agent_id in ids(b, "all")
    assert client.get_state(b.address, slow.agent_id).count == 3
    assert b.get_state(slow.agent_id).count == 3
    assert PagletProxy(b.address, slow.agent_id, client).send("add") == 4


# -- TransferTicket ---------------------------------------------------------------------------------------------
def test_ticket_required_capabilities(make_host: HostFactory) -> None:
    a, plain, gpu = make_host("alpha"), make_host("beta"), make_host("gamma", tags=["gpu", "edge"])
    mover = a.create(Mover, MoverState(count=1))
    with pytest.raises(TransferError, match="gpu"):
        a.dispatch(mover.agent_id, TransferTicket(plain.address, required_capabilities=("gpu",)))
    assert_active_at(a, mover.agent_id)
    assert mover.send("add") == 2
    assert ids(plain) == []
    moved = a.dispatch(mover.agent_id, TransferTicket(gpu.address, required_capabilities=("gpu", "edge")))
    assert moved.host_url == gpu.address and moved.send("add") == 3


def test_ticket_expected_code_version(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta", code_version="2.1")
    mover = a.create(Mover)
    with pytest.raises(TransferError, match="code version"):
        a.dispatch(mover.agent_id, TransferTicket(b.address, expected_code_version="9.9"))
    assert_active_at(a, mover.agent_id)
    assert ids(b) == []
    moved = a.dispatch(mover.agent_id, TransferTicket(b.address, expected_code_version="2.1"))
    assert moved.send("where") == "beta"


def test_ticket_arrival_inactive_then_a_message_activates_it(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta")
    mover = a.create(Mover, MoverState(count=9))
    moved = a.dispatch(mover.agent_id, TransferTicket(b.address, arrival_mode=ArrivalMode.INACTIVE))
    assert moved.host_url == b.address
    assert ids(b, "inactive") == [mover.agent_id] and ids(b, "active") == []
    assert not moved.is_active() and moved.is_valid()
    assert b.get_state(mover.agent_id).count == 9
    assert_absent(a, mover.agent_id)
    assert moved.send("add") == 10  # the message wakes it
    assert ids(b, "active") == [mover.agent_id]


def test_ticket_arrival_inactive_lands_files_and_runs_on_arrival(make_host: HostFactory, tmp_path: Path) -> None:
    a, b = make_host("alpha"), make_host("beta")
    digest = write_random(tmp_path / "notes.bin", 50_000)
    mover = a.create(Mover)
    mover.send(Message("register", {"path": str(tmp_path / "notes.bin"), "mode": "copy"}))
    moved = a.dispatch(mover.agent_id, TransferTicket(b.address, arrival_mode=ArrivalMode.INACTIVE))
    path, seen = moved.send(Message("file", {"name": "notes.bin"}))
    assert seen == digest and Path(path).resolve().is_relative_to(b.data_dir.resolve()), path
    assert "arrival@beta:dispatch:alpha->beta" in moved.send("log")
    assert_seen_in_hook(moved, "notes.bin", digest, b)


def test_ticket_retries_resend_the_same_transfer(make_host: HostFactory, saboteur: Callable[..., TransferSaboteur]) -> None:
    a = make_host("alpha")
    b, proxy = behind(make_host, saboteur, "beta", "cut", times=2)
    mover = a.create(Mover, MoverState(count=1, blob=os.urandom(256 * 1024)))
    moved = a.dispatch(mover.agent_id, TransferTicket(proxy.url, retries=4, retry_interval=0.05))
    assert proxy.sabotaged == 2 and proxy.seen >= 3
    assert moved.host_url == proxy.url
    assert moved.send("add") == 2
    assert ids(b) == [mover.agent_id]  # one copy, however many times the envelope went
    assert_absent(a, mover.agent_id)


def test_ticket_timeout_bounds_a_hanging_target(make_host: HostFactory, saboteur: Callable[..., TransferSaboteur]) -> None:
    a = make_host("alpha")
    b, proxy = behind(make_host, saboteur, "beta", "hold")
    mover = a.create(Mover, MoverState(count=1))
    started = time.monotonic()
    with pytest.raises(TransferError):
        a.dispatch(mover.agent_id, TransferTicket(proxy.url, timeout=0.5))
    assert time.monotonic() - started < 5.0  # the default timeout is 10 s per attempt
    assert proxy.sabotaged >= 1
    assert_active_at(a, mover.agent_id)
    assert mover.send("add") == 2
    assert ids(b) == []


# == 2. exactly once ==============================================================================================
CRASH_STEPS = [
    # (crash step, the process that dies, where the one copy must be after both are up again)
    ("before-begin", "src", "src"),
    ("before-send", "src", "src"),
    ("after-send", "src", "tgt"),
    ("before-accept", "tgt", "src"),
    ("after-accept", "tgt", "tgt"),
]


@pytest.mark.parametrize(("step", "dies", "ends_at"), CRASH_STEPS)
def test_a_crash_at_any_step_leaves_exactly_one_copy(serve: ServeFactory, client: HostClient, step: str, dies: str, ends_at: str) -> None:
    crash = {"PAGLETS_TEST_MODE": "1", "PAGLETS_CRASH_AT": step}
    procs = {
        "src": serve("src", env=crash if dies == "src" else None).start(),
        "tgt": serve("tgt", env=crash if dies == "tgt" else None).start(),
    }
    proxy = client.create(procs["src"].url, "paglets_tests.agents:CheckpointedCounter", {"count": 40})
    assert proxy.send(Message("add", {"by": 2})) == 42  # checkpointed: the last state is stored
    # The source that dies drops the caller's connection; a source whose target dies answers TransferError.
    with pytest.raises(RemoteHostError if dies == "src" else TransferError):
        client.agent_op(procs["src"].url, proxy.agent_id, "dispatch", procs["tgt"].url)
    dead = procs[dies]
    assert dead.proc is not None and dead.proc.wait(15) == 86
    procs[dies] = serve(dead.name, data_dir=dead.data_dir).start(port=port_of(dead.url))
    src, tgt = procs["src"].url, procs["tgt"].url

    def copies() -> dict[str, int]:
        return {name: len(live_copies(client, p.url, proxy.agent_id)) for name, p in procs.items()}

    def let_go(found: dict[str, int]) -> bool:
        """The side without the copy has let go: a source forwards to the target; a target holds nothing."""
        if found["tgt"]:
            try:
                client.send_message(src, proxy.agent_id, Message("get"))  # forwarded by the source's tombstone
                return True
            except PagletError:
                return False
        try:
            client.agent_info(tgt, proxy.agent_id)
        except InvalidAgentError:
            return True
        except PagletError:
            return False
        return False  # the target still holds a row for it (arriving, stored, ...)

    deadline = time.monotonic() + 20
    while True:
        found = copies()
        if sum(found.values()) > 1 or (sum(found.values()) == 1 and let_go(found)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found == {"src": int(ends_at == "src"), "tgt": int(ends_at == "tgt")}, f"live copies after a crash at {step}"
    assert let_go(found), "the other host did not let go of the paglet"
    home = procs[ends_at].url
    state = client.get_state(home, proxy.agent_id)
    assert state.count == 42 and state.seen == (["tgt"] if ends_at == "tgt" else [])
    assert PagletProxy(home, proxy.agent_id, client).send("add") == 43
    if ends_at == "tgt":
        assert proxy.send("add") == 44  # through the source: its tombstone forwards
    else:
        with pytest.raises(InvalidAgentError):
            client.send_message(tgt, proxy.agent_id, Message("get"))
    assert copies() == {"src": int(ends_at == "src"), "tgt": int(ends_at == "tgt")}


def test_dispatch_to_a_target_that_is_down(make_host: HostFactory, serve: ServeFactory) -> None:
    a = make_host("alpha")
    target = serve("tgt").start()
    assert a.wait_for_host(target.url, timeout=10).name == "tgt"  # known and online in alpha's mesh
    mover = a.create(Mover, MoverState(count=1))
    target.kill()
    with pytest.raises(TransferError):
        a.dispatch(mover.agent_id, target.url)
    assert_active_at(a, mover.agent_id)
    assert mover.send("add") == 2
    with pytest.raises(TransferError):
        a.dispatch(mover.agent_id, "http://127.0.0.1:9")  # never known, nothing listening
    assert mover.send("add") == 3


def test_dispatch_to_a_stopped_host(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta")
    probe = a.create(Mover)
    probe.dispatch(b.address).dispatch(a.address)  # alpha and beta have talked: connections are open
    b.stop()
    mover = a.create(Mover, MoverState(count=1))
    with pytest.raises(TransferError):
        a.dispatch(mover.agent_id, b.address)
    assert_active_at(a, mover.agent_id)
    assert mover.send("add") == 2


def test_connection_cut_mid_envelope(make_host: HostFactory, saboteur: Callable[..., TransferSaboteur], tmp_path: Path) -> None:
    a = make_host("alpha")
    b, proxy = behind(make_host, saboteur, "beta", "cut")
    blob = os.urandom(512 * 1024)
    digest = write_random(tmp_path / "carried.bin", 100_000)
    mover = a.create(Mover, MoverState(count=5, blob=blob))
    mover.send(Message("register", {"path": str(tmp_path / "carried.bin"), "mode": "move"}))
    with pytest.raises(TransferError):
        a.dispatch(mover.agent_id, TransferTicket(proxy.url, retries=0))
    assert proxy.sabotaged >= 1
    # The paglet stays active at the source with its state and its file; nothing arrived at the target.
    assert_active_at(a, mover.agent_id)
    assert mover.send("blob") == [len(blob), hashlib.sha256(blob).hexdigest()]
    assert mover.send("add") == 6
    assert (tmp_path / "carried.bin").is_file() and sha256_of(tmp_path / "carried.bin") == digest
    assert_absent(b, mover.agent_id)
    # Not stuck half-way: once the line is good, the same paglet moves.
    proxy.left = 0
    moved = a.dispatch(mover.agent_id, proxy.url)
    assert moved.send("add") == 7 and ids(b) == [mover.agent_id]
    assert not (tmp_path / "carried.bin").exists()  # "move": the source file goes after success


def test_answer_lost_and_network_down_after_the_target_accepted(make_host: HostFactory, saboteur: Callable[..., TransferSaboteur]) -> None:
    # The target stores the paglet, its "accepted" never comes back, and the line stays down for a
    # while: the source must not run the paglet again on a guess.
    a = make_host("alpha", housekeeping_interval=0.2)
    b, proxy = behind(make_host, saboteur, "beta", "lose-answer", times=1)
    mover = a.create(Mover, MoverState(count=5))
    with pytest.raises(TransferError):
        a.dispatch(mover.agent_id, proxy.url)
    assert proxy.sabotaged == 1
    wait_until(lambda: mover.agent_id in ids(b, "active"))  # it did arrive
    proxy.restore()

    def settled() -> bool:
        if mover.agent_id in ids(a):
            return True  # a second copy: stop waiting
        try:
            return mover.send("get") == 5  # through alpha's tombstone, to beta
        except PagletError:
            return False

    wait_until(settled, timeout=15)
    assert mover.agent_id not in ids(a), "the paglet runs on both hosts"
    assert ids(b) == [mover.agent_id]
    assert PagletProxy(proxy.url, mover.agent_id, a).send("add") == 6


# == 3. files and artifacts =========================================================================================
@pytest.mark.parametrize("mode", ["copy", "move"])
def test_registered_file_arrives_before_on_arrival(make_host: HostFactory, tmp_path: Path, mode: str) -> None:
    a, b = make_host("alpha"), make_host("beta")
    source = tmp_path / "outside" / "model.bin"
    source.parent.mkdir()
    digest = write_random(source, 300_000)
    mover = a.create(Mover)
    assert mover.send(Message("register", {"path": str(source), "mode": mode, "name": "model.bin"})) == digest
    assert mover.send(Message("file", {"name": "model.bin"}))[1] == digest
    moved = mover.dispatch(b.address)
    path, seen = moved.send(Message("file", {"name": "model.bin"}))
    assert seen == digest
    assert Path(path).resolve().is_relative_to(b.data_dir.resolve()), path
    assert source.is_file() == (mode == "copy")
    # And on to the next host, from beta's folder.
    home = moved.dispatch(a.address)
    path, seen = home.send(Message("file", {"name": "model.bin"}))
    assert seen == digest and Path(path).resolve().is_relative_to(a.data_dir.resolve())
    assert not any(p.is_file() for p in b.data_dir.rglob("model.bin"))  # beta let go of its copy
    # Each time, the file was in place, intact, when on_arrival ran.
    assert_seen_in_hook(home, "model.bin", digest, b)
    assert_seen_in_hook(home, "model.bin", digest, a)


def test_clone_always_copies_files(make_host: HostFactory, tmp_path: Path) -> None:
    a, b = make_host("alpha"), make_host("beta")
    source = tmp_path / "data.bin"
    digest = write_random(source, 200_000)
    original = a.create(Mover)
    original.send(Message("register", {"path": str(source), "mode": "move"}))
    remote = original.clone(b.address)
    local = original.clone()
    for copy, host in ((remote, b), (local, a)):
        path, seen = copy.send(Message("file", {"name": "data.bin"}))
        assert seen == digest and Path(path).resolve().is_relative_to(host.data_dir.resolve()), path
    assert source.is_file() and sha256_of(source) == digest  # the original still carries it
    assert original.send(Message("file", {"name": "data.bin"}))[1] == digest
    local_path = Path(local.send(Message("file", {"name": "data.bin"}))[0])
    assert local_path.resolve() != source.resolve()
    for copy, host in ((remote, b), (local, a)):
        assert_seen_in_hook(copy, "data.bin", digest, host)  # in place when on_clone ran


def test_a_file_name_that_climbs_out_is_refused(make_host: HostFactory, client: HostClient, tmp_path: Path) -> None:
    a = make_host("alpha")
    source = tmp_path / "x.bin"
    write_random(source, 1000)
    mover = a.create(Mover)
    assert mover.send(Message("register-bad-name", {"path": str(source), "name": "../../etc/passwd"})) == "ForbiddenError"
    with pytest.raises(ForbiddenError):
        a.register_file(mover.agent_id, source, name="../../etc/passwd")
    assert a.registered_files(mover.agent_id) == []
    with pytest.raises(ForbiddenError):
        client.upload_artifact(source, host_url=a.address, name="../../etc/passwd")
    status, _, body = raw_request(
        a.address, "POST", "/artifacts?name=" + urllib.parse.quote("../../etc/passwd", safe=""), source.read_bytes(),
        {"Content-Type": "application/octet-stream", "Content-Length": "1000"},
    )  # fmt: skip
    assert status == 403 and json.loads(body)["error"] == "ForbiddenError"
    assert client.artifacts(a.address) == []


def test_artifact_endpoints_stream_and_verify(make_host: HostFactory, client: HostClient, tmp_path: Path) -> None:
    a = make_host("alpha")
    source = tmp_path / "blob.bin"
    digest = write_random(source, 3 * 1024 * 1024 + 17)  # several chunks and a ragged end
    size = source.stat().st_size
    # POST /artifacts with a streamed body (a file object and its Content-Length), JSON answer.
    with open(source, "rb") as handle:
        status, _, body = raw_request(a.address, "POST", "/artifacts?name=blob.bin", handle,
                                      {"Content-Type": "application/octet-stream", "Content-Length": str(size)})  # fmt: skip
    assert status == 201, body
    ref = ArtifactRef.from_wire(json.loads(body)["artifact"])
    assert (ref.name, ref.size, ref.sha256, ref.host_url) == ("blob.bin", size, digest, a.address)
    assert [r.artifact_id for r in client.artifacts(a.address)] == [ref.artifact_id]  # GET /artifacts
    meta = client.call("GET", a.address, f"/artifacts/{ref.artifact_id}/metadata")["artifact"]
    assert (meta["size"], meta["sha256"], meta["name"]) == (size, digest, "blob.bin")
    status, headers, content = raw_request(a.address, "GET", f"/artifacts/{ref.artifact_id}")
    assert status == 200 and int(headers["content-length"]) == size and hashlib.sha256(content).hexdigest() == digest
    got = client.download_artifact(ref, tmp_path / "down" / "copy.bin")
    assert got.sha256 == digest and sha256_of(tmp_path / "down" / "copy.bin") == digest
    # HostClient.upload_artifact and the host's own calls.
    second = client.upload_artifact(source, host_url=a.address, name="second.bin")
    assert (second.size, second.sha256) == (size, digest) and second.artifact_id != ref.artifact_id
    a.download_artifact(second, tmp_path / "local.bin")
    assert sha256_of(tmp_path / "local.bin") == digest
    status, _, body = raw_request(a.address, "DELETE", f"/artifacts/{ref.artifact_id}")
    assert status == 200
    assert raw_request(a.address, "GET", f"/artifacts/{ref.artifact_id}")[0] == 404
    assert raw_request(a.address, "GET", f"/artifacts/{ref.artifact_id}/metadata")[0] == 404
    client.delete_artifact(second)
    assert client.artifacts(a.address) == []
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))


def test_artifacts_from_proxies_and_paglets(make_host: HostFactory, tmp_path: Path) -> None:
    a, b = make_host("alpha"), make_host("beta")
    source = tmp_path / "input.bin"
    digest = write_random(source, 1024 * 1024 + 5)
    worker = b.create(Mover)
    remote = PagletProxy(b.address, worker.agent_id, a)  # held by alpha: the artifact is uploaded to beta
    assert remote.send_artifact(Message("take-artifact"), source) == ["input.bin", digest, source.stat().st_size]
    assert [r.sha256 for r in b.list_artifacts()] == [digest] and a.list_artifacts() == []
    # A paglet uploads a file from its host, another host's paglet downloads it, the first deletes it.
    uploader = a.create(Mover)
    ref = uploader.send(Message("upload", {"path": str(source), "name": "shared.bin"}))
    assert isinstance(ref, ArtifactRef) and (ref.host_url, ref.sha256, ref.owner_agent_id) == (a.address, digest, uploader.agent_id)
    assert worker.send(Message("download", {"ref": ref, "as": "fetched.bin"})) == [digest, source.stat().st_size]
    assert uploader.send(Message("delete-artifact", {"ref": ref}))
    assert a.list_artifacts() == []
    with pytest.raises(PagletError):
        worker.send(Message("download", {"ref": ref, "as": "again.bin"}))


def test_an_arrival_keeps_artifacts_it_did_not_bring(make_host: HostFactory, client: HostClient, tmp_path: Path) -> None:
    a, b = make_host("alpha"), make_host("beta")
    source = tmp_path / "same.bin"
    digest = write_random(source, 100_000)
    theirs = client.upload_artifact(source, host_url=b.address, name="theirs.bin")  # somebody's artifact on beta
    mover = a.create(Mover)
    mover.send(Message("register", {"path": str(source)}))  # a file with the same content travels to beta
    moved = mover.dispatch(b.address)
    assert_seen_in_hook(moved, "same.bin", digest, b)
    assert [r.artifact_id for r in client.artifacts(b.address)] == [theirs.artifact_id]
    assert client.download_artifact(theirs, tmp_path / "back.bin").sha256 == digest


def test_artifact_expiry(make_host: HostFactory, client: HostClient, tmp_path: Path) -> None:
    a = make_host("alpha", housekeeping_interval=0.2, artifact_quota=1_000_000)
    source = tmp_path / "big.bin"
    write_random(source, 600_000)
    short = client.upload_artifact(source, host_url=a.address, name="short.bin", expires_at=time.time() + 0.5)
    with pytest.raises(StorageQuotaError):
        client.upload_artifact(source, host_url=a.address, name="lasting.bin")  # the first still counts

    def fits() -> ArtifactRef | None:
        try:
            return client.upload_artifact(source, host_url=a.address, name="lasting.bin")
        except StorageQuotaError:
            return None

    lasting = wait_until(fits, timeout=10, interval=0.1)  # housekeeping removed the expired one
    assert [r.artifact_id for r in client.artifacts(a.address)] == [lasting.artifact_id]
    assert raw_request(a.address, "GET", f"/artifacts/{short.artifact_id}")[0] == 404
    small = tmp_path / "small.bin"
    write_random(small, 1000)
    gone = client.upload_artifact(small, host_url=a.address, expires_at=time.time() - 1)  # already expired
    assert raw_request(a.address, "GET", f"/artifacts/{gone.artifact_id}/metadata")[0] == 404
    assert [r.artifact_id for r in client.artifacts(a.address)] == [lasting.artifact_id]


def test_artifact_quota(make_host: HostFactory, client: HostClient, tmp_path: Path) -> None:
    a = make_host("alpha", artifact_quota=100_000)
    big, part = tmp_path / "big.bin", tmp_path / "part.bin"
    write_random(big, 150_000)
    write_random(part, 60_000)
    with pytest.raises(StorageQuotaError):
        client.upload_artifact(big, host_url=a.address)
    with pytest.raises(StorageQuotaError):
        a.upload_artifact(big)
    status, _, body = raw_request(a.address, "POST", "/artifacts?name=big.bin", big.read_bytes(),
                                  {"Content-Type": "application/octet-stream", "Content-Length": "150000"})  # fmt: skip
    assert status == 413 and json.loads(body)["error"] == "StorageQuotaError"
    assert client.artifacts(a.address) == []
    first = client.upload_artifact(part, host_url=a.address)
    with pytest.raises(StorageQuotaError):
        client.upload_artifact(part, host_url=a.address)
    assert [r.artifact_id for r in client.artifacts(a.address)] == [first.artifact_id]


@pytest.mark.timeout(180)
def test_a_200_mib_artifact_streams_through_a_host(serve: ServeFactory, client: HostClient, tmp_path: Path) -> None:
    host = serve("store").start()
    assert host.proc is not None
    proc = psutil.Process(host.proc.pid)
    warm = tmp_path / "warm.bin"
    write_random(warm, 4 * 1024 * 1024)
    warm_ref = client.upload_artifact(warm, host_url=host.url)
    client.download_artifact(warm_ref, tmp_path / "warm-back.bin")
    client.delete_artifact(warm_ref)
    source, digest = tmp_path / "big.bin", hashlib.sha256()
    with open(source, "wb") as handle:
        for _ in range(200):
            piece = os.urandom(1 << 20)
            digest.update(piece)
            handle.write(piece)
    baseline = proc.memory_info().rss
    peak, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ref = client.upload_artifact(source, host_url=host.url, name="big.bin")
        assert (ref.size, ref.sha256) == (200 << 20, digest.hexdigest())
        after_upload = peak[0]
        client.download_artifact(ref, tmp_path / "big-back.bin")
    finally:
        stop.set()
        sampler.join()
    assert sha256_of(tmp_path / "big-back.bin") == digest.hexdigest()
    growth = (peak[0] - baseline) / 2**20
    assert growth < 50, f"the host grew by {growth:.0f} MiB (upload peak +{(after_upload - baseline) / 2**20:.0f} MiB)"


# == 4. mesh ====================================================================================================
def test_mesh_gossip_host_refs_and_offline(make_host: HostFactory) -> None:
    a = make_host("alpha", tags=["hub"], properties={"zone": "eu"}, **MESH)
    b = make_host("beta", peers=[a.address], **MESH)
    c = make_host("gamma", peers=[b.address], tags=["gpu"], **MESH)  # knows only beta; learns alpha by gossip
    hosts = (a, b, c)

    def knows_all() -> bool:
        return all({r.name for r in h.available_hosts()} == {"alpha", "beta", "gamma"} for h in hosts)

    wait_until(knows_all, timeout=15)
    ref = c.host_status("alpha")
    assert ref is not None
    assert (ref.name, ref.url, ref.code_version, ref.tags, ref.online, ref.compatible) == (
        "alpha",
        a.address,
        paglets.__version__,
        ("hub",),
        True,
        True,
    )
    assert ref.properties.get("zone") == "eu" and ref.last_seen > 0
    assert c.available_hosts()[0].name == "gamma"  # itself first
    assert "gamma" not in {r.name for r in c.available_hosts(include_self=False)}
    c.create(Mover)
    c.create(Mover).deactivate()

    def counts_seen() -> bool:
        seen = a.host_status("gamma")
        return seen is not None and (seen.active_count, seen.inactive_count, seen.tags) == (1, 1, ("gpu",))

    wait_until(counts_seen, timeout=15)
    c.stop()
    wait_until(lambda: not a.host_status("gamma").online and not b.host_status("gamma").online, timeout=15)  # type: ignore[union-attr]
    assert "gamma" not in {r.name for r in a.available_hosts()}
    assert "gamma" in {r.name for r in a.available_hosts(online_only=False)}


def test_mesh_version_gate(make_host: HostFactory) -> None:
    a = make_host("alpha", **MESH)
    d = make_host("delta", peers=[a.address], mesh_version="2", **MESH)
    wait_until(lambda: a.host_status("delta") is not None and a.host_status("delta").name == "delta", timeout=10)  # type: ignore[union-attr]
    ref = a.host_status("delta")
    assert ref is not None and not ref.compatible and ref.mesh_version == "2"
    assert "delta" in {r.name for r in a.available_hosts(online_only=False)}
    mover = a.create(Mover, MoverState(count=1))
    for target in ("delta", d.address):
        with pytest.raises(TransferError, match="mesh version"):
            a.dispatch(mover.agent_id, target)
        with pytest.raises(TransferError, match="mesh version"):
            a.clone(mover.agent_id, target)
    assert_active_at(a, mover.agent_id)
    assert mover.send("add") == 2
    assert ids(d) == []
    other = d.create(Mover)
    with pytest.raises(TransferError, match="mesh version"):
        d.dispatch(other.agent_id, a.address)


def test_names_resolve_for_movement(make_host: HostFactory, client: HostClient) -> None:
    a = make_host("alpha", **MESH)
    b = make_host("beta", peers=[a.address], **MESH)
    assert a.wait_for_host("beta", timeout=10).url == b.address
    with pytest.raises(HostError):
        a.wait_for_host("nowhere", timeout=0.3)
    mover = a.create(Mover, MoverState(count=1))
    assert mover.send("hosts") == ["alpha", "beta"]
    moved = mover.dispatch("beta")  # proxy.dispatch with a host name
    assert moved.host_url == b.address and moved.send("where") == "beta"
    # Over HTTP, a name too.
    back = PagletProxy(b.address, mover.agent_id, client).dispatch("alpha")
    assert back.host_url == a.address
    assert mover.send(Message("go", {"target": "beta", "how": "dispatch_to"})) == b.address  # self.dispatch_to("beta")
    wait_until(lambda: mover.agent_id in ids(b, "active"))
    c = make_host("gamma", peers=[b.address], **MESH)
    assert moved.send(Message("wait-host", {"name": "gamma"})) == "gamma"  # from inside, on beta
    url, copy_id = moved.send(Message("clone", {"target": "gamma", "how": "clone_to"}))
    assert url == c.address and PagletProxy(c.address, copy_id, b).send("where") == "gamma"
    with pytest.raises(HostError):
        a.dispatch(a.create(Mover).agent_id, "nowhere")


def test_known_peers_persist_across_restart(make_host: HostFactory, tmp_path: Path) -> None:
    a = make_host("alpha", **MESH)
    b = make_host("beta", peers=[a.address], data_dir=tmp_path / "beta-data", **MESH)
    wait_until(lambda: a.host_status("beta") is not None and b.host_status("alpha") is not None, timeout=10)
    b.stop()
    b2 = make_host("beta", data_dir=tmp_path / "beta-data", **MESH)  # no peers= this time
    assert b2.config.peers == ()

    def rejoined() -> bool:
        seen_b, seen_a = a.host_status("beta"), b2.host_status("alpha")
        return bool(seen_b and seen_b.online and seen_b.url == b2.address and seen_a and seen_a.online)

    wait_until(rejoined, timeout=15)
    assert "alpha" in {r.name for r in b2.available_hosts()}


# == 5. itineraries =================================================================================================
@pytest.mark.parametrize("walker", [agents_mobility.RunWalker, agents_mobility.ArrivalWalker])
def test_itinerary_visits_hosts_in_order_and_keeps_progress(make_host: HostFactory, walker: type[paglets.Paglet[Any]]) -> None:
    a, b, c = (make_host(name, hook_timeout=5) for name in ("alpha", "beta", "gamma"))
    connect(a, b, c)
    plan = ItineraryPlan(destinations=["beta", "gamma", "alpha"])
    proxy = a.create(walker, agents_mobility.WalkState(itinerary=plan))
    if walker is agents_mobility.ArrivalWalker:
        assert proxy.send("start") == b.address

    def done() -> bool:
        try:
            return bool(a.get_state(proxy.agent_id).itinerary.completed)
        except PagletError:
            return False

    wait_until(done, timeout=20)
    state = a.get_state(proxy.agent_id)
    assert state.arrivals == [
        ["beta", 1, ["beta"], "beta"],
        ["gamma", 2, ["beta", "gamma"], "gamma"],
        ["alpha", 3, ["beta", "gamma", "alpha"], "alpha"],
    ]
    assert state.itinerary.visited_destinations == ["beta", "gamma", "alpha"] and state.itinerary.current_index == 3
    assert proxy.agent_id not in ids(b) + ids(c)


def test_demo_ends_by_itself_and_prints_each_hop() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(PAGLETS_PY), "demo"], capture_output=True, text=True, timeout=30, env=env, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr
    hops = re.findall(r"(\w+)\s*->\s*(\w+)", done.stdout)
    assert [hop for hop in hops if hop[0] != "born"] == [("alpha", "beta"), ("beta", "gamma"), ("gamma", "alpha")], done.stdout


# == review regressions: transfer envelopes from the network, and the answer to an abort ==========
def post_envelope(host: paglets.Host, agent_id: str, meta: Any) -> tuple[int, Any]:
    """POST /transfers with a hand-made CBOR envelope for a Counter: (status, decoded answer)."""
    envelope = {
        "tid": "t" + uuid.uuid4().hex, "kind": "dispatch", "agent_id": agent_id, "agent_class": "paglets_tests.agents:Counter",
        "epoch": 1, "state": paglets._cbor_dumps(paglets._wire_encode(agents.CounterState())),
        "source_url": "http://127.0.0.1:9", "source_name": "nowhere", "meta": meta,
    }  # fmt: skip
    headers = {"Content-Type": "application/cbor", "Accept": "application/cbor"}
    status, _, body = raw_request(host.address, "POST", "/transfers", cbor2.dumps(envelope), headers)
    return status, cbor2.loads(body)


@pytest.mark.parametrize("bad", ["climbing-name", "absolute-name", "unknown-mode"])
def test_travelling_files_that_would_land_outside_the_data_folder_are_refused(
    make_host: HostFactory, client: HostClient, tmp_path: Path, bad: str
) -> None:
    b = make_host("beta")
    payload = b"written by a transfer\n"
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    artifact = client.upload_artifact(source, host_url=b.address, name="payload.bin", sha256=digest)
    outside = tmp_path / "escape" / "pwned.txt"
    outside.parent.mkdir()
    item = {"name": "fine.bin", "sha256": digest, "size": len(payload), "artifact_id": artifact.artifact_id, "mode": "copy"}
    wrong = {
        "climbing-name": {"name": "../" * 24 + str(outside).lstrip("/")},
        "absolute-name": {"name": str(outside)},
        "unknown-mode": {"mode": "delete"},
    }[bad]
    status, answer = post_envelope(b, "intruder", {"files": [{**item, **wrong}]})
    assert 400 <= status < 500, (status, answer)
    assert "intruder" not in ids(b)
    assert list(outside.parent.iterdir()) == []
    # The same envelope with a plain name and mode is fine: the refusal was about the name or the mode.
    assert post_envelope(b, "visitor", {"files": [item]}) == (200, {"status": "accepted"})
    wait_until(lambda: "visitor" in ids(b, "active"))
    (landed,) = b.registered_files("visitor")
    assert Path(landed.current_path).resolve().is_relative_to(b.data_dir.resolve())
    assert Path(landed.current_path).read_bytes() == payload
    assert list(outside.parent.iterdir()) == []


@pytest.mark.parametrize("meta", [{"files": 5}, {"files": [5]}, {"subscriptions": 3}])
def test_malformed_envelope_meta_is_a_400_not_a_500(make_host: HostFactory, meta: Any) -> None:
    b = make_host("beta")
    status, answer = post_envelope(b, "malformed", meta)
    assert status == 400, (status, answer)
    assert isinstance(answer, dict) and answer["error"] and answer["message"], answer
    assert "malformed" not in ids(b)
    assert post_envelope(b, "wellformed", {"files": [], "subscriptions": ["news"]}) == (200, {"status": "accepted"})


def test_abort_of_an_accepted_transfer_whose_journal_row_was_forgotten_answers_accepted(make_host: HostFactory) -> None:
    a, b = make_host("alpha"), make_host("beta")
    counter = a.create(agents.Counter, init=4)
    moved = counter.dispatch(b.address)
    assert moved.send("add") == 5
    db = apsw.Connection(str(b.data_dir / "paglets.sqlite3"))
    try:
        ((tid, epoch),) = list(db.execute("SELECT tid, epoch FROM transfers WHERE direction='in' AND agent_id=?", (counter.agent_id,)))
    finally:
        db.close()
    b._store.forget_transfers(time.time() + 1)  # what housekeeping does a week later

    def abort(transfer_id: str, at_epoch: int) -> tuple[int, Any]:
        body = json.dumps({"agent_id": counter.agent_id, "source_url": a.address, "epoch": at_epoch})
        status, _, answer = raw_request(b.address, "POST", f"/transfers/{transfer_id}/abort", body, {"Content-Type": "application/json"})
        return status, json.loads(answer)

    # The source, still in doubt, asks: the paglet did arrive, so it must not run there again.
    assert abort(tid, epoch) == (200, {"status": "accepted"})
    assert abort(tid, epoch) == (200, {"status": "accepted"})
    # A transfer of a later epoch that never reached this host is refused.
    assert abort("t" + uuid.uuid4().hex, epoch + 1) == (200, {"status": "refused"})
    assert moved.send("add") == 6
    assert counter.agent_id not in ids(a, "active")
