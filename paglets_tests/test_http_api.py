"""The remote API of one host (SPEC section 6, issue 4): every single-host endpoint over a real
loopback server, JSON and CBOR, errors, keep-alive, HostClient, PagletProxy local and remote,
mounting under a prefix, API keys, class names from the network, and hostile input."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import json
import re
import socket
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import bottle
import cbor2
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import paglets
from paglets import (
    ACTIVE,
    INACTIVE,
    AuthenticationError,
    DeactivationPolicy,
    ForbiddenError,
    HostClient,
    HostRef,
    InvalidAgentError,
    LifecycleError,
    Message,
    NotHandledError,
    PagletCrashedError,
    PagletError,
    PagletInactiveError,
    PagletProxy,
    PagletProxyRef,
    PayloadTooLargeError,
    SerializationError,
)
from paglets_tests import agents, agents_http
from paglets_tests.conftest import ServeProcess, wait_until

MakeHost = Callable[..., paglets.Host]
TIMEOUT = 10.0  # every socket in this file: an answer that does not come in time fails the test
JSON = "application/json"
CBOR = "application/cbor"
COUNTER = "paglets_tests.agents:Counter"
ALLOW = ["paglets_tests"]


# -- helpers ---------------------------------------------------------------------------------------
def request(
    port: int, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    """One request on a fresh connection: (status, content type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, (resp.getheader("Content-Type") or "").split(";")[0], resp.read()
    finally:
        conn.close()


def call(
    port: int, method: str, path: str, tree: Any = None, *, cbor: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A JSON (or CBOR) request and its decoded answer, in the same format."""
    kind = CBOR if cbor else JSON
    body = None if tree is None else (cbor2.dumps(tree) if cbor else json.dumps(tree))
    hdrs = {"Content-Type": kind, **({"Accept": CBOR} if cbor else {}), **(headers or {})}
    status, content_type, data = request(port, method, path, body, hdrs)
    assert content_type == kind, (status, content_type, data[:200])
    return status, (cbor2.loads(data) if cbor else json.loads(data))


def assert_error(status: int, tree: Any, want_status: int, kind: str) -> None:
    assert status == want_status, (status, tree)
    assert isinstance(tree, dict) and tree["error"] == kind, tree
    assert isinstance(tree["message"], str) and tree["message"], tree


def client_ports(server_port: int) -> set[int]:
    """Client ports of every TCP connection to server_port this machine knows (incl. TIME_WAIT)."""
    ports = set()
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.raddr:
            if conn.raddr.port == server_port and conn.raddr.ip == "127.0.0.1":
                ports.add(conn.laddr.port)
            elif conn.laddr.port == server_port and conn.laddr.ip == "127.0.0.1":
                ports.add(conn.raddr.port)
    return ports


def closed_by_peer(port_of_client: int, server_port: int) -> bool:
    """The server closed that connection (the client end is in CLOSE_WAIT or gone)."""
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.raddr and conn.laddr.port == port_of_client and conn.raddr.port == server_port:
            return conn.status in (psutil.CONN_CLOSE_WAIT, psutil.CONN_CLOSE)
    return True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- 1. every single-host endpoint -----------------------------------------------------------------
def test_health_answers_who_the_host_is(make_host: MakeHost) -> None:
    host = make_host("alpha", allow_modules=ALLOW)
    status, tree = call(host.port, "GET", "/health")
    assert status == 200
    assert tree["status"] == "ok" and tree["name"] == "alpha" and tree["url"] == host.address
    host.create(agents.Counter)
    assert call(host.port, "GET", "/health")[1]["active"] == 1


def test_hosts_and_join(make_host: MakeHost) -> None:
    alpha, beta = make_host("alpha"), make_host("beta")
    status, tree = call(alpha.port, "GET", "/hosts")
    assert status == 200
    assert alpha.address in [h["url"] for h in tree["hosts"]]
    assert beta.address not in [h["url"] for h in tree["hosts"]]

    status, tree = call(alpha.port, "POST", "/hosts/join", {"host": HostRef("beta", beta.address).to_wire()})
    assert status == 200
    assert {alpha.address, beta.address} <= {h["url"] for h in tree["hosts"]}
    listed = {h["url"]: h for h in call(alpha.port, "GET", "/hosts")[1]["hosts"]}
    assert listed[beta.address]["name"] == "beta"
    assert {h.url for h in HostClient().hosts(alpha.address)} >= {alpha.address, beta.address}


def test_events_since_and_limit(make_host: MakeHost) -> None:
    host = make_host("alpha")
    proxy = host.create(agents.Counter)
    proxy.deactivate()
    status, tree = call(host.port, "GET", "/events?since=0&limit=100")
    assert status == 200
    events = tree["events"]
    ids = [e["event_id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [(e["kind"], e["agent_id"]) for e in events]
    assert ("created", proxy.agent_id) in kinds and ("deactivated", proxy.agent_id) in kinds
    created = next(e for e in events if e["kind"] == "created")
    assert created["class_name"] == COUNTER and created["host_name"] == "alpha"

    later = call(host.port, "GET", f"/events?since={created['event_id']}&limit=100")[1]["events"]
    assert later and all(e["event_id"] > created["event_id"] for e in later)
    assert ("deactivated", proxy.agent_id) in [(e["kind"], e["agent_id"]) for e in later]
    assert len(call(host.port, "GET", "/events?since=0&limit=1")[1]["events"]) == 1
    assert call(host.port, "GET", f"/events?since={ids[-1]}")[1]["events"] == []
    assert [e.event_id for e in HostClient().events(host.address, 0, 2)] == ids[:2]


def test_services_lists_this_hosts_records(make_host: MakeHost) -> None:
    host = make_host("alpha")
    provider = host.create(agents_http.Provider)

    def mine(query: str = "") -> list[dict[str, Any]]:
        status, tree = call(host.port, "GET", "/services" + query)
        assert status == 200
        return [r for r in tree["services"] if r["agent_id"] == provider.agent_id]  # built-in services may be listed too

    assert mine() == []
    assert provider.send("advertise", name="calc") == "calc"
    (record,) = mine()
    assert record["name"] == "calc" and record["agent_id"] == provider.agent_id and record["host_url"] == host.address
    assert sorted(record["capabilities"]) == ["add", "echo"]
    assert len(mine("?name=calc")) == 1
    assert call(host.port, "GET", "/services?name=no-such-service")[1]["services"] == []
    assert len(mine("?capability=echo")) == 1
    assert call(host.port, "GET", "/services?capability=fly")[1]["services"] == []
    (rec,) = HostClient().services(host.address, name="calc")
    assert rec.agent_id == provider.agent_id and rec.metadata == {"unit": "apples"}


def test_agents_listing_by_state(make_host: MakeHost) -> None:
    host = make_host("alpha")
    baseline = {info["agent_id"] for info in host.list_agents("all")}  # built-in residents, if any
    awake, asleep = host.create(agents.Counter), host.create(agents.Counter)
    asleep.deactivate()

    def ids(query: str) -> dict[str, dict[str, Any]]:
        status, tree = call(host.port, "GET", "/agents" + query)
        assert status == 200
        return {info["agent_id"]: info for info in tree["agents"] if info["agent_id"] not in baseline}

    assert set(ids("")) == {awake.agent_id}  # active is the default
    assert set(ids("?state=active")) == {awake.agent_id}
    assert set(ids("?state=inactive")) == {asleep.agent_id}
    everything = ids("?state=all")
    assert set(everything) == {awake.agent_id, asleep.agent_id}
    assert everything[awake.agent_id]["active"] is True and everything[asleep.agent_id]["active"] is False
    for info in everything.values():
        assert info["agent_class"] == COUNTER and info["host_url"] == host.address
    status, tree = call(host.port, "GET", "/agents?state=sleeping")
    assert_error(status, tree, 400, "RequestError")


def test_create_info_and_state_over_http(make_host: MakeHost) -> None:
    host = make_host("alpha", allow_modules=ALLOW)
    status, tree = call(host.port, "POST", "/agents", {"agent_class": COUNTER, "state": {"count": 3}, "init": None, "agent_id": "c-1"})
    assert status == 201 and tree["agent_id"] == "c-1"
    assert tree["proxy"] == {"host_url": host.address, "agent_id": "c-1"}

    status, info = call(host.port, "GET", "/agents/c-1")
    assert status == 200
    assert (info["agent_id"], info["agent_class"], info["active"], info["host_url"]) == ("c-1", COUNTER, True, host.address)
    status, tree = call(host.port, "GET", "/agents/c-1/state")
    assert status == 200
    assert tree["state"] == {"$dc": "paglets_tests.agents:CounterState", "$f": {"count": 3, "seen": []}}

    # state null and an init value (Counter.on_creation takes an int init as its count); id chosen by the host
    status, tree = call(host.port, "POST", "/agents", {"agent_class": COUNTER, "state": None, "init": 41})
    assert status == 201
    new_id = tree["agent_id"]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", new_id) and new_id != "c-1"
    assert host.deliver_message(new_id, "add") == 42
    # a full wire state (as HostClient sends it) works too
    status, tree = call(
        host.port, "POST", "/agents", {"agent_class": COUNTER, "state": {"$dc": "paglets_tests.agents:CounterState", "$f": {"count": 9}}}
    )
    assert status == 201 and host.get_state(tree["agent_id"]) == agents.CounterState(count=9)

    status, tree = call(host.port, "POST", "/agents", {"agent_class": COUNTER, "agent_id": "c-1"})
    assert_error(status, tree, 409, "LifecycleError")
    assert host.deliver_message("c-1", "get") == 3  # the first c-1 is untouched


def test_unknown_agent_is_404_everywhere(make_host: MakeHost) -> None:
    host = make_host("alpha")
    for method, path, body in [
        ("GET", "/agents/ghost", None),
        ("GET", "/agents/ghost/state", None),
        ("POST", "/agents/ghost/messages", {"kind": "get"}),
        ("POST", "/agents/ghost/deactivate", {}),
        ("POST", "/agents/ghost/activate", {}),
        ("POST", "/agents/ghost/dispose", {}),
    ]:
        for cbor in (False, True):
            status, tree = call(host.port, method, path, body, cbor=cbor)
            assert_error(status, tree, 404, "InvalidAgentError")
    with pytest.raises(InvalidAgentError):
        HostClient().agent_info(host.address, "ghost")


def test_messages_sync_oneway_and_full_wire_message(make_host: MakeHost) -> None:
    host = make_host("alpha")
    counter = host.create(agents.Counter)
    path = f"/agents/{counter.agent_id}/messages"
    status, tree = call(host.port, "POST", path, {"kind": "add", "args": {"by": 5}})
    assert (status, tree) == (200, {"reply": 5})
    status, tree = call(host.port, "POST", path, Message("add", {"by": 2}, priority=paglets.MAX_PRIORITY).to_wire())
    assert (status, tree) == (200, {"reply": 7})
    status, tree = call(host.port, "POST", path, {**Message("add", {"by": 10}).to_wire(), "oneway": True})
    assert status == 202 and "reply" not in tree
    wait_until(lambda: counter.send("get") == 17)
    status, tree = call(host.port, "POST", path, {"kind": "echo", "args": {"value": {"nested": [1, "two", None, 2.5]}}})
    assert (status, tree) == (200, {"reply": {"nested": [1, "two", None, 2.5]}})


def test_deactivate_activate_dispose_over_http(make_host: MakeHost) -> None:
    host = make_host("alpha")
    counter = host.create(agents.Counter, init=4)
    aid = counter.agent_id
    status, tree = call(host.port, "POST", f"/agents/{aid}/deactivate", {})
    assert status == 200 and tree["proxy"] == {"host_url": host.address, "agent_id": aid}
    info = call(host.port, "GET", f"/agents/{aid}")[1]
    assert info["active"] is False and info["agent_class"] == COUNTER
    assert call(host.port, "GET", f"/agents/{aid}/state")[1]["state"]["$f"]["count"] == 4  # readable while asleep

    status, tree = call(host.port, "POST", f"/agents/{aid}/activate")  # no body at all
    assert status == 200 and call(host.port, "GET", f"/agents/{aid}")[1]["active"] is True
    assert counter.send("get") == 4

    # a deactivation request with a policy, as HostClient sends it
    nap = paglets.DeactivationRequest(
        reason="nap", policy=DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=False)
    )
    status, _ = call(host.port, "POST", f"/agents/{aid}/deactivate", {"request": nap.to_wire()}, cbor=True)
    assert status == 200
    status, tree = call(host.port, "POST", f"/agents/{aid}/messages", {"kind": "get"})
    assert_error(status, tree, 409, "PagletInactiveError")

    status, tree = call(host.port, "POST", f"/agents/{aid}/dispose", {})
    assert status == 200
    status, tree = call(host.port, "GET", f"/agents/{aid}")
    assert_error(status, tree, 404, "InvalidAgentError")


# -- 2. JSON / CBOR, errors, keep-alive, HostClient -------------------------------------------------------
def test_json_by_default_cbor_on_request_and_bytes_survive_both(make_host: MakeHost) -> None:
    host = make_host("alpha", allow_modules=ALLOW)
    counter = host.create(agents.Counter)
    path = f"/agents/{counter.agent_id}/messages"
    blob = bytes(range(256))

    # JSON in, JSON out: bytes travel as {"$bytes": base64}
    status, ctype, data = request(
        host.port, "POST", path, json.dumps({"kind": "echo", "args": {"value": {"$bytes": b64(blob)}}}), {"Content-Type": JSON}
    )
    assert (status, ctype) == (200, JSON) and json.loads(data) == {"reply": {"$bytes": b64(blob)}}
    # no Content-Type at all: JSON
    status, ctype, data = request(host.port, "POST", path, json.dumps({"kind": "echo", "args": {"value": "x"}}))
    assert (status, ctype, json.loads(data)) == (200, JSON, {"reply": "x"})
    # CBOR in and out: bytes are CBOR byte strings
    status, ctype, data = request(
        host.port, "POST", path, cbor2.dumps({"kind": "echo", "args": {"value": blob}}), {"Content-Type": CBOR, "Accept": CBOR}
    )
    assert (status, ctype) == (200, CBOR) and cbor2.loads(data) == {"reply": blob}
    # CBOR in, JSON out (no Accept) and JSON in, CBOR out
    status, ctype, data = request(host.port, "POST", path, cbor2.dumps({"kind": "echo", "args": {"value": blob}}), {"Content-Type": CBOR})
    assert (status, ctype) == (200, JSON) and json.loads(data) == {"reply": {"$bytes": b64(blob)}}
    status, ctype, data = request(
        host.port,
        "POST",
        path,
        json.dumps({"kind": "echo", "args": {"value": {"$bytes": b64(blob)}}}),
        {"Content-Type": JSON, "Accept": CBOR},
    )
    assert (status, ctype) == (200, CBOR) and cbor2.loads(data) == {"reply": blob}
    # GET answers and errors follow Accept too
    status, ctype, data = request(host.port, "GET", "/health", headers={"Accept": CBOR})
    assert (status, ctype) == (200, CBOR) and cbor2.loads(data)["name"] == "alpha"
    status, ctype, data = request(host.port, "GET", "/agents/ghost", headers={"Accept": CBOR})
    assert (status, ctype) == (404, CBOR) and cbor2.loads(data)["error"] == "InvalidAgentError"

    # bytes inside paglet state, created over JSON, read back over both
    status, tree = call(
        host.port, "POST", "/agents", {"agent_class": "paglets_tests.agents:Rich", "state": {"blob": {"$bytes": b64(blob)}}}
    )
    assert status == 201
    rich = tree["agent_id"]
    assert call(host.port, "GET", f"/agents/{rich}/state")[1]["state"]["$f"]["blob"] == {"$bytes": b64(blob)}
    assert call(host.port, "GET", f"/agents/{rich}/state", cbor=True)[1]["state"]["$f"]["blob"] == blob
    assert host.get_state(rich).blob == blob
    # and through HostClient (CBOR) as Python values
    client = HostClient(allow=ALLOW)
    assert client.send_message(host.address, counter.agent_id, Message("echo", {"value": blob})) == blob
    assert client.get_state(host.address, rich).blob == blob


def test_error_bodies_and_statuses(make_host: MakeHost) -> None:
    host = make_host("alpha", allow_modules=ALLOW)
    small = make_host("small", max_body_bytes=1024)
    counter = host.create(agents.Counter)
    provider = host.create(agents_http.Provider)
    msgs = f"/agents/{counter.agent_id}/messages"
    cases: list[tuple[int, str, tuple[int, Any]]] = [
        (400, "NotHandledError", call(host.port, "POST", msgs, {"kind": "no-such-kind"})),
        (422, "ValueError", call(host.port, "POST", msgs, {"kind": "raise", "args": {"value": 3}})),
        (
            422,
            "QuotaExceeded",
            call(host.port, "POST", f"/agents/{provider.agent_id}/messages", {"kind": "over-quota", "args": {"limit": 5}}),
        ),
        (400, "SerializationError", call(host.port, "POST", msgs, {"args": {}})),  # no kind
        (404, "InvalidAgentError", call(host.port, "GET", "/agents/ghost")),
        (403, "ForbiddenError", call(host.port, "POST", "/agents", {"agent_class": "os:system"})),
        (409, "LifecycleError", call(host.port, "POST", "/agents", {"agent_class": COUNTER, "agent_id": counter.agent_id})),
        (413, "PayloadTooLargeError", call(small.port, "POST", "/agents", {"agent_class": COUNTER, "init": "x" * 2000})),
    ]
    for want_status, kind, (status, tree) in cases:
        assert_error(status, tree, want_status, kind)
    status, ctype, data = request(host.port, "POST", msgs, b"{not json", {"Content-Type": JSON})
    assert status == 400 and ctype == JSON and json.loads(data)["error"] == "SerializationError"
    status, ctype, data = request(host.port, "POST", msgs, b"<kind/>", {"Content-Type": "application/xml"})
    assert 400 <= status < 500 and ctype == JSON and json.loads(data)["error"]
    for method, path in [("GET", "/nowhere"), ("DELETE", f"/agents/{counter.agent_id}"), ("PUT", "/health")]:
        status, ctype, data = request(host.port, method, path)
        assert status in (404, 405) and ctype == JSON and set(json.loads(data)) >= {"error", "message"}
    assert counter.send("get") == 0


def test_host_client_raises_the_class_the_host_raised(make_host: MakeHost) -> None:
    host = make_host("alpha", allow_modules=ALLOW)
    small = make_host("small", max_body_bytes=1024, allow_modules=ALLOW)
    client = HostClient(allow=ALLOW)
    url = host.address
    counter = client.create(url, agents.Counter)
    provider = client.create(url, agents_http.Provider)
    crashy = client.create(url, agents.Crashy)
    asleep = client.create(url, agents.Counter)
    asleep.deactivate(policy=DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=False))

    with pytest.raises(NotHandledError):
        counter.send("no-such-kind")
    with pytest.raises(ValueError, match="bad value 3") as info:
        counter.send(Message("raise", {"value": 3}))
    assert type(info.value) is ValueError
    with pytest.raises(agents_http.QuotaExceeded, match="quota of 5 exceeded"):
        provider.send("over-quota", limit=5)
    with pytest.raises(KeyError):
        provider.send("key-error")
    with pytest.raises(InvalidAgentError):
        client.send_message(url, "ghost", Message("get"))
    with pytest.raises(InvalidAgentError):
        client.get_state(url, "ghost")
    with pytest.raises(PagletInactiveError):
        asleep.send("get")
    with pytest.raises(ForbiddenError):
        client.create(url, "os:system")
    with pytest.raises(LifecycleError):
        client.create(url, agents.Counter, agent_id=counter.agent_id)
    with pytest.raises(SerializationError):
        client.create(url, agents.Counter, agents.LogState())  # the wrong State class
    with pytest.raises(PayloadTooLargeError):
        client.send_message(small.address, "ghost", Message("echo", {"value": "x" * 4096}))
    with pytest.raises(TimeoutError):
        counter.send(Message("sleep", {"seconds": 1.0}), timeout=0.2)
    with pytest.raises(PagletCrashedError):
        crashy.send("exit")
    with pytest.raises(PagletCrashedError):
        crashy.send("ping")  # later calls fail the same way
    status, tree = call(host.port, "POST", f"/agents/{crashy.agent_id}/messages", {"kind": "ping"})
    assert tree["error"] == "PagletCrashedError" and status >= 500
    assert counter.send("add") == 1  # the host and the other paglets go on


def test_host_client_error_body_imports_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error body naming a module must not make the client import it."""
    name, marker = make_marker_module(tmp_path, monkeypatch, "errmod")
    body = json.dumps({"error": "Boom", "message": "kaboom", "exception": f"{name}:Boom"}).encode()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(
                b"HTTP/1.1 422 Unprocessable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with server, pytest.raises(PagletError, match="kaboom") as info:
        HostClient(timeout=TIMEOUT).health(f"http://127.0.0.1:{port}")
    thread.join(TIMEOUT)
    assert type(info.value).__module__ == "paglets"  # not a class from the module the body named
    assert not marker.exists() and name not in sys.modules


def test_keep_alive_many_requests_one_connection(make_host: MakeHost) -> None:
    host = make_host("alpha")
    counter = host.create(agents.Counter)
    before = client_ports(host.port)
    conn = http.client.HTTPConnection("127.0.0.1", host.port, timeout=TIMEOUT)
    conn.connect()
    sock = conn.sock
    statuses = []
    sequence: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("GET", "/health", None, {}),
        ("POST", f"/agents/{counter.agent_id}/messages", b'{"kind": "add"}', {"Content-Type": JSON}),
        ("GET", "/agents/ghost", None, {}),  # an error answer keeps the connection too
        ("POST", f"/agents/{counter.agent_id}/messages", b"{broken", {"Content-Type": JSON}),
        ("POST", f"/agents/{counter.agent_id}/messages", b"<x/>", {"Content-Type": "application/xml"}),
        ("POST", f"/agents/{counter.agent_id}/messages", b'{"kind": "raise"}', {"Content-Type": JSON}),
        ("GET", "/nowhere", None, {}),
        ("GET", "/agents?state=all", None, {"Accept": CBOR}),
        ("POST", f"/agents/{counter.agent_id}/messages", cbor2.dumps({"kind": "add"}), {"Content-Type": CBOR}),
    ] * 3
    for method, path, body, headers in sequence:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
        assert not resp.will_close, (method, path, resp.getheaders())
        assert conn.sock is sock  # http.client did not have to reconnect
    assert statuses[:9] == [200, 200, 404, 400, 415, 422, 404, 200, 200]
    assert client_ports(host.port) - before == {sock.getsockname()[1]}  # the server saw one client port
    conn.close()
    assert counter.send("get") == 6
    # control: three fresh connections are three client ports, so the count above means something
    for _ in range(3):
        request(host.port, "GET", "/health")
    assert len(client_ports(host.port) - before) == 4


def test_host_client_one_connection_per_host_and_thread(make_host: MakeHost) -> None:
    alpha, beta = make_host("alpha"), make_host("beta")
    counter = alpha.create(agents.Counter)
    other = beta.create(agents.Counter)
    client = HostClient()
    before_a, before_b = client_ports(alpha.port), client_ports(beta.port)
    for _ in range(15):
        client.send_message(alpha.address, counter.agent_id, Message("add"))
        client.health(alpha.address)
        client.agents(alpha.address)
        client.send_message(beta.address, other.agent_id, Message("add"))
    with pytest.raises(InvalidAgentError):
        client.agent_info(alpha.address, "ghost")
    assert len(client_ports(alpha.port) - before_a) == 1
    assert len(client_ports(beta.port) - before_b) == 1

    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                client.send_message(alpha.address, counter.agent_id, Message("add"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not errors
    assert len(client_ports(alpha.port) - before_a) == 1 + 4  # one more connection per thread
    assert counter.send("get") == 15 + 40
    client.close()


def test_host_client_recovers_when_the_server_closed_an_idle_connection(make_host: MakeHost) -> None:
    host = make_host("alpha", keepalive_timeout=0.3)
    counter = host.create(agents.Counter)
    client = HostClient()
    before = client_ports(host.port)
    assert client.send_message(host.address, counter.agent_id, Message("add")) == 1
    (first,) = client_ports(host.port) - before
    wait_until(lambda: closed_by_peer(first, host.port), timeout=10)  # the server dropped the idle connection
    assert client.send_message(host.address, counter.agent_id, Message("add")) == 2  # exactly once more, not twice
    new = client_ports(host.port) - before - {first}
    assert len(new) == 1
    assert client.health(host.address)["status"] == "ok"
    assert counter.send("get") == 2



class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(app: Any) -> Iterator[Any]:
    """An outer WSGI app served by wsgiref on a free loopback port, shut down afterwards."""
    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_mounted_in_an_outer_bottle_app_under_a_prefix(make_host: MakeHost) -> None:
    host = make_host("alpha")
    counter = host.create(agents.Counter)
    outer = bottle.Bottle()
    outer.route("/hello", "GET", lambda: "outer app")
    outer.mount("/paglets/", host.wsgi_app)

    with serving(outer) as server:
        port = server.server_port
        status, tree = call(port, "GET", "/paglets/health")
        assert status == 200 and tree["name"] == "alpha"
        assert request(port, "GET", "/hello")[2] == b"outer app"
        path = f"/paglets/agents/{counter.agent_id}/messages"
        assert call(port, "POST", path, {"kind": "add", "args": {"by": 4}}) == (200, {"reply": 4})
        assert call(port, "POST", path, {"kind": "echo", "args": {"value": b"\x00\x01"}}, cbor=True) == (200, {"reply": b"\x00\x01"})
        status, tree = call(port, "GET", "/paglets/agents/ghost")
        assert_error(status, tree, 404, "InvalidAgentError")
        status, tree = call(port, "POST", path, {"kind": "nope"})
        assert_error(status, tree, 400, "NotHandledError")
        assert counter.send("get") == 4
        assert request(port, "GET", "/health")[0] == 404  # only under the prefix


def test_host_client_and_proxy_talk_to_a_host_mounted_under_a_prefix(make_host: MakeHost) -> None:
    """A base URL with a path (a host mounted in another app) is kept by HostClient."""
    host = make_host("alpha")
    counter = host.create(agents.Counter)
    outer = bottle.Bottle()
    outer.mount("/paglets/", host.wsgi_app)

    with serving(outer) as server:
        base = f"http://127.0.0.1:{server.server_port}/paglets"
        client = HostClient()
        assert client.health(base)["name"] == "alpha"
        assert PagletProxy(base, counter.agent_id, client).send("add", by=2) == 2


# -- 3. PagletProxy: local and remote the same -----------------------------------------------------------
def exercise_proxy(proxy: PagletProxy, resolver: Any, start: int) -> None:
    """Everything a user does with a proxy; the same for a local and a remote paglet."""
    assert proxy.send("add", by=2) == start + 2
    assert proxy.send(Message("echo", {"value": b"\x00\xffbytes"})) == b"\x00\xffbytes"
    with pytest.raises(ValueError, match="bad value 9"):
        proxy.send(Message("raise", {"value": 9}))
    with pytest.raises(NotHandledError):
        proxy.send("nope")
    assert proxy.send_oneway("add", by=10) is None
    wait_until(lambda: proxy.send("get") == start + 12)
    future = proxy.send_future("add", by=1)
    assert future.get_reply(TIMEOUT) == start + 13 and future.is_available()
    failing = proxy.send_future(Message("raise", {"value": 1}))
    assert failing.wait_for_reply(TIMEOUT)
    with pytest.raises(ValueError):
        failing.get_reply(TIMEOUT)

    info = proxy.info()
    assert (info["agent_id"], info["agent_class"], info["active"], info["host_url"]) == (proxy.agent_id, COUNTER, True, proxy.host_url)
    assert proxy.is_active() and proxy.is_valid() and proxy.is_state(ACTIVE) and not proxy.is_state(INACTIVE)
    assert proxy.to_wire() == {"host_url": proxy.host_url, "agent_id": proxy.agent_id}
    assert PagletProxyRef.from_wire(proxy.to_wire()) == proxy.ref()

    assert proxy.deactivate(reason="nap") == proxy
    assert not proxy.is_active() and proxy.is_valid() and proxy.is_state(INACTIVE) and not proxy.is_state(ACTIVE)
    assert proxy.activate() == proxy
    assert proxy.is_active() and proxy.send("get") == start + 13

    resolved = proxy.ref().resolve(resolver)
    assert resolved == proxy and resolved.is_remote() == proxy.is_remote()
    assert resolved.send("add") == start + 14

    proxy.dispose()
    assert not proxy.is_valid() and not proxy.is_active() and not proxy.is_state(ACTIVE | INACTIVE)
    with pytest.raises(InvalidAgentError):
        proxy.send("get")


def test_proxy_to_a_local_paglet(make_host: MakeHost) -> None:
    alpha = make_host("alpha")
    proxy = alpha.create(agents.Counter, init=1)
    assert not proxy.is_remote()
    exercise_proxy(proxy, alpha, 1)


def test_ref_of_a_sleeping_paglet_resolves_like_an_awake_one(make_host: MakeHost) -> None:
    """PagletProxyRef.resolve(host) of a local paglet is a local proxy, awake or asleep."""
    alpha = make_host("alpha")
    proxy = alpha.create(agents.Counter, init=1)
    awake = proxy.ref().resolve(alpha)
    assert awake == proxy and not awake.is_remote()
    proxy.deactivate()
    asleep = proxy.ref().resolve(alpha)
    assert asleep == proxy and not asleep.is_remote()
    assert asleep.send("get") == 1  # activates it (default policy), through the host itself


def test_proxy_to_a_remote_paglet_through_a_host(make_host: MakeHost) -> None:
    alpha, beta = make_host("alpha", allow_modules=ALLOW), make_host("beta", allow_modules=ALLOW)
    proxy = alpha.create_remote(beta.address, agents.Counter, agents.CounterState(count=2))
    assert proxy.host_url == beta.address and proxy.is_remote()
    assert beta.get_state(proxy.agent_id) == agents.CounterState(count=2)  # it lives on beta
    assert proxy.agent_id not in {a["agent_id"] for a in alpha.list_agents("all")}
    exercise_proxy(proxy, alpha, 2)


def test_proxy_through_a_bare_host_client(make_host: MakeHost) -> None:
    beta = make_host("beta", allow_modules=ALLOW)
    client = HostClient(allow=ALLOW)
    proxy = client.create(beta.address, agents.Counter, init=3)
    assert proxy.is_remote()
    exercise_proxy(proxy, client, 3)


def test_create_remote_with_init_and_by_name(make_host: MakeHost) -> None:
    alpha, beta = make_host("alpha", allow_modules=ALLOW), make_host("beta", allow_modules=ALLOW)
    by_class = alpha.create_remote(beta.address, agents.Counter, init=7)
    assert by_class.send("get") == 7
    by_name = alpha.create_remote(beta.address, COUNTER, init=8)
    assert by_name.send("get") == 8 and by_name.info()["host_url"] == beta.address
    assert {a["agent_id"] for a in beta.list_agents()} >= {by_class.agent_id, by_name.agent_id}
    with pytest.raises(ForbiddenError):
        alpha.create_remote(beta.address, "os:system")
    with pytest.raises(ForbiddenError):
        alpha.create_remote(beta.address, "paglets_tests.agents:NotAPagletState")


# -- 4. security -------------------------------------------------------------------------------------------
def test_concurrent_first_creates_of_a_lazily_imported_class_all_succeed(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    """Several clients naming a class whose allowed module is not imported yet: the import happens once,
    and no request sees the module half-initialised ("no class ...")."""
    package = f"slowpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / "mods" / package).mkdir(parents=True)
    (tmp_path / "mods" / package / "__init__.py").write_text("")
    (tmp_path / "mods" / package / "agents.py").write_text(
        "import time\n"
        "time.sleep(0.5)  # a module that takes a moment to import\n"
        "from paglets import Message, Paglet, PagletState\n"
        "class Slow(Paglet[PagletState]):\n"
        "    def handle_message(self, message: Message):\n"
        "        return 'hi'\n"
    )
    srv = serve("lazy", extra=["--path", str(tmp_path / "mods"), "--allow", package]).start()
    port = urllib.parse.urlsplit(srv.url).port
    assert port is not None

    def create() -> tuple[int, Any]:
        return call(port, "POST", "/agents", {"agent_class": f"{package}.agents:Slow"})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: create(), range(4)))
    assert [status for status, _ in answers] == [201] * 4, answers
    for _, tree in answers:
        assert HostClient().send_message(srv.url, tree["agent_id"], Message("ping")) == "hi"


def test_api_key_guards_every_endpoint_but_health(make_host: MakeHost) -> None:
    host = make_host("locked", api_key="k", allow_modules=ALLOW)
    baseline = {a["agent_id"] for a in host.list_agents("all")}
    counter = host.create(agents.Counter)
    aid = counter.agent_id
    endpoints: list[tuple[str, str, Any]] = [
        ("GET", "/hosts", None),
        ("POST", "/hosts/join", {"host": {"name": "x", "url": "http://127.0.0.1:9"}}),
        ("GET", "/events?since=0&limit=5", None),
        ("GET", "/services", None),
        ("GET", "/agents?state=all", None),
        ("POST", "/agents", {"agent_class": COUNTER, "agent_id": "intruder"}),
        ("GET", f"/agents/{aid}", None),
        ("GET", f"/agents/{aid}/state", None),
        ("POST", f"/agents/{aid}/messages", {"kind": "add"}),
        ("POST", f"/agents/{aid}/clone", {}),
        ("POST", f"/agents/{aid}/dispatch", {"target": "http://127.0.0.1:9"}),
        ("POST", f"/agents/{aid}/retract", {"target": "http://127.0.0.1:9"}),
        ("POST", f"/agents/{aid}/deactivate", {}),
        ("POST", f"/agents/{aid}/activate", {}),
        ("POST", f"/agents/{aid}/dispose", {}),
        ("GET", "/agents/ghost", None),
        ("POST", "/agents", {"agent_class": "os:system"}),  # refused for the key before anything else
    ]
    for method, path, body in endpoints:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer k2"}, {"Authorization": "k"},
                        {"Authorization": "Basic k"}, {"Authorization": "Bearer "}, {"X-Api-Key": "k"}):  # fmt: skip
            status, tree = call(host.port, method, path, body, headers=headers)
            assert_error(status, tree, 401, "AuthenticationError")
    assert counter.send("get") == 0 and {a["agent_id"] for a in host.list_agents("all")} == baseline | {aid}  # nothing happened

    status, tree = call(host.port, "GET", "/health")
    assert status == 200 and tree["status"] == "ok"
    good = {"Authorization": "Bearer k"}
    for method, path, _ in endpoints:
        if method == "GET" and "ghost" not in path:
            assert call(host.port, method, path, headers=good)[0] == 200, path
    assert call(host.port, "POST", f"/agents/{aid}/messages", {"kind": "add"}, headers=good) == (200, {"reply": 1})

    assert HostClient(api_key="k").send_message(host.address, aid, Message("add")) == 2
    with pytest.raises(AuthenticationError):
        HostClient().agents(host.address)
    with pytest.raises(AuthenticationError):
        HostClient(api_key="K").send_message(host.address, aid, Message("add"))
    assert HostClient().health(host.address)["status"] == "ok"

    # hosts sharing a key talk to each other with it
    peer = make_host("peer", api_key="k", allow_modules=ALLOW)
    remote = peer.create_remote(host.address, agents.Counter, init=5)
    assert remote.send("add") == 6 and remote.is_active()
    assert counter.send("get") == 2


def make_marker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stem: str) -> tuple[str, Path]:
    """A throwaway module on sys.path that writes a marker file when it is imported."""
    name = f"{stem}_{uuid.uuid4().hex[:10]}"
    marker = tmp_path / f"{name}.imported"
    source = (
        "import enum, pathlib\n"
        "from dataclasses import dataclass\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from paglets import Paglet, PagletState\n"
        "@dataclass\nclass EvilState(PagletState):\n    x: int = 0\n"
        "class Evil(Paglet[EvilState]):\n    State = EvilState\n"
        "class Colour(enum.Enum):\n    RED = 1\n"
        "class Boom(Exception):\n    pass\n"
    )
    folder = tmp_path / "evil_path"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    import importlib.util

    assert importlib.util.find_spec(name) is not None  # importable: so a refusal below means something
    return name, marker


def test_class_names_from_the_network_import_and_run_nothing(make_host: MakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil, marker = make_marker_module(tmp_path, monkeypatch, "evil")
    twin, twin_marker = make_marker_module(tmp_path, monkeypatch, "paglets_tests_twin")  # shares the allowed prefix, not the package
    host = make_host("alpha", allow_modules=ALLOW)
    counter = host.create(agents.Counter)
    baseline = {a["agent_id"] for a in host.list_agents("all")}
    sentinel = tmp_path / "ran"
    names = [
        "os:system",
        "builtins:eval",
        "builtins:exec",
        "subprocess:Popen",
        "posix:system",
        "importlib:import_module",
        f"{evil}:Evil",
        f"{twin}:Evil",
        "paglets_tests.agents:NotAPagletState",
        "paglets_tests.agents:CounterState",
        "paglets_tests.agents:Point",
        "paglets_tests.agents:Counter.__init__",
        "paglets_tests.agents:Counter.__class__",
        "paglets_tests.agents:os.system",
        "paglets:Paglet",
        "paglets:Host",
        "paglets:HostClient",
        "paglets_tests.agents",
        "os.system",
        f"os:system('touch {sentinel}')",
        "a:b:c",
        "",
    ]
    for name in names:
        for cbor in (False, True):
            status, tree = call(host.port, "POST", "/agents", {"agent_class": name, "state": None, "init": f"touch {sentinel}"}, cbor=cbor)
            assert 400 <= status < 500, (name, status, tree)
            assert tree["error"] in ("ForbiddenError", "SerializationError", "InvalidAgentError"), (name, tree)
    # class names inside values: state, message arguments, deactivation metadata
    hostile_values = [{"$dc": f"{evil}:EvilState", "$f": {}}, {"$enum": f"{evil}:Colour", "$v": 1}, {"$dc": f"{twin}:EvilState", "$f": {}},
                      {"$dc": "os:system", "$f": {}}, {"$enum": "subprocess:Popen", "$v": 1}]  # fmt: skip
    for value in hostile_values:
        status, tree = call(host.port, "POST", "/agents", {"agent_class": COUNTER, "state": value})
        assert 400 <= status < 500, (value, status, tree)
        status, tree = call(host.port, "POST", f"/agents/{counter.agent_id}/messages", {"kind": "echo", "args": {"value": value}})
        assert 400 <= status < 500, (value, status, tree)
        status, tree = call(host.port, "POST", f"/agents/{counter.agent_id}/deactivate", {"request": {"metadata": {"v": value}}})
        assert 400 <= status < 500, (value, status, tree)
    with pytest.raises(ForbiddenError):
        host.create_paglet(f"{evil}:Evil")  # by name from the embedding app: the same rules
    assert not marker.exists() and not twin_marker.exists() and not sentinel.exists()
    assert evil not in sys.modules and twin not in sys.modules
    assert {a["agent_id"] for a in host.list_agents("all")} == baseline and counter.is_active()
    # control: where the module is allowed, the same request does import it (whether or not its worker then starts)
    allowed = make_host("open", allow_modules=[evil])
    with contextlib.suppress(PagletError):
        HostClient().create(allowed.address, f"{evil}:Evil")
    assert marker.exists()


# -- 5. hostile input --------------------------------------------------------------------------------------
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10
)
NON_STR = VALUES.filter(lambda v: not isinstance(v, str))
NON_MAP = VALUES.filter(lambda v: not isinstance(v, dict))
HOSTILE_CLASSES = st.sampled_from(
    ["os:system", "builtins:eval", "subprocess:Popen", "paglets_tests.agents:NotAPagletState", "paglets_tests.agents:CounterState",
     "paglets:Paglet", "paglets:Host", "paglets_tests.agents:Counter.__class__", "paglets_tests.nosuch:X", "paglets_tests.conftest:wait_until",
     "shutil:rmtree", "a:b:c", ":", "x" * 300 + ":Y", "paglets_tests.agents:Counter\x00", " paglets_tests.agents:Counter"]
)  # fmt: skip
CONTENT_TYPES = st.sampled_from([JSON, CBOR, "text/plain", "", "application/xml", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                 "application/cbor; charset=utf-8", "APPLICATION/JSON", "application/json; charset=utf-16", "*/*"])  # fmt: skip
TAGS = st.sampled_from([0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 32, 33, 34, 35, 36, 37, 256, 258, 260, 261, 1000, 55799])
FUZZ = settings(
    max_examples=60, deadline=None, database=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck)
)


