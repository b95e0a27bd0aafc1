"""Workers: real processes from the fork server, mailboxes, lifecycle order, faults."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import paglets
from paglets import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    NORMAL_PRIORITY,
    UNQUEUED_PRIORITY,
    LifecycleError,
    Message,
    NotHandledError,
    PagletCrashedError,
)
from paglets_tests import agents, agents_review
from paglets_tests.conftest import process_gone, wait_until


def test_create_send_and_state(host: paglets.Host) -> None:
    counter = host.create(agents.Counter, init=5)
    assert counter.send(Message("add", {"by": 2})) == 7
    assert counter.send("add") == 8
    assert host.get_state(counter.agent_id) == agents.CounterState(count=8)
    assert counter.is_active() and counter.is_valid() and not counter.is_remote()


def test_each_paglet_runs_in_its_own_process(host: paglets.Host) -> None:
    a, b = host.create(agents.Counter), host.create(agents.Counter)
    pid_a, pid_b = a.send("pid"), b.send("pid")
    assert len({pid_a, pid_b, os.getpid()}) == 3
    assert psutil.Process(pid_a).is_running()


def test_handler_exception_comes_back_as_same_class(host: paglets.Host) -> None:
    counter = host.create(agents.Counter)
    with pytest.raises(ValueError, match="bad value 3"):
        counter.send(Message("raise", {"value": 3}))
    with pytest.raises(NotHandledError):
        counter.send("no-such-kind")
    assert counter.send("add") == 1  # the paglet goes on


def test_lifecycle_hooks_in_order_and_run_after_creation(host: paglets.Host) -> None:
    rec = host.create(agents.Recorder, init="hello")
    wait_until(lambda: "run" in rec.send("events"))
    events = rec.send("events")
    assert events[:2] == ["creation:hello", "run"]
    clone = rec.clone()
    assert rec.send("events")[-2:] == ["cloning", "cloned"]
    wait_until(lambda: "run" in clone.send("events")[2:])
    assert clone.send("events")[2:4] == ["cloning", "clone:False"]
    rec.send(Message("note", {"text": "x"}))
    rec.deactivate()
    assert not rec.is_active()
    rec.activate()
    events = rec.send("events")
    assert events[events.index("message:x") + 1 :][:2] == ["deactivating:deactivate", "activation:activate"]


def test_rich_values_round_trip_through_workers(host: paglets.Host) -> None:
    rich = host.create(agents.Rich)
    point = rich.send(Message("add-point", {"point": agents.Point(1, 2)}))
    assert point == agents.Point(1, 2)
    state = rich.send("state")
    assert state == agents.RichState(points=[agents.Point(1, 2)])


def test_unencodable_reply_is_a_clear_serialization_error(host: paglets.Host) -> None:
    bad = host.create(agents.Unencodable)
    with pytest.raises(paglets.SerializationError, match="reply"):
        bad.send("lambda")
    with pytest.raises(paglets.SerializationError, match=r"reply\.lock"):
        bad.send("lock")


def test_priority_order_then_fifo(host: paglets.Host) -> None:
    gate = host.create(agents.Gate)
    blocked = gate.send_future("block")
    wait_until(lambda: gate.send(Message("is-blocked", priority=UNQUEUED_PRIORITY)))
    sent = [("low-1", MIN_PRIORITY), ("norm-1", NORMAL_PRIORITY), ("max-1", MAX_PRIORITY), ("low-2", MIN_PRIORITY),
            ("max-2", MAX_PRIORITY), ("norm-2", NORMAL_PRIORITY)]  # fmt: skip
    futures = [gate.send_future(Message("log", {"text": text}, priority=p)) for text, p in sent]
    # UNQUEUED bypasses the queue and the blocked handler:
    assert gate.send(Message("open", priority=UNQUEUED_PRIORITY)) == "opened"
    assert blocked.get_reply(10) == "unblocked"
    for future in futures:
        future.get_reply(10)
    assert gate.send("read") == ["max-1", "max-2", "norm-1", "norm-2", "low-1", "low-2"]


def test_futures_and_reply_sets(host: paglets.Host) -> None:
    counter = host.create(agents.Counter)
    future = counter.send_future(Message("sleep", {"seconds": 0.2}))
    assert not future.is_available()
    assert future.wait_for_reply(10)
    assert future.get_string_reply() == "slept"
    failing = counter.send_future(Message("raise", {"value": 1}))
    with pytest.raises(ValueError):
        failing.get_reply(10)
    replies = paglets.ReplySet(counter.send_future("add") for _ in range(5))
    assert replies.wait_for_all_replies(10)
    assert replies.count_available() == 5 and replies.are_all_available()
    assert sorted(r.get_int_reply() for r in replies) == [1, 2, 3, 4, 5]
    assert not replies.has_more_future_replies()


def test_future_timeout(host: paglets.Host) -> None:
    counter = host.create(agents.Counter)
    slow = counter.send_future(Message("sleep", {"seconds": 1.0}))
    assert not slow.wait_for_reply(0.05)
    with pytest.raises(TimeoutError):
        slow.get_reply(0.05)
    assert slow.get_reply(10) == "slept"


def test_multicast_reaches_subscribers_only(host: paglets.Host) -> None:
    subs = [host.create(agents.Subscriber) for _ in range(3)]
    host.create(agents.Counter)
    replies = host.multicast_message("news", {"text": "hi"})
    assert replies.wait_for_all_replies(10)
    assert sorted(r.get_reply() for r in replies) == sorted(f"{s.agent_id}:hi" for s in subs)
    assert subs[0].send("unsubscribe") is True
    again = host.multicast_message("news", {"text": "again"})
    assert again.wait_for_all_replies(10)
    assert len(again) == 2


def test_wait_message_lets_the_next_message_in(host: paglets.Host) -> None:
    waiter = host.create(agents.Waiter)
    waiting = waiter.send_future("wait")
    assert waiter.send("notify") == "notified"
    assert waiting.get_reply(10) == "woken"
    assert waiter.send(Message("wait", {"timeout": 0.05})) == "timeout"


def test_run_thread_and_wait_state(host: paglets.Host) -> None:
    ticker = host.create(agents.Ticker)
    assert ticker.send(Message("wait-ticks", {"n": 5})) is True
    assert ticker.send("ticks") >= 5


@pytest.mark.parametrize("kind", ["exit", "segv"])
def test_a_dying_paglet_takes_only_itself_down(host: paglets.Host, kind: str) -> None:
    crashy, other = host.create(agents.Crashy), host.create(agents.Counter)
    with pytest.raises(PagletCrashedError) as info:
        crashy.send(kind)
    expected = "status 3" if kind == "exit" else "SIGSEGV"
    assert expected in str(info.value)
    with pytest.raises(PagletCrashedError):
        crashy.send("ping")  # later calls fail too
    assert other.send("add") == 1
    assert host.create(agents.Counter).send("add") == 1
    assert any(e.kind == "crashed" and e.agent_id == crashy.agent_id for e in host.list_events(limit=1000))


def test_killed_worker_fails_pending_calls(host: paglets.Host) -> None:
    crashy = host.create(agents.Crashy)
    pid = crashy.info()["pid"]
    pending = crashy.send_future("hang")
    queued = crashy.send_future("ping")
    os.kill(pid, signal.SIGKILL)
    for future in (pending, queued):
        with pytest.raises(PagletCrashedError, match="SIGKILL"):
            future.get_reply(10)
    assert host.health()["status"] == "ok"


def test_hook_failure_is_a_lifecycle_error_and_leaves_nothing(host: paglets.Host) -> None:
    with pytest.raises(LifecycleError, match="refusing to be born"):
        host.create(agents.FailsOnCreation)
    assert host.list_agents("all") == []
    assert host.create(agents.Counter).send("add") == 1


def test_dispose_of_a_hung_paglet_is_bounded(make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host("hung", stop_grace=0.5)
    hung = host.create(agents.HangOnDispose)
    pid = hung.info()["pid"]
    hung.send_oneway("spin")
    started = time.monotonic()
    hung.dispose()
    assert time.monotonic() - started < 5
    wait_until(lambda: process_gone(pid))
    assert not hung.is_valid()


def test_workers_end_with_stop(make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host("stopper")
    pids = [host.create(agents.Ticker).info()["pid"] for _ in range(3)]
    host.stop()
    wait_until(lambda: all(process_gone(pid) for pid in pids))


def test_self_deactivate_and_dispose_from_a_handler(host: paglets.Host) -> None:
    rec = host.create(agents.Recorder)
    assert rec.send("deactivate-me") == "going"
    wait_until(lambda: not rec.is_active())
    events = rec.send("events")  # activates it again (policy: activate on message)
    assert events[2:4] == ["deactivating:self", "activation:message"]
    assert rec.send("dispose-me") == "bye"
    wait_until(lambda: not rec.is_valid())


# -- review regressions: the worker/host message path ----------------------------------------------
def test_get_state_while_a_handler_holds_its_lock_across_a_send(host: paglets.Host) -> None:
    gate = host.create(agents.Gate)
    caller = host.create(agents_review.LockedCaller)
    asked = caller.send_future(Message("ask", {"other": gate.agent_id, "kind": "block"}), timeout=30)
    wait_until(lambda: gate.send(Message("is-blocked", priority=UNQUEUED_PRIORITY)))
    # The caller's handler now holds its state lock and waits for the gate's reply.
    worker = host._live[caller.agent_id].worker
    with ThreadPoolExecutor(1) as pool:
        peek = pool.submit(host.get_state, caller.agent_id)
        wait_until(lambda: len(worker.calls) == 2)  # the state request went out ahead of the gate's reply
        assert gate.send(Message("open", priority=UNQUEUED_PRIORITY)) == "opened"
        assert asked.get_reply(10) == "unblocked"
        assert peek.result(10) == agents_review.TallyState(n=1)  # taken once the lock was free
    assert caller.send("get", timeout=5) == 1
    assert host.get_state(caller.agent_id) == agents_review.TallyState(n=1)


def test_many_senders_to_one_paglet_whose_handler_makes_a_context_call(host: paglets.Host) -> None:
    # More senders than the host has context-call threads: a sender waiting for its reply must not
    # hold one of them, or the target's own context call (get_property) never gets a thread.
    target = host.create(agents_review.Relay)
    senders = [host.create(agents_review.Relay) for _ in range(paglets.CONTEXT_THREADS + 6)]
    blocked = target.send_future("block")
    wait_until(lambda: target.send(Message("is-blocked", priority=UNQUEUED_PRIORITY)))
    replies = [s.send_future(Message("go", {"to": target.agent_id}), timeout=30) for s in senders]
    queue = host._live[target.agent_id].worker.queue
    wait_until(lambda: len(queue) >= paglets.CONTEXT_THREADS)  # (nearly) every sender waits for the target now
    assert target.send(Message("open", priority=UNQUEUED_PRIORITY)) == "opened"
    assert blocked.get_reply(10) == "unblocked"
    deadline = time.monotonic() + 20
    assert [r.get_reply(max(0.1, deadline - time.monotonic())) for r in replies] == [7] * len(senders)
    assert target.send("hop", timeout=5) == 7
    assert senders[0].send(Message("go", {"to": target.agent_id}), timeout=5) == 7


def race_a_deactivation(host: paglets.Host) -> None:
    """Four threads send "add" to a fresh Counter while the host deactivates it."""
    counter = host.create(agents.Counter)  # default policy: a message wakes it
    acked: list[Any] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def spam() -> None:
        while not stop.is_set():
            try:
                acked.append(counter.send("add", timeout=10))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=spam, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acked) >= 20)
        host.deactivate(counter.agent_id)
        before = len(acked)
        wait_until(lambda: len(acked) >= before + 20 or errors)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert not errors, errors[:3]
    # every acknowledged "add" counted once (some were acknowledged as queued while it slept)
    wait_until(lambda: counter.send("get", timeout=10) == len(acked))


def test_messages_racing_a_deactivation_all_succeed(host: paglets.Host) -> None:
    for _ in range(5):
        race_a_deactivation(host)


def test_error_of_a_oneway_message_is_logged_as_an_event(host: paglets.Host) -> None:
    counter = host.create(agents.Counter)
    counter.send_oneway(Message("raise", {"value": 41}))

    def failed() -> list[paglets.ContextEvent]:
        return [e for e in host.list_events(limit=1000) if e.kind == "message-failed" and e.agent_id == counter.agent_id]

    (event,) = wait_until(failed)
    assert "ValueError" in str(event.error) and "bad value 41" in str(event.error), event
    assert counter.send("add") == 1


def test_exit_statuses_of_ended_workers_stay_bounded(host: paglets.Host) -> None:
    server = paglets._ForkServer.shared()
    for _ in range(max(100, 1100 - len(server._exits))):  # more ended workers than the bound, all told
        host.create(agents.Counter).dispose()
    last = host.create(agents.Counter)
    pid = last.send("pid")
    last.dispose()
    wait_until(lambda: pid in server._exits)  # the fork server has reaped the newest one
    assert len(server._exits) <= 1024


def test_a_stopped_host_leaves_no_open_sockets(tmp_path: Path) -> None:
    me = psutil.Process()
    warm = paglets.Host("warm", data_dir=tmp_path / "warm").start_background()  # the fork server and imports exist now
    warm.stop()
    before = me.num_fds()
    hosts = []
    for n in range(5):
        h = paglets.Host(f"h{n}", data_dir=tmp_path / f"h{n}").start_background()
        hosts.append(h)  # still referenced: the garbage collector closes nothing for it
        try:
            assert h.create(agents.Counter).send("add") == 1
        finally:
            h.stop()
    wait_until(lambda: me.num_fds() - before <= 3, timeout=5)
