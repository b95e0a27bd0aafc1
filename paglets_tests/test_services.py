"""Services (SPEC sections 2-4, issue 6): the registry (local and mesh), typed contracts, leases,
resident services (lazy, eager, launch files), the built-in server-info service with the `info`
command, per-paglet resource figures and the per-paglet memory limit.  Real hosts on loopback
ports, real worker processes, real `serve` subprocesses."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import paglets
from paglets import (
    SERVER_INFO_CONTRACT,
    HostClient,
    HostError,
    InvalidAgentError,
    Message,
    PagletContext,
    PagletCrashedError,
    PagletProxyRef,
    ResidentLifecycle,
    ResidentService,
    ServerInfoReply,
    ServerInfoRequest,
    ServiceContractError,
    ServiceHandle,
    ServiceNotFoundError,
    ServiceRecord,
    ServiceScope,
)
from paglets_tests import agents
from paglets_tests.agents_services import (
    CALC_V1,
    CALC_V2,
    MIB,
    TALLY_B,
    TALLY_C,
    TALLY_CONTRACT,
    AddReply,
    AddRequest,
    Advertiser,
    BumpRequest,
    CalcProvider,
    ContractCaller,
    HistoryReply,
    Hog,
    LimitedHog,
    RecordRequest,
    RunHog,
    RunHogState,
    SelfAdvertiser,
    Tally,
    TallyReply,
    TallyState,
)
from paglets_tests.conftest import PAGLETS_PY, ROOT, process_gone, wait_until

MakeHost = Callable[..., paglets.Host]
TIMEOUT = 10.0
SERVER_INFO_ID = "service.server-info"


# -- helpers ---------------------------------------------------------------------------------------
def http_json(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One JSON request to a host URL; (status, decoded body)."""
    hostport = url.split("://", 1)[1].rstrip("/")
    conn = http.client.HTTPConnection(hostport, timeout=TIMEOUT)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def advertise(proxy: paglets.PagletProxy, name: str, **args: Any) -> ServiceRecord:
    return proxy.send(Message("advertise", {"name": name, **args}))


def ids(records: list[ServiceRecord]) -> set[tuple[str, str]]:
    return {(r.host_url, r.agent_id) for r in records}


def active_ids(host: paglets.Host) -> set[str]:
    return {info["agent_id"] for info in host.list_agents("active")}


def all_ids(host: paglets.Host) -> set[str]:
    return {info["agent_id"] for info in host.list_agents("all")}


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(PAGLETS_PY), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))


def calc_provider(host: paglets.Host, version: str = "1", scope: str = "local") -> paglets.PagletProxy:
    """A started CalcProvider that advertised its contract."""
    proxy = host.create(CalcProvider, init={"version": version})
    record = proxy.send(Message("advertise", {"scope": scope}))
    assert record.name == "calc" and record.agent_id == proxy.agent_id
    return proxy


def mesh_of(*hosts: paglets.Host) -> None:
    """Wait until every host knows every other one as online."""
    urls = {h.address for h in hosts}
    for host in hosts:
        wait_until(lambda host=host: urls <= {ref.url for ref in host.available_hosts(online_only=True)}, timeout=15)


# ==== 1. the registry ============================================================================
def test_advertise_from_inside_lookup_by_name_and_capability_and_unadvertise(host: paglets.Host) -> None:
    adv = host.create(Advertiser)
    record = advertise(adv, "weather", capabilities=["forecast", "radar"], metadata={"unit": "C", "max": 3})
    assert isinstance(record, ServiceRecord)
    assert (record.name, record.agent_id, record.host_url) == ("weather", adv.agent_id, host.address)
    assert record.capabilities == ("forecast", "radar")
    assert record.metadata == {"unit": "C", "max": 3}
    assert record.scope is ServiceScope.LOCAL and record.expires_at is None
    assert record.proxy == PagletProxyRef(host.address, adv.agent_id)
    other = host.create(Advertiser)
    advertise(other, "tides", capabilities=["forecast"])

    assert [r.agent_id for r in host.lookup_services("weather")] == [adv.agent_id]
    assert [r.agent_id for r in host.lookup_services("weather", "radar")] == [adv.agent_id]
    assert host.lookup_services("weather", "tides") == []
    assert host.lookup_services("nothing") == []
    assert {r.name for r in host.lookup_services(capability="forecast")} == {"weather", "tides"}
    assert {"weather", "tides"} <= {r.name for r in host.lookup_services()}
    # From inside a paglet (through its worker): the same answers.
    found = other.send(Message("lookup", {"name": "weather", "capability": "forecast"}))
    assert [(r.name, r.agent_id, r.capabilities) for r in found] == [("weather", adv.agent_id, ("forecast", "radar"))]
    assert other.send(Message("lookup-one", {"name": "weather"})) == PagletProxyRef(host.address, adv.agent_id)
    assert other.send(Message("lookup-one", {"name": "weather", "capability": "sonar"})) is None

    removed = adv.send(Message("unadvertise", {"name": "weather"}))
    assert [(r.name, r.agent_id) for r in removed] == [("weather", adv.agent_id)]
    assert host.lookup_services("weather") == []
    assert [r.agent_id for r in host.lookup_services("tides")] == [other.agent_id]
    assert adv.send(Message("unadvertise", {"name": "weather"})) == []