class Prober:
    """Sends requests, each on a fresh connection with a timeout, and notes every answer that is not a 4xx."""

    def __init__(self, port: int, ids: list[str]) -> None:
        self.port, self.ids, self.count = port, ids, 0
        self.bad: list[tuple[str, str, str]] = []  # (what was sent, what came back, signature for grouping)

    def _note(self, sent: str, answer: str, route: str) -> None:
        for aid in self.ids:
            route = route.replace(aid, "<id>")
        self.bad.append((sent, answer, f"{route[:60]} -> {answer[:70]}"))

    def http(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int | None:
        self.count += 1
        sent = f"{method} {path[:100]} {headers or {}} {body!r:.200}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._note(sent, f"no answer: {exc!r}", f"{method} {path.split('?')[0]}")
            return None
        finally:
            conn.close()
        if not 400 <= resp.status < 500:
            self._note(sent, f"{resp.status} {data[:120]!r}", f"{method} {path.split('?')[0]}")
        return resp.status

    def raw(self, data: bytes, half_close: bool = True) -> int | None:
        """Bytes as they are; the answer must start with an HTTP status line with a 4xx status."""
        self.count += 1
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            try:
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                resp = http.client.HTTPResponse(sock)
                resp.begin()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                self._note(f"raw {data[:200]!r}", f"no 4xx status line: {exc!r}", f"raw {data[:40]!r}")
                return None
        if not 400 <= status < 500:
            self._note(f"raw {data[:200]!r}", str(status), f"raw {data[:40]!r}")
        return status

    def report(self) -> str:
        groups: dict[str, list[tuple[str, str, str]]] = {}
        for item in self.bad:
            groups.setdefault(item[2], []).append(item)
        lines = [f"{len(self.bad)} of {self.count} hostile requests did not get a 4xx ({len(groups)} kinds):"]
        for signature, items in groups.items():
            lines.append(f"  {len(items)} x {signature}\n      e.g. {items[0][0]}\n      got {items[0][1]}")
        return "\n".join(lines)


def test_hostile_requests_get_4xx_and_the_host_survives(make_host: MakeHost) -> None:
    host = make_host("fuzz", allow_modules=ALLOW, max_body_bytes=8192)
    counter = host.create(agents.Counter, init=7)
    provider = host.create(agents_http.Provider)
    provider.send("advertise", name="svc")
    sleeper = host.create(agents.Counter, init=3)
    sleeper.deactivate(policy=DeactivationPolicy(activate_on_message=True))
    real = [counter.agent_id, provider.agent_id]
    everyone = {a["agent_id"] for a in host.list_agents("all")}
    before = {aid: call(host.port, "GET", f"/agents/{aid}/state")[1] for aid in [*real, sleeper.agent_id]}
    pids = {aid: host.agent_info(host.address, aid)["pid"] for aid in real}
    probe = Prober(host.port, [*real, sleeper.agent_id])
    ops = ["deactivate", "activate", "dispose", "dispatch", "clone", "retract"]
    body_paths = ["/hosts/join", "/agents", *[f"/agents/{aid}/{op}" for aid in real for op in ["messages", *ops]], "/agents/ghost/messages"]

    def decodes_to_map(body: bytes) -> bool:
        for loads in (json.loads, cbor2.loads):
            try:
                if isinstance(loads(body), dict):
                    return True
            except Exception:
                pass
        return False

    @FUZZ
    @given(st.sampled_from(body_paths), CONTENT_TYPES, st.binary(min_size=1, max_size=400))
    def random_bytes(path: str, ctype: str, body: bytes) -> None:
        if decodes_to_map(body):
            return
        probe.http("POST", path, body, {"Content-Type": ctype} if ctype else {})

    bad_timeout = VALUES.filter(lambda v: not (type(v) in (int, float) and 0 < v < 1))
    message = st.fixed_dictionaries(
        {"kind": NON_STR | st.just("") | st.text(min_size=257, max_size=300) | st.text(min_size=1, max_size=20).map("zz-".__add__)},
        optional={"args": VALUES, "arg": VALUES, "priority": VALUES, "message_type": VALUES, "timestamp": VALUES, "sender": VALUES,
                  "reply_to": VALUES, "message_id": VALUES, "timeout": bad_timeout, "oneway": VALUES.filter(lambda v: v is not True)},
    )  # fmt: skip

    @FUZZ
    @given(st.sampled_from(real), message, st.booleans())
    def wrong_messages(aid: str, body: dict[str, Any], cbor: bool) -> None:
        data = cbor2.dumps(body) if cbor else json.dumps(body).encode()
        probe.http("POST", f"/agents/{aid}/messages", data, {"Content-Type": CBOR if cbor else JSON})

    bad_id = (
        NON_STR.filter(lambda v: v is not None) | st.text(max_size=200).filter(lambda s: not AGENT_ID.fullmatch(s)) | st.sampled_from(real)
    )
    create = st.fixed_dictionaries({"agent_class": HOSTILE_CLASSES | NON_STR | st.text(max_size=40)}, optional={"state": VALUES, "init": VALUES, "agent_id": VALUES}) | (
        st.fixed_dictionaries({"agent_class": st.just(COUNTER), "agent_id": bad_id}, optional={"state": VALUES, "init": VALUES}))  # fmt: skip

    @FUZZ
    @given(create, st.booleans())
    def wrong_creates(body: dict[str, Any], cbor: bool) -> None:
        data = cbor2.dumps(body) if cbor else json.dumps(body).encode()
        probe.http("POST", "/agents", data, {"Content-Type": CBOR if cbor else JSON})

    peer = {"name": "fuzz-peer", "url": "http://127.0.0.1:9"}
    join = (
        st.fixed_dictionaries({"host": NON_MAP})
        | st.fixed_dictionaries({"host": st.fixed_dictionaries({"name": NON_STR, "url": st.text(max_size=20)})})
        | st.fixed_dictionaries({"host": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=9), "url": NON_STR})})
        | st.fixed_dictionaries({"host": st.fixed_dictionaries({"url": st.text(max_size=20)})})
        | st.fixed_dictionaries({"host": st.just(peer), "hosts": VALUES.filter(lambda v: not isinstance(v, list))})
        | st.fixed_dictionaries({"hosts": st.lists(st.just(peer))})
    )

    @FUZZ
    @given(join, st.booleans())
    def wrong_joins(body: dict[str, Any], cbor: bool) -> None:
        data = cbor2.dumps(body) if cbor else json.dumps(body).encode()
        probe.http("POST", "/hosts/join", data, {"Content-Type": CBOR if cbor else JSON})

    bad_request = (
        NON_MAP.filter(lambda v: v is not None)  # "request": null means no request, as for "target" and "policy"
        | st.fixed_dictionaries({"reason": NON_STR})
        | st.fixed_dictionaries({"source": NON_STR})
        | st.fixed_dictionaries({"policy": NON_MAP.filter(lambda v: v is not None)})
        | st.fixed_dictionaries(
            {"policy": st.fixed_dictionaries({"activate_on_message": VALUES.filter(lambda v: not isinstance(v, bool))})}
        )
        | st.fixed_dictionaries({"metadata": NON_MAP})
    )
    bad_ticket = (
        NON_MAP.filter(lambda v: v is not None)  # "ticket": null means no ticket
        | st.fixed_dictionaries({"destination": NON_STR})
        | st.fixed_dictionaries({"timeout": VALUES})
    )
    lifecycle = (
        st.fixed_dictionaries({"request": bad_request})
        | st.fixed_dictionaries({"ticket": bad_ticket})
        | st.fixed_dictionaries({"target": NON_STR.filter(lambda v: v is not None)})
    )

    @FUZZ
    @given(st.sampled_from(real), st.sampled_from(ops), lifecycle, st.booleans())
    def wrong_lifecycle(aid: str, op: str, body: dict[str, Any], cbor: bool) -> None:
        data = cbor2.dumps(body) if cbor else json.dumps(body).encode()
        probe.http("POST", f"/agents/{aid}/{op}", data, {"Content-Type": CBOR if cbor else JSON})

    good_bodies = [
        (f"/agents/{counter.agent_id}/messages", {"kind": "add", "args": {"by": 1000}}),
        ("/agents", {"agent_class": COUNTER, "state": {"count": 1}}),
        ("/hosts/join", {"host": peer}),
        (f"/agents/{counter.agent_id}/deactivate", {"request": {"reason": "fuzz"}}),
        (f"/agents/{provider.agent_id}/dispose", {"request": {"reason": "fuzz"}}),
    ]

    @FUZZ
    @given(st.sampled_from(good_bodies), st.data())
    def broken_cbor(case: tuple[str, dict[str, Any]], data: st.DataObject) -> None:
        path, tree = case
        encoded = cbor2.dumps(tree)
        how = data.draw(st.sampled_from(["truncate", "trailing", "tag-inside", "tag-around", "indefinite"]))
        if how == "truncate":
            body = encoded[: data.draw(st.integers(1, len(encoded) - 1))]
        elif how == "trailing":
            body = encoded + data.draw(st.binary(min_size=1, max_size=8))
        elif how == "indefinite":  # the same map, as an indefinite-length map
            body = b"\xbf" + encoded[1:] + b"\xff" if len(tree) < 24 else encoded + b"\xff"
        else:
            tag = data.draw(TAGS)
            inner = data.draw(VALUES)
            if how == "tag-around":
                body = cbor2.dumps(cbor2.CBORTag(tag, tree))
            else:
                key = next(iter(tree))
                body = cbor2.dumps({**tree, key: cbor2.CBORTag(tag, tree[key] if data.draw(st.booleans()) else inner)})
        probe.http("POST", path, body, {"Content-Type": CBOR})

    @FUZZ
    @given(st.integers(30, 3000), st.sampled_from([b"\x81", b"\xa1\x61a", b"\xd8\x1c\x81", b"\x9f"]), st.booleans())
    def deep_cbor(depth: int, opener: bytes, in_args: bool) -> None:
        leaf = opener * depth + b"\x00"
        if in_args:  # {"kind": "zz-deep", "args": {"v": <deep>}}
            body = b"\xa2" + cbor2.dumps("kind") + cbor2.dumps("zz-deep") + cbor2.dumps("args") + b"\xa1" + cbor2.dumps("v") + leaf
        else:
            body = leaf
        probe.http("POST", f"/agents/{counter.agent_id}/messages", body, {"Content-Type": CBOR})

    @FUZZ
    @given(st.integers(100, 1300), st.booleans())
    def deep_json(depth: int, lists: bool) -> None:
        leaf = ("[" * depth + "]" * depth) if lists else ('{"a":' * depth + "1" + "}" * depth)
        probe.http(
            "POST",
            f"/agents/{counter.agent_id}/messages",
            b'{"kind":"zz-deep","args":{"v":' + leaf.encode() + b"}}",
            {"Content-Type": JSON},
        )

    @FUZZ
    @given(
        st.sampled_from(["messages-args", "create-state", "top"]),
        st.dictionaries(st.integers() | st.binary(max_size=4) | st.booleans(), VALUES, min_size=1, max_size=3),
    )
    def non_string_keys(where: str, odd: dict[Any, Any]) -> None:
        if where == "messages-args":
            path, tree = f"/agents/{counter.agent_id}/messages", {"kind": "zz-keys", "args": odd}
        elif where == "create-state":
            path, tree = "/agents", {"agent_class": COUNTER, "state": odd}
        else:
            path, tree = "/agents", odd
        probe.http("POST", path, cbor2.dumps(tree), {"Content-Type": CBOR})

    @FUZZ
    @given(
        st.text(min_size=1, max_size=300).filter(lambda s: s not in real),
        st.sampled_from(["", "/state", "/messages", *(f"/{op}" for op in ops)]),
    )
    def unknown_ids(aid: str, suffix: str) -> None:
        path = f"/agents/{urllib.parse.quote(aid, safe='')}{suffix}"
        if suffix == "/messages":
            probe.http("POST", path, b'{"kind": "add"}', {"Content-Type": JSON})
        elif suffix:
            probe.http("GET" if suffix == "/state" else "POST", path, b"{}" if suffix != "/state" else None, {"Content-Type": JSON})
        else:
            probe.http("GET", path)

    bad_int = st.text(min_size=1, max_size=20).filter(lambda s: not re.fullmatch(r"-?\d{1,12}", s))
    bad_state = st.text(min_size=1, max_size=20).filter(lambda s: s not in ("active", "inactive", "all"))

    @FUZZ
    @given(st.sampled_from(["since", "limit", "state"]), bad_int, bad_state)
    def wrong_queries(which: str, number: str, state: str) -> None:
        if which == "state":
            probe.http("GET", f"/agents?state={urllib.parse.quote(state)}")
        else:
            probe.http("GET", f"/events?{which}={urllib.parse.quote(number)}")

    for fuzz in (random_bytes, wrong_messages, wrong_creates, wrong_joins, wrong_lifecycle, broken_cbor, deep_cbor, deep_json,
                 non_string_keys, unknown_ids, wrong_queries):  # fmt: skip
        fuzz()

    # hand-written: CBOR bombs, odd JSON, bad URLs, bodies that are too big
    cid = counter.agent_id
    msgs = f"/agents/{cid}/messages"
    shared_bomb = bytes.fromhex("d81c82d81d00d81d00") * 8
    for body in [
        b"\xd8\x1c" + b"\x82\xd8\x1d\x00\xd8\x1d\x00",  # shared references (tags 28/29)
        b"\xa1\x64kind" + b"\xd8\x1c\x63add",
        b"\x82" + shared_bomb[:9] + shared_bomb[9:18],
        b"\xd8\x18\x45\xa1\x64kind",  # embedded CBOR (tag 24)
        b"\xc2\x49\x01" + b"\x00" * 8,  # bignum
        b"\xd9\x01\x02\x81\x01",  # a set (tag 258)
        b"\xd8\x23\x63a.*",  # a regex (tag 35)
        b"\xd8\x24\x63abc",  # a MIME message (tag 36)
        b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # a byte string of 2**64-1 bytes
        b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",  # an array of 2**32 items
        b"\xbb\x00\x00\x00\x00\x10\x00\x00\x00",  # a map of 2**28 pairs
        b"\xa1\x64kind\xf7",  # undefined
        b"\xa1\x64kind\xf8\xff",  # simple value 255
        b"\xa1\x64kind\x7f\x63add\xff",  # indefinite text
        b"\xa1\x64kind\x63ad",  # truncated
        b"\xff",
        b"\x1c",  # reserved additional info
        b"",  # an empty body is no message
    ]:
        probe.http("POST", msgs, body, {"Content-Type": CBOR})
    for body in [b'{"kind": "add", "args": {"by": 1}', b'{"kind": "add"}{"kind": "add"}', b'{"kind": "add", "priority": 1e999}', b'{"kind": "add", "priority": 5.0}',
                 b'{"kind": "add", "args": {"by": 1}, "message_type": 7}', b'{"kind": "add", "timestamp": NaN}', b'{"kind": "add", "args": {"by": {"$bytes": "!!"}}}',
                 b'{"kind": "add", "args": {"by": {"$int": "9" * 5000}}}', b'{"kind": "add", "args": [1, 2]}', b'{"kind": "add", "args": {"$map": 5}}',
                 b'{"kind": "add", "args": {"by": {"$nope": 1}}}', b'{"kind": "add", "sender": 5}', b'{"kind": ["add"]}', b'["kind", "add"]', b'"add"', b"null",
                 b'{"kind": "add", "priority": 99}', b'{"kind": "add", "priority": -1}', b'{"kind": "add", "priority": true}', b'{"kind": "add", "timeout": -1}',
                 b'{"kind": "add", "timeout": "soon"}', b'{"kind": "add", "timeout": 1e9}', "\ufeff{\"kind\": \"add\"".encode(), b'{"kind": "\xff"}']:  # fmt: skip
        probe.http("POST", msgs, body, {"Content-Type": JSON})
    for url in ["", " ", "not a url", "ftp://example.com", "javascript:alert(1)", "http://", "http://[::1", "file:///etc/passwd", "http://exa mple.com:80",
                "http://127.0.0.1:99999", "\x00"]:  # fmt: skip
        probe.http("POST", "/hosts/join", json.dumps({"host": {"name": "odd", "url": url}}).encode(), {"Content-Type": JSON})
    for path, tree in [(f"/agents/{cid}/deactivate", {"target": "somewhere"}), (f"/agents/{cid}/deactivate", {"ticket": {"destination": "http://127.0.0.1:9"}}),
                       (f"/agents/{cid}/clone", {"target": "no-such-host"}), (f"/agents/{cid}/dispatch", {"target": "no-such-host"}),
                       (f"/agents/{cid}/retract", {"target": "no-such-host"}), (f"/agents/{cid}/dispatch", {}), (f"/agents/{cid}/retract", {}),
                       ("/agents", {"agent_class": COUNTER, "state": {"count": 1}, "agent_id": "x" * 129}), ("/agents", {"state": {}}), ("/agents", {})]:  # fmt: skip
        probe.http("POST", path, json.dumps(tree).encode(), {"Content-Type": JSON})
    too_big = json.dumps({"kind": "add", "args": {"pad": "x" * 9000}}).encode()
    probe.http("POST", msgs, too_big, {"Content-Type": JSON})
    probe.http("POST", "/agents", too_big, {"Content-Type": JSON})
    probe.http("POST", "/hosts/join", too_big, {"Content-Type": CBOR})
    # methods and paths that do not exist, path tricks
    for method in ["DELETE", "PUT", "PATCH", "OPTIONS", "TRACE", "FOO"]:
        for path in ["/health", "/agents", f"/agents/{cid}", f"/agents/{cid}/messages", "/hosts/join", "/events"]:
            probe.http(method, path)
    for path in ["/agents/../health", "/agents/%2e%2e/health", "/agents/%2e%2e%2fhealth", f"/agents/{cid}/../../health", "/./health", "/health/",
                 "/agents/" + "a" * 5000, "/agents/" + "a" * 5000 + "/state", "/agents/a%00b", f"/agents/{cid}%00/state", "/agents/%ff%fe",
                 "/agents/%252e%252e", "/%2fetc%2fpasswd", "/agents/.", "/agents/..", "/agents/-x", "/agents/%20", "/nope", "/" + "x" * 8000,
                 f"/agents/{cid}/state/", f"/agents/{cid}/nope", "/agents/x/y/z/state", "/events?since=1e3", "/events?limit=99999999999999",
                 "/events?since=0x10", "/agents?state=ALL", "/agents?state=active%00"]:  # fmt: skip
        probe.http("GET", path)
    for op in ["messages", *ops]:
        probe.http("GET", f"/agents/{cid}/{op}")  # POST-only routes
    # raw bytes on the socket: framing the server must refuse with a 4xx status line
    head = f"POST {msgs} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for data in [
        (head + 'Transfer-Encoding: chunked\r\n\r\nf\r\n{"kind": "add"}\r\n0\r\n\r\n').encode(),
        (head + 'Transfer-Encoding: chunked\r\nContent-Length: 15\r\n\r\nf\r\n{"kind": "add"}\r\n0\r\n\r\n').encode(),
        (head + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n").encode(),
        (head + 'Content-Length: 15\r\nContent-Length: 16\r\n\r\n{"kind": "add"} ').encode(),
        (head + "Content-Length: -1\r\n\r\n").encode(),
        (head + "Content-Length: 1e3\r\n\r\n").encode(),
        (head + 'Content-Length: 0x0f\r\n\r\n{"kind": "add"}').encode(),
        head.encode() + b"Content-Length: \xb2\r\n\r\nab",  # a digit to str.isdigit(), not to int()
        head.encode() + b'Content-Length: \xd9\xa1\xd9\xa5\r\n\r\n{"kind": "add"}',  # Arabic-Indic digits
        (head + 'Content-Length: 100\r\n\r\n{"kind": "add"}').encode(),  # shorter than announced
        (head + "Content-Length: 99999999999999999999999999\r\n\r\n").encode(),
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",  # a TLS ClientHello
        b"GET /health HTTP/1.1 extra\r\n\r\n",
        b"GET /health HTTP/1.x\r\n\r\n",
        b"GET /hea\x00lth HTTP/1.1\r\n\r\n",
        f"GET /agents/{cid}\x00/state HTTP/1.1\r\n\r\n".encode(),
        b"GET /agents/\xff\xfe HTTP/1.1\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",  # request line too long
        b"GET /health HTTP/1.1\r\nX-Long: " + b"b" * 70000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n",
        b"GET http://evil.example/agents/ghost HTTP/1.1\r\n\r\n",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
        (f"POST /agents HTTP/1.1\r\nExpect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n").encode(),
    ]:
        probe.raw(data)

    assert probe.count >= 500, probe.count
    assert not probe.bad, probe.report()

    # still healthy, every paglet intact: same set, same workers, same state
    assert call(host.port, "GET", "/health")[1]["status"] == "ok"
    assert {a["agent_id"] for a in host.list_agents("all")} == everyone  # nothing created, nothing lost
    for aid in real:
        info = host.agent_info(host.address, aid)
        assert info["active"] and info["pid"] == pids[aid], info
    assert host.agent_info(host.address, sleeper.agent_id)["active"] is False
    after = {aid: call(host.port, "GET", f"/agents/{aid}/state")[1] for aid in [*real, sleeper.agent_id]}
    assert after == before
    assert counter.send("add") == 8


