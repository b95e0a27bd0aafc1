"""Paglets used by the tests.  Workers find classes by module:qualname, so they live here."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from paglets import (
    CloneEvent,
    CreationEvent,
    DeactivationPolicy,
    Message,
    MobilityEvent,
    Paglet,
    PagletState,
    PersistencyEvent,
)


@dataclass
class CounterState(PagletState):
    count: int = 0
    seen: list[str] = field(default_factory=list)


class Counter(Paglet[CounterState]):
    """The SPEC's example: add, get, and a few failure kinds."""

    State = CounterState

    def on_creation(self, event: CreationEvent) -> None:
        if isinstance(event.init, int):
            self.state.count = event.init

    def on_arrival(self, event: MobilityEvent) -> None:
        self.state.seen.append(event.host_name)

    def handle_message(self, message: Message) -> Any:
        if message.kind == "add":
            self.state.count += int(message.get_arg("by", 1))
            return self.state.count
        if message.kind == "get":
            return self.state.count
        if message.kind == "echo":
            return message.get_arg("value")
        if message.kind == "raise":
            raise ValueError(f"bad value {message.get_arg('value')!r}")
        if message.kind == "sleep":
            time.sleep(float(message.get_arg("seconds", 0.1)))
            return "slept"
        if message.kind == "pid":
            return os.getpid()
        return self.not_handled()


class CheckpointedCounter(Counter):
    """Stores its state after every handled message."""

    CHECKPOINT = "message"


@dataclass
class RecorderState(PagletState):
    events: list[str] = field(default_factory=list)


class Recorder(Paglet[RecorderState]):
    """Writes every hook it sees into its state, in order."""

    State = RecorderState

    def _note(self, text: str) -> None:
        with self.locked():
            self.state.events.append(text)

    def on_creation(self, event: CreationEvent) -> None:
        self._note(f"creation:{event.init}")

    def on_dispatching(self, event: MobilityEvent) -> None:
        self._note(f"dispatching:{event.target_host_name}")

    def on_arrival(self, event: MobilityEvent) -> None:
        self._note(f"arrival:{event.reason}:{event.host_name}")

    def on_reverting(self, event: MobilityEvent) -> None:
        self._note(f"reverting:{event.host_name}")

    def on_cloning(self, event: CloneEvent) -> None:
        self._note("cloning")

    def on_clone(self, event: CloneEvent) -> None:
        self._note(f"clone:{event.source_agent_id == self.agent_id}")

    def on_cloned(self, event: CloneEvent) -> None:
        self._note("cloned")

    def on_deactivating(self, event: PersistencyEvent) -> None:
        self._note(f"deactivating:{event.reason}")

    def on_activation(self, event: PersistencyEvent) -> None:
        self._note(f"activation:{event.reason}")

    def on_disposing(self, event: PersistencyEvent) -> None:
        self._note("disposing")

    def run(self) -> None:
        self._note("run")

    def handle_message(self, message: Message) -> Any:
        if message.kind == "events":
            with self.locked():
                return list(self.state.events)
        if message.kind == "note":
            self._note(f"message:{message.get_arg('text')}")
            return None
        if message.kind == "deactivate-me":
            self.deactivate(reason="self", policy=DeactivationPolicy(activate_on_message=True))
            return "going"
        if message.kind == "dispose-me":
            self.dispose()
            return "bye"
        return self.not_handled()


@dataclass
class LogState(PagletState):
    log: list[str] = field(default_factory=list)


class Gate(Paglet[LogState]):
    """Blocks its mailbox on "block" until an UNQUEUED "open" arrives, so messages can pile up."""

    State = LogState

    def on_creation(self, event: CreationEvent) -> None:
        self.gate = threading.Event()
        self.blocked = threading.Event()

    on_activation = on_creation  # type: ignore[assignment]

    def handle_message(self, message: Message) -> Any:
        if message.kind == "block":
            self.blocked.set()
            self.gate.wait(30)
            return "unblocked"
        if message.kind == "is-blocked":
            return self.blocked.is_set()
        if message.kind == "open":
            self.gate.set()
            return "opened"
        if message.kind == "log":
            with self.locked():
                self.state.log.append(message.get_arg("text"))
                return list(self.state.log)
        if message.kind == "read":
            return list(self.state.log)
        return self.not_handled()


class Subscriber(Paglet[LogState]):
    """Subscribes to "news" on creation and answers multicasts with its id."""

    State = LogState

    def on_creation(self, event: CreationEvent) -> None:
        self.subscribe_message("news")

    def handle_message(self, message: Message) -> Any:
        if message.kind == "news":
            return f"{self.agent_id}:{message.get_arg('text')}"
        if message.kind == "unsubscribe":
            self.unsubscribe_message("news")
            return True
        return self.not_handled()


class Waiter(Paglet[LogState]):
    """wait_message()/notify_message(): "wait" blocks until a "notify" arrives."""

    State = LogState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "wait":
            woke = self.wait_message(timeout=float(message.get_arg("timeout", 10)))
            return "woken" if woke else "timeout"
        if message.kind == "notify":
            self.notify_message()
            return "notified"
        return self.not_handled()


class Crashy(Paglet[CounterState]):
    """Dies in the ways a paglet can die."""

    State = CounterState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "exit":
            os._exit(3)
        if message.kind == "segv":
            ctypes.string_at(0)
        if message.kind == "hang":
            while True:
                time.sleep(0.05)
        if message.kind == "spin":
            while True:
                pass
        if message.kind == "ping":
            return "pong"
        return self.not_handled()


class HangOnDispose(Crashy):
    """A paglet whose on_disposing never returns."""

    def on_disposing(self, event: PersistencyEvent) -> None:
        while True:
            time.sleep(0.05)


class FailsOnCreation(Paglet[CounterState]):
    """on_creation raises: create must fail with LifecycleError and leave nothing behind."""

    State = CounterState

    def on_creation(self, event: CreationEvent) -> None:
        raise RuntimeError("refusing to be born")


class VetoDispatch(Counter):
    """on_dispatching raises: the move is vetoed."""

    def on_dispatching(self, event: MobilityEvent) -> None:
        raise PermissionError("I stay here")


@dataclass
class TickerState(PagletState):
    ticks: int = 0


class Ticker(Paglet[TickerState]):
    """run() counts in the background until its worker ends."""

    State = TickerState

    def run(self) -> None:
        while True:
            with self.locked():
                self.state.ticks += 1
            self.notify_all_state_changed()
            time.sleep(0.005)

    def handle_message(self, message: Message) -> Any:
        if message.kind == "wait-ticks":
            target = int(message.get_arg("n", 3))
            return self.wait_state(lambda state: state.ticks >= target, timeout=10)
        if message.kind == "ticks":
            return self.state.ticks
        return self.not_handled()


@dataclass
class Point:
    x: int
    y: int


@dataclass
class RichState(PagletState):
    points: list[Point] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)
    blob: bytes = b""
    pair: tuple[int, str] = (0, "")


class Rich(Paglet[RichState]):
    """Returns dataclasses and other rich values."""

    State = RichState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "add-point":
            point = message.get_arg("point")
            assert isinstance(point, Point), type(point)
            self.state.points.append(point)
            return point
        if message.kind == "state":
            return self.state
        return self.not_handled()


class Unencodable(Paglet[CounterState]):
    """Returns things the codec cannot carry."""

    State = CounterState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "lambda":
            return lambda: 1
        if message.kind == "lock":
            return {"lock": threading.Lock()}
        return self.not_handled()


@dataclass
class NotAPagletState:
    """A dataclass posing as a paglet class in hostile requests."""

    value: int = 0