def test_context_of_embedding_app_advertises_with_agent_id(host: paglets.Host) -> None:
    counter = host.create(agents.Counter)
    ctx = PagletContext(host)
    record = ctx.advertise_service("counting", ["add", "get"], {"v": 1}, ServiceScope.LOCAL, None, agent_id=counter.agent_id)
    assert (record.agent_id, record.capabilities, record.metadata) == (counter.agent_id, ("add", "get"), {"v": 1})
    ref = ctx.lookup_service("counting", "add")
    assert ref == PagletProxyRef(host.address, counter.agent_id)
    assert ref.resolve(ctx).send(Message("add", {"by": 4})) == 4
    assert [r.agent_id for r in ctx.lookup_services("counting")] == [counter.agent_id]
    with pytest.raises(HostError, match="agent_id"):
        ctx.advertise_service("counting")  # not attached to a paglet and no agent_id=
    with pytest.raises(InvalidAgentError):
        ctx.advertise_service("ghost", agent_id="no-such-paglet")
    assert ctx.lookup_services("ghost") == []
    attached = PagletContext(host, agent_id=counter.agent_id)
    attached.advertise_service("counting-2", ["get"])
    assert [r.agent_id for r in host.lookup_services("counting-2")] == [counter.agent_id]
    assert [r.name for r in ctx.unadvertise_service("counting", agent_id=counter.agent_id)] == ["counting"]
    assert ctx.lookup_service("counting") is None
    assert attached.unadvertise_service("counting-2")[0].name == "counting-2"
    assert host.lookup_services("counting-2") == []


def test_ttl_expiry(make_host: MakeHost) -> None:
    host = make_host("alpha", housekeeping_interval=0.2)
    adv = host.create(Advertiser)
    before = time.time()
    short = advertise(adv, "short-lived", ttl=0.6)
    advertise(adv, "long-lived", ttl=600)
    advertise(adv, "forever")
    assert short.expires_at is not None and before + 0.5 <= short.expires_at <= time.time() + 0.7
    assert [r.agent_id for r in host.lookup_services("short-lived")] == [adv.agent_id]
    wait_until(lambda: host.lookup_services("short-lived") == [], timeout=10)
    assert time.time() >= short.expires_at
    names = {r["name"] for r in http_json(host.address, "GET", "/services")[1]["services"]}
    assert "short-lived" not in names and {"long-lived", "forever"} <= names


def test_records_go_when_owner_is_disposed_or_moves_away(make_host: MakeHost) -> None:
    alpha, beta = make_host("alpha"), make_host("beta")
    staying, leaving, disposed = alpha.create(Advertiser), alpha.create(Advertiser), alpha.create(Advertiser)
    for proxy in (staying, leaving, disposed):
        advertise(proxy, "svc", capabilities=["x"], scope="mesh")
        advertise(proxy, "svc-2")
    assert {r.agent_id for r in alpha.lookup_services("svc")} == {staying.agent_id, leaving.agent_id, disposed.agent_id}

    disposed.dispose()
    assert {r.agent_id for r in alpha.lookup_services("svc")} == {staying.agent_id, leaving.agent_id}
    assert disposed.agent_id not in {r.agent_id for r in alpha.lookup_services()}

    moved = alpha.dispatch(leaving.agent_id, beta.address)
    assert moved.send(Message("whoami"))["host"] == "beta"
    assert {r.agent_id for r in alpha.lookup_services("svc")} == {staying.agent_id}
    assert leaving.agent_id not in {r.agent_id for r in alpha.lookup_services()}
    assert leaving.agent_id not in {r.agent_id for r in alpha.lookup_services("svc", scope=ServiceScope.MESH)}
    names = {(r["name"], r["agent_id"]) for r in http_json(alpha.address, "GET", "/services")[1]["services"]}
    assert ("svc", leaving.agent_id) not in names and ("svc", staying.agent_id) in names


def test_advertise_from_on_creation(host: paglets.Host) -> None:
    """The natural place for a provider to advertise is its on_creation hook."""
    born = host.create(SelfAdvertiser)
    assert [(r.agent_id, r.metadata) for r in host.lookup_services("self-service")] == [(born.agent_id, {"at": "alpha"})]
    assert born.send(Message("whoami"))["calls"] == 1


def test_advertise_from_on_arrival_after_a_move(make_host: MakeHost) -> None:
    """Records stay behind when a paglet moves; it advertises again in on_arrival on the new host."""
    alpha = make_host("alpha", hook_timeout=2.0)
    beta = make_host("beta", hook_timeout=2.0)  # a hook that hangs fails in 2 s, not 30
    quiet = alpha.create(SelfAdvertiser, init="quiet")
    assert alpha.lookup_services("self-service") == []
    moved = alpha.dispatch(quiet.agent_id, beta.address)
    assert moved.send(Message("whoami"))["host"] == "beta"
    assert [(r.agent_id, r.metadata) for r in beta.lookup_services("self-service")] == [(quiet.agent_id, {"at": "beta"})]
    assert alpha.lookup_services("self-service") == []


def test_get_services_over_http_with_filters(host: paglets.Host) -> None:
    one, two = host.create(Advertiser), host.create(Advertiser)
    advertise(one, "maps", capabilities=["route", "tiles"], metadata={"zoom": 12}, scope="mesh")
    advertise(two, "maps", capabilities=["tiles"])
    advertise(two, "clock", capabilities=["now"], scope="mesh")

    def query(path: str) -> set[tuple[str, str]]:
        status, body = http_json(host.address, "GET", path)
        assert status == 200, body
        return {(item["name"], item["agent_id"]) for item in body["services"]}

    every = query("/services")
    assert {("maps", one.agent_id), ("maps", two.agent_id), ("clock", two.agent_id)} <= every
    assert query("/services?name=maps") == {("maps", one.agent_id), ("maps", two.agent_id)}
    assert query("/services?name=maps&capability=route") == {("maps", one.agent_id)}
    assert query("/services?capability=now") == {("clock", two.agent_id)}
    assert query("/services?name=maps&scope=mesh") == {("maps", one.agent_id)}
    assert query("/services?name=maps&scope=local") == {("maps", two.agent_id)}
    assert query("/services?name=nothing") == set()
    status, body = http_json(host.address, "GET", "/services?name=maps&capability=route")
    assert status == 200
    item = ServiceRecord.from_wire(body["services"][0])
    assert (item.capabilities, item.metadata, item.scope, item.host_url) == (
        ("route", "tiles"),
        {"zoom": 12},
        ServiceScope.MESH,
        host.address,
    )
    assert item.proxy == PagletProxyRef(host.address, one.agent_id)
    client = HostClient(timeout=TIMEOUT)
    try:
        assert {r.agent_id for r in client.services(host.address, "maps", "tiles")} == {one.agent_id, two.agent_id}
    finally:
        client.close()


