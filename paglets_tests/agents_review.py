"""Paglets for the regression tests of the code review (workers find them by module:qualname)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paglets import DeactivationPolicy, Message, Paglet, PagletState
from paglets_tests.agents import Counter, Gate


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


class Relay(Gate):
    """Kind "go" sends "hop" to another Relay; "hop" makes one context call; "block" holds the
    mailbox until an UNQUEUED "open" (Gate's kinds)."""

    def handle_message(self, message: Message) -> Any:
        if message.kind == "hop":
            return self.context.get_property("relay-x", 7)
        if message.kind == "go":
            return self.send(message.get_arg("to"), "hop")
        return super().handle_message(message)


#: Asleep, it queues messages durably and waits for an explicit activation.
QUEUE_ONLY = DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=True)


class QueueCounter(Counter):
    """A Counter that can put itself to sleep from a handler, with the QUEUE_ONLY policy."""

    def handle_message(self, message: Message) -> Any:
        if message.kind == "deactivate-me":
            self.deactivate(reason="self", policy=QUEUE_ONLY)
            return "going"
        return super().handle_message(message)
