"""Section 6 value types and section 7 replies: wire round trips, type checks, helpers, reply sets."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import paglets
from paglets import (
    FUTURE,
    MAX_PRIORITY,
    MIN_PRIORITY,
    NORMAL_PRIORITY,
    ONEWAY,
    SYNCHRONOUS,
    UNQUEUED_PRIORITY,
    ArrivalMode,
    ArtifactRef,
    CloneEvent,
    ContextEvent,
    CreationEvent,
    DeactivationPolicy,
    DeactivationRequest,
    FutureReply,
    HostRef,
    Message,
    MobilityEvent,
    PagletEvent,
    PagletFileRef,
    PagletProxyRef,
    PersistencyEvent,
    ReplySet,
    SerializationError,
    ServiceRecord,
    ServiceScope,
    TransferTicket,
    from_cbor,
    to_cbor,
)

policy = DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=False, activate_on_startup=True, activate_at=1.7e9)
request = DeactivationRequest(reason="nap", source="self", policy=policy, metadata={"why": ["tired", 3], 7: b"x"})

#: One fully populated example of every value type of SPEC section 3 (no field left at its default).
EXAMPLES: list[Any] = [
    Message(
        "add",
        {"by": 2, "nested": {"t": (1, 2), "s": {3}}, 5: "non-str key"},
        arg=[1.5, None],
        sender="http://a:1",
        reply_to="http://a:1/agents/x",
        priority=MAX_PRIORITY,
        message_type=FUTURE,
        timestamp=123.25,
        message_id="m-1",
    ),
    PagletEvent("a1", "alpha", "http://alpha:1", 10.5),
    CreationEvent("a1", "alpha", "http://alpha:1", 11.0, init={"start": [1, 2], "when": (3, 4)}),
    MobilityEvent("a1", "beta", "http://beta:2", 12.0, "alpha", "http://alpha:1", "beta", "http://beta:2", "retract"),
    CloneEvent("a1", "beta", "http://beta:2", 13.0, "a1", "a2", "alpha", "http://alpha:1", "beta", "http://beta:2"),
    PersistencyEvent("a1", "alpha", "http://alpha:1", 14.0, reason="shutdown", request=request, policy=policy),
    ContextEvent(9, "created", "alpha", "http://alpha:1", 15.0, "a1", "mod:Cls", "m-1", "svc", {"k": [1, {"x": None}]}, "ValueError: no"),
    TransferTicket(
        "beta",
        timeout=2.5,
        retries=3,
        retry_interval=0.5,
        required_capabilities=("gpu", "arm"),
        expected_code_version="0.2",
        arrival_mode=ArrivalMode.INACTIVE,
    ),
    policy,
    request,
    PagletProxyRef("http://beta:2", "a2"),
    HostRef("beta", "http://beta:2", "0.1", False, 99.5, 3, 4, ("edge", "pi"), {"site": "lab", "n": 2}, "timeout", "2", False),
    ServiceRecord(
        "printer", "a1", "http://alpha:1", ("color",), {"dpi": 600}, ServiceScope.MESH, 1e10, PagletProxyRef("http://alpha:1", "a1")
    ),
    ArtifactRef("http://alpha:1", "art-1", "model.bin", 1024, "ab" * 32, "zstd", 16.0, 17.0, "a1"),
    PagletFileRef("data.csv", "alpha", "/src/data.csv", 18.0, 19.0, "cd" * 32, 77, "/work/a1/data.csv", "move"),
]

_ids = [type(v).__name__ for v in EXAMPLES]


def _all_fields_differ_from_defaults(value: Any) -> bool:
    for f in dataclasses.fields(value):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        )
        if default is not dataclasses.MISSING and getattr(value, f.name) == default and f.name not in ("timestamp",):
            return False
    return True


def test_every_value_type_of_the_spec_has_an_example() -> None:
    names = {"Message", "PagletEvent", "CreationEvent", "MobilityEvent", "CloneEvent", "PersistencyEvent", "ContextEvent",
             "TransferTicket", "DeactivationPolicy", "DeactivationRequest", "PagletProxyRef", "HostRef", "ServiceRecord",
             "ArtifactRef", "PagletFileRef"}  # fmt: skip
    assert {type(v).__name__ for v in EXAMPLES} == names
    for value in EXAMPLES:
        assert _all_fields_differ_from_defaults(value), f"{type(value).__name__} example leaves a field at its default"


@pytest.mark.parametrize("value", EXAMPLES, ids=_ids)
def test_to_wire_from_wire_round_trip(value: Any) -> None:
    wire = value.to_wire()
    assert type(value).from_wire(wire) == value


@pytest.mark.parametrize("value", EXAMPLES, ids=_ids)
def test_wire_form_travels_as_json_and_as_cbor(value: Any) -> None:
    wire = value.to_wire()
    assert type(value).from_wire(paglets._json_loads(paglets._json_dumps(wire))) == value
    assert type(value).from_wire(from_cbor(to_cbor(wire))) == value


@pytest.mark.parametrize("value", EXAMPLES, ids=_ids)
def test_value_round_trips_through_cbor_as_a_dataclass(value: Any) -> None:
    back = from_cbor(to_cbor(value))
    assert type(back) is type(value) and back == value


@pytest.mark.parametrize("value", EXAMPLES, ids=_ids)
def test_wire_form_is_plain_data(value: Any) -> None:
    """Wire maps hold only JSON/CBOR-native values; enums travel as their string values."""

    def walk(tree: Any) -> None:
        assert type(tree) in (dict, list, str, int, float, bool, bytes, type(None)), type(tree)
        if isinstance(tree, dict):
            assert all(type(k) is str for k in tree)
            for item in tree.values():
                walk(item)
        elif isinstance(tree, list):
            for item in tree:
                walk(item)

    walk(value.to_wire())


def test_enums_travel_as_their_string_values() -> None:
    ticket = TransferTicket("beta", arrival_mode=ArrivalMode.INACTIVE).to_wire()
    assert ticket["arrival_mode"] == "inactive" and type(ticket["arrival_mode"]) is str
    record = ServiceRecord("s", "a", "http://h:1", scope=ServiceScope.MESH).to_wire()
    assert record["scope"] == "mesh" and type(record["scope"]) is str
    assert TransferTicket.from_wire({"destination": "b", "arrival_mode": "inactive"}).arrival_mode is ArrivalMode.INACTIVE
    assert ServiceRecord.from_wire({"name": "s", "agent_id": "a", "host_url": "u", "scope": "mesh"}).scope is ServiceScope.MESH


def test_tuples_come_back_as_tuples() -> None:
    ticket = TransferTicket.from_wire({"destination": "b", "required_capabilities": ["x", "y"]})
    assert ticket.required_capabilities == ("x", "y")
    host = HostRef.from_wire({"name": "n", "url": "u", "tags": ["a"]})
    assert host.tags == ("a",)


def test_service_record_fills_in_its_proxy() -> None:
    record = ServiceRecord.from_wire({"name": "s", "agent_id": "a1", "host_url": "http://h:1"})
    assert record.proxy == PagletProxyRef("http://h:1", "a1")


def test_missing_optional_fields_take_their_defaults() -> None:
    assert TransferTicket.from_wire({"destination": "b"}) == TransferTicket("b")
    assert DeactivationPolicy.from_wire({}) == DeactivationPolicy()
    assert Message.from_wire({"kind": "k"}).priority == NORMAL_PRIORITY


# -- from_wire refuses wrong types, naming the field ----------------------------------------------

BAD = [
    (Message, {"kind": "k", "priority": "high"}, "priority"),
    (Message, {"kind": "k", "priority": 11}, "priority"),
    (Message, {"kind": "k", "priority": -1}, "priority"),
    (Message, {"kind": "k", "priority": True}, "priority"),
    (Message, {"kind": "k", "priority": 5.0}, "priority"),
    (Message, {"kind": 5}, "kind"),
    (Message, {"kind": ""}, "kind"),
    (Message, {"kind": "k" * 257}, "kind"),
    (Message, {}, "kind"),
    (Message, {"kind": "k", "args": [1, 2]}, "args"),
    (Message, {"kind": "k", "args": "x"}, "args"),
    (Message, {"kind": "k", "message_type": 3}, "message_type"),
    (Message, {"kind": "k", "message_type": "future"}, "message_type"),
    (Message, {"kind": "k", "message_type": True}, "message_type"),
    (Message, {"kind": "k", "sender": 5}, "sender"),
    (Message, {"kind": "k", "reply_to": ["x"]}, "reply_to"),
    (Message, {"kind": "k", "message_id": 7}, "message_id"),
    (Message, {"kind": "k", "timestamp": "now"}, "timestamp"),
    (Message, {"kind": "k", "timestamp": float("nan")}, "timestamp"),
    (Message, ["kind", "k"], "message"),
    (PagletEvent, {"agent_id": 1, "host_name": "h", "host_address": "u"}, "agent_id"),
    (PagletEvent, {"agent_id": "a", "host_name": "h", "host_address": "u", "timestamp": "t"}, "timestamp"),
    (PagletEvent, {"agent_id": "a", "host_name": "h"}, "host_address"),
    (MobilityEvent, {"agent_id": "a", "host_name": "h", "host_address": "u", "reason": 3}, "reason"),
    (CloneEvent, {"agent_id": "a", "host_name": "h", "host_address": "u", "clone_agent_id": None}, "clone_agent_id"),
    (PersistencyEvent, {"agent_id": "a", "host_name": "h", "host_address": "u", "policy": "never"}, "policy"),
    (ContextEvent, {"event_id": "1", "kind": "k", "host_name": "h", "host_address": "u"}, "event_id"),
    (ContextEvent, {"event_id": True, "kind": "k", "host_name": "h", "host_address": "u"}, "event_id"),
    (ContextEvent, {"event_id": 1, "kind": "k", "host_name": "h", "host_address": "u", "data": [1]}, "data"),
    (TransferTicket, {"destination": 5}, "destination"),
    (TransferTicket, {"destination": "b", "timeout": "10"}, "timeout"),
    (TransferTicket, {"destination": "b", "retries": 1.5}, "retries"),
    (TransferTicket, {"destination": "b", "arrival_mode": "sideways"}, "arrival_mode"),
    (TransferTicket, {"destination": "b", "required_capabilities": [1]}, "required_capabilities"),
    (TransferTicket, {"destination": "b", "required_capabilities": "gpu"}, "required_capabilities"),
    (DeactivationPolicy, {"activate_on_message": "yes"}, "activate_on_message"),
    (DeactivationPolicy, {"activate_at": "tomorrow"}, "activate_at"),
    (DeactivationRequest, {"metadata": [1]}, "metadata"),
    (DeactivationRequest, {"policy": [True]}, "policy"),
    (PagletProxyRef, {"host_url": "u"}, "agent_id"),
    (PagletProxyRef, {"host_url": "u", "agent_id": 3}, "agent_id"),
    (HostRef, {"name": 5, "url": "u"}, "name"),
    (HostRef, {"name": "n", "url": "u", "online": 1}, "online"),
    (HostRef, {"name": "n", "url": "u", "active_count": "3"}, "active_count"),
    (HostRef, {"name": "n", "url": "u", "tags": ["a", 2]}, "tags"),
    (ServiceRecord, {"name": "s", "agent_id": "a", "host_url": "u", "scope": "galaxy"}, "scope"),
    (ServiceRecord, {"name": "s", "agent_id": "a", "host_url": "u", "capabilities": [None]}, "capabilities"),
    (ServiceRecord, {"name": "s", "agent_id": "a", "host_url": "u", "proxy": {"host_url": "u"}}, "proxy"),
    (ArtifactRef, {"host_url": "u", "artifact_id": "x", "size": "big"}, "size"),
    (PagletFileRef, {"name": ["x"]}, "name"),
    (PagletFileRef, {"name": "x", "size": None}, "size"),
    (HostRef, "not a map", "HostRef"),
]


@pytest.mark.parametrize(("cls", "payload", "named"), BAD, ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, n) in enumerate(BAD)])
def test_from_wire_refuses_wrong_types_naming_the_field(cls: type, payload: Any, named: str) -> None:
    with pytest.raises(SerializationError) as info:
        cls.from_wire(payload)
    assert named in str(info.value)


def test_message_from_wire_refuses_a_class_it_may_not_build() -> None:
    with pytest.raises(paglets.ForbiddenError):
        Message.from_wire({"kind": "k", "arg": {"$dc": "os:system", "$f": {}}})


def test_a_message_keeps_its_timestamp_even_zero() -> None:
    for stamp in (0.0, 0, 1.5, 1e12):
        assert Message.from_wire(Message("k", timestamp=stamp).to_wire()).timestamp == stamp


@settings(max_examples=200, deadline=None, database=None, phases=[Phase.explicit, Phase.generate, Phase.shrink])
@given(
    kind=st.text(min_size=1, max_size=20),
    args=st.dictionaries(st.text(max_size=5) | st.integers(), st.integers() | st.text() | st.none() | st.binary(max_size=4), max_size=4),
    priority=st.integers(UNQUEUED_PRIORITY, MAX_PRIORITY),
    message_type=st.sampled_from([SYNCHRONOUS, FUTURE, ONEWAY]),
    timestamp=st.floats(allow_nan=False, allow_infinity=False).filter(bool),  # 0.0 has its own test above
)
def test_messages_round_trip(kind: str, args: dict[Any, Any], priority: int, message_type: int, timestamp: float) -> None:
    message = Message(kind, args, arg=(1, "x"), priority=priority, message_type=message_type, timestamp=timestamp)
    assert Message.from_wire(paglets._json_loads(paglets._json_dumps(message.to_wire()))) == message
    assert from_cbor(to_cbor(message)) == message


# -- Message helpers -------------------------------------------------------------------------------


def test_message_defaults() -> None:
    before = time.time()
    a, b = Message("k"), Message("k")
    assert (a.args, a.arg, a.sender, a.reply_to) == ({}, None, None, None)
    assert (a.priority, a.message_type) == (NORMAL_PRIORITY, SYNCHRONOUS)
    assert before <= a.timestamp <= time.time()
    assert a.message_id and a.message_id != b.message_id
    a.args["x"] = 1
    assert b.args == {}  # no shared default dict


def test_get_arg_and_set_arg() -> None:
    message = Message("k", {"a": 1, "none": None}, arg="plain")
    assert message.get_arg("a") == 1
    assert message.get_arg("missing") is None
    assert message.get_arg("missing", 7) == 7
    assert message.get_arg("none", 7) is None  # present but None is still present
    assert message.get_arg() == "plain"
    assert Message("k").get_arg(default="d") == "d"
    assert message.set_arg("b", 2) is message
    assert message.get_arg("b") == 2 and message.args == {"a": 1, "none": None, "b": 2}


def test_same_kind() -> None:
    message = Message("ping")
    assert message.same_kind("ping") and not message.same_kind("pong")
    assert message.same_kind(Message("ping", {"x": 1})) and not message.same_kind(Message("Ping"))


def test_priority_steps_stay_within_bounds() -> None:
    message = Message("k", priority=MAX_PRIORITY - 1)
    message.increase_priority()
    assert message.priority == MAX_PRIORITY
    message.increase_priority()
    assert message.priority == MAX_PRIORITY
    message = Message("k", priority=MIN_PRIORITY + 1)
    message.decrease_priority()
    assert message.priority == MIN_PRIORITY
    message.decrease_priority()
    assert message.priority == MIN_PRIORITY
    message = Message("k")
    message.increase_priority()
    message.decrease_priority()
    message.decrease_priority()
    assert message.priority == NORMAL_PRIORITY - 1


def test_priority_and_type_constants() -> None:
    assert (UNQUEUED_PRIORITY, MIN_PRIORITY, NORMAL_PRIORITY, MAX_PRIORITY) == (0, 1, 5, 10)
    assert len({SYNCHRONOUS, FUTURE, ONEWAY}) == 3


def test_deactivation_policy_after() -> None:
    before = time.time()
    policy = DeactivationPolicy.after(30, activate_on_message=False)
    after = time.time()
    assert before + 30 <= policy.activate_at <= after + 30
    assert policy.activate_on_message is False and policy.queue_messages_when_inactive is True
    assert DeactivationPolicy.from_wire(policy.to_wire()) == policy


def test_deactivation_policy_defaults() -> None:
    assert DeactivationPolicy() == DeactivationPolicy(True, True, False, None)
    request = DeactivationRequest()
    assert (request.reason, request.source, request.policy, request.metadata) == ("deactivate", "external", None, {})


def test_events_are_frozen() -> None:
    event = CreationEvent("a", "h", "u", init=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.agent_id = "b"  # type: ignore[misc]


def test_proxy_ref_resolves_to_a_proxy_that_talks_through_what_it_was_given() -> None:
    ref = PagletProxyRef("http://beta:2/", "a2")
    sent: list[Any] = []

    class Transport(paglets.HostClient):  # a client whose sends are recorded instead of going out
        def send_message(self, host_url: str, agent_id: str, message: Message, **options: Any) -> Any:
            sent.append((host_url, agent_id, message.kind, message.args))
            return "pong"

    proxy = ref.resolve(Transport())
    assert isinstance(proxy, paglets.PagletProxy)
    assert (proxy.host_url, proxy.agent_id) == ("http://beta:2", "a2")
    assert proxy.send("ping", n=1) == "pong"
    assert sent == [("http://beta:2", "a2", "ping", {"n": 1})]
    assert proxy.ref() == PagletProxyRef("http://beta:2", "a2")


# -- FutureReply -----------------------------------------------------------------------------------


def test_future_reply_waits_then_gives_the_value() -> None:
    future: Future[Any] = Future()
    reply = FutureReply(future)
    assert not reply.is_available()
    assert reply.wait_for_reply(0.01) is False
    with pytest.raises(TimeoutError):
        reply.get_reply(0.01)
    future.set_result("42")
    assert reply.is_available() and reply.wait_for_reply(0) is True
    assert reply.get_reply() == "42"
    assert reply.get_int_reply() == 42 and reply.get_float_reply() == 42.0
    assert reply.get_string_reply() == "42" and reply.get_boolean_reply() is True


def test_future_reply_reraises_the_handlers_error() -> None:
    error = ValueError("bad value 3")
    reply = FutureReply.of(error=error)
    assert reply.is_available() and reply.wait_for_reply(0) is True
    with pytest.raises(ValueError, match="bad value 3") as info:
        reply.get_reply()
    assert info.value is error
    with pytest.raises(ValueError):
        reply.get_int_reply()


def test_future_reply_of_a_value() -> None:
    assert FutureReply.of(None).get_reply(0) is None
    assert FutureReply.of(0).get_boolean_reply(0) is False


def test_future_reply_completed_from_another_thread() -> None:
    future: Future[Any] = Future()
    go = threading.Event()
    worker = threading.Thread(target=lambda: (go.wait(5), future.set_result("done")))
    worker.start()
    reply = FutureReply(future)
    go.set()
    assert reply.get_reply(5) == "done"
    worker.join(5)


# -- ReplySet --------------------------------------------------------------------------------------


def _pending(n: int) -> tuple[list[Future[Any]], list[FutureReply]]:
    futures: list[Future[Any]] = [Future() for _ in range(n)]
    return futures, [FutureReply(f) for f in futures]


def test_replies_are_taken_in_the_order_they_arrive() -> None:
    futures, replies = _pending(4)
    reply_set = ReplySet(replies)
    assert len(reply_set) == 4 and reply_set.count_unavailable() == 4
    for i in (2, 0, 3):
        futures[i].set_result(i)
    assert reply_set.count_available() == 3 and reply_set.count_unavailable() == 1
    assert reply_set.is_any_available() and not reply_set.are_all_available()
    taken = [reply_set.get_next_future_reply(0) for _ in range(3)]
    assert [r.get_reply() for r in taken] == [2, 0, 3]
    assert taken == [replies[2], replies[0], replies[3]]
    assert not reply_set.is_any_available() and reply_set.has_more_future_replies()
    futures[1].set_exception(KeyError("k"))
    assert reply_set.are_all_available()
    last = reply_set.get_next_future_reply(0)
    assert last is replies[1]
    with pytest.raises(KeyError):
        last.get_reply()
    assert not reply_set.has_more_future_replies() and len(reply_set) == 0


def test_replies_done_before_they_are_added_count_as_arrived_in_adding_order() -> None:
    futures, replies = _pending(3)
    futures[1].set_result("b")
    reply_set = ReplySet()
    reply_set.add_future_reply(replies[0])
    reply_set.add_future_reply(FutureReply.of("a"))
    reply_set.add_future_reply(replies[1])
    reply_set.add_future_reply(replies[2])
    futures[2].set_result("c")
    futures[0].set_result("z")
    assert [r.get_reply() for r in reply_set] == ["a", "b", "c", "z"]


def test_get_next_times_out_with_none_and_keeps_the_pending_reply() -> None:
    futures, replies = _pending(1)
    reply_set = ReplySet(replies)
    assert reply_set.get_next_future_reply(timeout=0.02) is None
    assert reply_set.wait_for_next_future_reply(timeout=0.02) is False
    assert reply_set.wait_for_all_replies(timeout=0.02) is False
    assert reply_set.has_more_future_replies() and reply_set.count_unavailable() == 1
    futures[0].set_result(1)
    assert reply_set.wait_for_next_future_reply(timeout=0) is True
    assert reply_set.wait_for_all_replies(timeout=0) is True
    assert reply_set.get_next_future_reply(timeout=0) is replies[0]


def test_an_empty_reply_set_never_blocks() -> None:
    reply_set = ReplySet()
    assert reply_set.get_next_future_reply() is None  # no timeout: would hang if it waited
    assert reply_set.wait_for_next_future_reply() is False
    assert reply_set.wait_for_all_replies() is True
    assert list(reply_set) == [] and reply_set.are_all_available()


def test_iteration_waits_for_late_replies_and_ends_when_all_are_taken() -> None:
    futures, replies = _pending(3)
    reply_set = ReplySet(replies)
    futures[1].set_result(1)
    got: list[Any] = []
    release = threading.Event()

    def finish() -> None:
        release.wait(5)
        futures[2].set_result(2)
        futures[0].set_result(0)

    worker = threading.Thread(target=finish)
    worker.start()
    for reply in reply_set:
        got.append(reply.get_reply())
        release.set()  # the rest arrive only after the first was taken
    worker.join(5)
    assert got == [1, 2, 0]
    assert list(reply_set) == []


def test_one_reply_in_two_sets() -> None:
    futures, replies = _pending(1)
    first, second = ReplySet(replies), ReplySet(replies)
    futures[0].set_result("x")
    assert first.get_next_future_reply(0) is replies[0] and second.get_next_future_reply(0) is replies[0]