def test_record_proxy_resolves_through_host_context_client_and_paglet(make_host: MakeHost) -> None:
    alpha, beta = make_host("alpha"), make_host("beta")
    provider = alpha.create(Advertiser)
    advertise(provider, "echo", capabilities=["whoami"])
    record = alpha.lookup_services("echo")[0]
    assert record.proxy is not None
    assert record.proxy.resolve(alpha).send(Message("whoami"))["calls"] == 1
    assert record.proxy.resolve(PagletContext(alpha)).send(Message("whoami"))["calls"] == 2
    client = HostClient(timeout=TIMEOUT)
    try:
        remote = client.services(alpha.address, "echo")[0]
        proxy = remote.proxy.resolve(client)
        assert proxy.send(Message("whoami")) == {"agent_id": provider.agent_id, "host": "alpha", "calls": 3}
    finally:
        client.close()
    # Through the worker's context: a caller on the same host, and one on another host.
    local_caller, remote_caller = alpha.create(Advertiser), beta.create(Advertiser)
    assert local_caller.send(Message("call-ref", {"ref": record.proxy}))["calls"] == 4
    assert remote_caller.send(Message("call-ref", {"ref": record.proxy})) == {"agent_id": provider.agent_id, "host": "alpha", "calls": 5}
    assert record.proxy.resolve(PagletContext(beta)).send(Message("whoami"))["calls"] == 6


def test_mesh_lookup_across_three_hosts_and_with_one_stopped(make_host: MakeHost) -> None:
    knobs = {"gossip_interval": 0.2, "mesh_lookup_timeout": 1.0}
    alpha = make_host("alpha", **knobs)
    beta = make_host("beta", peers=[alpha.address], **knobs)
    gamma = make_host("gamma", peers=[alpha.address], **knobs)
    mesh_of(alpha, beta, gamma)
    a_local = alpha.create(Advertiser)
    b_mesh, b_local, c_mesh = beta.create(Advertiser), beta.create(Advertiser), gamma.create(Advertiser)
    advertise(a_local, "weather", capabilities=["forecast"])
    advertise(b_mesh, "weather", capabilities=["forecast", "radar"], scope="mesh")
    advertise(b_local, "weather", capabilities=["forecast", "radar"])
    advertise(c_mesh, "weather", capabilities=["forecast"], scope="mesh")

    want = {(alpha.address, a_local.agent_id), (beta.address, b_mesh.agent_id), (gamma.address, c_mesh.agent_id)}
    assert ids(alpha.lookup_services("weather", scope=ServiceScope.MESH)) == want
    assert ids(PagletContext(alpha).lookup_services("weather", scope=ServiceScope.MESH)) == want
    assert ids(alpha.lookup_services("weather", "radar", ServiceScope.MESH)) == {(beta.address, b_mesh.agent_id)}
    assert ids(alpha.lookup_services("weather")) == {(alpha.address, a_local.agent_id)}  # LOCAL: this host only
    # From inside a paglet on alpha.
    caller = alpha.create(Advertiser)
    assert ids(caller.send(Message("lookup", {"name": "weather", "scope": "mesh"}))) == want
    # Every host offers server-info with MESH scope, so a mesh lookup finds all three.
    infos = alpha.lookup_services(SERVER_INFO_CONTRACT.name, scope=ServiceScope.MESH)
    assert {(r.host_url, r.agent_id) for r in infos} == {(h.address, SERVER_INFO_ID) for h in (alpha, beta, gamma)}
    handle = next(h for h in PagletContext(alpha).lookup_contracts(SERVER_INFO_CONTRACT, scope=ServiceScope.MESH)
                  if h.record.host_url == beta.address)  # fmt: skip
    assert handle.call("info", ServerInfoRequest()).host_name == "beta"

    gamma.stop()
    for _ in range(3):  # several lookups, so more than one of alpha's connections to gamma is tried
        started = time.monotonic()
        found = alpha.lookup_services("weather", scope=ServiceScope.MESH)
        assert time.monotonic() - started < 3.0
        assert ids(found) == {(alpha.address, a_local.agent_id), (beta.address, b_mesh.agent_id)}


def test_a_stopped_host_answers_no_more_service_lookups(make_host: MakeHost) -> None:
    """After stop(), a client that talked to the host before gets an error, not the stopped host's records."""
    gamma = make_host("gamma")
    adv = gamma.create(Advertiser)
    advertise(adv, "weather", scope="mesh")
    client = HostClient(timeout=TIMEOUT)
    try:
        assert [r.agent_id for r in client.services(gamma.address, "weather")] == [adv.agent_id]
        gamma.stop()
        with pytest.raises(paglets.RemoteHostError):
            client.services(gamma.address, "weather")
        with pytest.raises(paglets.RemoteHostError):
            client.health(gamma.address)
    finally:
        client.close()


