"""Paglets used by test_mobility.py.  Workers find classes by module:qualname, so they live here."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paglets import (
    ArtifactRef,
    CloneEvent,
    CreationEvent,
    ItineraryAgentMixin,
    ItineraryPlan,
    Message,
    MobilityEvent,
    Paglet,
    PagletError,
    PagletState,
    TransferError,
)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class MoverState(PagletState):
    count: int = 0
    log: list[str] = field(default_factory=list)
    #: Destinations run() dispatches to, one per start of run().
    route: list[str] = field(default_factory=list)
    #: "host/name" -> [path, SHA-256] of each registered file as seen from inside on_arrival / on_clone on that host
    #: (SHA "missing" if absent).
    checks: dict[str, list[str]] = field(default_factory=dict)
    blob: bytes = b""


class Mover(Paglet[MoverState]):
    """Records every mobility hook with the host it ran on, and moves itself on request."""

    State = MoverState

    def _note(self, text: str) -> None:
        with self.locked():
            self.state.log.append(text)

    def _check_files(self) -> None:
        for ref in self.registered_files():
            path = self.file_path(ref.name)
            self.state.checks[f"{self.context.name}/{ref.name}"] = [str(path), sha256_of(path) if path.is_file() else "missing"]

    def on_creation(self, event: CreationEvent) -> None:
        self._note(f"creation@{self.context.name}")

    def on_dispatching(self, event: MobilityEvent) -> None:
        self._note(
            f"dispatching@{self.context.name}:{event.source_host_name}->{event.target_host_name}:{event.target_host_address}:{event.reason}"
        )

    def on_arrival(self, event: MobilityEvent) -> None:
        self._check_files()
        self._note(f"arrival@{self.context.name}:{event.reason}:{event.source_host_name}->{event.target_host_name}")

    def on_reverting(self, event: MobilityEvent) -> None:
        self._note(f"reverting@{self.context.name}:{event.source_host_name}->{event.target_host_name}")

    def on_cloning(self, event: CloneEvent) -> None:
        self._note(f"cloning@{self.context.name}:{event.target_host_name}")

    def on_clone(self, event: CloneEvent) -> None:
        self._check_files()
        mine = event.clone_agent_id == self.agent_id and event.source_agent_id != self.agent_id
        self._note(f"clone@{self.context.name}:{event.source_host_name}->{event.target_host_name}:{mine}")

    def on_cloned(self, event: CloneEvent) -> None:
        self._note(f"cloned@{self.context.name}:{event.clone_agent_id}")

    def run(self) -> None:
        with self.locked():
            target = self.state.route.pop(0) if self.state.route else None
        if target is not None:
            self._note(f"run-dispatch@{self.context.name}")
            self.dispatch(target)

    def handle_message(self, message: Message) -> Any:
        kind = message.kind
        if kind == "add":
            self.state.count += int(message.get_arg("by", 1))
            return self.state.count
        if kind == "get":
            return self.state.count
        if kind == "log":
            with self.locked():
                return list(self.state.log)
        if kind == "where":
            return self.context.name
        if kind == "go":
            target, how = message.get_arg("target"), message.get_arg("how", "dispatch")
            try:
                proxy = self.dispatch_to(target) if how == "dispatch_to" else self.dispatch(target)
            except TransferError as exc:
                return f"stayed:{type(exc).__name__}:{exc}"
            return proxy.host_url
        if kind == "clone":
            target, how = message.get_arg("target"), message.get_arg("how", "clone")
            proxy = self.clone_to(target) if how == "clone_to" else self.clone(target)
            return [proxy.host_url, proxy.agent_id]
        if kind == "register":
            carried = self.register_file(message.get_arg("path"), name=message.get_arg("name"), mode=message.get_arg("mode", "copy"))
            return carried.sha256
        if kind == "file":
            path = self.file_path(message.get_arg("name"))
            return [str(path), sha256_of(path) if path.is_file() else None]
        if kind == "checks":
            return dict(self.state.checks)
        if kind == "blob":
            return [len(self.state.blob), hashlib.sha256(self.state.blob).hexdigest()]
        if kind == "hosts":
            return sorted(ref.name for ref in self.context.available_hosts(include_self=message.get_arg("self", True)))
        if kind == "wait-host":
            return self.context.wait_for_host(message.get_arg("name"), timeout=float(message.get_arg("timeout", 10))).name
        if kind == "upload":
            return self.upload_artifact(message.get_arg("path"), name=message.get_arg("name"))
        if kind == "download":
            ref: ArtifactRef = message.get_arg("ref")
            target = self.work_dir() / message.get_arg("as", "download.bin")
            self.download_artifact(ref, target)
            return [sha256_of(target), os.path.getsize(target)]
        if kind == "delete-artifact":
            self.delete_artifact(message.get_arg("ref"))
            return True
        if kind == "take-artifact":
            artifact: ArtifactRef = message.get_arg("artifact")
            target = self.work_dir() / "taken.bin"
            self.download_artifact(artifact, target)
            return [artifact.name, sha256_of(target), os.path.getsize(target)]
        if kind == "register-bad-name":
            try:
                self.register_file(message.get_arg("path"), name=message.get_arg("name"))
            except PagletError as exc:
                return type(exc).__name__
            return "accepted"
        return self.not_handled()


@dataclass
class WalkState(PagletState):
    itinerary: ItineraryPlan = field(default_factory=ItineraryPlan)
    #: One entry per arrival: [host name, current_index, visited_destinations, current_location].
    arrivals: list[list[Any]] = field(default_factory=list)


class RunWalker(ItineraryAgentMixin, Paglet[WalkState]):
    """Goes on to its next destination from run() (which starts after creation and each arrival)."""

    State = WalkState

    def on_arrival(self, event: MobilityEvent) -> None:
        plan = self.get_itinerary()
        self.state.arrivals.append([self.context.name, plan.current_index, list(plan.visited_destinations), plan.current_location])

    def run(self) -> None:
        self.go_to_next_destination()

    def handle_message(self, message: Message) -> Any:
        if message.kind == "arrivals":
            return list(self.state.arrivals)
        return self.not_handled()


class ArrivalWalker(ItineraryAgentMixin, Paglet[WalkState]):
    """Starts its route on a "start" message and goes on from on_arrival at every stop."""

    State = WalkState

    def on_arrival(self, event: MobilityEvent) -> None:
        plan = self.get_itinerary()
        self.state.arrivals.append([self.context.name, plan.current_index, list(plan.visited_destinations), plan.current_location])
        self.go_to_next_destination()

    def handle_message(self, message: Message) -> Any:
        if message.kind == "start":
            proxy = self.go_to_next_destination()
            return proxy.host_url if proxy is not None else None
        if message.kind == "arrivals":
            return list(self.state.arrivals)
        return self.not_handled()


class SlowArrival(Mover):
    """A Mover whose on_arrival takes a while, so its arrival can be watched from outside."""

    def on_arrival(self, event: MobilityEvent) -> None:
        time.sleep(1.0)
        super().on_arrival(event)


class VetoMover(Mover):
    """A Mover whose on_dispatching vetoes every move, also one it asked for itself."""

    def on_dispatching(self, event: MobilityEvent) -> None:
        raise PermissionError("I stay here")
