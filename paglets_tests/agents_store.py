"""Paglets used by test_store.py.  Workers find classes by module:qualname, so they live here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from paglets import (
    DeactivationPolicy,
    DeactivationRequest,
    Message,
    Paglet,
    PagletState,
    PersistencyEvent,
)
from paglets_tests.agents import CheckpointedCounter, Counter


@dataclass
class AppendState(PagletState):
    log: list[Any] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


class Appender(Paglet[AppendState]):
    """Appends each "append" message's value to its log; records activation reasons; uses storage."""

    State = AppendState

    def on_activation(self, event: PersistencyEvent) -> None:
        with self.locked():
            self.state.activations.append(event.reason)

    def handle_message(self, message: Message) -> Any:
        kind = message.kind
        if kind == "append":
            with self.locked():
                self.state.log.append(message.get_arg("value"))
                return len(self.state.log)
        if kind == "log":
            return list(self.state.log)
        if kind == "activations":
            return list(self.state.activations)
        if kind == "requests":
            return list(self.state.requests)
        if kind == "pid":
            return os.getpid()
        if kind == "workdir":
            path = self.work_dir()
            (path / "scratch.txt").write_text("scratch")
            return str(path)
        if kind == "sleep-self":  # deactivate itself until a timer wakes it; messages wait in the queue
            self.deactivate(reason="nap", policy=DeactivationPolicy.after(float(message.get_arg("seconds")), activate_on_message=False))
            return "napping"
        if kind.startswith("store-"):
            return self._storage(kind[6:], message)
        return self.not_handled()

    def _storage(self, op: str, message: Message) -> Any:
        store = self.persistent_storage(quota_bytes=message.get_arg("quota"))
        if op == "write":
            store.write_bytes(message.get_arg("key"), message.get_arg("data"))
            return None
        if op == "read":
            return store.read_bytes(message.get_arg("key"))
        if op == "exists":
            return store.exists(message.get_arg("key"))
        if op == "keys":
            return store.keys()
        if op == "delete":
            store.delete(message.get_arg("key"))
            return None
        if op == "status":
            status = store.status()
            return [status.used_bytes, status.quota_bytes, status.files]
        return self.not_handled()


class CheckpointedAppender(Appender):
    """An Appender whose state is stored after every handled message."""

    CHECKPOINT = "message"


class OtherAppender(Appender):
    """Another class: its persistent storage is its own."""


class StrictSleeper(Appender):
    """Chooses its own policy whatever an external request asks: no wake on message, no queue."""

    def deactivation_policy(self, request: DeactivationRequest) -> DeactivationPolicy:
        with self.locked():
            self.state.requests.append(f"{request.source}:{request.reason}")
        if request.source == "self":
            return request.policy or DeactivationPolicy()
        return DeactivationPolicy(activate_on_message=False, queue_messages_when_inactive=False)


class RecordingCounter(CheckpointedCounter):
    """A CheckpointedCounter that writes every activation reason into ``state.seen``."""

    def on_activation(self, event: PersistencyEvent) -> None:
        self.state.seen.append(f"activation:{event.reason}")


class SnapshotCounter(Counter):
    """Checkpoints only at lifecycle steps and when asked to with "snapshot"."""

    def handle_message(self, message: Message) -> Any:
        if message.kind == "snapshot":
            self.snapshot()
            return self.state.count
        return super().handle_message(message)