def test_mesh_lookup_with_a_hung_host_answers_within_the_timeout(make_host: MakeHost, serve: Callable[..., Any]) -> None:
    knobs = {"gossip_interval": 0.2, "mesh_lookup_timeout": 1.0}
    alpha = make_host("alpha", **knobs)
    beta = make_host("beta", peers=[alpha.address], **knobs)
    hung = serve("hung", extra=["--peer", alpha.address]).start()
    alpha.mesh.join(hung.url)  # at once: serve's first gossip comes only after its 5 s gossip interval
    mesh_of(alpha, beta)
    assert hung.url in {ref.url for ref in alpha.available_hosts(online_only=True)}
    b_mesh = beta.create(Advertiser)
    advertise(b_mesh, "weather", scope="mesh")
    client = HostClient(timeout=TIMEOUT)
    try:
        far = client.create(hung.url, "paglets_tests.agents_services:Advertiser")
        far.send(Message("advertise", {"name": "weather", "scope": "mesh"}))
    finally:
        client.close()
    assert ids(alpha.lookup_services("weather", scope=ServiceScope.MESH)) == {(beta.address, b_mesh.agent_id), (hung.url, far.agent_id)}

    os.kill(hung.proc.pid, signal.SIGSTOP)  # the host accepts connections (the kernel does) but never answers
    try:
        started = time.monotonic()
        found = alpha.lookup_services("weather", scope=ServiceScope.MESH)
        elapsed = time.monotonic() - started
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    assert elapsed < 3.0, elapsed
    assert ids(found) == {(beta.address, b_mesh.agent_id)}


# ==== 2. typed contracts =========================================================================
def test_contract_call_oneway_and_capabilities(make_host: MakeHost) -> None:
    host = make_host("alpha")
    provider = calc_provider(host)
    record = host.lookup_services("calc")[0]
    assert record.agent_id == provider.agent_id
    assert record.capabilities == CALC_V1.capabilities == ("add", "record", "history", "broken")
    assert record.metadata["region"] == "test"
    assert record.metadata[paglets.CONTRACT_METADATA_KEY]["version"] == "1"
    assert [r.agent_id for r in host.lookup_services(capability="history")] == [provider.agent_id]

    ctx = PagletContext(host)
    handle = ctx.require_contract(CALC_V1)
    assert isinstance(handle, ServiceHandle) and handle.record.agent_id == provider.agent_id
    reply = handle.call("add", AddRequest(2, 3, "hi"))
    assert reply == AddReply(5, "hi") and type(reply) is AddReply
    assert handle.call(CALC_V1.operations[0], AddRequest(-1, 1)) == AddReply(0, "")
    op = CALC_V1.operation_for("history")
    assert ctx.lookup_contract(CALC_V1, op).record.agent_id == provider.agent_id
    assert [h.record.agent_id for h in ctx.lookup_contracts(CALC_V1)] == [provider.agent_id]

    assert handle.send_oneway("record", RecordRequest("first")) is None
    handle.send_oneway(CALC_V1.operation_for("record"), RecordRequest("second"))
    wait_until(lambda: handle.call("history").items == ["first", "second"])
    assert handle.call("history") == HistoryReply(["first", "second"], provider.agent_id)

    # Through a HostClient, and from inside another paglet (its worker's context).
    client = HostClient(timeout=TIMEOUT)
    try:
        assert ServiceHandle(CALC_V1, client.services(host.address, "calc")[0], client).call("add", AddRequest(40, 2)).total == 42
    finally:
        client.close()
    caller = host.create(ContractCaller)
    assert caller.send(Message("add", {"a": 7, "b": 8})) == {"total": 15, "type": "AddReply", "provider": provider.agent_id}


def test_contract_validation_through_a_service_handle(host: paglets.Host) -> None:
    provider = calc_provider(host)
    handle = PagletContext(host).require_contract(CALC_V1)
    # A request field of the wrong type is refused before it leaves.
    with pytest.raises(ServiceContractError, match=r"add request\.a\b"):
        handle.call("add", AddRequest("two", 3))  # type: ignore[arg-type]
    with pytest.raises(ServiceContractError, match=r"add request\.b\b"):
        handle.call("add", AddRequest(2, True))  # a bool is not an int
    with pytest.raises(ServiceContractError, match=r"add request\.note\b"):
        handle.call("add", AddRequest(2, 3, note=5))  # type: ignore[arg-type]
    with pytest.raises(ServiceContractError, match="AddRequest"):
        handle.call("add", RecordRequest("not the request type"))
    with pytest.raises(ServiceContractError, match="nope"):
        handle.call("nope", AddRequest(1, 2))
    with pytest.raises(ServiceContractError, match=r"record request\.text\b"):
        handle.send_oneway("record", RecordRequest(17))  # type: ignore[arg-type]
    # A handler returning the wrong reply type: the provider refuses to send it.
    with pytest.raises(ServiceContractError, match=r"broken reply\.total\b"):
        handle.call("broken", AddRequest(1, 2))
    # A provider that answers a map that does not fit: the caller checks the reply too.
    for raw, pattern in (
        ({"note": "no total"}, r"'total'.*missing"),
        ({"total": 3, "extra": 1}, r"unknown field 'extra'"),
        ({"total": "3"}, r"add reply\.total\b"),
    ):
        assert provider.send(Message("set-raw", {"reply": raw})) is True
        with pytest.raises(ServiceContractError, match=pattern):
            handle.call("add", AddRequest(1, 2))
    provider.send(Message("set-raw", {"reply": None}))
    assert handle.call("add", AddRequest(1, 2)) == AddReply(3)
    assert handle.call("history").items == []  # the refused oneway never arrived


