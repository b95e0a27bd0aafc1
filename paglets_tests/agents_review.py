"""Paglets for the regression tests of the code review (workers find them by module:qualname)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from paglets import CreationEvent, DeactivationPolicy, Message, Paglet, PagletState
from paglets_tests.agents import Counter


@dataclass
class TallyState(PagletState):
    n: int = 0


class LockedCaller(Paglet[TallyState]):
    """The "ask" kind holds its state lock across a send to another paglet (a context call)."""

    State = TallyState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "ask":
            with self.locked():
                reply = self.send(message.get_arg("other"), Message(message.get_arg("kind", "get")))
                self.state.n += 1
                return reply
        if message.kind == "get":
            return self.state.n
        return self.not_handled()


class Relay(Paglet[TallyState]):
    """Kind "go" sends "hop" to another Relay; "hop" makes one context call; "block" holds the mailbox until an UNQUEUED "open"."""

    State = TallyState

    def on_creation(self, event: CreationEvent) -> None:
        self.gate = threading.Event()
        self.blocked = threading.Event()

    def handle_message(self, message: Message) -> Any:
        if message.kind == "hop":
            return self.context.get_property("relay-x", 7)
        if message.kind == "go":
            return self.send(message.get_arg("to"), "hop")
        if message.kind == "block":
            self.blocked.set()
            self.gate.wait(30)
            return "unblocked"
        if message.kind == "is-blocked":
            return self.blocked.is_set()
        if message.kind == "open":
            self.gate.set()
            return "opened"
        return self.not_handled()


#: Asleep, it queues messages durably and waits for an explicit activation.
QUEUE_ONLY = DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=True)


class QueueCounter(Counter):
    """A Counter that can put itself to sleep from a handler, with the QUEUE_ONLY policy."""

    def handle_message(self, message: Message) -> Any:
        if message.kind == "deactivate-me":
            self.deactivate(reason="self", policy=QUEUE_ONLY)
            return "going"
        return super().handle_message(message)
