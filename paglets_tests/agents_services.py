"""Paglets used by test_services.py.  Workers find classes by module:qualname, so they live here."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from paglets import (
    CreationEvent,
    EmptyPayload,
    Message,
    Paglet,
    PagletProxyRef,
    PagletState,
    PersistencyEvent,
    ServiceContract,
    ServiceOperation,
    ServiceScope,
)


# -- a plain registry user -----------------------------------------------------------------------
@dataclass
class AdvertiserState(PagletState):
    calls: int = 0


class Advertiser(Paglet[AdvertiserState]):
    """Advertises, withdraws and looks up services from inside, and calls what it finds."""

    State = AdvertiserState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "advertise":
            return self.advertise_service(
                message.get_arg("name"),
                capabilities=list(message.get_arg("capabilities", [])),
                metadata=dict(message.get_arg("metadata", {})),
                scope=ServiceScope(message.get_arg("scope", "local")),
                ttl=message.get_arg("ttl"),
            )
        if message.kind == "unadvertise":
            return self.unadvertise_service(message.get_arg("name"))
        if message.kind == "lookup":
            return self.lookup_services(message.get_arg("name"), message.get_arg("capability"),
                                        ServiceScope(message.get_arg("scope", "local")))  # fmt: skip
        if message.kind == "lookup-one":
            return self.lookup_service(message.get_arg("name"), message.get_arg("capability"))
        if message.kind == "call-ref":
            ref = message.get_arg("ref")
            assert isinstance(ref, PagletProxyRef)
            return ref.resolve(self.context).send(Message("whoami"))
        if message.kind == "whoami":
            self.state.calls += 1
            return {"agent_id": self.agent_id, "host": self.context.name, "calls": self.state.calls}
        return self.not_handled()


# -- a typed contract ------------------------------------------------------------------------------
@dataclass
class AddRequest:
    a: int
    b: int
    note: str | None = None


@dataclass
class AddReply:
    total: int
    note: str = ""


@dataclass
class RecordRequest:
    text: str


@dataclass
class HistoryReply:
    items: list[str] = field(default_factory=list)
    provider: str = ""


def _calc_operations() -> tuple[ServiceOperation[Any, Any], ...]:
    return (
        ServiceOperation("add", AddRequest, AddReply),
        ServiceOperation("record", RecordRequest, EmptyPayload),
        ServiceOperation("history", EmptyPayload, HistoryReply),
        ServiceOperation("broken", AddRequest, AddReply),
    )


CALC_V1 = ServiceContract("calc", "1", _calc_operations())
CALC_V2 = ServiceContract("calc", "2", _calc_operations())


@dataclass
class CalcState(PagletState):
    version: str = "1"
    history: list[str] = field(default_factory=list)
    #: When set, "add" answers this raw map instead of a checked AddReply (a provider that breaks the contract).
    raw_reply: dict[str, Any] | None = None


class CalcProvider(Paglet[CalcState]):
    """Provides CALC_V1 (or CALC_V2 with init {"version": "2"}); advertises it on "advertise"."""

    State = CalcState

    @property
    def contract(self) -> ServiceContract:
        return CALC_V2 if self.state.version == "2" else CALC_V1

    def on_creation(self, event: CreationEvent) -> None:
        init = event.init if isinstance(event.init, dict) else {}
        self.state.version = str(init.get("version", "1"))

    def _advertise(self, scope: str) -> Any:
        # On a message rather than in on_creation, so these tests do not depend on advertising from hooks
        # (test_advertise_from_lifecycle_hooks covers that).
        return self.advertise_contract(self.contract, scope=ServiceScope(scope), metadata={"region": "test"})

    def add(self, request: AddRequest) -> AddReply:
        return AddReply(request.a + request.b, request.note or "")

    def record(self, request: RecordRequest) -> None:
        self.state.history.append(request.text)

    def history(self, request: EmptyPayload) -> HistoryReply:
        return HistoryReply(list(self.state.history), self.agent_id)

    def broken(self, request: AddRequest) -> Any:
        return AddReply(total=str(request.a + request.b))  # type: ignore[arg-type]  # the wrong type on purpose

    def handle_message(self, message: Message) -> Any:
        if message.kind == "advertise":
            return self._advertise(message.get_arg("scope", "local"))
        if message.kind == "set-raw":
            self.state.raw_reply = message.get_arg("reply")
            return True
        if message.kind == "add" and self.state.raw_reply is not None:
            return dict(self.state.raw_reply)
        return self.contract.route(
            message, {"add": self.add, "record": self.record, "history": self.history, "broken": self.broken}, default=self.not_handled()
        )


class ContractCaller(Paglet[PagletState]):
    """Finds a calc provider by contract from inside a paglet and calls it."""

    def handle_message(self, message: Message) -> Any:
        contract = CALC_V2 if message.get_arg("version") == "2" else CALC_V1
        scope = ServiceScope(message.get_arg("scope", "local"))
        if message.kind == "add":
            handle = self.require_contract(contract, scope=scope)
            reply = handle.call("add", AddRequest(int(message.get_arg("a")), int(message.get_arg("b"))))
            return {"total": reply.total, "type": type(reply).__name__, "provider": handle.record.agent_id}
        if message.kind == "find":
            handle = self.lookup_contract(contract, scope=scope)
            return None if handle is None else handle.record.agent_id
        return self.not_handled()


# -- a resident service -------------------------------------------------------------------------------
@dataclass
class BumpRequest:
    by: int = 1


@dataclass
class TallyReply:
    count: int
    label: str
    events: list[str]
    pid: int


TALLY_CONTRACT = ServiceContract("tally", "1", (ServiceOperation("bump", BumpRequest, TallyReply),))
#: The same operation under other names, so that one host can run several Tally residents told apart by contract.
TALLY_B = ServiceContract("tally-b", "1", TALLY_CONTRACT.operations)
TALLY_C = ServiceContract("tally-c", "1", TALLY_CONTRACT.operations)


@dataclass
class TallyState(PagletState):
    count: int = 0
    label: str = ""
    events: list[str] = field(default_factory=list)


class Tally(Paglet[TallyState]):
    """A resident service: counts bumps and writes its lifecycle hooks into its state."""

    State = TallyState
    CONTRACT = TALLY_CONTRACT

    def on_creation(self, event: CreationEvent) -> None:
        self.state.events.append("creation")

    def on_activation(self, event: PersistencyEvent) -> None:
        self.state.events.append(f"activation:{event.reason}")

    def on_deactivating(self, event: PersistencyEvent) -> None:
        self.state.events.append("deactivating")

    def bump(self, request: BumpRequest) -> TallyReply:
        self.state.count += request.by
        return TallyReply(self.state.count, self.state.label, list(self.state.events), os.getpid())

    def handle_message(self, message: Message) -> Any:
        return TALLY_CONTRACT.route(message, {"bump": self.bump}, default=self.not_handled())


# -- memory hogs -------------------------------------------------------------------------------------
MIB = 1 << 20


@dataclass
class HogState(PagletState):
    pass


class Hog(Paglet[HogState]):
    """Allocates on "hog" until stopped (capped, so a missing limit fails the test instead of the machine)."""

    State = HogState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "hog":
            cap = int(message.get_arg("cap_mib", 1024))
            kept = []
            for _ in range(cap // 16):
                kept.append(b"x" * (16 * MIB))  # filled, so every page counts in RSS too
            return f"allocated {len(kept) * 16} MiB and survived"
        if message.kind == "spin":
            until = time.process_time() + float(message.get_arg("cpu_seconds", 0.2))
            while time.process_time() < until:
                pass
            return time.process_time()
        if message.kind == "pid":
            return os.getpid()
        if message.kind == "ping":
            return "pong"
        return self.not_handled()


class LimitedHog(Hog):
    """The same hog with a class memory limit of 256 MiB."""

    MEMORY_LIMIT = 256 * MIB


class SelfAdvertiser(Advertiser):
    """Advertises "self-service" in on_creation and again in on_arrival (records do not travel)."""

    def on_creation(self, event: CreationEvent) -> None:
        if event.init != "quiet":
            self.advertise_service("self-service", capabilities=["whoami"], metadata={"at": self.context.name})

    def on_arrival(self, event: Any) -> None:
        self.advertise_service("self-service", capabilities=["whoami"], metadata={"at": self.context.name})


@dataclass
class RunHogState(PagletState):
    hog_mib: int = 0


class RunHog(Paglet[RunHogState]):
    """Allocates in run() (its background thread) when its state says so; answers "ping"."""

    State = RunHogState
    MEMORY_LIMIT = 256 * MIB

    def run(self) -> None:
        kept = []
        for _ in range(self.state.hog_mib // 16):
            kept.append(b"x" * (16 * MIB))

    def handle_message(self, message: Message) -> Any:
        if message.kind == "pid":
            return os.getpid()
        if message.kind == "ping":
            return "pong"
        return self.not_handled()