def test_contract_validation_of_hand_made_messages(host: paglets.Host) -> None:
    provider = calc_provider(host)
    cases = [
        (Message("add", {"a": "x", "b": 1}), r"add request\.a\b"),
        (Message("add", {"a": 1, "b": False}), r"add request\.b\b"),
        (Message("add", {"a": 1}), r"field 'b'.*missing"),
        (Message("add", {"a": 1, "b": 2, "c": 3}), r"unknown field 'c'"),
        (Message("record", {"text": ["list"]}), r"record request\.text\b"),
        (Message("broken", {"a": 1, "b": 2}), r"broken reply\.total\b"),
    ]
    client = HostClient(timeout=TIMEOUT)
    try:
        for message, pattern in cases:
            with pytest.raises(ServiceContractError, match=pattern):
                provider.send(Message(message.kind, dict(message.args)))
            with pytest.raises(ServiceContractError, match=pattern):  # the same over HTTP, same class
                client.send_message(host.address, provider.agent_id, Message(message.kind, dict(message.args)))
    finally:
        client.close()
    assert provider.send(Message("add", {"a": 1, "b": 2})) == {"total": 3, "note": ""}  # travels as a map of fields
    assert provider.send(Message("add", {"a": 1, "b": 2, "note": None}))["total"] == 3
    assert provider.send(Message("history")) == {"items": [], "provider": provider.agent_id}


def test_require_contract_not_found_and_version_matching(host: paglets.Host) -> None:
    ctx = PagletContext(host)
    with pytest.raises(ServiceNotFoundError, match="calc"):
        ctx.require_contract(CALC_V1)
    assert issubclass(ServiceNotFoundError, ServiceContractError)
    plain = host.create(Advertiser)
    advertise(plain, "calc", capabilities=list(CALC_V1.capabilities))  # the name, but no contract
    assert ctx.lookup_contract(CALC_V1) is None
    with pytest.raises(ServiceNotFoundError):
        ctx.require_contract(CALC_V1)

    v2 = calc_provider(host, "2")
    assert host.lookup_services("calc", "add") and len(host.lookup_services("calc")) == 2
    assert ctx.lookup_contract(CALC_V1) is None and ctx.lookup_contracts(CALC_V1) == []
    with pytest.raises(ServiceNotFoundError):
        ctx.require_contract(CALC_V1)
    caller = host.create(ContractCaller)
    with pytest.raises(ServiceNotFoundError):
        caller.send(Message("add", {"a": 1, "b": 2, "version": "1"}))
    assert caller.send(Message("find", {"version": "1"})) is None
    handle = ctx.require_contract(CALC_V2)
    assert handle.record.agent_id == v2.agent_id
    assert handle.call("add", AddRequest(2, 2)) == AddReply(4)
    assert caller.send(Message("add", {"a": 1, "b": 2, "version": "2"}))["provider"] == v2.agent_id

    v1 = calc_provider(host)
    assert [h.record.agent_id for h in ctx.lookup_contracts(CALC_V1)] == [v1.agent_id]
    assert [h.record.agent_id for h in ctx.lookup_contracts(CALC_V2)] == [v2.agent_id]
    with pytest.raises(ServiceContractError):
        ctx.lookup_contract(CALC_V1, paglets.ServiceOperation("nope", AddRequest, AddReply))


# ==== 3. leases and resident services =====================================================================
def test_lazy_resident_discoverable_before_it_runs_idles_out_and_comes_back(make_host: MakeHost) -> None:
    spec = ResidentService(
        Tally, "svc.x", ResidentLifecycle.LAZY, ServiceScope.LOCAL, idle_timeout=0.5, state=TallyState(count=100, label="initial")
    )
    host = make_host("alpha", resident_services=[spec], housekeeping_interval=0.2)
    record = host.lookup_services("tally")[0]
    assert (record.agent_id, record.capabilities) == ("svc.x", ("bump",))
    assert "svc.x" not in all_ids(host)  # no worker and no agent row yet
    status, body = http_json(host.address, "GET", "/agents/svc.x")
    assert status == 404, body

    ctx = PagletContext(host)
    first = ctx.require_contract(TALLY_CONTRACT).call("bump", BumpRequest(1))
    assert isinstance(first, TallyReply)
    assert (first.count, first.label, first.events) == (101, "initial", ["creation"])
    assert "svc.x" in active_ids(host)
    assert http_json(host.address, "GET", "/agents/svc.x")[1]["pid"] == first.pid

    wait_until(lambda: "svc.x" not in active_ids(host), timeout=10)
    assert "svc.x" in {info["agent_id"] for info in host.list_agents("inactive")}
    wait_until(lambda: process_gone(first.pid))
    assert [r.agent_id for r in host.lookup_services("tally")] == ["svc.x"]  # still discoverable while idle

    second = ctx.require_contract(TALLY_CONTRACT).call("bump", BumpRequest(10))
    assert (second.count, second.label) == (111, "initial")  # its state was kept
    assert second.events[:2] == ["creation", "deactivating"] and second.events[2].startswith("activation")
    assert len(second.events) == 3 and second.pid != first.pid
    wait_until(lambda: "svc.x" not in active_ids(host), timeout=10)  # and idles out again
    # Started again by a call, like any paglet woken by a message (Host._wake_for uses reason "message").
    assert second.events[2] == "activation:message"


