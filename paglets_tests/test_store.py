"""The SQLite store (issue 3): schema, deactivation, durable queues, crash recovery, event log, storage."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest

import paglets
from paglets import (
    ACTIVE,
    INACTIVE,
    DeactivationPolicy,
    DeactivationRequest,
    HostClient,
    HostError,
    Message,
    PagletContext,
    PagletInactiveError,
    StorageQuotaError,
)
from paglets_tests import agents, agents_review, agents_store
from paglets_tests.conftest import PAGLETS_PY, ROOT, ServeProcess, process_gone, wait_until

DB = "paglets.sqlite3"
SCHEMA = len(paglets._STORE_MIGRATIONS)
HostFactory = Callable[..., paglets.Host]


# -- helpers ------------------------------------------------------------------------------------------
def sql(path: Path, query: str) -> list[tuple[Any, ...]]:
    """Run one statement on a database file with a connection of our own, then close it."""
    conn = apsw.Connection(str(path))
    try:
        return list(conn.execute(query))
    finally:
        conn.close()


def integrity(data_dir: Path) -> str:
    return str(sql(data_dir / DB, "PRAGMA integrity_check")[0][0])


def sqlite_files(folder: Path) -> list[Path]:
    """Every file under a folder that is an SQLite database (by its header)."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                if handle.read(16) == b"SQLite format 3\x00":
                    found.append(path)
    return found