def test_oversized_body_is_refused_before_it_is_read(make_host: MakeHost) -> None:
    host = make_host("small", max_body_bytes=1024)
    counter = host.create(agents.Counter)
    msgs = f"/agents/{counter.agent_id}/messages"
    # A terabyte announced, nothing sent: the 413 must come back while the body is still "on its way".
    with socket.create_connection(("127.0.0.1", host.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"POST {msgs} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {10**12}\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 413
        assert json.loads(resp.read())["error"] == "PayloadTooLargeError"
    # the limit is exact: 1024 bytes pass, 1025 do not
    body = json.dumps({"kind": "echo", "args": {"value": ""}}).encode()
    fits = body[:-2] + b" " * (1024 - len(body)) + body[-2:]
    assert len(fits) == 1024
    assert request(host.port, "POST", msgs, fits, {"Content-Type": JSON})[0] == 200
    status, _, data = request(host.port, "POST", msgs, fits + b" ", {"Content-Type": JSON})
    assert status == 413 and json.loads(data)["error"] == "PayloadTooLargeError"
    # chunked bodies are refused (their size is not known up front)
    with socket.create_connection(("127.0.0.1", host.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"POST {msgs} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert 400 <= resp.status < 500
    assert counter.send("get") == 0
    assert HostClient().health(host.address)["status"] == "ok"


# -- review regressions ------------------------------------------------------------------------------
def test_chunked_request_gets_411_and_its_body_is_never_a_request(make_host: MakeHost) -> None:
    host = make_host("alpha")
    counter = host.create(agents.Counter)
    inner = f'POST /agents/{counter.agent_id}/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{{"kind": "add"}}'
    outer = "POST /hosts/join HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = (outer + f"{len(inner):x}\r\n{inner}\r\n0\r\n\r\n").encode()
    received = b""
    with socket.create_connection(("127.0.0.1", host.port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):  # until the server closes the connection (a timeout fails the test)
            received += chunk
    assert received.startswith(b"HTTP/1.1 411 "), received[:200]
    assert received.count(b"HTTP/1.") == 1, received  # one answer, then the connection was closed
    assert counter.send("get") == 0  # the smuggled message never ran