def test_lease_keeps_a_lazy_resident_active_until_released_and_eager_runs_from_start(make_host: MakeHost) -> None:
    residents = [
        ResidentService(Tally, "svc.leased", ResidentLifecycle.LAZY, ServiceScope.LOCAL, idle_timeout=0.5),
        ResidentService(Tally, "svc.control", ResidentLifecycle.LAZY, ServiceScope.LOCAL, idle_timeout=0.5, contract=TALLY_B),
        ResidentService(Tally, "svc.eager", ResidentLifecycle.EAGER, ServiceScope.LOCAL, idle_timeout=0.5, contract=TALLY_C,
                        state={"count": 5, "label": "eager"}),
    ]  # fmt: skip
    host = make_host("alpha", resident_services=residents, housekeeping_interval=0.2)
    assert "svc.eager" in active_ids(host)  # running from host start, before any call
    assert host.get_state("svc.eager").events == ["creation"]
    assert "svc.leased" not in all_ids(host) and "svc.control" not in all_ids(host)

    ctx = PagletContext(host)
    lease = ctx.lease_contract(TALLY_CONTRACT, ttl=60)
    assert isinstance(lease, paglets.ServiceLease) and lease.expires_at > time.time() + 50
    with lease as handle:
        assert "svc.leased" in active_ids(host)  # the lease started it
        assert handle.call("bump", BumpRequest(2)).count == 2
        # The control, used after the leased one, idles out; the leased one outlives it.
        assert ctx.require_contract(TALLY_B).call("bump").count == 1
        wait_until(lambda: "svc.control" not in active_ids(host), timeout=10)
        assert "svc.leased" in active_ids(host)
        assert "svc.eager" in active_ids(host)  # eager services do not idle out
    assert lease.released
    lease.release()  # twice is harmless
    wait_until(lambda: "svc.leased" not in active_ids(host), timeout=10)
    assert ctx.require_contract(TALLY_C).call("bump").count == 6 and "svc.eager" in active_ids(host)


def test_lease_expires_and_leases_over_http(make_host: MakeHost) -> None:
    alpha = make_host("alpha", gossip_interval=0.2)
    spec = ResidentService(Tally, "svc.far", ResidentLifecycle.LAZY, ServiceScope.MESH, idle_timeout=0.5)
    beta = make_host("beta", peers=[alpha.address], resident_services=[spec], housekeeping_interval=0.2, gossip_interval=0.2)
    mesh_of(alpha, beta)
    # A lease taken on alpha for beta's provider (POST /services/leases on beta), left to expire.
    lease = PagletContext(alpha).lease_contract(TALLY_CONTRACT, scope=ServiceScope.MESH, ttl=1.5)
    assert lease.handle.record.host_url == beta.address
    assert "svc.far" in active_ids(beta)
    assert lease.handle.call("bump").count == 1
    wait_until(lambda: "svc.far" not in active_ids(beta), timeout=15)
    assert time.time() >= lease.expires_at - 0.05 and lease.expired  # kept past its 0.5 s idle timeout until the lease ran out

    # The raw endpoints: take a lease, see it wake the service and hold it, release it.
    status, body = http_json(beta.address, "POST", "/services/leases", {"agent_id": "svc.far", "ttl": 60})
    assert status == 201 and body["expires_at"] > time.time() + 50, body
    assert "svc.far" in active_ids(beta)
    assert lease.handle.call("bump").count == 2
    status, released = http_json(beta.address, "POST", f"/services/leases/{body['lease_id']}/release", {})
    assert status == 200, released
    wait_until(lambda: "svc.far" not in active_ids(beta), timeout=10)
    assert http_json(beta.address, "POST", "/services/leases", {"agent_id": "svc.far", "ttl": "long"})[0] == 400
    assert http_json(beta.address, "POST", "/services/leases", {"agent_id": "svc.far", "ttl": 0})[0] == 400
    assert http_json(beta.address, "POST", "/services/leases", {"agent_id": "no-such-service", "ttl": 5})[0] == 404


def test_a_crashed_lazy_resident_is_started_again_by_the_next_call(make_host: MakeHost) -> None:
    """The host keeps its resident services: one whose worker died answers the next call again."""
    spec = ResidentService(Tally, "svc.x", ResidentLifecycle.LAZY, ServiceScope.LOCAL, idle_timeout=30, state=TallyState(label="kept"))
    host = make_host("alpha", resident_services=[spec])
    handle = PagletContext(host).require_contract(TALLY_CONTRACT)
    first = handle.call("bump")
    os.kill(first.pid, signal.SIGKILL)
    wait_until(lambda: "svc.x" not in active_ids(host))
    assert [r.agent_id for r in host.lookup_services("tally")] == ["svc.x"]  # still advertised...
    again = handle.call("bump")  # ...so a call must reach a running provider
    assert again.pid != first.pid and again.label == "kept"
    assert "svc.x" in active_ids(host)


LAUNCH_FILE = """
[[resident_services]]
class = "paglets_tests.agents_services:Tally"
agent_id = "svc.lazy"
lifecycle = "lazy"
scope = "mesh"
idle_timeout = 30
state = { count = 7, label = "from-toml" }

[[resident_services]]
class = "paglets_tests.agents_services:Tally"
agent_id = "svc.eager"
lifecycle = "eager"
"""


def test_serve_with_a_launch_file_starts_its_resident_services(tmp_path: Path, serve: Callable[..., Any]) -> None:
    config = tmp_path / "launch.toml"
    config.write_text(LAUNCH_FILE)
    proc = serve("launched", extra=["--config", str(config)]).start()
    status, body = http_json(proc.url, "GET", "/services?name=tally")
    assert status == 200
    records = {item["agent_id"]: ServiceRecord.from_wire(item) for item in body["services"]}
    assert set(records) == {"svc.lazy", "svc.eager"}
    assert records["svc.lazy"].scope is ServiceScope.MESH and records["svc.eager"].scope is ServiceScope.LOCAL
    assert records["svc.lazy"].capabilities == ("bump",)
    services = {item["agent_id"] for item in http_json(proc.url, "GET", "/services")[1]["services"]}
    assert SERVER_INFO_ID in services  # the built-in one is there too

    agent_ids = {info["agent_id"] for info in http_json(proc.url, "GET", "/agents?state=all")[1]["agents"]}
    assert "svc.eager" in agent_ids and "svc.lazy" not in agent_ids
    client = HostClient(timeout=TIMEOUT)
    try:
        reply = ServiceHandle(TALLY_CONTRACT, records["svc.lazy"], client).call("bump", BumpRequest(1))
        assert (reply.count, reply.label, reply.events) == (8, "from-toml", ["creation"])
    finally:
        client.close()
    status, info = http_json(proc.url, "GET", "/agents/svc.lazy")
    assert status == 200 and info["active"] is True and info["pid"] == reply.pid