def run_serve(data_dir: Path, name: str = "other", timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python paglets.py serve`` expected to fail: it must end by itself."""
    args = [sys.executable, str(PAGLETS_PY), "serve", "--name", name, "--port", "0", "--data-dir", str(data_dir),
            "--path", str(ROOT), "--allow", "paglets_tests", "--log-level", "warning"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))


def assert_one_line_error(text: str, *needles: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def asleep(policy: DeactivationPolicy | None = None, reason: str = "deactivate") -> DeactivationRequest:
    return DeactivationRequest(reason=reason, policy=policy)


QUEUE_ONLY = DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=True)
REFUSE = DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=False)


# == 1. one database, WAL, versioned schema, migrations, threads ======================================
def test_one_wal_database_with_current_schema_version(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host("alpha")
    host.create(agents.Counter).send("add")
    host.set_property("colour", "teal")
    assert sqlite_files(tmp_path / "alpha") == [tmp_path / "alpha" / DB]
    assert sql(tmp_path / "alpha" / DB, "PRAGMA journal_mode")[0][0] == "wal"
    assert sql(tmp_path / "alpha" / DB, "PRAGMA user_version")[0][0] == SCHEMA


def test_older_schema_is_upgraded_in_place_and_keeps_its_data(make_host: HostFactory, tmp_path: Path) -> None:
    # Real rows from a real host, copied into a database built by hand with only the first migration.
    source = make_host("source")
    counter = source.create(agents.Counter, init=41)
    counter.deactivate(asleep(QUEUE_ONLY))
    counter.send_oneway(Message("add", {"by": 1}))  # waits in the durable queue
    source.set_property("colour", "teal")
    source.stop()

    old = tmp_path / "old"
    old.mkdir()
    conn = apsw.Connection(str(old / DB))
    conn.execute(paglets._STORE_MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.execute(f"ATTACH DATABASE '{tmp_path / 'source' / DB}' AS src")
    conn.execute(  # in schema 1 a paglet's state lived in its agents row (later schemas keep it apart)
        "INSERT INTO agents SELECT a.agent_id, agent_class, status, s.state, coalesce(s.version, 0), policy, request, reason,"
        " activate_at, activate_on_startup, meta, updated_at FROM src.agents a LEFT JOIN src.states s ON s.agent_id = a.agent_id"
    )
    conn.execute("INSERT INTO queue SELECT seq, agent_id, message, oneway, created_at FROM src.queue")
    conn.execute("INSERT INTO properties SELECT key, value FROM src.properties")
    conn.execute("DETACH DATABASE src")
    conn.close()
    assert sql(old / DB, "SELECT count(*) FROM queue")[0][0] == 1

    host = make_host("upgraded", data_dir=old)
    assert sql(old / DB, "PRAGMA user_version")[0][0] == SCHEMA
    assert sql(old / DB, "PRAGMA journal_mode")[0][0] == "wal"
    assert host.get_property("colour") == "teal"
    proxy = host.get_proxy(counter.agent_id, include_inactive=True)
    assert proxy is not None and proxy.is_state(INACTIVE)
    proxy.activate()
    assert proxy.send("get") == 42  # 41 stored + the queued "add"
    assert integrity(old) == "ok"


def test_newer_schema_is_refused_with_a_clear_message(make_host: HostFactory, tmp_path: Path) -> None:
    data = tmp_path / "future"
    make_host("future", data_dir=data).stop()
    sql(data / DB, f"PRAGMA user_version={SCHEMA + 1}")
    for _ in range(2):  # the failed start gave its folder lock back: the second try says the same
        with pytest.raises(HostError) as caught:
            make_host("again", data_dir=data, start=False)
        assert_one_line_error(str(caught.value), str(data / DB), "upgrade", "--data-dir")
    assert sql(data / DB, "PRAGMA user_version")[0][0] == SCHEMA + 1  # left untouched


def test_many_threads_read_and_write_the_store(host: paglets.Host) -> None:
    sink = host.create(agents_store.Appender)
    sink.deactivate(asleep(QUEUE_ONLY))
    errors: list[BaseException] = []
    rounds = 40

    def work(thread: int) -> None:
        try:
            for i in range(rounds):
                host.set_property(f"t{thread}", i)
                assert host.get_property(f"t{thread}") == i
                host.deliver_message(sink.agent_id, Message("append", {"value": [thread, i]}), oneway=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert {host.get_property(f"t{t}") for t in range(8)} == {rounds - 1}
    sink.activate()
    log = sink.send("log")
    assert len(log) == 8 * rounds
    for t in range(8):  # each thread's messages arrive in the order it sent them
        assert [i for thread, i in log if thread == t] == list(range(rounds))


# == 2. deactivate / activate, policies ===============================================================
def test_deactivate_ends_the_worker_and_activate_restores_the_state(host: paglets.Host) -> None:
    proxy = host.create(agents_store.Appender)
    proxy.send(Message("append", {"value": "a"}))
    pid = proxy.send("pid")
    proxy.deactivate()
    assert not proxy.is_active() and proxy.is_state(INACTIVE) and proxy.is_valid()
    wait_until(lambda: process_gone(pid))
    assert [p.agent_id for p in host.get_proxies(INACTIVE)] == [proxy.agent_id]
    assert host.get_proxies(ACTIVE) == []
    assert host.get_state(proxy.agent_id).log == ["a"]  # the stored state, read without waking it
    assert not proxy.is_active()
    proxy.activate()
    assert proxy.is_active()
    assert proxy.send("log") == ["a"]
    assert proxy.send("activations") == ["activate"]
    assert proxy.send("pid") != pid


def test_message_activates_an_inactive_paglet(host: paglets.Host) -> None:
    proxy = host.create(agents_store.Appender)
    proxy.deactivate(asleep(DeactivationPolicy(activate_on_message=True)))
    assert not proxy.is_active()
    assert proxy.send(Message("append", {"value": 1})) == 1
    assert proxy.is_active()
    assert proxy.send("activations") == ["message"]


def test_200_queued_messages_are_delivered_in_order_after_activation(host: paglets.Host) -> None:
    proxy = host.create(agents_store.Appender)
    proxy.deactivate(asleep(QUEUE_ONLY))
    reply = proxy.send(Message("append", {"value": 0}))  # a synchronous send is stored and acknowledged
    assert reply["queued"] is True
    for i in range(1, 200):
        proxy.send_oneway(Message("append", {"value": i}))
    assert not proxy.is_active()  # nothing woke it
    assert host.get_state(proxy.agent_id).log == []
    assert host.list_agents("inactive")[0]["queued"] == 200
    proxy.activate()
    assert proxy.send("log") == list(range(200))  # "log" is handled after every queued message
    assert proxy.send("activations") == ["activate"]
    proxy.deactivate(asleep(QUEUE_ONLY))
    assert host.list_agents("inactive")[0]["queued"] == 0  # delivered messages left the queue
    proxy.activate()
    assert proxy.send("log") == list(range(200))  # and are not delivered twice


def test_messages_sent_during_activation_come_after_the_queued_ones(host: paglets.Host) -> None:
    """A sender that keeps going while the paglet wakes: nothing overtakes the queue, nothing is stranded."""
    for _round in range(5):  # the window is short: try it a few times
        proxy = host.create(agents_store.Appender)
        proxy.deactivate(asleep(QUEUE_ONLY))
        for i in range(100):
            proxy.send_oneway(Message("append", {"value": i}))
        sent: list[int] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def stream(proxy: paglets.PagletProxy = proxy, sent: list[int] = sent, errors: list[BaseException] = errors,
                   stop: threading.Event = stop) -> None:  # fmt: skip
            value = 1000
            try:
                while not stop.is_set():
                    proxy.send_oneway(Message("append", {"value": value}))
                    sent.append(value)
                    value += 1
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=stream)
        sender.start()
        try:
            wait_until(lambda sent=sent: len(sent) >= 20)
            proxy.activate()  # while the sender keeps going
            after = len(sent)
            wait_until(lambda sent=sent, after=after: len(sent) >= after + 20)
        finally:
            stop.set()
            sender.join(30)
        assert errors == []
        log = proxy.send("log")
        assert sorted((set(range(100)) | set(sent)) - set(log)) == [], "messages stranded in the queue of an active paglet"
        assert log == list(range(100)) + sent, "queued messages first, then the rest in the order sent"
        proxy.dispose()


def test_policy_that_neither_wakes_nor_queues_fails_fast(host: paglets.Host) -> None:
    proxy = host.create(agents_store.Appender)
    proxy.deactivate(asleep(REFUSE))
    with pytest.raises(PagletInactiveError):
        proxy.send(Message("append", {"value": "x"}))
    with pytest.raises(PagletInactiveError):
        proxy.send_oneway(Message("append", {"value": "y"}))
    with pytest.raises(PagletInactiveError):  # over HTTP the same class comes back
        HostClient().send_message(host.address, proxy.agent_id, Message("append", {"value": "z"}))
    assert not proxy.is_active()
    proxy.activate()
    assert proxy.send("log") == []  # nothing was queued


def test_timed_activation_after_seconds(host: paglets.Host) -> None:
    proxy = host.create(agents_store.Appender)
    proxy.deactivate(asleep(DeactivationPolicy.after(1.0, activate_on_message=False)))
    assert not proxy.is_active()
    proxy.send_oneway(Message("append", {"value": "while asleep"}))
    wait_until(proxy.is_active, timeout=10)
    assert proxy.send("activations") == ["timer"]
    assert proxy.send("log") == ["while asleep"]


def test_activation_at_startup(make_host: HostFactory, tmp_path: Path) -> None:
    first = make_host("alpha")
    early = first.create(agents_store.Appender)
    late = first.create(agents_store.Appender)
    early.send(Message("append", {"value": "kept"}))
    early.deactivate(asleep(DeactivationPolicy(activate_on_message=False, activate_on_startup=True)))
    late.deactivate(asleep(QUEUE_ONLY))
    first.stop()

    second = make_host("alpha-again", data_dir=tmp_path / "alpha")
    early2 = second.get_proxy(early.agent_id, include_inactive=True)
    late2 = second.get_proxy(late.agent_id, include_inactive=True)
    assert early2 is not None and late2 is not None
    assert early2.is_active()
    assert not late2.is_active()  # no startup wake-up was asked for
    assert early2.send("activations") == ["startup"]
    assert early2.send("log") == ["kept"]


def test_deactivation_policy_is_consulted_for_external_requests(host: paglets.Host) -> None:
    proxy = host.create(agents_store.StrictSleeper)
    # The request asks to wake on message; the paglet's deactivation_policy() says otherwise.
    proxy.deactivate(asleep(DeactivationPolicy(activate_on_message=True), reason="maintenance"))
    with pytest.raises(PagletInactiveError):
        proxy.send(Message("append", {"value": 1}))
    assert not proxy.is_active()
    proxy.activate()
    assert proxy.send("requests") == ["external:maintenance"]
    assert proxy.send("log") == []


def test_self_deactivation_from_a_handler(host: paglets.Host) -> None:
    rec = host.create(agents.Recorder)
    pid = rec.info()["pid"]
    assert rec.send("deactivate-me") == "going"
    wait_until(lambda: process_gone(pid))
    assert rec.is_state(INACTIVE)
    events = rec.send("events")  # activate_on_message=True (the paglet's own choice) wakes it
    assert rec.is_active()
    assert "deactivating:self" in events
    assert events.index("activation:message") > events.index("deactivating:self")


def test_self_deactivation_with_a_timer_queues_messages_until_it_wakes(host: paglets.Host) -> None:
    proxy = host.create(agents_store.Appender)
    pid = proxy.send("pid")
    assert proxy.send(Message("sleep-self", {"seconds": 1.0})) == "napping"
    wait_until(lambda: process_gone(pid))
    assert not proxy.is_active()
    for i in range(5):
        proxy.send_oneway(Message("append", {"value": i}))
    wait_until(proxy.is_active, timeout=10)
    assert proxy.send("log") == list(range(5))
    assert proxy.send("activations") == ["timer"]


# == 3. shutdown and restart ===========================================================================
def test_shutdown_deactivates_and_next_start_restores(make_host: HostFactory, tmp_path: Path) -> None:
    first = make_host("alpha")
    rec = first.create(agents.Recorder, init="x")
    rec.send(Message("note", {"text": "before"}))
    wait_until(lambda: "run" in rec.send("events"))
    pid = rec.info()["pid"]
    first.shutdown()
    wait_until(lambda: process_gone(pid))

    second = make_host("alpha-again", data_dir=tmp_path / "alpha", start=False)
    assert [a["agent_id"] for a in second.list_agents("inactive")] == [rec.agent_id]  # stored, asleep
    second.start_background()
    again = second.get_proxy(rec.agent_id)
    assert again is not None and again.is_active()
    events = again.send("events")
    assert events[:3] == ["creation:x", "run", "message:before"]
    assert "deactivating:shutdown" in events
    assert events.index("activation:shutdown") > events.index("deactivating:shutdown")


# == 4. crash recovery ================================================================================
def test_stop_without_deactivation_recovers_active_paglets(make_host: HostFactory, tmp_path: Path) -> None:
    first = make_host("alpha")
    counter = first.create(agents_store.RecordingCounter)
    snap = first.create(agents_store.SnapshotCounter)
    for _ in range(5):
        counter.send("add")
    snap.send(Message("add", {"by": 3}))
    assert snap.send("snapshot") == 3
    snap.send(Message("add", {"by": 100}))  # never checkpointed: lost with the host
    first.stop()

    second = make_host("alpha-again", data_dir=tmp_path / "alpha")
    counter2 = second.get_proxy(counter.agent_id)
    snap2 = second.get_proxy(snap.agent_id)
    assert counter2 is not None and snap2 is not None
    assert counter2.is_active() and snap2.is_active()
    assert counter2.send("get") == 5
    assert snap2.send("get") == 3
    assert second.get_state(counter.agent_id).seen == ["activation:recover"]


class Stream:
    """A client thread sending messages one after another until the host goes away."""

    def __init__(self, url: str, agent_id: str, make: Callable[[int], Message], oneway: bool = False) -> None:
        self.url, self.agent_id, self.make, self.oneway = url, agent_id, make, oneway
        self.acked: list[Any] = []  # replies (or, for oneway, the values acknowledged as stored)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = HostClient(timeout=10)
        i = 0
        while True:
            message = self.make(i)
            try:
                reply = client.send_message(self.url, self.agent_id, message, oneway=self.oneway)
            except Exception:
                return  # the host was killed
            self.acked.append(message.get_arg("value") if self.oneway else reply)
            i += 1


def test_queued_messages_handled_after_activation_survive_a_crash(make_host: HostFactory, tmp_path: Path) -> None:
    """Messages acknowledged as stored are not lost, even by a class that checkpoints only at lifecycle steps."""
    first = make_host("alpha")
    proxy = first.create(agents_store.Appender)  # CHECKPOINT = "lifecycle"
    proxy.deactivate(asleep(QUEUE_ONLY))
    for i in range(20):
        proxy.send_oneway(Message("append", {"value": i}))  # acknowledged: stored durably
    proxy.activate()
    assert proxy.send("log") == list(range(20))  # handled; no hook has run since
    first.stop()  # the host ends without deactivating anything, as in a crash

    second = make_host("alpha-again", data_dir=tmp_path / "alpha")
    again = second.get_proxy(proxy.agent_id)
    assert again is not None and again.is_active()
    assert again.send("log") == list(range(20))  # restored from a checkpoint, or delivered again from the queue


@pytest.mark.timeout(120)
def test_sigkill_mid_stream_of_checkpointed_messages(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    data = tmp_path / "svc"
    client = HostClient(timeout=10)
    proc = serve("svc", data_dir=data).start()
    counter = client.create(proc.url, "paglets_tests.agents_store:RecordingCounter")
    sink = client.create(proc.url, "paglets_tests.agents_store:Appender")
    client.agent_op(proc.url, sink.agent_id, "deactivate", asleep(QUEUE_ONLY))
    assert client.agents(proc.url, "inactive")[0]["agent_id"] == sink.agent_id

    queued: list[int] = []  # oneway values acknowledged (202) to the inactive paglet
    for crash in range(1, 3):
        adds = Stream(proc.url, counter.agent_id, lambda i: Message("add"))
        ones = Stream(proc.url, sink.agent_id, lambda i, c=crash: Message("append", {"value": c * 100_000 + i}), oneway=True)
        wait_until(lambda a=adds, o=ones: len(a.acked) >= 40 and len(o.acked) >= 40, timeout=30)
        proc.kill()  # SIGKILL mid-stream
        assert proc.proc is not None and process_gone(proc.proc.pid)
        for stream in (adds, ones):
            stream.thread.join(30)
            assert not stream.thread.is_alive()
        assert integrity(data) == "ok"
        last = adds.acked[-1]
        queued += ones.acked

        proc = serve("svc", data_dir=data).start()  # a new process (and port) on the same folder
        restored = client.send_message(proc.url, counter.agent_id, Message("get"))
        assert last <= restored <= last + 1, f"last acknowledged {last}, restored {restored}"
        assert client.get_state(proc.url, counter.agent_id).seen == ["activation:recover"] * crash

    # Every oneway message acknowledged to the inactive paglet survived both SIGKILLs, in order
    # (at most the one in flight at each kill may have been stored too).
    client.agent_op(proc.url, sink.agent_id, "activate")
    log = client.send_message(proc.url, sink.agent_id, Message("log"))
    assert sorted(set(queued) - set(log)) == []
    assert log == sorted(log)
    assert len(log) - len(queued) <= 2
    proc.kill()
    assert integrity(data) == "ok"


# == 5. the event log ================================================================================
@pytest.mark.parametrize("capacity", [20, 200])
def test_event_log_is_bounded_and_ids_keep_increasing(make_host: HostFactory, tmp_path: Path, capacity: int) -> None:
    first = make_host("alpha", event_log_capacity=capacity)
    sink = first.create(agents_store.Appender)
    sink.deactivate(asleep(QUEUE_ONLY))
    for i in range(600):  # each queued message is one "message-queued" event
        sink.send_oneway(Message("append", {"value": i}))
        if i >= 300 and i % 37 == 0:  # bounded at any time, not only now and then
            kept = len(first.list_events(since=0, limit=100_000))
            assert capacity <= kept <= capacity * 1.5, f"{kept} events kept with a capacity of {capacity}"
    events = first.list_events(since=0, limit=100_000)
    ids = [e.event_id for e in events]
    assert capacity <= len(events) <= capacity * 1.5, f"{len(events)} events kept with a capacity of {capacity}"
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # the newest ones: oldest dropped first
    assert events[-1].kind == "message-queued" and events[-1].agent_id == sink.agent_id
    assert sql(tmp_path / "alpha" / DB, "SELECT count(*) FROM events")[0][0] == len(events)  # it lives in the database
    top = ids[-1]
    first.stop()

    second = make_host("alpha-again", data_dir=tmp_path / "alpha", event_log_capacity=capacity)
    newer = second.list_events(since=top)
    assert "host-started" in [e.kind for e in newer]
    assert all(e.event_id > top for e in newer)
    assert second.list_events(since=0, limit=100_000)[0].event_id <= top  # old events survived the restart


def test_listeners_get_events(host: paglets.Host) -> None:
    seen: list[paglets.ContextEvent] = []
    host.add_listener(seen.append)
    proxy = host.create(agents.Counter)
    created = [e for e in seen if e.kind == "created"]
    assert [e.agent_id for e in created] == [proxy.agent_id]
    assert created[0].event_id in {e.event_id for e in host.list_events(since=0, limit=1000)}
    proxy.deactivate()
    assert any(e.kind == "deactivated" and e.agent_id == proxy.agent_id for e in seen)
    host.remove_listener(seen.append)
    count = len(seen)
    other = host.create(agents.Counter)
    assert len(seen) == count  # removed: called no more
    assert any(e.agent_id == other.agent_id for e in host.list_events(since=0, limit=1000))


# == 6. properties, persistent storage, work folders =================================================
def test_host_properties_persist_across_restarts(make_host: HostFactory, tmp_path: Path) -> None:
    first = make_host("alpha", properties={"site": "roof"})
    first.set_property("colour", "teal")
    PagletContext(first).set_property("limits", {"max": 3, "names": ["a", "b"]})
    first.set_property("gone", "soon")
    first.set_property("gone", None)
    first.stop()

    second = make_host("alpha-again", data_dir=tmp_path / "alpha")
    assert second.get_property("site") == "roof"
    assert second.get_property("colour") == "teal"
    context = PagletContext(second)
    assert context.get_property("limits") == {"max": 3, "names": ["a", "b"]}
    assert context.get_property("gone", "default") == "default"


def test_persistent_storage_quota_status_and_isolation(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host("alpha")
    mine = host.create(agents_store.Appender)
    other = host.create(agents_store.OtherAppender)

    def call(proxy: paglets.PagletProxy, op: str, **args: Any) -> Any:
        return proxy.send(Message(f"store-{op}", {"quota": 1000, **args}))

    assert call(mine, "status") == [0, 1000, 0]
    call(mine, "write", key="a", data=b"x" * 600)
    assert call(mine, "status") == [600, 1000, 1]
    with pytest.raises(StorageQuotaError):
        call(mine, "write", key="b", data=b"y" * 500)
    assert call(mine, "status") == [600, 1000, 1]  # nothing written
    assert call(mine, "exists", key="b") is False
    with pytest.raises(StorageQuotaError):  # replacing a key past the quota keeps the old value
        call(mine, "write", key="a", data=b"z" * 1001)
    assert call(mine, "read", key="a") == b"x" * 600
    call(mine, "write", key="a", data=b"w" * 900)  # a replacement counts once
    assert call(mine, "status") == [900, 1000, 1]

    assert call(other, "keys") == []  # another class has its own store
    call(other, "write", key="a", data=b"other")
    assert call(mine, "read", key="a") == b"w" * 900
    assert call(other, "read", key="a") == b"other"

    # Default quota, and the embedding app's view through PagletContext(host).
    store = PagletContext(host).persistent_storage(agent_id=mine.agent_id)
    assert store.status().quota_bytes == paglets.STORAGE_QUOTA_BYTES
    assert store.keys() == ["a"] and store.read_bytes("a") == b"w" * 900
    host.stop()

    again = make_host("alpha-again", data_dir=tmp_path / "alpha")
    newcomer = again.create(agents_store.Appender)  # a new paglet of the same class sees the store
    assert call(newcomer, "read", key="a") == b"w" * 900
    assert call(newcomer, "status") == [900, 1000, 1]


def test_work_dir_is_scratch(make_host: HostFactory, tmp_path: Path) -> None:
    first = make_host("alpha")
    proxy = first.create(agents_store.Appender)
    work = Path(proxy.send("workdir"))
    assert work.is_dir() and (work / "scratch.txt").read_text() == "scratch"
    assert (tmp_path / "alpha") in work.parents
    doomed = first.create(agents_store.Appender)
    doomed_work = Path(doomed.send("workdir"))
    doomed.dispose()
    assert not doomed_work.exists()  # cleared on dispose
    first.stop()
    assert (work / "scratch.txt").exists()

    second = make_host("alpha-again", data_dir=tmp_path / "alpha")
    again = second.get_proxy(proxy.agent_id)
    assert again is not None and again.is_active()  # the paglet came back ...
    assert not (work / "scratch.txt").exists()  # ... its scratch did not
    assert Path(again.send("workdir")).is_dir()


# == 7. bad input ====================================================================================
def test_database_that_is_not_sqlite_is_refused(make_host: HostFactory, tmp_path: Path) -> None:
    data = tmp_path / "garbage"
    data.mkdir()
    (data / DB).write_bytes(b"this is not a database\n" * 300)
    with pytest.raises(HostError) as caught:
        make_host("garbage", data_dir=data)
    assert_one_line_error(str(caught.value), str(data / DB), "--data-dir")
    result = run_serve(data)
    assert result.returncode != 0
    assert_one_line_error(result.stderr, str(data / DB), "--data-dir")
    assert (data / DB).read_bytes() == b"this is not a database\n" * 300  # left for the operator


def test_truncated_database_is_refused(make_host: HostFactory, tmp_path: Path) -> None:
    data = tmp_path / "cut"
    first = make_host("cut", data_dir=data)
    for i in range(40):
        first.set_property(f"p{i}", "x" * 20_000)
    first.create(agents.Counter)
    first.stop()
    sql(data / DB, "PRAGMA wal_checkpoint(TRUNCATE)")
    for leftover in data.glob(DB + "-*"):
        leftover.unlink()
    whole = (data / DB).read_bytes()
    assert len(whole) > 500_000
    (data / DB).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(HostError) as caught:
        make_host("cut-again", data_dir=data)
    assert_one_line_error(str(caught.value), str(data / DB), "--data-dir")
    result = run_serve(data)
    assert result.returncode != 0
    assert_one_line_error(result.stderr, str(data / DB), "--data-dir")


def test_second_host_on_the_same_folder_is_refused(make_host: HostFactory, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    first = make_host("first", data_dir=data)
    with pytest.raises(HostError) as caught:
        make_host("second", data_dir=data)
    assert_one_line_error(str(caught.value), str(data), "in use", "--data-dir")
    result = run_serve(data)  # and from another process
    assert result.returncode != 0
    assert_one_line_error(result.stderr, str(data), "in use", "--data-dir")
    assert first.create(agents.Counter).send("add") == 1  # the first goes on
    first.stop()
    make_host("second", data_dir=data)  # once it is gone the folder is free


def test_second_serve_process_on_the_same_folder_is_refused(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    data = tmp_path / "svc"
    proc = serve("svc", data_dir=data).start()
    result = run_serve(data)
    assert result.returncode != 0
    assert_one_line_error(result.stderr, str(data), "in use", "--data-dir")
    assert HostClient().health(proc.url)["status"] == "ok"
    proc.kill()
    serve("svc", data_dir=data).start()  # the kernel dropped the dead host's lock


# -- review regressions: host snapshots, durable-queue messages and a deactivation ------------------
def test_host_snapshot_then_acknowledged_messages_all_survive_a_restart(make_host: HostFactory, tmp_path: Path) -> None:
    first = make_host("alpha")
    counter = first.create(agents.CheckpointedCounter)  # CHECKPOINT = "message"
    assert counter.send("add") == 1
    first.snapshot(counter.agent_id)
    for n in range(2, 7):
        assert counter.send("add") == n  # acknowledged: each one's checkpoint is stored
    first.stop()  # no shutdown hooks, as in a crash

    second = make_host("alpha-again", data_dir=tmp_path / "alpha")
    assert second.get_state(counter.agent_id).count == 6  # not the older snapshot
    again = second.get_proxy(counter.agent_id)
    assert again is not None and again.send("add") == 7


def queued_rows(host: paglets.Host, agent_id: str) -> list[tuple[int, str]]:
    """(seq, kind) of a paglet's durably queued messages, oldest first."""
    return [(seq, paglets._cbor_loads(blob, untrusted=False)["kind"]) for seq, blob, _ in host._store.queued(agent_id)]


def test_deactivation_while_queued_messages_are_delivered_leaves_no_duplicates(make_host: HostFactory, tmp_path: Path) -> None:
    first = make_host("alpha")
    proxy = first.create(agents_review.QueueCounter)
    proxy.deactivate(asleep(agents_review.QUEUE_ONLY))
    proxy.send_oneway("deactivate-me")
    for _ in range(5):
        proxy.send_oneway(Message("add", {"by": 1}))  # acknowledged: stored durably
    rows = queued_rows(first, proxy.agent_id)
    assert [kind for _, kind in rows] == ["deactivate-me", "add", "add", "add", "add", "add"]
    # Activation hands all six to the worker; the first puts it back to sleep while the five adds
    # wait for their turn.  They are still in the durable queue: they must stay the rows they are,
    # not be queued a second time (a crash before the first copies were dropped left both).
    first.activate(proxy.agent_id)
    wait_until(lambda: not proxy.is_active() and queued_rows(first, proxy.agent_id)[:1] != rows[:1])
    assert queued_rows(first, proxy.agent_id) == rows[1:]
    first.stop()
    query = f"SELECT seq FROM queue WHERE agent_id='{proxy.agent_id}' ORDER BY seq"
    assert sql(tmp_path / "alpha" / DB, query) == [(seq,) for seq, _ in rows[1:]]

    second = make_host("alpha-again", data_dir=tmp_path / "alpha")
    second.activate(proxy.agent_id)
    again = second.get_proxy(proxy.agent_id)
    assert again is not None and again.send("get") == 5  # each acknowledged add handled once
    wait_until(lambda: second._store.queue_length(proxy.agent_id) == 0)
