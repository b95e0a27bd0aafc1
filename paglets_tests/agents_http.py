"""Paglets used by the HTTP API and CLI tests (workers find classes by module:qualname)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from paglets import Message, Paglet, PagletState


class QuotaExceeded(Exception):
    """A paglet's own exception class: a client that has this module must get this class back."""


@dataclass
class ProviderState(PagletState):
    calls: int = 0
    notes: list[str] = field(default_factory=list)


class Provider(Paglet[ProviderState]):
    """Advertises a service when asked; raises its own exception class on "over-quota"."""

    State = ProviderState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "advertise":
            record = self.advertise_service(message.get_arg("name", "calc"), capabilities=["add", "echo"], metadata={"unit": "apples"})
            return record.name
        if message.kind == "over-quota":
            raise QuotaExceeded(f"quota of {message.get_arg('limit')} exceeded")
        if message.kind == "key-error":
            raise KeyError("missing")
        if message.kind == "call":
            self.state.calls += 1
            return self.state.calls
        return self.not_handled()