GOOD_ENTRY = '[[resident_services]]\nclass = "paglets_tests.agents_services:Tally"\nagent_id = "svc.a"\n\n[[resident_services]]\n'
TALLY = 'class = "paglets_tests.agents_services:Tally"\n'
#: case -> (launch file, the field its one-line error must name; None: no field, the entry itself is wrong)
BAD_LAUNCH_FILES = {
    "unknown-field": (GOOD_ENTRY + 'agent_id = "svc.b"\n' + TALLY + 'colour = "blue"\n', "colour"),
    "missing-class": (GOOD_ENTRY + 'agent_id = "svc.b"\nlifecycle = "lazy"\n', "class"),
    "missing-agent-id": (GOOD_ENTRY + TALLY, "agent_id"),
    "bad-agent-id": (GOOD_ENTRY + 'agent_id = "no spaces/here"\n' + TALLY, "agent_id"),
    "bad-lifecycle": (GOOD_ENTRY + 'agent_id = "svc.b"\n' + TALLY + 'lifecycle = "sometimes"\n', "lifecycle"),
    "bad-scope": (GOOD_ENTRY + 'agent_id = "svc.b"\n' + TALLY + 'scope = "galaxy"\n', "scope"),
    "bad-idle-timeout": (GOOD_ENTRY + 'agent_id = "svc.b"\n' + TALLY + 'idle_timeout = "soon"\n', "idle_timeout"),
    "no-such-class": (GOOD_ENTRY + 'agent_id = "svc.b"\nclass = "paglets_tests.agents_services:NoSuchPaglet"\n', "class"),
    "no-such-module": (GOOD_ENTRY + 'agent_id = "svc.b"\nclass = "paglets_tests.no_such_module:Tally"\n', "class"),
    "not-a-paglet": (GOOD_ENTRY + 'agent_id = "svc.b"\nclass = "paglets_tests.agents_services:AddRequest"\n', "class"),
    "state-not-a-table": (GOOD_ENTRY + 'agent_id = "svc.b"\n' + TALLY + "state = 5\n", "state"),
    "state-unknown-field": (GOOD_ENTRY + 'agent_id = "svc.b"\n' + TALLY + "state = { nope = 1 }\n", "nope"),
    "entry-not-a-table": ('resident_services = [{ class = "paglets_tests.agents_services:Tally", agent_id = "svc.a" }, "oops"]\n', None),
}


def serve_must_refuse(config: Path, data_dir: Path, *extra: str) -> list[str]:
    """Run serve with a launch file; it must exit non-zero without serving.  Returns its stderr lines."""
    args = [
        sys.executable,
        str(PAGLETS_PY),
        "serve",
        "--name",
        "bad",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *extra,
        "--config",
        str(config),
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()  # "serving at" if it started; "" when it exited
        assert "serving at" not in first, f"serve started with a bad launch file {config.name}: {config.read_text()!r}"
        code = proc.wait(30)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines


@pytest.mark.parametrize("case", sorted(BAD_LAUNCH_FILES))
def test_bad_launch_file_is_one_line_naming_file_entry_and_field(tmp_path: Path, case: str) -> None:
    text, field = BAD_LAUNCH_FILES[case]
    config = tmp_path / f"{case}.toml"
    config.write_text(text)
    (line,) = serve_must_refuse(config, tmp_path / "data", "--path", str(ROOT), "--allow", "paglets_tests", "--log-level", "warning")
    assert str(config) in line
    assert "resident_services[1]" in line  # the second entry; the first one is fine
    if field is not None:
        assert re.search(rf"\b{field}\b", line), line
        named = re.search(r"resident_services\[1\]\.(\w+)", line)  # "entry.field: ..." must name the right field
        assert named is None or named.group(1) in ({field, "state"} if field == "nope" else {field}), line


def test_invalid_toml_or_missing_launch_file_is_one_line_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('[[resident_services]]\nclass = "paglets_tests.agents_services:Tally\nagent_id = 3 =\n')
    (line,) = serve_must_refuse(config, tmp_path / "data")
    assert str(config) in line
    (line,) = serve_must_refuse(tmp_path / "absent.toml", tmp_path / "data")
    assert str(tmp_path / "absent.toml") in line


# ==== 4. the built-in server-info service ===========================================================
def test_every_host_offers_server_info_lazily_with_sane_figures(make_host: MakeHost, tmp_path: Path) -> None:
    host = make_host("alpha")
    record = host.lookup_service(SERVER_INFO_CONTRACT.name)
    assert record is not None
    assert (record.agent_id, record.scope, record.host_url) == (SERVER_INFO_ID, ServiceScope.MESH, host.address)
    assert SERVER_INFO_CONTRACT.matches_record(record)
    assert record.capabilities == ("info",)
    assert SERVER_INFO_ID not in all_ids(host)  # lazy: not running before the first call

    counters = [host.create(agents.Counter) for _ in range(3)]
    host.deactivate(counters[0].agent_id)
    data = tmp_path / "disk"
    data.mkdir()
    handle = PagletContext(host).require_contract(SERVER_INFO_CONTRACT)
    reply = handle.call("info", ServerInfoRequest([str(data), "/"]))
    assert isinstance(reply, ServerInfoReply)
    assert (reply.host_name, reply.host_url) == ("alpha", host.address)
    assert reply.cpu_count >= 1 and reply.cpu_count == psutil.cpu_count()
    assert reply.memory_total > reply.memory_available > 0
    assert 0 <= reply.memory_percent <= 100
    assert set(reply.disks) == {str(data), "/"}
    for usage in reply.disks.values():
        assert usage["total"] > 0 and 0 <= usage["free"] <= usage["total"] and 0 <= usage["used"] <= usage["total"]
    assert reply.uptime > 0 and reply.boot_time < time.time()
    assert len(reply.load_average) == 3 and all(x >= 0 for x in reply.load_average)
    assert SERVER_INFO_ID in active_ids(host)
    assert reply.active_paglets == len(host.list_agents("active")) == 3  # two counters and server-info itself
    assert reply.inactive_paglets == len(host.list_agents("inactive")) == 1
    assert reply.active_paglets == host.health()["active"]


def test_info_command_prints_server_info(serve: Callable[..., Any], tmp_path: Path) -> None:
    proc = serve("infohost").start()
    result = run_cli("info", "--host-url", proc.url, "--path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "infohost" in result.stdout and proc.url in result.stdout
    assert re.search(r"\b\d+ CPUs\b", result.stdout) and f"disk {tmp_path}" in result.stdout
    as_json = run_cli("info", "--host-url", proc.url, "--json", "--path", str(tmp_path))
    assert as_json.returncode == 0, as_json.stderr
    figures = json.loads(as_json.stdout)
    assert figures["host_name"] == "infohost" and figures["host_url"] == proc.url
    assert figures["cpu_count"] >= 1
    assert figures["memory_total"] > figures["memory_available"] > 0
    assert figures["disks"][str(tmp_path)]["total"] > 0
    assert figures["uptime"] > 0
    assert figures["active_paglets"] >= 1 and figures["inactive_paglets"] == 0  # server-info itself answers
    # Nothing listening there: a failed call, exit status 1, one line on stderr.
    proc.kill()
    down = run_cli("info", "--host-url", proc.url, "--timeout", "2")
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr


# ==== 5. resource figures and the memory limit =======================================================
def test_agents_listing_carries_resource_figures_of_the_worker(host: paglets.Host) -> None:
    busy, idle = host.create(Hog), host.create(agents.Counter)
    busy_pid, idle_pid = busy.send("pid"), idle.send(Message("pid"))
    assert busy.send(Message("spin", {"cpu_seconds": 0.3})) >= 0.3
    status, body = http_json(host.address, "GET", "/agents")
    assert status == 200
    listed = {info["agent_id"]: info for info in body["agents"]}
    for proxy, pid in ((busy, busy_pid), (idle, idle_pid)):
        info = listed[proxy.agent_id]
        assert info["pid"] == pid and pid != os.getpid() and psutil.pid_exists(pid)
        assert psutil.Process(pid).is_running()
        real_rss = psutil.Process(pid).memory_info().rss
        assert info["rss"] > 0 and 0.5 * real_rss <= info["rss"] <= 2 * real_rss
        assert isinstance(info["cpu_time"], (int, float)) and info["cpu_time"] >= 0
        assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert listed[busy.agent_id]["cpu_time"] >= 0.25  # the CPU the handler burnt shows
    status, one = http_json(host.address, "GET", f"/agents/{busy.agent_id}")
    assert status == 200 and one["pid"] == busy_pid and one["rss"] > 0 and one["threads"] >= 1 and one["cpu_time"] >= 0.25
    assert busy.info()["pid"] == busy_pid


def _hog_is_ended(host: paglets.Host, hog: paglets.PagletProxy, bystander: paglets.PagletProxy) -> None:
    pid = hog.send(Message("pid"))
    with pytest.raises(PagletCrashedError) as caught:
        hog.send(Message("hog", {"cap_mib": 2048}), timeout=45)
    assert re.search(r"memory.*limit", str(caught.value)), str(caught.value)
    wait_until(lambda: process_gone(pid))
    # The host stays healthy and the other paglets keep answering.
    assert bystander.send(Message("add", {"by": 1})) == 2
    status, health = http_json(host.address, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert host.create(agents.Counter).send(Message("get")) == 0
    with pytest.raises(PagletCrashedError):
        hog.send(Message("ping"))
    assert hog.agent_id not in active_ids(host)


def test_memory_limit_of_the_class_ends_the_hog(make_host: MakeHost) -> None:
    host = make_host("alpha", housekeeping_interval=0.2)
    bystander = host.create(agents.Counter, init=1)
    unlimited = host.create(Hog)  # the same allocation without a limit is fine: the limit is what ends the hog
    assert unlimited.send(Message("hog", {"cap_mib": 512}), timeout=45) == "allocated 512 MiB and survived"
    hog = host.create(LimitedHog)
    assert LimitedHog.MEMORY_LIMIT == 256 * MIB
    _hog_is_ended(host, hog, bystander)
    assert unlimited.send(Message("ping")) == "pong"


def test_memory_limit_of_the_host_ends_the_hog(make_host: MakeHost) -> None:
    host = make_host("alpha", housekeeping_interval=0.2, paglet_memory_limit=256 * MIB)
    bystander = host.create(agents.Counter, init=1)
    hog = host.create(Hog)
    _hog_is_ended(host, hog, bystander)


def test_memory_limit_ends_a_hog_in_run(make_host: MakeHost) -> None:
    """Allocating past the limit in run() (the background thread) ends the worker as in a handler."""
    host = make_host("alpha", housekeeping_interval=0.2)
    bystander = host.create(agents.Counter, init=1)
    hog = host.create(RunHog, RunHogState(hog_mib=2048))
    pid = hog.send(Message("pid"))
    wait_until(lambda: process_gone(pid) or any(e.kind == "run-failed" for e in host.list_events()), timeout=30)
    wait_until(lambda: process_gone(pid), timeout=2)
    with pytest.raises(PagletCrashedError, match=r"memory.*limit"):
        hog.send(Message("ping"))
    assert bystander.send(Message("add", {"by": 1})) == 2
