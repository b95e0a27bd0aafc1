"""paglets.py: a mobile-agent runtime in one file.

A paglet is a Python object with dataclass state that lives in its own worker process on a host,
answers messages, and can move (dispatch), copy itself (clone), sleep to disk (deactivate) and wake
up again, on one machine or across a mesh of hosts.  It re-imagines IBM's Java Aglets and the
published multi-package ``paglets`` 2.x for small devices: one file, four dependencies (apsw,
cbor2, bottle, psutil), a warm fork server, SQLite for everything that must survive a power cut.

Quick start::

    from dataclasses import dataclass
    from paglets import Host, Message, Paglet, PagletState

    @dataclass
    class CounterState(PagletState):
        count: int = 0

    class Counter(Paglet[CounterState]):
        State = CounterState
        def handle_message(self, message: Message):
            if message.kind == "add":
                self.state.count += int(message.get_arg("by", 1))
                return self.state.count
            return self.not_handled()

    with Host("edge-1", data_dir="./data") as host:
        counter = host.create(Counter)
        print(counter.send(Message("add", {"by": 2})))          # 2

Run a host from a shell with ``python paglets.py serve``; ``python paglets.py --help`` lists the rest.

Map of this file (``grep -n '^# [0-9]*\\. ' paglets.py`` prints it with line numbers):

    1. Imports
    2. Constants and configuration
    3. Errors
    4. Helpers
    5. Wire codec
    6. Value types
    7. Replies, client and proxies
    8. Service contracts
    9. The paglet model
    10. Itineraries
    11. SQLite store
    12. Files and artifacts
    13. Worker protocol
    14. Worker process
    15. Fork server and workers
    16. Mesh
    17. HTTP API
    18. Host
    19. Built-in paglets
    20. Demo and bench
    21. Command line
"""

from __future__ import annotations

if __name__ == "__main__":  # pragma: no cover
    # Guarded here, at the top, so that `python paglets.py` runs the module body once, not twice.
    import paglets  # this file under its own name, so classes have one identity

    raise SystemExit(paglets.main())

__version__ = "0.1.0"

__all__ = [
    # 2. Constants and configuration
    "ACTIVE",
    "ARTIFACT_CHUNK_BYTES",
    "ARTIFACT_QUOTA_BYTES",
    "CALL_TIMEOUT",
    "CONTEXT_THREADS",
    "DEFAULT_PORT",
    "ENV_API_KEY",
    "ENV_CRASH_AT",
    "ENV_TEST_MODE",
    "EVENT_LOG_CAPACITY",
    "GOSSIP_INTERVAL",
    "HOOK_TIMEOUT",
    "HOUSEKEEPING_INTERVAL",
    "KEEPALIVE_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MESH_LOOKUP_TIMEOUT",
    "OFFLINE_AFTER",
    "RESIDENT_IDLE_TIMEOUT",
    "STOP_GRACE",
    "STORAGE_QUOTA_BYTES",
    "EXECUTE_ON_ARRIVAL",
    "EXECUTE_ON_DEFAULT",
    "EXECUTE_ON_DISPATCH",
    "EXECUTE_ON_REVERTING",
    "FUTURE",
    "INACTIVE",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "NORMAL_PRIORITY",
    "ONEWAY",
    "SYNCHRONOUS",
    "UNQUEUED_PRIORITY",
    "ArrivalMode",
    "EnvelopeKind",
    "HostConfig",
    "ResidentLifecycle",
    "ServiceScope",
    # 3. Errors
    "AuthenticationError",
    "ForbiddenError",
    "HostError",
    "HostNotFoundError",
    "InvalidAgentError",
    "LifecycleError",
    "NotHandledError",
    "PagletCrashedError",
    "PagletError",
    "PagletInactiveError",
    "PayloadTooLargeError",
    "RemoteHostError",
    "RequestError",
    "SerializationError",
    "ServiceContractError",
    "ServiceNotFoundError",
    "StorageQuotaError",
    "TransferError",
    # 5. Wire codec
    "from_cbor",
    "to_cbor",
    # 6. Value types
    "ArtifactRef",
    "CloneEvent",
    "ContextEvent",
    "CreationEvent",
    "DeactivationPolicy",
    "DeactivationRequest",
    "HostRef",
    "Message",
    "MobilityEvent",
    "PagletEvent",
    "PagletFileRef",
    "PagletProxyRef",
    "PersistencyEvent",
    "ServiceRecord",
    "TransferTicket",
    # 7. Replies, client and proxies
    "FutureReply",
    "HostClient",
    "PagletProxy",
    "ReplySet",
    # 8. Service contracts
    "CONTRACT_METADATA_KEY",
    "EmptyPayload",
    "ServiceContract",
    "ServiceHandle",
    "ServiceLease",
    "ServiceOperation",
    # 9. The paglet model
    "NOT_HANDLED",
    "Paglet",
    "PagletContext",
    "PagletState",
    "PersistentStorage",
    "ResourceRegistry",
    "StorageStatus",
    "state_locked",
    # 10. Itineraries
    "ItineraryAgentMixin",
    "ItineraryPlan",
    "ItineraryTask",
    "TaskItineraryPlan",
    # 16. Mesh
    "MeshRegistry",
    # 18. Host
    "Host",
    "ResidentService",
    # 19. Built-in paglets
    "SERVER_INFO_CONTRACT",
    "ServerInfo",
    "ServerInfoReply",
    "ServerInfoRequest",
    "Traveller",
    "TravellerState",
    # 21. Command line
    "main",
]

# ==============================================================================
# 1. Imports
# ==============================================================================
# Owns: every import.  The standard library first, alphabetically, then the four dependencies.
# Each dependency has one home section: cbor2 in 5, apsw in 11, psutil in 15 and 19, bottle in 17.
import argparse
import base64
import builtins
import concurrent.futures
import contextlib
import dataclasses
import datetime
import decimal
import enum
import fcntl
import functools
import gc
import hashlib
import heapq
import hmac
import http.client
import http.server
import importlib
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import resource
import select
import selectors
import shutil
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import types
import typing
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import apsw
import bottle
import cbor2
import psutil

# ==============================================================================
# 2. Constants and configuration
# ==============================================================================
# Owns: public constants and enums of SPEC sections 2-3, every tunable default, and HostConfig,
# the one frozen bundle of knobs that the sections below receive instead of 30 arguments.

_log = logging.getLogger("paglets")
_log.addHandler(logging.NullHandler())

#: Paglet states, for ``get_proxies(state)`` and ``PagletProxy.is_state``.
ACTIVE = 0x1
INACTIVE = 0x2

#: Message types (``Message.message_type``).
SYNCHRONOUS = 0
FUTURE = 1
ONEWAY = 2

#: Message priorities: highest first, FIFO within one priority.  UNQUEUED bypasses the queue and
#: runs at once, beside whatever handler is running.
UNQUEUED_PRIORITY = 0
MIN_PRIORITY = 1
NORMAL_PRIORITY = 5
MAX_PRIORITY = 10

#: Phases of a task itinerary.
EXECUTE_ON_ARRIVAL = "arrival"
EXECUTE_ON_DISPATCH = "dispatch"
EXECUTE_ON_REVERTING = "reverting"
EXECUTE_ON_DEFAULT = "default"


class ServiceScope(enum.StrEnum):
    """Where a service is advertised and looked up: this host, or every compatible host."""

    LOCAL = "local"
    MESH = "mesh"


class ResidentLifecycle(enum.StrEnum):
    """When a resident service runs: on first call (and idles out), or from host start."""

    LAZY = "lazy"
    EAGER = "eager"


class ArrivalMode(enum.StrEnum):
    """Whether a paglet that arrives by dispatch or clone starts at once or is stored inactive."""

    ACTIVATE = "activate"
    INACTIVE = "inactive"


class EnvelopeKind(enum.StrEnum):
    """Why an envelope travels between hosts."""

    DISPATCH = "dispatch"
    CLONE = "clone"
    RETRACT = "retract"
    ACTIVATION = "activation"


#: Default port of ``serve`` and of the CLI's ``--host-url``.
DEFAULT_PORT = 8765
#: Largest control request body (JSON or CBOR) the HTTP API reads; bigger gets 413.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Events kept in the database log; the oldest are dropped first.
EVENT_LOG_CAPACITY = 10_000
#: Default quota of ``persistent_storage()`` per paglet class.
STORAGE_QUOTA_BYTES = 10 * 1024 * 1024
#: Default quota of all artifacts on one host.
ARTIFACT_QUOTA_BYTES = 4 * 1024 * 1024 * 1024
#: Artifact chunk size: one short transaction per chunk keeps other writers waiting < 1 ms.
ARTIFACT_CHUNK_BYTES = 512 * 1024
#: Seconds a lifecycle hook (on_creation, on_arrival, ...) may run before it counts as hung.
HOOK_TIMEOUT = 30.0
#: Seconds ``dispose`` and ``stop`` give a worker to finish before it is killed.
STOP_GRACE = 2.0
#: Seconds an HTTP message call waits for a reply when the caller gave no timeout.
CALL_TIMEOUT = 300.0
#: Seconds between two gossip rounds of the mesh, and after which a silent peer is offline.
GOSSIP_INTERVAL = 5.0
OFFLINE_AFTER = 20.0
#: Seconds a mesh-wide service lookup waits for each peer.
MESH_LOOKUP_TIMEOUT = 2.0
#: Seconds a lazy resident service may idle before it is deactivated.
RESIDENT_IDLE_TIMEOUT = 60.0
#: Most HTTP connections served at once; past it, a new connection waits up to 5 s, then is closed.
MAX_CONNECTIONS = 128
#: Seconds an idle keep-alive connection stays open on the server.
KEEPALIVE_TIMEOUT = 30.0
#: Threads that run context calls of workers (sends between paglets, creates, ...).
CONTEXT_THREADS = 64
#: Seconds between two WAL checkpoints and timer sweeps of the host's background thread.
HOUSEKEEPING_INTERVAL = 1.0
#: Environment variables read by the CLI.
ENV_API_KEY = "PAGLETS_API_KEY"
#: Test mode lets a test kill the host process at a named step of a transfer (SPEC section 6).
ENV_TEST_MODE = "PAGLETS_TEST_MODE"
ENV_CRASH_AT = "PAGLETS_CRASH_AT"


@dataclasses.dataclass(frozen=True, slots=True)
class HostConfig:
    """Every knob of one host.  ``Host(...)`` builds one from its keywords."""

    #: The host's name in the mesh (``dispatch_to("beta")``).
    name: str
    #: Address and port to bind; port 0 picks a free port.
    bind_host: str = "127.0.0.1"
    port: int = 0
    #: Folder of the database, work folders and files; None makes a temporary one.
    data_dir: Path | None = None
    #: With a key, every endpoint but ``GET /health`` needs ``Authorization: Bearer <key>``.
    api_key: str | None = None
    peers: tuple[str, ...] = ()
    #: Hosts of another mesh version are listed but are not movement targets.
    mesh_version: str = "1"
    tags: tuple[str, ...] = ()
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Modules (or package prefixes; "*" for any) whose classes may be named over the network.
    allow_modules: tuple[str, ...] = ()
    #: The URL other hosts use to reach this one, when it differs from the bound address.
    public_url: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    event_log_capacity: int = EVENT_LOG_CAPACITY
    storage_quota: int = STORAGE_QUOTA_BYTES
    artifact_quota: int = ARTIFACT_QUOTA_BYTES
    hook_timeout: float = HOOK_TIMEOUT
    stop_grace: float = STOP_GRACE
    call_timeout: float = CALL_TIMEOUT
    gossip_interval: float = GOSSIP_INTERVAL
    offline_after: float = OFFLINE_AFTER
    mesh_lookup_timeout: float = MESH_LOOKUP_TIMEOUT
    #: Bytes of memory (RSS) one worker may use; None for no limit.
    paglet_memory_limit: int | None = None
    resident_services: tuple[Any, ...] = ()
    #: Run the built-in resident services (server-info) besides ``resident_services``.
    builtin_services: bool = True
    max_connections: int = MAX_CONNECTIONS
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    housekeeping_interval: float = HOUSEKEEPING_INTERVAL
    code_version: str = __version__


# ==============================================================================
# 3. Errors
# ==============================================================================
# Owns: PagletError and its subclasses, each with the HTTP status it travels with; the registry
# that turns a wire error back into the same class; the translation of foreign errors at edges.


class PagletError(Exception):
    """Base of every error paglets raises across a public boundary or the wire."""

    #: The HTTP status this error travels with; its class name is its wire ``kind``.
    http_status: ClassVar[int] = 500

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__ == PagletError.__module__:  # an app's own subclass must not take over a wire kind
            _ERRORS[cls.__name__] = cls


_ERRORS: dict[str, type[PagletError]] = {"PagletError": PagletError}


class HostError(PagletError):
    """A host could not do what was asked (a local runtime error)."""


class InvalidAgentError(PagletError):
    """No paglet with that id lives here (any more)."""

    http_status = 404


class HostNotFoundError(HostError):
    """No known host has that name, or a URL is not a host URL."""

    http_status = 404


class LifecycleError(PagletError):
    """A lifecycle step (create, hook, dispatch, deactivate, ...) failed or is not possible now."""

    http_status = 409


class NotHandledError(PagletError):
    """The paglet does not handle messages of that kind."""

    http_status = 400


class PagletCrashedError(PagletError):
    """The paglet's worker process died; its pending and later calls fail with this."""


class PagletInactiveError(PagletError):
    """The paglet is inactive and its policy says to fail fast rather than queue or activate."""

    http_status = 409


class RemoteHostError(PagletError):
    """Another host could not be reached or answered with something that is not our protocol."""

    http_status = 502


class SerializationError(PagletError):
    """A value cannot be carried by the wire codec, or bytes are not a valid wire value."""

    http_status = 400


class TransferError(PagletError):
    """A dispatch, clone or retract did not complete; the paglet stays where it was."""

    http_status = 502


class AuthenticationError(PagletError):
    """The request lacks a valid API key."""

    http_status = 401


class ForbiddenError(PagletError):
    """The request is understood but not allowed (a class from a module that is not allowed)."""

    http_status = 403


class ServiceContractError(PagletError):
    """A typed service contract is misused, or a request or reply does not fit it."""

    http_status = 400


class ServiceNotFoundError(ServiceContractError):
    """No provider of the required service or contract is known."""

    http_status = 404


class StorageQuotaError(PagletError):
    """A write would exceed a storage or artifact quota; nothing was written."""

    http_status = 413


class PayloadTooLargeError(PagletError):
    """A request body is larger than the host accepts."""

    http_status = 413


class RequestError(PagletError):
    """An HTTP request the host cannot serve (no such route, bad media type, missing length)."""

    def __init__(self, message: str = "", status: int = 400) -> None:
        super().__init__(message)
        self.http_status = status  # type: ignore[misc]


class _HandlerError(PagletError):
    """A paglet's own exception whose class cannot be rebuilt here; keeps kind and message."""

    http_status = 422

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


#: Builtin exceptions a handler may raise that come back as themselves (not as _HandlerError).
_BUILTIN_ERRORS: dict[str, type[BaseException]] = {
    name: obj for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, Exception) and not name.startswith("_")
}


def _error_to_wire(exc: BaseException, *, with_traceback: bool = False) -> dict[str, Any]:
    """The JSON/CBOR error body of SPEC section 6: ``{"error": kind, "message": ...}``."""
    cls = type(exc)
    only = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else None
    body: dict[str, Any] = {"error": cls.__name__, "message": str(exc) if only is None else only}
    if not isinstance(exc, PagletError) or cls.__module__ != __name__:
        body["exception"] = f"{cls.__module__}:{cls.__qualname__}"
    if isinstance(exc, _HandlerError) and getattr(exc, "remote_exception", None):
        body["error"], body["exception"] = exc.args[1], exc.remote_exception  # type: ignore[attr-defined]
        body["message"] = exc.args[0]
    if with_traceback and exc.__traceback__ is not None:
        body["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
    return body


def _error_status(exc: BaseException) -> int:
    """The HTTP status an exception travels with: 422 for a paglet's own exception, 500 for ours."""
    if isinstance(exc, PagletError):
        return exc.http_status
    if isinstance(exc, TimeoutError):
        return 504
    return 422 if getattr(exc, "_paglets_remote", False) else 500


def _error_from_wire(body: Any, *, default: type[PagletError] = RemoteHostError) -> BaseException:
    """Rebuild the exception an error body describes, as the same class where that is safe.

    Only our own error classes, builtin exceptions and exception classes of modules that are
    already imported are rebuilt; nothing is imported because an error body named it.
    """
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return default(f"unexpected error body: {str(body)[:200]}")
    kind, message = body["error"], str(body.get("message", ""))
    qualified = body.get("exception")
    if kind in _ERRORS and not qualified:
        with contextlib.suppress(Exception):
            return _ERRORS[kind](message)
    cls = _error_class_for(qualified) if isinstance(qualified, str) else None
    exc: BaseException | None = None
    if cls is not None:
        with contextlib.suppress(Exception):
            exc = cls(message)
    if exc is None:
        exc = _HandlerError(message, kind)
        exc.remote_exception = qualified or kind  # type: ignore[attr-defined]
    with contextlib.suppress(AttributeError):
        exc._paglets_remote = True  # type: ignore[attr-defined]  # a paglet raised it, not this host
    return exc


def _error_class_for(qualified: str) -> type[BaseException] | None:
    module_name, _, qualname = qualified.partition(":")
    if module_name == "builtins":
        return _BUILTIN_ERRORS.get(qualname)
    module = sys.modules.get(module_name)
    if module is None or "__" in qualname:
        return None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    ok = isinstance(obj, type) and issubclass(obj, Exception)
    return obj if ok and f"{obj.__module__}:{obj.__qualname__}" == qualified else None


@contextlib.contextmanager
def _translating(source: tuple[type[BaseException], ...], target: type[PagletError], what: str) -> Iterator[None]:
    """Turn a foreign library's errors into one of ours at the edge of the section that owns it."""
    try:
        yield
    except PagletError:
        raise
    except source as exc:
        raise target(f"{what}: {exc}") from exc


# ==============================================================================
# 4. Helpers
# ==============================================================================
# Owns: small functions used by two or more sections, and the class-name policy of SPEC section 6
# (the registries of paglet and state classes are declared here and filled by section 9).

#: Paglet and PagletState subclasses by ``module:qualname``, filled by ``__init_subclass__``.
_PAGLET_CLASSES: dict[str, type] = {}
_STATE_CLASSES: dict[str, type] = {}

_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def _new_id() -> str:
    return os.urandom(16).hex()  # as unique as uuid4().hex, and a tenth of its cost on the message path


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


_URL = re.compile(r"http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~\-/%]*)?")


def _check_url(url: Any) -> str:
    """A host URL from the network: http, a host name or address, a port in range; else HostNotFoundError."""
    text = _normalize_url(url) if isinstance(url, str) and len(url) <= 300 else ""
    match = _URL.fullmatch(text)
    port = int(match.group(2)[1:]) if match and match.group(2) else 80
    if not match or not 0 < port < 65536:
        raise HostNotFoundError(f"not a host URL: {str(url)[:80]!r}")
    return text


def _check_agent_id(agent_id: Any, what: str = "agent") -> str:
    """An id from outside (of a paglet, an artifact, a lease): letters, digits, ``_.-``, at most 128."""
    if not isinstance(agent_id, str) or not _AGENT_ID.fullmatch(agent_id):
        raise InvalidAgentError(f"not a valid {what} id: {str(agent_id)[:80]!r}")
    return agent_id


def _module_allowed(module_name: str, allow: Iterable[str]) -> bool:
    return any(entry == "*" or module_name == entry or module_name.startswith(entry + ".") for entry in allow)


def _walk_qualname(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _resolve_class(name: Any, kind: str, allow: Iterable[str] | None) -> type:
    """Turn ``module:qualname`` into a class of the wanted kind, by the rules of SPEC section 6.

    ``kind`` is "paglet", "state" (any dataclass) or "enum".  ``allow`` is the host's allow list;
    None means the caller is a worker, which trusts names its host has already checked.  A name
    resolves only to a registered Paglet subclass (for paglets), or a dataclass or enum of
    ``paglets``, of a module already imported, or of an allowed module, and only if the class
    found is registered under exactly that name.  Nothing is imported unless allowed.
    """
    registry: dict[str, type] = {"paglet": _PAGLET_CLASSES, "state": _STATE_CLASSES}.get(kind, {})
    if isinstance(name, str) and name in registry:
        return _current_class(registry[name], name)
    if not isinstance(name, str) or len(name) > 200 or not _CLASS_NAME.fullmatch(name):
        raise SerializationError(f"not a class name (module:Qualname): {str(name)[:80]!r}")
    module_name, qualname = name.split(":")
    if "__" in name and not (allow is None and module_name == "__main__" and "__" not in qualname):
        raise ForbiddenError(f"class names with dunders are refused: {name!r}")
    module = sys.modules.get(module_name)
    allowed = allow is None or _module_allowed(module_name, allow)
    if module is None or allowed:  # import_module also waits for an import another thread started
        if not allowed:
            raise ForbiddenError(f"module {module_name!r} is not allowed on this host (see --allow)")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an allowed module that fails to import is the caller's problem
            raise SerializationError(f"cannot import {module_name!r}: {exc}") from exc
    if kind == "paglet" and name in _PAGLET_CLASSES:
        return _current_class(_PAGLET_CLASSES[name], name)
    cls = _walk_qualname(module, qualname)
    if cls is None:
        raise SerializationError(f"no class {name!r}")
    if not isinstance(cls, type) or _qualified_name(cls) != name:
        raise ForbiddenError(f"{name!r} is not a {'Paglet subclass' if kind == 'paglet' else kind + ' class'}")
    if kind == "state" and dataclasses.is_dataclass(cls):
        return cls
    if kind == "enum" and issubclass(cls, enum.Enum):
        return cls
    raise ForbiddenError(f"{name!r} is not a {'Paglet subclass' if kind == 'paglet' else kind + ' class'}")


def _current_class(cls: type, name: str) -> type:
    """``@dataclass(slots=True)`` replaces the class that ``__init_subclass__`` registered."""
    module_name, qualname = name.split(":")
    current = _walk_qualname(sys.modules.get(module_name), qualname)
    return current if isinstance(current, type) and _qualified_name(current) == name else cls


def _lan_address() -> str:
    """This machine's address on its LAN (no packet is sent), or loopback."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        return str(probe.getsockname()[0])
    return "127.0.0.1"


def _is_loopback(bind_host: str) -> bool:
    if bind_host in ("localhost", ""):
        return bind_host == "localhost"
    try:
        return ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        return False


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _safe_file_name(name: Any) -> str:
    """A logical file or artifact name: one path component, no tricks (``../../etc/passwd``)."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 255
        or name in (".", "..")
        or any(c in name for c in "/\\\x00")
        or name != name.strip()
    ):
        raise ForbiddenError(f"not a safe file name: {str(name)[:80]!r}")
    return name


def _save_stream(chunks: Iterable[bytes], target: Path, ref: Any) -> Any:
    """Stream chunks into ``target`` through a temporary file; refuse content that is not ``ref``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{_new_id()[:8]}.partial")
    digest, size = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if size != ref.size or (ref.sha256 and digest.hexdigest() != ref.sha256):
            raise TransferError(f"artifact {ref.name!r} arrived damaged ({size} bytes, sha256 {digest.hexdigest()[:12]}...)")
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return ref


# ==============================================================================
# 5. Wire codec
# ==============================================================================
# Owns: the mapping between Python values and wire trees (plain lists, dicts with string keys,
# str, int, float, bool, None, bytes), their CBOR and JSON bytes, and the pre-decode check of
# CBOR from the network.  The only user of cbor2.  No pickle, and no CBOR tags: special values
# travel as one-key maps whose key starts with "$" (user dicts with such keys travel as "$map").

#: Nesting the encoder produces, counted in CBOR containers ("$" forms take two or three); the
#: check of bytes from the network allows more, so envelopes around a value still pass.
_WIRE_MAX_DEPTH = 48
_CBOR_MAX_DEPTH = 64
#: Ints beyond this travel as hex text; much bigger ones are refused (a few KiB of digits).
_WIRE_MAX_INT_BITS = 16_000


def _wire_nest(depth: int, levels: int, path: str) -> int:
    """The depth of a value's children, refusing nesting the decoder would refuse."""
    depth += levels
    if depth > _WIRE_MAX_DEPTH:
        raise SerializationError(f"cannot carry {path}: nested deeper than {_WIRE_MAX_DEPTH} levels")
    return depth


def _wire_int(value: int, path: str) -> Any:
    if -(2**63) <= value < 2**64:
        return value
    if value.bit_length() > _WIRE_MAX_INT_BITS:
        raise SerializationError(f"cannot carry {path}: an int of {value.bit_length()} bits (at most {_WIRE_MAX_INT_BITS})")
    return {"$int": hex(value)}


def _wire_encode(value: Any, path: str = "value", depth: int = 0) -> Any:
    """Turn a Python value into a wire tree, or raise SerializationError naming the field."""
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is float or kind is bytes:
        return value
    if kind is int:
        return _wire_int(value, path)
    if kind is list:
        inner = _wire_nest(depth, 1, path)
        return [_wire_encode(item, f"{path}[{i}]", inner) for i, item in enumerate(value)]
    if kind is dict:
        return _wire_encode_dict(value, path, depth)
    encoder = _WIRE_ENCODERS.get(kind)
    if encoder is not None:
        return encoder(value, path, depth)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _wire_encode_dataclass(value, path, depth)
    if isinstance(value, enum.Enum):
        return {"$enum": _qualified_name(kind), "$v": _wire_encode(value.value, path, _wire_nest(depth, 1, path))}
    for base, encoder in _WIRE_ENCODERS.items():
        if isinstance(value, base):
            return encoder(value, path, depth)
    if isinstance(value, (str, int, float, bytes)):
        return _wire_encode(kind.__mro__[1](value), path, depth)  # a subclass of a plain type
    if isinstance(value, dict):
        return _wire_encode_dict(dict(value), path, depth)
    raise SerializationError(f"cannot carry {path}: {kind.__module__}.{kind.__qualname__} {_wire_hint(value)}")


def _wire_hint(value: Any) -> str:
    if callable(value):
        return "(functions, lambdas and methods do not travel; store data, not code)"
    return "(only dataclasses, enums, plain containers and scalars travel; keep handles in transient attributes)"


def _wire_encode_dict(value: dict[Any, Any], path: str, depth: int) -> Any:
    if all(type(key) is str and not key.startswith("$") for key in value):
        inner = _wire_nest(depth, 1, path)
        return {key: _wire_encode(item, f"{path}.{key}", inner) for key, item in value.items()}
    inner = _wire_nest(depth, 3, path)  # {"$map": [[key, value], ...]}
    return {"$map": [[_wire_encode(k, f"{path}<key>", inner), _wire_encode(v, f"{path}[{k!r}]", inner)] for k, v in value.items()]}


def _wire_encode_dataclass(value: Any, path: str, depth: int) -> Any:
    cls = type(value)
    if "<locals>" in cls.__qualname__:
        raise SerializationError(f"cannot carry {path}: {cls.__qualname__} is defined inside a function")
    inner = _wire_nest(depth, 2, path)  # {"$dc": name, "$f": {fields}}
    fields = {field.name: _wire_encode(getattr(value, field.name), f"{path}.{field.name}", inner) for field in dataclasses.fields(value)}
    return {"$dc": _qualified_name(cls), "$f": fields}


def _wire_fields_tree(cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """The wire tree of a dataclass given as a plain map of its fields (from JSON, TOML, a CLI)."""
    return {"$dc": _qualified_name(cls), "$f": fields}


def _wire_seq(tag: str) -> Callable[[Any, str, int], Any]:
    def encode(value: Any, path: str, depth: int) -> Any:
        inner = _wire_nest(depth, 2, path)  # {tag: [items]}
        return {tag: [_wire_encode(item, f"{path}[{i}]", inner) for i, item in enumerate(value)]}

    return encode


#: Encoders of the non-plain types the codec carries, by exact type (subclasses are tried after).
_WIRE_ENCODERS: dict[type, Callable[[Any, str, int], Any]] = {
    tuple: _wire_seq("$tuple"),
    set: _wire_seq("$set"),
    frozenset: _wire_seq("$frozenset"),
    bytearray: lambda v, p, d: {"$bytearray": bytes(v)},
    datetime.datetime: lambda v, p, d: {"$datetime": v.isoformat()},
    datetime.date: lambda v, p, d: {"$date": v.isoformat()},
    datetime.time: lambda v, p, d: {"$time": v.isoformat()},
    datetime.timedelta: lambda v, p, d: {"$timedelta": [v.days, v.seconds, v.microseconds]},
    decimal.Decimal: lambda v, p, d: {"$decimal": str(v)},
    uuid.UUID: lambda v, p, d: {"$uuid": str(v)},
    complex: lambda v, p, d: {"$complex": [v.real, v.imag]},
    PurePath: lambda v, p, d: {"$path": str(v)},
}
for _path_type in (Path, type(Path()), PurePath, type(PurePath())):
    _WIRE_ENCODERS[_path_type] = lambda v, p, d: {"$path": str(v)}


def _wire_decode(tree: Any, resolve: Callable[[str, str], type], depth: int = 0) -> Any:
    """Turn a wire tree back into Python values.  ``resolve(name, kind)`` finds classes."""
    kind = type(tree)
    if tree is None or kind is str or kind is int or kind is bool or kind is float or kind is bytes:
        return tree
    if depth > _CBOR_MAX_DEPTH:
        raise SerializationError(f"wire value nested deeper than {_CBOR_MAX_DEPTH}")
    if kind is list:
        return [_wire_decode(item, resolve, depth + 1) for item in tree]
    if kind is not dict:
        raise SerializationError(f"not a wire value: {kind.__name__}")
    if tree and isinstance(key := next(iter(tree)), str) and key.startswith("$"):
        decoder = _WIRE_DECODERS.get(key)
        if decoder is None:
            raise SerializationError(f"unknown wire marker {key[:40]!r}")
        try:
            return decoder(tree, resolve, depth + 1)
        except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as exc:
            raise SerializationError(f"malformed {key} value: {exc}") from exc
    return {_wire_key(k): _wire_decode(v, resolve, depth + 1) for k, v in tree.items()}


def _wire_key(key: Any) -> str:
    if type(key) is not str:
        raise SerializationError("wire maps have string keys; other keys travel as $map")
    return key


def _wire_decode_dataclass(tree: dict[str, Any], resolve: Callable[[str, str], type], depth: int) -> Any:
    cls = resolve(tree["$dc"], "state")
    given = tree.get("$f", {})
    if not isinstance(given, dict):
        raise SerializationError(f"fields of {tree['$dc']!r} must be a map")
    obj: Any = object.__new__(cls)
    for field in dataclasses.fields(cls):
        if field.name in given:
            value = _wire_decode(given[field.name], resolve, depth + 1)
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            raise SerializationError(f"{tree['$dc']}: field {field.name!r} is missing")
        object.__setattr__(obj, field.name, value)  # frozen dataclasses too; __post_init__ not rerun
    return obj


def _wire_decode_seq(build: Callable[[list[Any]], Any]) -> Callable[[Any, Any, int], Any]:
    def decode(tree: dict[str, Any], resolve: Callable[[str, str], type], depth: int) -> Any:
        (items,) = tree.values()
        if type(items) is not list:
            raise TypeError("expected a list")
        return build([_wire_decode(item, resolve, depth + 1) for item in items])

    return decode


def _wire_decode_map(tree: dict[str, Any], resolve: Callable[[str, str], type], depth: int) -> Any:
    pairs = tree["$map"]
    if type(pairs) is not list or any(type(p) is not list or len(p) != 2 for p in pairs):
        raise TypeError("$map takes a list of [key, value] pairs")
    return {_wire_decode(k, resolve, depth + 1): _wire_decode(v, resolve, depth + 1) for k, v in pairs}


def _wire_decode_enum(tree: dict[str, Any], resolve: Callable[[str, str], type], depth: int) -> Any:
    return resolve(tree["$enum"], "enum")(_wire_decode(tree["$v"], resolve, depth + 1))


def _wire_bytes(tree: dict[str, Any]) -> bytes:
    (value,) = tree.values()
    if type(value) is not bytes:
        raise TypeError("expected bytes")  # never bytearray(n) from a number someone sent
    return value


def _wire_str(tree: dict[str, Any]) -> str:
    (value,) = tree.values()
    if type(value) is not str or len(value) > 4096:
        raise TypeError("expected a short string")
    return value


#: Decoders of the "$" markers, the inverse of _WIRE_ENCODERS.
_WIRE_DECODERS: dict[str, Callable[[Any, Callable[[str, str], type], int], Any]] = {
    "$dc": _wire_decode_dataclass,
    "$enum": _wire_decode_enum,
    "$map": _wire_decode_map,
    "$tuple": _wire_decode_seq(tuple),
    "$set": _wire_decode_seq(set),
    "$frozenset": _wire_decode_seq(frozenset),
    "$bytearray": lambda t, r, d: bytearray(_wire_bytes(t)),
    "$int": lambda t, r, d: int(_wire_str(t), 16),
    "$float": lambda t, r, d: float(_wire_str(t)),
    "$datetime": lambda t, r, d: datetime.datetime.fromisoformat(_wire_str(t)),
    "$date": lambda t, r, d: datetime.date.fromisoformat(_wire_str(t)),
    "$time": lambda t, r, d: datetime.time.fromisoformat(_wire_str(t)),
    "$timedelta": lambda t, r, d: datetime.timedelta(*map(int, t["$timedelta"][:3])),
    "$decimal": lambda t, r, d: decimal.Decimal(_wire_str(t)),
    "$uuid": lambda t, r, d: uuid.UUID(_wire_str(t)),
    "$complex": lambda t, r, d: complex(*map(float, t["$complex"][:2])),
    "$path": lambda t, r, d: Path(_wire_str(t)),
    "$bytes": lambda t, r, d: base64.b64decode(_wire_str(t), validate=True),
}


def _wire_resolver(allow: Iterable[str] | None) -> Callable[[str, str], type]:
    """A ``resolve(name, kind)`` bound to an allow list (None: a worker's trusting resolver)."""
    allow = None if allow is None else tuple(allow)
    return lambda name, kind: _resolve_class(name, kind, allow)


def to_cbor(value: Any) -> bytes:
    """Encode a value (dataclasses, containers, scalars, ...) as CBOR bytes, without tags."""
    return _cbor_dumps(_wire_encode(value))


def from_cbor(data: bytes, *, allow: Iterable[str] = ()) -> Any:
    """Decode CBOR bytes made by ``to_cbor``; they are checked first as if from the network."""
    return _wire_decode(_cbor_loads(data, untrusted=True), _wire_resolver(allow))


def _cbor_dumps(tree: Any) -> bytes:
    try:
        return cbor2.dumps(tree)
    except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode as CBOR: {exc}") from exc


def _cbor_loads(data: bytes, *, untrusted: bool) -> Any:
    """Decode CBOR bytes; bytes from the network are first checked by ``_cbor_check``."""
    if untrusted:
        _cbor_check(data)
    with _translating((cbor2.CBORDecodeError, ValueError, TypeError, EOFError, OverflowError), SerializationError, "bad CBOR"):
        return cbor2.loads(data)


def _cbor_check(data: bytes) -> None:
    """Walk the CBOR item heads once: refuse tags, indefinite lengths, unknown simple values,
    nesting deeper than _CBOR_MAX_DEPTH, lengths beyond the data, and trailing bytes.  After
    this, decoding is safe on every cbor2 version (no tag can expand, allocate or import)."""
    view, end = memoryview(data), len(data)
    pos, pending = 0, [1]  # pending[-1] = items still to read at this nesting level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= end:
            raise SerializationError("truncated CBOR")
        major, info = view[pos] >> 5, view[pos] & 31
        pos += 1
        if info < 24:
            arg = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > end:
                raise SerializationError("truncated CBOR")
            arg = int.from_bytes(view[pos : pos + size], "big")
            pos += size
        else:
            raise SerializationError("indefinite-length or reserved CBOR items are refused")
        if major in (2, 3):
            if arg > end - pos:
                raise SerializationError("CBOR string longer than the data")
            pos += arg
        elif major in (4, 5):
            count = arg * (2 if major == 5 else 1)
            if count > end - pos:
                raise SerializationError("CBOR container larger than the data")
            if len(pending) > _CBOR_MAX_DEPTH:
                raise SerializationError(f"CBOR nested deeper than {_CBOR_MAX_DEPTH}")
            pending.append(count)
        elif major == 6:
            raise SerializationError("CBOR tags are refused")
        elif (major == 7 and info < 24 and arg not in (20, 21, 22)) or (major == 7 and info == 24):
            raise SerializationError("CBOR simple values other than true, false and null are refused")
    if pos != end:
        raise SerializationError("trailing bytes after the CBOR value")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _json_dumps(tree: Any) -> bytes:
    """Standard JSON bytes of a wire tree; bytes travel as ``{"$bytes": base64}``, NaN and
    infinities as ``{"$float": "nan"}``."""
    try:
        try:
            return json.dumps(tree, default=_json_default, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except ValueError:  # a NaN or an infinity somewhere (rare): spell them out, then again
            return json.dumps(_json_finite(tree), default=_json_default, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"cannot encode as JSON: {exc}") from exc


def _json_finite(tree: Any) -> Any:
    if isinstance(tree, float) and not math.isfinite(tree):
        return {"$float": str(tree)}
    if isinstance(tree, list):
        return [_json_finite(item) for item in tree]
    if isinstance(tree, dict):
        return {key: _json_finite(value) for key, value in tree.items()}
    return tree


def _json_bytes_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$bytes" in obj and isinstance(obj["$bytes"], str):
        with _translating((ValueError,), SerializationError, "bad $bytes"):
            return base64.b64decode(obj["$bytes"], validate=True)
    return obj


def _json_loads(data: bytes) -> Any:
    with _translating((ValueError, RecursionError, UnicodeDecodeError), SerializationError, "bad JSON"):
        return json.loads(data, object_hook=_json_bytes_hook)


# ==============================================================================
# 6. Value types
# ==============================================================================
# Owns: the plain values of SPEC section 3 (messages, events, tickets, policies, references,
# records).  Each has to_wire()/from_wire(); wire forms carry enums as their string values.
# from_wire checks types, because wire trees may come from the network.


def _value_to_wire(obj: Any) -> dict[str, Any]:
    """Fields of a value type as a wire map: enums as strings, nested value types as maps."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, enum.Enum):
            out[field.name] = value.value
        elif isinstance(value, _WireValue):
            out[field.name] = value.to_wire()
        elif isinstance(value, tuple):
            out[field.name] = [_wire_encode(item, field.name) for item in value]
        else:
            out[field.name] = _wire_encode(value, field.name)
    return out


def _value_from_wire(cls: type, payload: Any, resolve: Callable[[str, str], type] | None = None) -> Any:
    """Build a value type from its wire map, checking each field against its default's type."""
    if not isinstance(payload, dict):
        raise SerializationError(f"{cls.__name__} must be a map, not {type(payload).__name__}")
    resolve = resolve or _wire_resolver(())
    kwargs: dict[str, Any] = {}
    nested: dict[str, Any] = getattr(cls, "_WIRE_NESTED", {})
    for field in dataclasses.fields(cls):
        if field.name not in payload:
            continue
        value = payload[field.name]
        if field.name in nested and value is not None:
            try:
                value = _value_nested(nested[field.name], value)
            except (SerializationError, TypeError, ValueError, AttributeError) as exc:
                raise SerializationError(f"{cls.__name__}.{field.name}: {exc}") from exc
        else:
            value = _wire_decode(value, resolve)
            if isinstance(value, list) and str(field.type).startswith("tuple"):
                value = tuple(value)
        kwargs[field.name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise SerializationError(f"bad {cls.__name__}: {exc}") from exc
    _value_check(obj)
    return obj


def _value_nested(cls: Any, value: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        try:
            return cls(value)
        except ValueError as exc:
            raise SerializationError(f"{value!r} is not one of {[m.value for m in cls]}") from exc
    return cls.from_wire(value)


_VALUE_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "dict[str, Any]": (dict,),
    "list[str]": (list, tuple),
    "tuple[str, ...]": (list, tuple),
    "str | None": (str, type(None)),
    "float | None": (int, float, type(None)),
    "int | None": (int, type(None)),
}


def _value_check(obj: Any) -> None:
    """Check fields whose annotation is a simple type (the rest is checked by their users)."""
    for field in dataclasses.fields(obj):
        allowed = _VALUE_TYPES.get(str(field.type))
        value = getattr(obj, field.name)
        if (allowed and not isinstance(value, allowed)) or (allowed == (int,) and isinstance(value, bool)):
            raise SerializationError(f"{type(obj).__name__}.{field.name} must be {field.type}, not {type(value).__name__}")
        strings = str(field.type) in ("list[str]", "tuple[str, ...]")
        if strings and not all(isinstance(item, str) for item in value):
            raise SerializationError(f"{type(obj).__name__}.{field.name} must hold strings")


@dataclasses.dataclass(slots=True)
class Message:
    """A message to a paglet: a kind, named arguments, one optional plain argument, a priority.

    The reply is whatever ``handle_message`` returns.
    """

    kind: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    arg: Any = None
    #: Address of the sending host, or the sending paglet's proxy URL.
    sender: str | None = None
    reply_to: str | None = None
    priority: int = NORMAL_PRIORITY
    message_type: int = SYNCHRONOUS
    timestamp: float = dataclasses.field(default_factory=time.time)
    message_id: str = dataclasses.field(default_factory=_new_id)

    def get_arg(self, name: str | None = None, default: Any = None) -> Any:
        """The named argument, or the plain ``arg`` when no name is given."""
        if name is None:
            return self.arg if self.arg is not None else default
        return self.args.get(name, default)

    def set_arg(self, name: str, value: Any) -> Message:
        """Set a named argument; returns the message for chaining."""
        self.args[name] = value
        return self

    def same_kind(self, kind: str | Message) -> bool:
        """Whether this message has the given kind (or the kind of the given message)."""
        return self.kind == (kind.kind if isinstance(kind, Message) else kind)

    def increase_priority(self) -> None:
        """One step up, at most MAX_PRIORITY."""
        self.priority = min(MAX_PRIORITY, self.priority + 1)

    def decrease_priority(self) -> None:
        """One step down, at least MIN_PRIORITY."""
        self.priority = max(MIN_PRIORITY, self.priority - 1)

    def to_wire(self) -> dict[str, Any]:
        """The message as a wire map (arguments encoded by the codec)."""
        return {
            "kind": self.kind,
            "args": _wire_encode(self.args, "args"),
            "arg": _wire_encode(self.arg, "arg"),
            "sender": self.sender,
            "reply_to": self.reply_to,
            "priority": self.priority,
            "message_type": self.message_type,
            "timestamp": self.timestamp,
            "message_id": self.message_id,
        }

    @classmethod
    def from_wire(cls, payload: Any, resolve: Callable[[str, str], type] | None = None) -> Message:
        """Rebuild a message from ``to_wire()`` output, checking every field."""
        _message_check_wire(payload)
        resolve = resolve or _wire_resolver(())
        args = _wire_decode(payload.get("args") or {}, resolve)
        if not isinstance(args, dict):
            raise SerializationError("Message.args must be a map")
        return cls(
            kind=payload["kind"],
            args=args,
            arg=_wire_decode(payload.get("arg"), resolve),
            sender=payload.get("sender"),
            reply_to=payload.get("reply_to"),
            priority=payload.get("priority", NORMAL_PRIORITY),
            message_type=payload.get("message_type", SYNCHRONOUS),
            timestamp=float(payload["timestamp"]) if payload.get("timestamp") is not None else time.time(),
            message_id=payload.get("message_id") or _new_id(),
        )


def _message_check_wire(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise SerializationError("a message must be a map")
    kind = payload.get("kind")
    if not isinstance(kind, str) or not 0 < len(kind) <= 256:
        raise SerializationError("Message.kind must be a non-empty string of at most 256 characters")
    priority = payload.get("priority", NORMAL_PRIORITY)
    if type(priority) is not int or not UNQUEUED_PRIORITY <= priority <= MAX_PRIORITY:
        raise SerializationError(f"Message.priority must be an integer from 0 to {MAX_PRIORITY}")
    message_type = payload.get("message_type", SYNCHRONOUS)
    if type(message_type) is not int or message_type not in (SYNCHRONOUS, FUTURE, ONEWAY):
        raise SerializationError("Message.message_type must be 0, 1 or 2")
    for name in ("sender", "reply_to", "message_id"):
        value = payload.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 512):
            raise SerializationError(f"Message.{name} must be a string")
    stamp = payload.get("timestamp")
    if stamp is not None and (type(stamp) not in (int, float) or not math.isfinite(stamp)):
        raise SerializationError("Message.timestamp must be a number")


def _as_message(message: Message | str, args: dict[str, Any] | None = None) -> Message:
    if isinstance(message, Message):
        return message
    if isinstance(message, str):
        return Message(message, dict(args or {}))
    raise TypeError(f"expected a Message or a kind, not {type(message).__name__}")


class _WireValue:
    """Mixin-free helper base: ``to_wire``/``from_wire`` through the two functions above."""

    __slots__ = ()

    def to_wire(self) -> dict[str, Any]:
        """This value as a wire map."""
        return _value_to_wire(self)

    @classmethod
    def from_wire(cls, payload: Any) -> Any:
        """Rebuild the value from ``to_wire()`` output, checking field types."""
        return _value_from_wire(cls, payload)


@dataclasses.dataclass(frozen=True, slots=True)
class PagletEvent(_WireValue):
    """What every lifecycle hook receives: who, where, when."""

    agent_id: str
    host_name: str
    host_address: str
    timestamp: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass(frozen=True, slots=True)
class CreationEvent(PagletEvent):
    """``on_creation``: ``init`` is the value given to create."""

    init: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class MobilityEvent(PagletEvent):
    """``on_dispatching`` / ``on_arrival`` / ``on_reverting``; reason is "dispatch" or "retract"."""

    source_host_name: str = ""
    source_host_address: str = ""
    target_host_name: str = ""
    target_host_address: str = ""
    reason: str = "dispatch"


@dataclasses.dataclass(frozen=True, slots=True)
class CloneEvent(PagletEvent):
    """``on_cloning`` / ``on_clone`` / ``on_cloned``."""

    source_agent_id: str = ""
    clone_agent_id: str = ""
    source_host_name: str = ""
    source_host_address: str = ""
    target_host_name: str = ""
    target_host_address: str = ""


@dataclasses.dataclass(slots=True)
class DeactivationPolicy(_WireValue):
    """What happens to messages and wake-ups while a paglet is inactive."""

    #: A message activates the paglet (then it is delivered).
    activate_on_message: bool = True
    #: Otherwise a message is stored durably and delivered after activation (else it fails fast).
    queue_messages_when_inactive: bool = True
    #: The host activates the paglet when it starts.
    activate_on_startup: bool = False
    #: Unix time at which the host activates the paglet.
    activate_at: float | None = None

    @classmethod
    def after(cls, seconds: float, **kwargs: Any) -> DeactivationPolicy:
        """A policy that wakes the paglet ``seconds`` from now."""
        return cls(activate_at=time.time() + seconds, **kwargs)


@dataclasses.dataclass(slots=True)
class DeactivationRequest(_WireValue):
    """A request to deactivate, given to ``deactivation_policy()`` before the paglet chooses."""

    reason: str = "deactivate"
    #: "self" (the paglet asked), "external" (host, proxy, HTTP) or "shutdown".
    source: str = "external"
    policy: DeactivationPolicy | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    _WIRE_NESTED: ClassVar[dict[str, Any]] = {"policy": DeactivationPolicy}


@dataclasses.dataclass(frozen=True, slots=True)
class PersistencyEvent(PagletEvent):
    """``on_deactivating`` / ``on_activation`` / ``on_disposing``.

    ``reason`` is "deactivate", "activate", "shutdown", "recover", "message", "timer", "startup"
    or "dispose".
    """

    reason: str = "deactivate"
    request: DeactivationRequest | None = None
    policy: DeactivationPolicy | None = None
    _WIRE_NESTED: ClassVar[dict[str, Any]] = {"request": DeactivationRequest, "policy": DeactivationPolicy}


@dataclasses.dataclass(frozen=True, slots=True)
class ContextEvent(_WireValue):
    """One entry of the host's event log (``list_events``, ``GET /events``, listeners)."""

    event_id: int
    kind: str
    host_name: str
    host_address: str
    timestamp: float = dataclasses.field(default_factory=time.time)
    agent_id: str | None = None
    class_name: str | None = None
    message_id: str | None = None
    service_name: str | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TransferTicket(_WireValue):
    """Where and how to move a paglet: destination URL or host name, retries, requirements."""

    destination: str
    #: Seconds for each attempt to hand the paglet over.
    timeout: float = 10.0
    retries: int = 0
    retry_interval: float = 0.25
    #: Tags the target host must carry.
    required_capabilities: tuple[str, ...] = ()
    #: The code version the target host must report.
    expected_code_version: str | None = None
    arrival_mode: ArrivalMode = ArrivalMode.ACTIVATE
    _WIRE_NESTED: ClassVar[dict[str, Any]] = {"arrival_mode": ArrivalMode}


@dataclasses.dataclass(frozen=True, slots=True)
class PagletProxyRef(_WireValue):
    """A storable, movable reference to a paglet: host URL and agent id."""

    host_url: str
    agent_id: str

    def resolve(self, context_or_client: Any) -> PagletProxy:
        """A working proxy, through a ``PagletContext``, a ``Host`` or a ``HostClient``."""
        transport = getattr(context_or_client, "transport", context_or_client)
        return transport.proxy_for(self.host_url, self.agent_id)  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True, slots=True)
class HostRef(_WireValue):
    """What one host knows of another (or of itself)."""

    name: str
    url: str
    code_version: str = ""
    online: bool = True
    last_seen: float = 0.0
    active_count: int = 0
    inactive_count: int = 0
    tags: tuple[str, ...] = ()
    properties: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    mesh_version: str = ""
    #: False when the host runs another mesh version: listed, but not a movement target.
    compatible: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceRecord(_WireValue):
    """An advertised service: who offers it, where, with which capabilities, until when."""

    name: str
    agent_id: str
    host_url: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    scope: ServiceScope = ServiceScope.LOCAL
    expires_at: float | None = None
    proxy: PagletProxyRef | None = None
    _WIRE_NESTED: ClassVar[dict[str, Any]] = {"scope": ServiceScope, "proxy": PagletProxyRef}

    def __post_init__(self) -> None:
        if self.proxy is None:
            object.__setattr__(self, "proxy", PagletProxyRef(self.host_url, self.agent_id))


@dataclasses.dataclass(frozen=True, slots=True)
class ArtifactRef(_WireValue):
    """A blob stored in one host's database, addressed by id and checked by SHA-256."""

    host_url: str
    artifact_id: str
    name: str = ""
    size: int = 0
    sha256: str = ""
    compression: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    owner_agent_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class PagletFileRef(_WireValue):
    """A file registered by a paglet; it travels with the paglet on dispatch and clone."""

    name: str
    source_host: str = ""
    source_path: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    sha256: str = ""
    size: int = 0
    #: Where the file is now, on the host the paglet is on.
    current_path: str = ""
    mode: str = "copy"


# ==============================================================================
# 7. Replies, client and proxies
# ==============================================================================
# Owns: FutureReply and ReplySet; HostClient, the HTTP client of other hosts (one keep-alive
# connection per target host and thread, TCP_NODELAY, CBOR); PagletProxy and the _Transport it
# talks through, which a Host (local or remote paglets), a HostClient and a worker's stub provide.
# Threads: a HostClient may be shared; connections are per thread, so calls never interleave.


class FutureReply:
    """The reply of a message that is still being handled (``send_future``)."""

    def __init__(self, future: Future[Any] | None = None) -> None:
        self._future: Future[Any] = future if future is not None else Future()
        self._sets: list[ReplySet] = []
        self._future.add_done_callback(self._notify)

    @classmethod
    def of(cls, value: Any = None, *, error: BaseException | None = None) -> FutureReply:
        """A reply that is already available (with a value or an error)."""
        reply = cls()
        if error is not None:
            reply._future.set_exception(error)
        else:
            reply._future.set_result(value)
        return reply

    def is_available(self) -> bool:
        """Whether the reply (or its error) has arrived."""
        return self._future.done()

    def wait_for_reply(self, timeout: float | None = None) -> bool:
        """Wait until the reply arrives; False if the timeout passed first."""
        with contextlib.suppress(TimeoutError):
            self._future.exception(timeout)
            return True
        return False

    def get_reply(self, timeout: float | None = None) -> Any:
        """The reply; re-raises the handler's error; TimeoutError if it did not arrive in time."""
        return self._future.result(timeout)

    def get_boolean_reply(self, timeout: float | None = None) -> bool:
        """The reply as a bool."""
        return bool(self.get_reply(timeout))

    def get_int_reply(self, timeout: float | None = None) -> int:
        """The reply as an int."""
        return int(self.get_reply(timeout))

    def get_float_reply(self, timeout: float | None = None) -> float:
        """The reply as a float."""
        return float(self.get_reply(timeout))

    def get_string_reply(self, timeout: float | None = None) -> str:
        """The reply as a str."""
        return str(self.get_reply(timeout))

    def _join(self, reply_set: ReplySet) -> None:
        self._sets.append(reply_set)
        if self._future.done():
            reply_set._arrived(self)

    def _notify(self, _future: Future[Any]) -> None:
        for reply_set in list(self._sets):
            reply_set._arrived(self)


class ReplySet:
    """Replies of a multicast (or any futures you add), taken in the order they arrive."""

    def __init__(self, replies: Iterable[FutureReply] = ()) -> None:
        self._cond = threading.Condition()
        self._waiting: list[FutureReply] = []
        self._available: list[FutureReply] = []
        for reply in replies:
            self.add_future_reply(reply)

    def add_future_reply(self, reply: FutureReply) -> None:
        """Add one more reply to wait for."""
        with self._cond:
            self._waiting.append(reply)
        reply._join(self)

    def _arrived(self, reply: FutureReply) -> None:
        with self._cond:
            if reply in self._waiting:
                self._waiting.remove(reply)
                self._available.append(reply)
                self._cond.notify_all()

    def are_all_available(self) -> bool:
        """Whether no reply is still outstanding."""
        with self._cond:
            return not self._waiting

    def count_available(self) -> int:
        """Replies that arrived and were not yet taken."""
        with self._cond:
            return len(self._available)

    def count_unavailable(self) -> int:
        """Replies still outstanding."""
        with self._cond:
            return len(self._waiting)

    def is_any_available(self) -> bool:
        """Whether a reply is ready to be taken."""
        with self._cond:
            return bool(self._available)

    def has_more_future_replies(self) -> bool:
        """Whether any reply is left, arrived or not."""
        with self._cond:
            return bool(self._available or self._waiting)

    def wait_for_all_replies(self, timeout: float | None = None) -> bool:
        """Wait until every reply has arrived; False if the timeout passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting, timeout)

    def wait_for_next_future_reply(self, timeout: float | None = None) -> bool:
        """Wait until a reply is ready to be taken; False on timeout or when none is left."""
        with self._cond:
            return self._cond.wait_for(lambda: self._available or not self._waiting, timeout) and bool(self._available)

    def get_next_future_reply(self, timeout: float | None = None) -> FutureReply | None:
        """Take the next reply that arrived, waiting for one; None on timeout or when none is left."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._available or not self._waiting, timeout):
                return None
            return self._available.pop(0) if self._available else None

    def __iter__(self) -> Iterator[FutureReply]:
        while (reply := self.get_next_future_reply()) is not None:
            yield reply

    def __len__(self) -> int:
        with self._cond:
            return len(self._available) + len(self._waiting)


class _Transport(Protocol):
    """What a PagletProxy needs: a Host, a HostClient and a worker's stub all provide it."""

    def send_message(
        self, host_url: str, agent_id: str, message: Message, *, oneway: bool = False, timeout: float | None = None
    ) -> Any: ...

    def send_future(self, host_url: str, agent_id: str, message: Message, *, timeout: float | None = None) -> FutureReply: ...

    def agent_op(self, host_url: str, agent_id: str, op: str, arg: Any = None) -> PagletProxyRef | None: ...

    def agent_info(self, host_url: str, agent_id: str) -> dict[str, Any]: ...

    def is_local_url(self, host_url: str) -> bool: ...

    def proxy_for(self, host_url: str, agent_id: str) -> PagletProxy: ...

    def upload_artifact(
        self, path: Path | str, *, host_url: str | None = None, name: str | None = None, owner_agent_id: str = "",
        expires_at: float | None = None, compression: str = "", sha256: str | None = None,
    ) -> ArtifactRef: ...  # fmt: skip


class PagletProxy:
    """A handle on a paglet, local or remote; every call works the same either way."""

    __slots__ = ("_client", "agent_id", "host_url")

    def __init__(self, host_url: str, agent_id: str, client: _Transport) -> None:
        self.host_url = _normalize_url(host_url)
        self.agent_id = agent_id
        self._client = client

    def __repr__(self) -> str:
        return f"PagletProxy({self.host_url!r}, {self.agent_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PagletProxy) and (other.host_url, other.agent_id) == (self.host_url, self.agent_id)

    def __hash__(self) -> int:
        return hash((self.host_url, self.agent_id))

    def send(self, message: Message | str, timeout: float | None = None, **args: Any) -> Any:
        """Send and wait for the reply; the handler's exception is raised here."""
        return self._client.send_message(self.host_url, self.agent_id, _as_message(message, args), timeout=timeout)

    def send_oneway(self, message: Message | str, **args: Any) -> None:
        """Send without waiting for (or getting) a reply."""
        msg = _as_message(message, args)
        msg.message_type = ONEWAY
        self._client.send_message(self.host_url, self.agent_id, msg, oneway=True)

    def send_future(self, message: Message | str, timeout: float | None = None, **args: Any) -> FutureReply:
        """Send and return at once; the FutureReply gets the reply later."""
        msg = _as_message(message, args)
        msg.message_type = FUTURE
        return self._client.send_future(self.host_url, self.agent_id, msg, timeout=timeout)

    def send_artifact(
        self, message: Message | str, path: Path | str, *, arg_name: str = "artifact", timeout: float | None = None, **meta: Any
    ) -> Any:
        """Upload a file as an artifact to the paglet's host, then send the message with its ArtifactRef."""
        ref = self._client.upload_artifact(path, host_url=self.host_url, **meta)
        msg = _as_message(message)
        msg.args[arg_name] = ref
        return self.send(msg, timeout=timeout)

    def _moved(self, ref: PagletProxyRef | None) -> PagletProxy:
        return PagletProxy(ref.host_url, ref.agent_id, self._client) if ref is not None else self

    def dispatch(self, target: str | TransferTicket) -> PagletProxy:
        """Move the paglet to another host (URL, host name or ticket); returns its new proxy."""
        return self._moved(self._client.agent_op(self.host_url, self.agent_id, "dispatch", target))

    def clone(self, target: str | TransferTicket | None = None) -> PagletProxy:
        """Copy the paglet (here, or to another host); returns the copy's proxy."""
        return self._moved(self._client.agent_op(self.host_url, self.agent_id, "clone", target))

    def retract(self) -> PagletProxy:
        """Bring a remote paglet to the host this proxy's client belongs to."""
        return self._moved(self._client.agent_op(self.host_url, self.agent_id, "retract"))

    def deactivate(self, request: DeactivationRequest | None = None, **fields: Any) -> PagletProxy:
        """Store the paglet and end its worker (``reason=``, ``policy=``, ``metadata=`` also work)."""
        request = request or DeactivationRequest(**fields)
        return self._moved(self._client.agent_op(self.host_url, self.agent_id, "deactivate", request))

    def activate(self) -> PagletProxy:
        """Start an inactive paglet again."""
        return self._moved(self._client.agent_op(self.host_url, self.agent_id, "activate"))

    def dispose(self) -> None:
        """End the paglet for good (``on_disposing`` runs first)."""
        self._client.agent_op(self.host_url, self.agent_id, "dispose")

    def info(self) -> dict[str, Any]:
        """What the host knows of the paglet (class, active, host_url, worker figures, ...)."""
        return self._client.agent_info(self.host_url, self.agent_id)

    def is_valid(self) -> bool:
        """Whether the paglet still lives on that host, active or inactive."""
        try:
            self.info()
        except (InvalidAgentError, RemoteHostError):
            return False
        return True

    def is_active(self) -> bool:
        """Whether the paglet is running now."""
        try:
            return bool(self.info().get("active"))
        except (InvalidAgentError, RemoteHostError):
            return False

    def is_state(self, state: int) -> bool:
        """Whether the paglet is in ACTIVE or INACTIVE state (or either, with ACTIVE | INACTIVE)."""
        try:
            active = bool(self.info().get("active"))
        except (InvalidAgentError, RemoteHostError):
            return False
        return bool(state & (ACTIVE if active else INACTIVE))

    def is_remote(self) -> bool:
        """Whether the paglet lives on another host than this proxy's client."""
        return not self._client.is_local_url(self.host_url)

    def ref(self) -> PagletProxyRef:
        """A storable reference (a dataclass that can live in paglet state)."""
        return PagletProxyRef(self.host_url, self.agent_id)

    def to_wire(self) -> dict[str, Any]:
        """The proxy as a wire map (``{"host_url", "agent_id"}``)."""
        return self.ref().to_wire()


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 connection with Nagle off: small requests must not wait for delayed ACKs."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Unreachable(RemoteHostError):
    """The connection could not even be opened: the request certainly did not arrive."""


_CBOR_TYPE = "application/cbor"
_JSON_TYPE = "application/json"
_STALE_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class HostClient:
    """Client of the HTTP API of hosts: the remote half of every proxy, and of host-to-host calls.

    Keeps one keep-alive connection per target host and thread, and reconnects once when a
    reused connection turns out to be closed.  Errors come back as the class the host raised.
    """

    def __init__(self, api_key: str | None = None, *, timeout: float = 30.0, allow: Iterable[str] = ()) -> None:
        self.api_key = api_key
        self.timeout = timeout
        self._resolve = _wire_resolver(allow)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- transport ------------------------------------------------------------------------
    def _connection(self, url: str, fresh: bool) -> _Connection:
        conns: dict[str, _Connection] = self._local.__dict__.setdefault("conns", {})
        url = urllib.parse.urlunsplit((*urllib.parse.urlsplit(url)[:2], "", "", ""))  # one connection per host
        conn = conns.get(url)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            parts = urllib.parse.urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise RemoteHostError(f"not an http URL: {url!r}")
            conn = conns[url] = _Connection(parts.hostname, parts.port or 80, timeout=self.timeout, blocksize=ARTIFACT_CHUNK_BYTES)
        return conn

    def close(self) -> None:
        """Close this thread's connections (others close when their threads end)."""
        for conn in self._local.__dict__.pop("conns", {}).values():
            conn.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _headers(self, body_type: str | None) -> dict[str, str]:
        headers = {"Accept": _CBOR_TYPE, "Connection": "keep-alive"}
        if body_type:
            headers["Content-Type"] = body_type
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def open(
        self, method: str, url: str, path: str, body: Any = None, *, timeout: float | None = None,
        body_type: str | None = None, length: int | None = None,
    ) -> http.client.HTTPResponse:  # fmt: skip
        """Send one request and return the response (whose body the caller reads).

        ``body`` is a wire tree (sent as CBOR), or bytes or a file with its ``body_type`` (and
        ``length`` for a file).
        """
        url = _normalize_url(url)
        path = urllib.parse.urlsplit(url).path + path  # a host mounted under a prefix keeps it
        if body is not None and body_type is None:
            body, body_type = _cbor_dumps(body), _CBOR_TYPE
        # Whether a request may have been handled matters to exactly-once moves: a failure while
        # sending means the server never had the whole request; one while waiting for the answer
        # means it may have.  _Unreachable says "certainly not delivered".
        answered_phase = False
        for attempt in (0, 1):
            conn = self._connection(url, fresh=attempt == 1)
            reused, waiting = conn.sock is not None, False
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(timeout or self.timeout)
                else:
                    conn.timeout = timeout or self.timeout
                headers = self._headers(body_type)
                if length is not None:
                    headers["Content-Length"] = str(length)
                conn.request(method, path, body=body, headers=headers)
                waiting = True
                return conn.getresponse()
            except _STALE_ERRORS as exc:
                conn.close()
                answered_phase = answered_phase or waiting
                if reused and attempt == 0 and isinstance(body, (bytes, type(None))):
                    continue  # a keep-alive connection the server had closed: once more, fresh
                error: Exception = exc
            except TimeoutError as exc:
                conn.close()
                raise TimeoutError(f"no answer from {url}{path} within {timeout or self.timeout} s") from exc
            except OSError as exc:
                conn.close()
                answered_phase, error = answered_phase or waiting, exc
            kind = RemoteHostError if answered_phase else _Unreachable
            raise kind(f"connection to {url} failed: {error}") from error
        raise AssertionError("unreachable")

    def call(self, method: str, url: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """One request with a CBOR body; returns the decoded wire tree or raises the host's error."""
        response = self.open(method, url, path, body, timeout=timeout)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._connection(url, fresh=True)
            raise RemoteHostError(f"reading the answer of {url}{path} failed: {exc}") from exc
        return self._decode(response, data, url, path)

    def _decode(self, response: http.client.HTTPResponse, data: bytes, url: str, path: str) -> Any:
        content_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
        try:
            if content_type == _CBOR_TYPE:
                tree = _cbor_loads(data, untrusted=True)
            elif content_type == _JSON_TYPE:
                tree = _json_loads(data)
            else:
                tree = {"error": "RemoteHostError", "message": f"{url}{path} answered {response.status} {content_type!r}"}
        except SerializationError as exc:
            raise RemoteHostError(f"{url}{path} sent a malformed body: {exc}") from exc
        if response.status >= 400:
            raise _error_from_wire(tree)
        return tree

    def _decode_value(self, tree: Any) -> Any:
        return _wire_decode(tree, self._resolve)

    # -- the _Transport of proxies ----------------------------------------------------------
    def is_local_url(self, host_url: str) -> bool:
        """A bare client is local to no host."""
        return False

    def proxy_for(self, host_url: str, agent_id: str) -> PagletProxy:
        """A proxy that talks through this client."""
        return PagletProxy(host_url, agent_id, self)

    def send_message(self, host_url: str, agent_id: str, message: Message, *, oneway: bool = False, timeout: float | None = None) -> Any:
        """POST /agents/<id>/messages; returns the reply value."""
        body = message.to_wire()
        if oneway:
            body["oneway"] = True
        if timeout is not None:
            body["timeout"] = timeout
        wait = None if timeout is None else timeout + 5.0
        tree = self.call("POST", host_url, f"/agents/{_check_agent_id(agent_id)}/messages", body, timeout=wait or CALL_TIMEOUT + 5.0)
        return None if oneway else self._decode_value(tree.get("reply") if isinstance(tree, dict) else None)

    def send_future(self, host_url: str, agent_id: str, message: Message, *, timeout: float | None = None) -> FutureReply:
        """Send on a pool thread; the FutureReply gets the reply."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="paglets-client")
        return FutureReply(self._pool.submit(self.send_message, host_url, agent_id, message, timeout=timeout))

    def agent_op(self, host_url: str, agent_id: str, op: str, arg: Any = None) -> PagletProxyRef | None:
        """POST /agents/<id>/<op> for dispatch, clone, retract, deactivate, activate, dispose."""
        body: dict[str, Any] = {}
        if isinstance(arg, (TransferTicket, DeactivationRequest)):
            body["ticket" if isinstance(arg, TransferTicket) else "request"] = arg.to_wire()
        elif arg is not None:
            body["target"] = arg
        tree = self.call("POST", host_url, f"/agents/{_check_agent_id(agent_id)}/{op}", body, timeout=CALL_TIMEOUT)
        proxy = tree.get("proxy") if isinstance(tree, dict) else None
        return PagletProxyRef.from_wire(proxy) if proxy else None

    def agent_info(self, host_url: str, agent_id: str) -> dict[str, Any]:
        """GET /agents/<id>; InvalidAgentError for an unknown id."""
        tree = self.call("GET", host_url, f"/agents/{_check_agent_id(agent_id)}")
        if not isinstance(tree, dict):
            raise RemoteHostError("agent info must be a map")
        return tree

    # -- other endpoints -------------------------------------------------------------------
    def health(self, url: str, *, timeout: float | None = None) -> dict[str, Any]:
        """GET /health."""
        return dict(self.call("GET", url, "/health", timeout=timeout))

    def hosts(self, url: str) -> list[HostRef]:
        """GET /hosts: what that host knows of the mesh."""
        return [HostRef.from_wire(item) for item in self.call("GET", url, "/hosts")["hosts"]]

    def events(self, url: str, since: int = 0, limit: int = 100) -> list[ContextEvent]:
        """GET /events."""
        tree = self.call("GET", url, f"/events?since={int(since)}&limit={int(limit)}")
        return [ContextEvent.from_wire(item) for item in tree["events"]]

    def agents(self, url: str, state: str = "active") -> list[dict[str, Any]]:
        """GET /agents?state=active|inactive|all."""
        return list(self.call("GET", url, f"/agents?state={urllib.parse.quote(state)}")["agents"])

    def services(
        self, url: str, name: str | None = None, capability: str | None = None, scope: str | None = None, *, timeout: float | None = None
    ) -> list[ServiceRecord]:
        """GET /services (that host's own records; scope="mesh" for those it shares with the mesh)."""
        query = urllib.parse.urlencode({k: v for k, v in (("name", name), ("capability", capability), ("scope", scope)) if v})
        tree = self.call("GET", url, "/services" + (f"?{query}" if query else ""), timeout=timeout)
        return [ServiceRecord.from_wire(item) for item in tree["services"]]

    def lease_service(self, host_url: str, agent_id: str, ttl: float) -> tuple[str, float]:
        """POST /services/leases: keep a provider running for ``ttl`` seconds."""
        tree = self.call("POST", host_url, "/services/leases", {"agent_id": agent_id, "ttl": ttl})
        return str(tree["lease_id"]), float(tree["expires_at"])

    def release_lease(self, host_url: str, lease_id: str) -> None:
        """POST /services/leases/<id>/release."""
        self.call("POST", host_url, f"/services/leases/{_check_agent_id(lease_id, 'lease')}/release", {})

    def create(self, url: str, agent_class: type | str, state: Any = None, *, init: Any = None, agent_id: str | None = None) -> PagletProxy:
        """POST /agents: create a paglet of a class the host allows."""
        name = agent_class if isinstance(agent_class, str) else _qualified_name(agent_class)
        body = {"agent_class": name, "state": _wire_encode(state, "state"), "init": _wire_encode(init, "init")}
        if agent_id is not None:
            body["agent_id"] = agent_id
        tree = self.call("POST", url, "/agents", body, timeout=CALL_TIMEOUT)
        ref = PagletProxyRef.from_wire(tree["proxy"])
        return PagletProxy(ref.host_url, ref.agent_id, self)

    def get_state(self, url: str, agent_id: str) -> Any:
        """GET /agents/<id>/state, decoded (classes must be known or allowed here)."""
        return self._decode_value(self.call("GET", url, f"/agents/{_check_agent_id(agent_id)}/state")["state"])

    def get_proxy(self, agent_id: str, host_url: str | None = None) -> PagletProxy | None:
        """A proxy through this client (``PagletProxyRef.resolve(client)``)."""
        return PagletProxy(host_url, agent_id, self) if host_url else None

    # -- artifacts: streamed both ways, never whole in memory ---------------------------------------
    def upload_artifact(
        self, path: Path | str, *, host_url: str | None = None, name: str | None = None, owner_agent_id: str = "",
        expires_at: float | None = None, compression: str = "", sha256: str | None = None,
    ) -> ArtifactRef:  # fmt: skip
        """POST /artifacts: stream a file into another host's database."""
        if not host_url:
            raise RemoteHostError("upload_artifact needs the host_url of the host to store it on")
        path = Path(path)
        query = {"name": name or path.name, "owner": owner_agent_id, "compression": compression}
        query.update({k: str(v) for k, v in (("expires_at", expires_at), ("sha256", sha256)) if v is not None})
        with open(path, "rb") as handle:
            response = self.open(
                "POST", host_url, "/artifacts?" + urllib.parse.urlencode(query), handle, timeout=CALL_TIMEOUT,
                body_type="application/octet-stream", length=os.fstat(handle.fileno()).st_size,
            )  # fmt: skip
            tree = self._decode(response, response.read(), host_url, "/artifacts")
        return ArtifactRef.from_wire(tree["artifact"])

    def download_artifact(self, ref: ArtifactRef, target: Path | str, move: bool = False) -> ArtifactRef:
        """GET /artifacts/<id> into a file (via a temporary name), checking size and SHA-256."""
        response = self.open("GET", ref.host_url, f"/artifacts/{_check_agent_id(ref.artifact_id, 'artifact')}", timeout=CALL_TIMEOUT)
        if response.status >= 400:
            self._decode(response, response.read(), ref.host_url, "/artifacts")
        try:
            _save_stream(iter(lambda: response.read(ARTIFACT_CHUNK_BYTES), b""), Path(target), ref)
        except (OSError, http.client.HTTPException) as exc:
            self._connection(ref.host_url, fresh=True)
            raise TransferError(f"download of artifact {ref.name!r} failed: {exc}") from exc
        if move:
            self.delete_artifact(ref)
        return ref

    def delete_artifact(self, ref: ArtifactRef) -> None:
        """DELETE /artifacts/<id>."""
        self.call("DELETE", ref.host_url, f"/artifacts/{_check_agent_id(ref.artifact_id, 'artifact')}")

    def artifacts(self, url: str, sha256: str | None = None) -> list[ArtifactRef]:
        """GET /artifacts: complete artifacts of a host (optionally with one SHA-256)."""
        query = f"?sha256={urllib.parse.quote(sha256)}" if sha256 else ""
        return [ArtifactRef.from_wire(item) for item in self.call("GET", url, "/artifacts" + query)["artifacts"]]


# ==============================================================================
# 8. Service contracts
# ==============================================================================
# Owns: typed services: ServiceOperation (a named request dataclass -> reply dataclass),
# ServiceContract (a versioned set of operations), ServiceHandle (a caller's typed view of one
# advertised provider) and ServiceLease (keeps a lazy provider running).  Requests and replies
# travel as maps of their fields, so a client in another language can call them too; both ends
# check them against the dataclasses and name the field that does not fit.

_Req = TypeVar("_Req")
_Rep = TypeVar("_Rep")
#: The metadata key under which an advertised service record carries its contract.
CONTRACT_METADATA_KEY = "contract"
_HINTS: dict[type, dict[str, Any]] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class EmptyPayload:
    """The request or reply of an operation that carries nothing."""


def _contract_hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a hint that cannot be resolved is not checked
            hints = {}
        _HINTS[cls] = hints
    return hints


def _contract_check(value: Any, hint: Any, label: str) -> Any:
    """Check (and for nested dataclasses, build) one field value against its type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            with contextlib.suppress(ServiceContractError):
                return _contract_check(value, option, label)
        raise ServiceContractError(f"{label} must be {hint}, not {type(value).__name__}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _contract_build(hint, value, label)
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(base, type) and (not isinstance(value, base) or (base is int and isinstance(value, bool))):
        if base is tuple and isinstance(value, list):
            value = tuple(value)
        else:
            raise ServiceContractError(f"{label} must be {getattr(hint, '__name__', hint)}, not {type(value).__name__}")
    if base in (list, tuple, set, frozenset) and args and args[-1] is not Ellipsis and len(args) == 1:
        return base(_contract_check(item, args[0], f"{label}[{i}]") for i, item in enumerate(value))
    if base is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple(_contract_check(item, args[0], f"{label}[{i}]") for i, item in enumerate(value))
    if base is dict and len(args) == 2:
        return {_contract_check(k, args[0], f"{label}<key>"): _contract_check(v, args[1], f"{label}[{k!r}]") for k, v in value.items()}
    return value


def _contract_build(cls: type, payload: Any, label: str) -> Any:
    """A request or reply dataclass from a map of its fields, every field checked."""
    if not isinstance(payload, dict):
        raise ServiceContractError(f"{label} must be a map of {cls.__name__} fields, not {type(payload).__name__}")
    hints, names = _contract_hints(cls), {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(payload) - names)
    if unknown:
        raise ServiceContractError(f"{label}: unknown field {unknown[0]!r} for {cls.__name__}")
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in payload:
            kwargs[field.name] = _contract_check(payload[field.name], hints.get(field.name, Any), f"{label}.{field.name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ServiceContractError(f"{label}: field {field.name!r} of {cls.__name__} is missing")
    return cls(**kwargs)


def _contract_fields(value: Any, cls: type, label: str) -> dict[str, Any]:
    """The map of fields a request or reply travels as (checked against its dataclass)."""
    if not isinstance(value, cls):
        raise ServiceContractError(f"{label} must be a {cls.__name__}, not {type(value).__name__}")
    fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(cls)}
    _contract_build(cls, fields, label)  # type-check every field before it leaves
    return fields


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceOperation(Generic[_Req, _Rep]):
    """One typed operation: its name is the message kind, its request and reply are dataclasses."""

    name: str
    request_type: type = EmptyPayload
    reply_type: type = EmptyPayload

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ServiceContractError("a service operation needs a name")
        for label in ("request_type", "reply_type"):
            if not (isinstance(getattr(self, label), type) and dataclasses.is_dataclass(getattr(self, label))):
                raise ServiceContractError(f"{self.name}: {label} must be a dataclass")

    def to_message(self, request: Any = None) -> Message:
        """The message that calls this operation."""
        request = self.request_type() if request is None else request
        return Message(self.name, _contract_fields(request, self.request_type, f"{self.name} request"))

    def decode_request(self, message: Message | dict[str, Any]) -> Any:
        """The request dataclass of an incoming message, every field checked."""
        args = message.args if isinstance(message, Message) else message
        return _contract_build(self.request_type, args, f"{self.name} request")

    def encode_reply(self, reply: Any = None) -> dict[str, Any]:
        """The map a reply travels as."""
        reply = self.reply_type() if reply is None else reply
        return _contract_fields(reply, self.reply_type, f"{self.name} reply")

    def decode_reply(self, payload: Any) -> Any:
        """The reply dataclass, every field checked."""
        if isinstance(payload, self.reply_type):
            return payload
        return _contract_build(self.reply_type, {} if payload is None else payload, f"{self.name} reply")

    def schema(self) -> dict[str, str]:
        """What the operation looks like in advertised metadata."""
        return {"name": self.name, "request_type": _qualified_name(self.request_type), "reply_type": _qualified_name(self.reply_type)}


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceContract:
    """A named, versioned set of operations that a service provider implements."""

    name: str
    version: str = "1"
    operations: tuple[ServiceOperation[Any, Any], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.version, (tuple, list)):  # the published order: (name, operations, version)
            ops, version = self.version, self.operations if isinstance(self.operations, str) else "1"
            object.__setattr__(self, "version", version)
            object.__setattr__(self, "operations", ops)
        object.__setattr__(self, "operations", tuple(self.operations))
        if not self.name or not str(self.version) or not self.operations:
            raise ServiceContractError("a service contract needs a name, a version and at least one operation")
        names = [op.name for op in self.operations if isinstance(op, ServiceOperation)]
        if len(names) != len(self.operations) or len(set(names)) != len(names):
            raise ServiceContractError(f"contract {self.name!r}: operations must be distinct ServiceOperations")

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The operation names (advertised as the record's capabilities)."""
        return tuple(op.name for op in self.operations)

    def operation_for(self, name: str) -> ServiceOperation[Any, Any] | None:
        """The operation of that name, or None."""
        return next((op for op in self.operations if op.name == name), None)

    def require_operation(self, operation: ServiceOperation[Any, Any] | str) -> ServiceOperation[Any, Any]:
        """The contract's own operation (ServiceContractError if it is not part of it)."""
        name = operation if isinstance(operation, str) else operation.name
        found = self.operation_for(name)
        if found is None or (isinstance(operation, ServiceOperation) and found != operation):
            raise ServiceContractError(f"{name!r} is not an operation of contract {self.name!r} {self.version}")
        return found

    def metadata(self) -> dict[str, Any]:
        """What an advertised record carries under CONTRACT_METADATA_KEY."""
        return {"name": self.name, "version": str(self.version), "operations": [op.schema() for op in self.operations]}

    def matches_record(self, record: ServiceRecord, operation: ServiceOperation[Any, Any] | None = None) -> bool:
        """Whether a record offers this contract: same name and version, and the operations needed."""
        meta = record.metadata.get(CONTRACT_METADATA_KEY)
        if record.name != self.name or not isinstance(meta, dict) or meta.get("version") != str(self.version):
            return False
        offered = {op.get("name"): op for op in meta.get("operations", []) if isinstance(op, dict)}
        needed = [operation] if operation is not None else list(self.operations)
        return all(offered.get(op.name) == op.schema() for op in needed)

    def route(self, message: Message, handlers: Mapping[Any, Callable[[Any], Any]], default: Any = NotImplemented) -> Any:
        """Provider side: decode the request, call its handler, check and encode the reply.

        ``handlers`` maps operations (or their names) to functions; a kind that is not part of
        the contract returns ``default`` if given, else raises ServiceContractError.
        """
        operation = self.operation_for(message.kind)
        if operation is None:
            if default is not NotImplemented:
                return default
            raise ServiceContractError(f"{message.kind!r} is not an operation of contract {self.name!r}")
        handler = handlers.get(operation, handlers.get(operation.name))
        if handler is None:
            raise ServiceContractError(f"no handler for operation {operation.name!r}")
        return operation.encode_reply(handler(operation.decode_request(message)))


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceHandle:
    """A caller's typed view of one provider of a contract."""

    contract: ServiceContract
    record: ServiceRecord
    #: A PagletContext, Host or HostClient through which the provider is reached.
    via: Any = None

    def proxy(self) -> PagletProxy:
        """The provider's proxy."""
        assert self.record.proxy is not None
        return self.record.proxy.resolve(self.via)

    def call(self, operation: ServiceOperation[Any, Any] | str, request: Any = None, timeout: float | None = None) -> Any:
        """Call an operation and get its reply dataclass (ServiceContractError if either does not fit)."""
        op = self.contract.require_operation(operation)
        return op.decode_reply(self.proxy().send(op.to_message(request), timeout=timeout))

    def send_oneway(self, operation: ServiceOperation[Any, Any] | str, request: Any = None) -> None:
        """Call an operation without waiting for a reply."""
        op = self.contract.require_operation(operation)
        self.proxy().send_oneway(op.to_message(request))


class ServiceLease:
    """Keeps a lazy provider running until released or expired; a context manager giving the handle."""

    def __init__(self, handle: ServiceHandle, lease_id: str, expires_at: float, release: Callable[[], Any]) -> None:
        self.handle, self.lease_id, self.expires_at = handle, lease_id, expires_at
        self._release, self.released = release, False

    @property
    def expired(self) -> bool:
        """Whether the lease ran out."""
        return time.time() >= self.expires_at

    def release(self) -> None:
        """Let the provider idle out again (safe to call twice)."""
        if not self.released:
            self.released = True
            with contextlib.suppress(PagletError):
                self._release()

    def __enter__(self) -> ServiceHandle:
        return self.handle

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


# ==============================================================================
# 9. The paglet model
# ==============================================================================
# Owns: PagletState, Paglet and its hooks, PagletContext, ResourceRegistry, PersistentStorage and
# _HostPort, the operations a paglet may ask of its host.  The worker's stub (14) and the Host
# (18) implement _HostPort, so a paglet's code runs the same in a worker and against a real host.
# Threads: handlers and hooks run one at a time; run() and UNQUEUED handlers run beside them, so
# shared state goes through locked() / locked_state() / @state_locked.

_StateT = TypeVar("_StateT")
_FuncT = TypeVar("_FuncT", bound=Callable[..., Any])


class _NotHandled:
    """The reply that says "not my kind of message" (``return self.not_handled()``)."""

    _instance: ClassVar[_NotHandled | None] = None

    def __new__(cls) -> _NotHandled:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_HANDLED"


NOT_HANDLED = _NotHandled()


@dataclasses.dataclass
class PagletState:
    """Base of paglet state.  Subclass it with ``@dataclass``; only the state moves and persists."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "<locals>" not in cls.__qualname__:
            _STATE_CLASSES[_qualified_name(cls)] = cls


@dataclasses.dataclass(frozen=True, slots=True)
class StorageStatus:
    """How full a paglet class's persistent storage is."""

    used_bytes: int
    quota_bytes: int
    files: int


class _HostPort(_Transport, Protocol):
    """The operations a paglet may ask of its host (implemented by the worker stub and Host)."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    def get_proxy(self, agent_id: str, include_inactive: bool = False, host_url: str | None = None) -> PagletProxy | None: ...

    def get_proxies(self, state: int = ACTIVE) -> list[PagletProxy]: ...

    def get_property(self, key: str, default: Any = None) -> Any: ...

    def set_property(self, key: str, value: Any) -> None: ...

    def create_paglet(self, cls: type | str, state: Any = None, init: Any = None, host_url: str | None = None) -> PagletProxy: ...

    def dispatch(self, agent_id: str, target: str | TransferTicket) -> PagletProxy: ...

    def clone(self, agent_id: str, target: str | TransferTicket | None = None) -> PagletProxy: ...

    def deactivate(self, agent_id: str, request: DeactivationRequest | None = None) -> PagletProxy: ...

    def dispose(self, agent_id: str) -> None: ...

    def snapshot(self, agent_id: str) -> None: ...

    def resolve_url(self, name_or_url: str) -> str: ...

    def available_hosts(self, online_only: bool = True, include_self: bool = True) -> list[HostRef]: ...

    def host_status(self, name_or_url: str) -> HostRef | None: ...

    def wait_for_host(self, name_or_url: str, timeout: float = 10.0) -> HostRef: ...

    def multicast_message(self, kind: str | Message, args: dict[str, Any] | None = None, exclude: Iterable[str] = ()) -> ReplySet: ...

    def subscribe_message(self, agent_id: str, kind: str) -> None: ...

    def unsubscribe_message(self, agent_id: str, kind: str | None = None) -> None: ...

    def wait_message(self, agent_id: str, timeout: float | None = None) -> bool: ...

    def notify_message(self, agent_id: str, everyone: bool = False) -> None: ...

    def advertise_service(
        self, agent_id: str, name: str, capabilities: Iterable[str] = (), metadata: dict[str, Any] | None = None,
        scope: ServiceScope | str = ServiceScope.LOCAL, ttl: float | None = None,
    ) -> ServiceRecord: ...  # fmt: skip

    def unadvertise_service(self, agent_id: str, name: str) -> list[ServiceRecord]: ...

    def lookup_services(
        self, name: str | None = None, capability: str | None = None, scope: ServiceScope = ServiceScope.LOCAL
    ) -> list[ServiceRecord]: ...

    def work_dir(self, agent_id: str, create: bool = True) -> Path: ...

    def storage_call(self, owner: str, quota: int | None, op: str, key: str | None = None, data: bytes | None = None) -> Any: ...

    def register_file(self, agent_id: str, path: Path | str, name: str | None = None, mode: str = "copy") -> PagletFileRef: ...

    def registered_files(self, agent_id: str) -> list[PagletFileRef]: ...

    def unregister_file(self, agent_id: str, name: str) -> None: ...

    def download_artifact(self, ref: ArtifactRef, target: Path | str, move: bool = False) -> ArtifactRef: ...

    def delete_artifact(self, ref: ArtifactRef) -> None: ...

    def lease_service(self, host_url: str, agent_id: str, ttl: float) -> tuple[str, float]: ...

    def release_lease(self, host_url: str, lease_id: str) -> None: ...


class ResourceRegistry:
    """Things a paglet opened (files, sockets, threads) and how to close them.

    The runtime closes them, newest first, before the paglet leaves its worker (dispatch,
    deactivate, dispose).
    """

    def __init__(self) -> None:
        self._items: dict[str, tuple[Callable[[], Any], bool]] = {}
        self._lock = threading.Lock()

    def register(self, name: str, close: Callable[[], Any], *, suppress: bool = False) -> None:
        """Remember ``close`` under ``name``; ``suppress`` swallows its errors."""
        with self._lock:
            self._items[name] = (close, suppress)

    def unregister(self, name: str) -> bool:
        """Forget a resource without closing it."""
        with self._lock:
            return self._items.pop(name, None) is not None

    def names(self) -> list[str]:
        """Names of the registered resources, oldest first."""
        with self._lock:
            return list(self._items)

    def close(self, name: str) -> None:
        """Close one resource now and forget it."""
        with self._lock:
            close, suppress = self._items.pop(name)
        with contextlib.suppress(Exception) if suppress else contextlib.nullcontext():
            close()

    def close_all(self) -> list[BaseException]:
        """Close every resource, newest first; returns the errors that were not suppressed."""
        errors: list[BaseException] = []
        for name in reversed(self.names()):
            try:
                self.close(name)
            except Exception as exc:
                errors.append(exc)
        return errors


class PersistentStorage:
    """A per-paglet-class key/file store in the host's database, with a quota.

    Keys are file names (one path component).  A write past the quota raises StorageQuotaError
    and writes nothing.
    """

    def __init__(self, port: _HostPort, owner: str, quota_bytes: int | None = None) -> None:
        self._port, self.owner, self.quota_bytes = port, owner, quota_bytes

    def _call(self, op: str, key: str | None = None, data: bytes | None = None) -> Any:
        return self._port.storage_call(self.owner, self.quota_bytes, op, key, data)

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes; KeyError if there are none."""
        data = self._call("read", _safe_file_name(key))
        if data is None:
            raise KeyError(key)
        return bytes(data)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store bytes under a key (replacing what was there)."""
        self._call("write", _safe_file_name(key), bytes(data))

    def read_text(self, key: str, encoding: str = "utf-8") -> str:
        """The stored text."""
        return self.read_bytes(key).decode(encoding)

    def write_text(self, key: str, text: str, encoding: str = "utf-8") -> None:
        """Store text under a key."""
        self.write_bytes(key, text.encode(encoding))

    def exists(self, key: str) -> bool:
        """Whether a key is stored."""
        return key in self.keys()

    def delete(self, key: str) -> None:
        """Remove a key (no error if it is missing)."""
        self._call("delete", _safe_file_name(key))

    def keys(self) -> list[str]:
        """Stored keys, sorted."""
        return list(self._call("keys"))

    def clear(self) -> None:
        """Remove every key of this store."""
        self._call("clear")

    def status(self) -> StorageStatus:
        """Bytes used, quota and number of files."""
        used, quota, files = self._call("status")
        return StorageStatus(used, quota, files)


def state_locked(method: _FuncT) -> _FuncT:
    """Run a paglet method under the paglet's reentrant state lock."""

    @functools.wraps(method)
    def wrapper(self: Paglet[Any], *args: Any, **kwargs: Any) -> Any:
        with self.locked():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class PagletContext:
    """The environment a paglet sees: its host, and everything it may ask of it.

    Inside a worker the host is the worker's stub; an embedding app may build
    ``PagletContext(host)`` on a real Host, and must then pass ``agent_id=`` where a call
    concerns one paglet.
    """

    def __init__(self, host: _HostPort, agent_id: str | None = None) -> None:
        self._host, self.agent_id = host, agent_id

    def _owner(self, agent_id: str | None, what: str) -> str:
        owner = agent_id or self.agent_id
        if owner is None:
            raise HostError(f"{what} needs agent_id= when the context is not attached to a paglet")
        return owner

    @property
    def transport(self) -> _HostPort:
        """What proxies made through this context talk through."""
        return self._host

    @property
    def name(self) -> str:
        """The host's name."""
        return self._host.name

    @property
    def address(self) -> str:
        """The host's URL."""
        return self._host.address

    # -- proxies, properties, creation ------------------------------------------------------
    def get_proxy(self, agent_id: str, host_url: str | None = None) -> PagletProxy | None:
        """A proxy of a paglet here (None if unknown) or, with host_url, on another host."""
        return self._host.get_proxy(agent_id, include_inactive=True, host_url=host_url)

    def get_proxies(self, state: int = ACTIVE) -> list[PagletProxy]:
        """Proxies of this host's paglets in that state (ACTIVE, INACTIVE or both)."""
        return self._host.get_proxies(state)

    def get_property(self, key: str, default: Any = None) -> Any:
        """A host property (persisted in the host's database)."""
        return self._host.get_property(key, default)

    def set_property(self, key: str, value: Any) -> None:
        """Set a host property (persisted)."""
        self._host.set_property(key, value)

    def create_paglet(self, cls: type[Paglet[Any]] | str, state: Any = None, init: Any = None, host_url: str | None = None) -> PagletProxy:
        """Create a paglet here, or on another host with host_url."""
        return self._host.create_paglet(cls, state, init, host_url)

    # -- hosts of the mesh ------------------------------------------------------------------
    def available_hosts(self, online_only: bool = True, include_self: bool = True) -> list[HostRef]:
        """Hosts this host knows of."""
        return self._host.available_hosts(online_only, include_self)

    def host_status(self, name_or_url: str) -> HostRef | None:
        """What is known of one host (None if nothing)."""
        return self._host.host_status(name_or_url)

    def is_host_online(self, name_or_url: str) -> bool:
        """Whether a host answered recently."""
        ref = self._host.host_status(name_or_url)
        return bool(ref and ref.online)

    def wait_for_host(self, name_or_url: str, timeout: float = 10.0) -> HostRef:
        """Wait until a host is known and online; HostError on timeout."""
        return self._host.wait_for_host(name_or_url, timeout)

    # -- messages ---------------------------------------------------------------------------
    def send(self, agent_id: str, message: Message | str, host_url: str | None = None, timeout: float | None = None) -> Any:
        """Send a message to a paglet here or on another host and wait for the reply."""
        msg = _as_message(message)
        msg.sender = msg.sender or self._host.address
        return self._host.send_message(host_url or self._host.address, agent_id, msg, timeout=timeout)

    def multicast(self, kind: str | Message, args: dict[str, Any] | None = None, exclude: Iterable[str] = ()) -> ReplySet:
        """Send to every paglet here subscribed to the kind; replies arrive in the ReplySet."""
        return self._host.multicast_message(kind, args, exclude)

    # -- movement and lifecycle, agent id first -----------------------------------------------
    def dispatch(self, agent_id: str, target: str | TransferTicket) -> PagletProxy:
        """Move a paglet to another host (URL, name or ticket)."""
        return self._host.dispatch(agent_id, target)

    def clone(self, agent_id: str, target: str | TransferTicket | None = None) -> PagletProxy:
        """Copy a paglet (here or to another host)."""
        return self._host.clone(agent_id, target)

    def dispatch_to(self, agent_id: str, name_or_url: str) -> PagletProxy:
        """Move a paglet to a host given by name or URL."""
        return self._host.dispatch(agent_id, self._host.resolve_url(name_or_url))

    def clone_to(self, agent_id: str, name_or_url: str) -> PagletProxy:
        """Copy a paglet to a host given by name or URL."""
        return self._host.clone(agent_id, self._host.resolve_url(name_or_url))

    def deactivate(self, agent_id: str, request: DeactivationRequest | None = None) -> PagletProxy:
        """Store a paglet and end its worker."""
        return self._host.deactivate(agent_id, request)

    def dispose(self, agent_id: str) -> None:
        """End a paglet for good."""
        self._host.dispose(agent_id)

    # -- services ---------------------------------------------------------------------------
    def advertise_service(
        self,
        name: str,
        capabilities: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        scope: ServiceScope = ServiceScope.LOCAL,
        ttl: float | None = None,
        agent_id: str | None = None,
    ) -> ServiceRecord:
        """Advertise a service offered by a paglet of this host."""
        owner = self._owner(agent_id, "advertise_service")
        return self._host.advertise_service(
            owner, name, capabilities=tuple(capabilities), metadata=dict(metadata or {}), scope=scope, ttl=ttl
        )

    def unadvertise_service(self, name: str, agent_id: str | None = None) -> list[ServiceRecord]:
        """Withdraw a service; returns the records removed."""
        return self._host.unadvertise_service(self._owner(agent_id, "unadvertise_service"), name)

    def lookup_services(
        self, name: str | None = None, capability: str | None = None, scope: ServiceScope = ServiceScope.LOCAL
    ) -> list[ServiceRecord]:
        """Services by name and capability, on this host or (MESH) on every compatible host."""
        return self._host.lookup_services(name, capability, scope)

    def lookup_service(self, name: str, capability: str | None = None, scope: ServiceScope = ServiceScope.LOCAL) -> PagletProxyRef | None:
        """A reference to the first provider of a service, or None."""
        records = self.lookup_services(name, capability, scope)
        return records[0].proxy if records else None

    def advertise_contract(
        self, contract: ServiceContract, scope: ServiceScope = ServiceScope.LOCAL, ttl: float | None = None,
        metadata: dict[str, Any] | None = None, agent_id: str | None = None,
    ) -> ServiceRecord:  # fmt: skip
        """Advertise a typed contract (its operations become the record's capabilities)."""
        meta = dict(metadata or {})
        if CONTRACT_METADATA_KEY in meta:
            raise ServiceContractError(f"metadata key {CONTRACT_METADATA_KEY!r} is reserved for the contract")
        meta[CONTRACT_METADATA_KEY] = contract.metadata()
        return self.advertise_service(contract.name, contract.capabilities, meta, scope, ttl, agent_id)

    def lookup_contracts(
        self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None, scope: ServiceScope = ServiceScope.LOCAL
    ) -> list[ServiceHandle]:
        """Handles of every provider of the contract (name, version and operations must match)."""
        op = contract.require_operation(operation) if operation is not None else None
        records = self.lookup_services(contract.name, op.name if op else None, scope)
        return [ServiceHandle(contract, record, self) for record in records if contract.matches_record(record, op)]

    def lookup_contract(
        self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None, scope: ServiceScope = ServiceScope.LOCAL
    ) -> ServiceHandle | None:
        """A handle of the first provider, or None."""
        handles = self.lookup_contracts(contract, operation, scope)
        return handles[0] if handles else None

    def require_contract(
        self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None, scope: ServiceScope = ServiceScope.LOCAL
    ) -> ServiceHandle:
        """A handle of a provider; ServiceNotFoundError if there is none."""
        handle = self.lookup_contract(contract, operation, scope)
        if handle is None:
            what = f" with operation {operation.name!r}" if operation is not None else ""
            raise ServiceNotFoundError(f"no provider of contract {contract.name!r} {contract.version}{what} ({ServiceScope(scope).value})")
        return handle

    def lease_contract(
        self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None,
        scope: ServiceScope = ServiceScope.LOCAL, ttl: float = 60.0,
    ) -> ServiceLease:  # fmt: skip
        """A provider kept running for ``ttl`` seconds or until released (use it with ``with``)."""
        handle = self.require_contract(contract, operation, scope)
        url, agent_id = handle.record.host_url, handle.record.agent_id
        lease_id, expires_at = self._host.lease_service(url, agent_id, ttl)
        return ServiceLease(handle, lease_id, expires_at, lambda: self._host.release_lease(url, lease_id))

    # -- storage, files, artifacts ------------------------------------------------------------
    def work_dir(self, create: bool = True, agent_id: str | None = None) -> Path:
        """The paglet's scratch folder (cleared at host start, dispatch and dispose)."""
        return self._host.work_dir(self._owner(agent_id, "work_dir"), create)

    def persistent_storage(
        self, quota_bytes: int | None = None, agent_id: str | None = None, owner: str | None = None
    ) -> PersistentStorage:
        """The key/file store of the paglet's class (or of ``owner``), with a quota."""
        if owner is None:
            info = self._host.agent_info(self._host.address, self._owner(agent_id, "persistent_storage"))
            owner = str(info["agent_class"])
        return PersistentStorage(self._host, owner, quota_bytes)

    def register_file(self, path: Path | str, name: str | None = None, mode: str = "copy", agent_id: str | None = None) -> PagletFileRef:
        """Register a file that travels with the paglet ("copy" keeps the original, "move" takes it)."""
        return self._host.register_file(self._owner(agent_id, "register_file"), path, name, mode)

    def registered_files(self, agent_id: str | None = None) -> list[PagletFileRef]:
        """The paglet's registered files."""
        return self._host.registered_files(self._owner(agent_id, "registered_files"))

    def unregister_file(self, name: str | PagletFileRef, agent_id: str | None = None) -> None:
        """Stop carrying a file (and delete the paglet's copy)."""
        key = name.name if isinstance(name, PagletFileRef) else name
        self._host.unregister_file(self._owner(agent_id, "unregister_file"), key)

    def file_path(self, name: str | PagletFileRef, agent_id: str | None = None) -> Path:
        """Where a registered file is on this host."""
        key = name.name if isinstance(name, PagletFileRef) else name
        for ref in self.registered_files(agent_id):
            if ref.name == key:
                return Path(ref.current_path)
        raise KeyError(f"no registered file {key!r}")

    def upload_artifact(self, path: Path | str, host_url: str | None = None, agent_id: str | None = None, **meta: Any) -> ArtifactRef:
        """Store a file as an artifact on this host (or another); returns its reference."""
        meta.setdefault("owner_agent_id", agent_id or self.agent_id or "")
        return self._host.upload_artifact(path, host_url=host_url, **meta)

    def download_artifact(self, ref: ArtifactRef, target: Path | str, move: bool = False) -> ArtifactRef:
        """Copy an artifact (from whichever host holds it) into a file, checking its SHA-256."""
        return self._host.download_artifact(ref, target, move)

    def delete_artifact(self, ref: ArtifactRef) -> None:
        """Delete an artifact on the host that holds it."""
        self._host.delete_artifact(ref)


class Paglet(Generic[_StateT]):
    """Base class of paglets.  Set ``State`` to a dataclass and override the hooks you need.

    Only ``state`` moves and persists.  ``agent_id``, ``context`` and ``resources`` are given by the
    runtime; other attributes are transient (set them again in ``on_activation``/``on_arrival``).
    """

    #: The dataclass of this paglet's state.
    State: ClassVar[type[Any]] = PagletState
    #: "lifecycle": checkpoint at creation, arrival, activation and snapshot(); "message": also
    #: after every handled message, before the reply is given.
    CHECKPOINT: ClassVar[str] = "lifecycle"
    #: Bytes of memory this paglet's worker may use (None: the host's limit).
    MEMORY_LIMIT: ClassVar[int | None] = None
    #: The typed contract this class provides as a resident service (see ResidentService).
    CONTRACT: ClassVar[ServiceContract | None] = None
    ACTIVE: ClassVar[int] = ACTIVE
    INACTIVE: ClassVar[int] = INACTIVE

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "<locals>" not in cls.__qualname__:
            _PAGLET_CLASSES[_qualified_name(cls)] = cls

    def __init__(self, state: _StateT | None = None, *, agent_id: str | None = None) -> None:
        state_cls = type(self).State
        if state is None:
            state = state_cls()
        if not dataclasses.is_dataclass(state) or isinstance(state, type):
            raise TypeError(f"{type(self).__name__}.State must be a dataclass, not {type(state).__name__}")
        self.agent_id: str = agent_id or _new_id()
        self.state: _StateT = state  # type: ignore[assignment]
        self.resources = ResourceRegistry()
        self._context: PagletContext | None = None
        self._state_lock = threading.RLock()
        self._state_cond = threading.Condition(self._state_lock)

    @property
    def context(self) -> PagletContext:
        """The paglet's context (set by the runtime before the first hook)."""
        if self._context is None:
            raise HostError("this paglet is not attached to a host")
        return self._context

    @staticmethod
    def not_handled() -> _NotHandled:
        """Return this from ``handle_message`` for kinds you do not handle."""
        return NOT_HANDLED

    # -- hooks (all no-ops) -----------------------------------------------------------------
    def on_creation(self, event: CreationEvent) -> None:
        """After the paglet is created; ``event.init`` is the init value."""

    def on_dispatching(self, event: MobilityEvent) -> None:
        """On the source host, before leaving; raise to veto the move."""

    def on_arrival(self, event: MobilityEvent) -> None:
        """On the target host, after a dispatch or retract."""

    def on_reverting(self, event: MobilityEvent) -> None:
        """On the remote host, before being retracted."""

    def on_cloning(self, event: CloneEvent) -> None:
        """On the source, before the copy is made."""

    def on_clone(self, event: CloneEvent) -> None:
        """On the new copy, on its host."""

    def on_cloned(self, event: CloneEvent) -> None:
        """On the source, after the copy is made."""

    def on_deactivating(self, event: PersistencyEvent) -> None:
        """Before the paglet is stored and its worker ends."""

    def on_activation(self, event: PersistencyEvent) -> None:
        """After the paglet is restored (reason: activate, message, timer, startup, shutdown, recover)."""

    def on_disposing(self, event: PersistencyEvent) -> None:
        """Before the paglet ends for good."""

    def deactivation_policy(self, request: DeactivationRequest) -> DeactivationPolicy:
        """Choose the policy for an external deactivation request (default: the request's, or the default)."""
        return request.policy or DeactivationPolicy()

    def run(self) -> None:
        """Started in a background thread after creation, arrival, clone arrival and activation."""

    def handle_message(self, message: Message) -> Any:
        """Answer a message; return ``self.not_handled()`` for kinds you do not handle."""
        return NOT_HANDLED

    # -- state helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the paglet's reentrant state lock."""
        with self._state_lock:
            yield

    @contextlib.contextmanager
    def locked_state(self) -> Iterator[_StateT]:
        """Hold the state lock and get the state."""
        with self._state_lock:
            yield self.state

    def wait_state(self, predicate: Callable[[_StateT], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate(state)`` holds (woken by notify_state_changed); False on timeout."""
        with self._state_cond:
            return self._state_cond.wait_for(lambda: predicate(self.state), timeout)

    def notify_state_changed(self) -> None:
        """Wake one ``wait_state`` waiter."""
        with self._state_cond:
            self._state_cond.notify()

    def notify_all_state_changed(self) -> None:
        """Wake every ``wait_state`` waiter."""
        with self._state_cond:
            self._state_cond.notify_all()

    # -- mailbox helpers -----------------------------------------------------------------------
    def wait_message(self, timeout: float | None = None) -> bool:
        """Inside a handler: let other messages be handled until notify_message(); False on timeout."""
        return self.context._host.wait_message(self.agent_id, timeout)

    def notify_message(self) -> None:
        """Wake one handler waiting in wait_message (it resumes after the current handler)."""
        self.context._host.notify_message(self.agent_id, False)

    def notify_all_messages(self) -> None:
        """Wake every handler waiting in wait_message."""
        self.context._host.notify_message(self.agent_id, True)

    def subscribe_message(self, kind: str) -> None:
        """Receive multicasts of this kind."""
        self.context._host.subscribe_message(self.agent_id, kind)

    def unsubscribe_message(self, kind: str) -> None:
        """Stop receiving multicasts of this kind."""
        self.context._host.unsubscribe_message(self.agent_id, kind)

    def unsubscribe_all_messages(self) -> None:
        """Stop receiving any multicast."""
        self.context._host.unsubscribe_message(self.agent_id, None)

    # -- movement and lifecycle from inside ----------------------------------------------------
    def dispatch(self, target: str | TransferTicket) -> PagletProxy:
        """Move to another host; returns the proxy there once it has arrived (TransferError if not).

        The state that travels is the state at this call; code after it still runs here (return
        soon).  Called from on_arrival or another start-up hook, the move happens right after it.
        """
        return self.context.dispatch(self.agent_id, target)

    def clone(self, target: str | TransferTicket | None = None) -> PagletProxy:
        """Copy this paglet (here or to another host); returns the copy's proxy."""
        return self.context.clone(self.agent_id, target)

    def dispatch_to(self, name_or_url: str) -> PagletProxy:
        """Move to a host given by name or URL."""
        return self.context.dispatch_to(self.agent_id, name_or_url)

    def clone_to(self, name_or_url: str) -> PagletProxy:
        """Copy to a host given by name or URL."""
        return self.context.clone_to(self.agent_id, name_or_url)

    def deactivate(
        self, reason: str = "deactivate", policy: DeactivationPolicy | None = None, metadata: dict[str, Any] | None = None
    ) -> PagletProxy:
        """Go to sleep on disk with the state as it is now; this worker ends once the handler returns."""
        request = DeactivationRequest(reason=reason, source="self", policy=policy, metadata=dict(metadata or {}))
        return self.context.deactivate(self.agent_id, request)

    def dispose(self) -> None:
        """End for good (on_disposing runs now); this worker ends once the handler returns."""
        self.context.dispose(self.agent_id)

    def snapshot(self) -> None:
        """Store the current state now, so a host crash restores it."""
        self.context._host.snapshot(self.agent_id)

    # -- messages and services from inside -------------------------------------------------------
    def send(self, agent_id: str, message: Message | str, host_url: str | None = None, timeout: float | None = None) -> Any:
        """Send to another paglet and wait for its reply."""
        return self.context.send(agent_id, message, host_url, timeout)

    def multicast(self, kind: str | Message, args: dict[str, Any] | None = None, include_self: bool = True) -> ReplySet:
        """Multicast to this host's subscribers of the kind."""
        return self.context.multicast(kind, args, () if include_self else (self.agent_id,))

    def advertise_service(self, name: str, **options: Any) -> ServiceRecord:
        """Advertise a service this paglet offers (capabilities=, metadata=, scope=, ttl=)."""
        return self.context.advertise_service(name, agent_id=self.agent_id, **options)

    def unadvertise_service(self, name: str) -> list[ServiceRecord]:
        """Withdraw a service."""
        return self.context.unadvertise_service(name, agent_id=self.agent_id)

    def lookup_service(self, name: str, capability: str | None = None, scope: ServiceScope = ServiceScope.LOCAL) -> PagletProxyRef | None:
        """The first provider of a service."""
        return self.context.lookup_service(name, capability, scope)

    def lookup_services(
        self, name: str | None = None, capability: str | None = None, scope: ServiceScope = ServiceScope.LOCAL
    ) -> list[ServiceRecord]:
        """Every provider of a service."""
        return self.context.lookup_services(name, capability, scope)

    def advertise_contract(self, contract: ServiceContract, **options: Any) -> ServiceRecord:
        """Advertise a typed contract this paglet provides (scope=, ttl=, metadata=)."""
        return self.context.advertise_contract(contract, agent_id=self.agent_id, **options)

    def lookup_contract(self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None,
                        scope: ServiceScope = ServiceScope.LOCAL) -> ServiceHandle | None:  # fmt: skip
        """A handle of the first provider of a contract."""
        return self.context.lookup_contract(contract, operation, scope)

    def lookup_contracts(self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None,
                         scope: ServiceScope = ServiceScope.LOCAL) -> list[ServiceHandle]:  # fmt: skip
        """Handles of every provider of a contract."""
        return self.context.lookup_contracts(contract, operation, scope)

    def require_contract(self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None,
                         scope: ServiceScope = ServiceScope.LOCAL) -> ServiceHandle:  # fmt: skip
        """A handle of a provider, or ServiceNotFoundError."""
        return self.context.require_contract(contract, operation, scope)

    def lease_contract(self, contract: ServiceContract, operation: ServiceOperation[Any, Any] | None = None,
                       scope: ServiceScope = ServiceScope.LOCAL, ttl: float = 60.0) -> ServiceLease:  # fmt: skip
        """Keep a provider running while you use it."""
        return self.context.lease_contract(contract, operation, scope, ttl)

    def work_dir(self, create: bool = True) -> Path:
        """This paglet's scratch folder."""
        return self.context.work_dir(create, self.agent_id)

    def persistent_storage(self, quota_bytes: int | None = None) -> PersistentStorage:
        """The key/file store of this paglet's class."""
        return self.context.persistent_storage(quota_bytes, owner=_qualified_name(type(self)))

    def register_file(self, path: Path | str, name: str | None = None, mode: str = "copy") -> PagletFileRef:
        """Register a file to carry along."""
        return self.context.register_file(path, name, mode, self.agent_id)

    def registered_files(self) -> list[PagletFileRef]:
        """The files this paglet carries."""
        return self.context.registered_files(self.agent_id)

    def unregister_file(self, name: str | PagletFileRef) -> None:
        """Stop carrying a file."""
        self.context.unregister_file(name, self.agent_id)

    def file_path(self, name: str | PagletFileRef) -> Path:
        """Where a carried file is on this host."""
        return self.context.file_path(name, self.agent_id)

    def upload_artifact(self, path: Path | str, host_url: str | None = None, **meta: Any) -> ArtifactRef:
        """Store a file as an artifact owned by this paglet."""
        return self.context.upload_artifact(path, host_url, self.agent_id, **meta)

    def download_artifact(self, ref: ArtifactRef, target: Path | str, move: bool = False) -> ArtifactRef:
        """Fetch an artifact into a file."""
        return self.context.download_artifact(ref, target, move)

    def delete_artifact(self, ref: ArtifactRef) -> None:
        """Delete an artifact."""
        self.context.delete_artifact(ref)


# ==============================================================================
# 10. Itineraries
# ==============================================================================
# Owns: route plans that live in paglet state and travel with it.  dispatch_next advances the
# plan *before* dispatching, because the state that travels is captured during the dispatch.


@dataclasses.dataclass(slots=True)
class ItineraryPlan:
    """A route of destinations (URLs or host names) with progress, stored in paglet state."""

    destinations: list[str] = dataclasses.field(default_factory=list)
    current_index: int = 0
    current_location: str | None = None
    visited_destinations: list[str] = dataclasses.field(default_factory=list)
    mutable: bool = True
    circular: bool = False
    loop_count: int = 0
    completed: bool = False

    def add_next_destination(
        self, destination: str, index: int | None = None, after: str | None = None, allow_duplicate: bool = True
    ) -> bool:
        """Add a destination (at the end, at ``index``, or after another); False if not allowed."""
        if not self.mutable or not destination or (not allow_duplicate and destination in self.destinations):
            return False
        if after is not None:
            if after not in self.destinations:
                return False
            index = self.destinations.index(after) + 1
        if index is None:
            self.destinations.append(destination)
            return True
        if not 0 <= index <= len(self.destinations):
            return False
        self.destinations.insert(index, destination)
        if index < self.current_index:
            self.current_index += 1
        return True

    def add_next_destination_if_not_duplicated(self, destination: str) -> bool:
        """Add a destination unless it is already on the route."""
        return self.add_next_destination(destination, allow_duplicate=False)

    def remove_destination(self, destination: str) -> bool:
        """Remove the first occurrence of a destination."""
        if not self.mutable or destination not in self.destinations:
            return False
        return self.remove_destination_at(self.destinations.index(destination))

    def remove_destination_at(self, index: int) -> bool:
        """Remove the destination at an index."""
        if not self.mutable or not 0 <= index < len(self.destinations):
            return False
        del self.destinations[index]
        if index < self.current_index:
            self.current_index -= 1
        return True

    def set_immutable(self) -> None:
        """Freeze the route."""
        self.mutable = False

    def skip_next(self) -> None:
        """Skip the next destination."""
        if self.current_index < len(self.destinations):
            self.current_index += 1
        elif self.circular and self.destinations:
            self.current_index, self.loop_count = 1, self.loop_count + 1

    def get_destination_count(self) -> int:
        """Number of destinations."""
        return len(self.destinations)

    def get_remaining_destination_count(self) -> int:
        """Destinations not yet visited in this loop."""
        return max(0, len(self.destinations) - self.current_index)

    def get_destinations(self) -> list[str]:
        """A copy of the route."""
        return list(self.destinations)

    def get_first_destination(self) -> str | None:
        """The first destination."""
        return self.destinations[0] if self.destinations else None

    def get_last_destination(self) -> str | None:
        """The last destination."""
        return self.destinations[-1] if self.destinations else None

    def get_current_location(self) -> str | None:
        """Where the paglet was last sent."""
        return self.current_location

    def get_loop_count(self) -> int:
        """Completed loops of a circular route."""
        return self.loop_count

    def next_destination(self) -> str | None:
        """The destination dispatch_next would go to, or None at the end."""
        if self.current_index < len(self.destinations):
            return self.destinations[self.current_index]
        if self.circular and self.destinations:
            return self.destinations[0]
        return None

    def advance(self) -> str | None:
        """Move the plan to the next destination and return it; marks the plan completed at the end."""
        target = self.next_destination()
        if target is None:
            self.completed = True
            return None
        if self.current_index >= len(self.destinations):
            self.current_index, self.loop_count = 0, self.loop_count + 1
        self.current_index += 1
        self.current_location = target
        self.visited_destinations.append(target)
        return target

    def dispatch_next(self, agent: Any) -> Any:
        """Advance, then dispatch ``agent`` there; None (and completed) at the end of the route."""
        target = self.advance()
        return None if target is None else agent.dispatch_to(target)


@dataclasses.dataclass(slots=True)
class ItineraryTask:
    """A named task to run at a destination (on arrival, on dispatch, or by default)."""

    name: str
    execution: str = EXECUTE_ON_ARRIVAL
    args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class TaskItineraryPlan(ItineraryPlan):
    """An itinerary with tasks per destination and default tasks."""

    destination_tasks: dict[str, list[ItineraryTask]] = dataclasses.field(default_factory=dict)
    default_tasks: list[ItineraryTask] = dataclasses.field(default_factory=list)
    execute_default_on_arrival: bool = True
    execute_default_on_dispatch: bool = False
    execute_default_on_reverting: bool = False

    def add_default_task(self, task: ItineraryTask) -> bool:
        """Add a task that runs at every destination (execution must be EXECUTE_ON_DEFAULT)."""
        if task.execution != EXECUTE_ON_DEFAULT or task in self.default_tasks:
            return False
        self.default_tasks.append(task)
        return True

    def remove_default_task(self, task: ItineraryTask) -> bool:
        """Remove a default task."""
        if task not in self.default_tasks:
            return False
        self.default_tasks.remove(task)
        return True

    def add_task_for_destination(self, destination: str, task: ItineraryTask) -> bool:
        """Add a task for one destination (default tasks go to the default list)."""
        if not destination:
            return False
        if task.execution == EXECUTE_ON_DEFAULT:
            return self.add_default_task(task)
        self.destination_tasks.setdefault(destination, []).append(task)
        return True

    def add_next_destination_with_task(self, destination: str, task: ItineraryTask) -> bool:
        """Add a destination and a task for it."""
        return self.add_next_destination(destination) and self.add_task_for_destination(destination, task)

    def remove_all_tasks_for_destination(self, destination: str) -> bool:
        """Remove every task of a destination."""
        return self.destination_tasks.pop(destination, None) is not None

    def remove_task_for_destination(self, destination: str, task: ItineraryTask) -> bool:
        """Remove one task of a destination."""
        tasks = self.destination_tasks.get(destination)
        if not tasks or task not in tasks:
            return False
        tasks.remove(task)
        if not tasks:
            del self.destination_tasks[destination]
        return True

    def get_tasks_for_destination(self, destination: str) -> list[ItineraryTask]:
        """The tasks of a destination."""
        return list(self.destination_tasks.get(destination, []))

    def tasks_for_phase(self, destination: str | None, phase: str) -> list[ItineraryTask]:
        """Default tasks enabled for the phase, then the destination's tasks of that phase."""
        enabled = {
            EXECUTE_ON_ARRIVAL: self.execute_default_on_arrival,
            EXECUTE_ON_DISPATCH: self.execute_default_on_dispatch,
            EXECUTE_ON_REVERTING: self.execute_default_on_reverting,
        }.get(phase, False)
        tasks = list(self.default_tasks) if enabled else []
        if destination is not None:
            tasks += [task for task in self.destination_tasks.get(destination, []) if task.execution == phase]
        return tasks


class ItineraryAgentMixin:
    """For paglets whose state has an ``itinerary`` field (an ItineraryPlan)."""

    #: The state field that holds the plan.
    itinerary_attr: ClassVar[str] = "itinerary"

    def get_itinerary(self) -> ItineraryPlan:
        """The plan in the paglet's state."""
        return getattr(self.state, self.itinerary_attr)  # type: ignore[attr-defined,no-any-return]

    def go_to_next_destination(self) -> Any:
        """Advance the plan and dispatch there; None when the route is done."""
        return self.get_itinerary().dispatch_next(self)

    def execute_itinerary_tasks(self, phase: str, event: Any = None) -> list[Any]:
        """Run the tasks of the current location for a phase (a TaskItineraryPlan only)."""
        plan = self.get_itinerary()
        if not isinstance(plan, TaskItineraryPlan):
            return []
        tasks = plan.tasks_for_phase(plan.get_current_location(), phase)
        return [self.execute_itinerary_task(task, phase, event) for task in tasks]

    def execute_itinerary_task(self, task: ItineraryTask, phase: str, event: Any = None) -> Any:
        """Override to run one task."""
        raise NotImplementedError(f"{type(self).__name__} must implement execute_itinerary_task for {task.name!r}")


# ==============================================================================
# 11. SQLite store
# ==============================================================================
# Owns: the host's database (schema, migrations by PRAGMA user_version, every SQL string) and
# the data folder's lock file.  The only user of apsw.
# Threads: one connection per thread; every write transaction starts with BEGIN IMMEDIATE under
# one lock per store, so writers queue in Python (fair, bounded) instead of in SQLite's busy loop.
# Durability: commits that someone is told about (a checkpoint, a queued message, a transfer
# accepted or refused) run with synchronous=FULL; the event log and figures with NORMAL.

_STORE_FILE = "paglets.sqlite3"
_STORE_LOCK_FILE = "host.lock"

#: Schema migrations; the database's user_version says how many have run.
_STORE_MIGRATIONS: tuple[str, ...] = (
    # 1: paglets, durable queues, events, properties, peers, services, per-class storage.
    """
    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        agent_class TEXT NOT NULL,
        status TEXT NOT NULL,                 -- active | inactive | departing | gone
        state BLOB,                           -- CBOR wire tree of the last checkpoint
        state_version INTEGER NOT NULL DEFAULT 0,
        policy BLOB,                          -- CBOR DeactivationPolicy while inactive
        request BLOB,                         -- CBOR DeactivationRequest while inactive
        reason TEXT,                          -- why inactive: deactivate | shutdown
        activate_at REAL,
        activate_on_startup INTEGER NOT NULL DEFAULT 0,
        meta BLOB,                            -- CBOR: subscriptions, registered files, created_at
        updated_at REAL NOT NULL
    );
    CREATE INDEX agents_by_status ON agents(status);
    CREATE TABLE queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id TEXT NOT NULL,
        message BLOB NOT NULL,
        oneway INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX queue_by_agent ON queue(agent_id, seq);
    CREATE TABLE events (event_id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL);
    CREATE TABLE properties (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE peers (url TEXT PRIMARY KEY, body BLOB NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE services (
        name TEXT NOT NULL, agent_id TEXT NOT NULL, body BLOB NOT NULL, expires_at REAL,
        PRIMARY KEY (name, agent_id)
    );
    CREATE TABLE storage (
        owner TEXT NOT NULL, key TEXT NOT NULL, data BLOB NOT NULL, size INTEGER NOT NULL,
        updated_at REAL NOT NULL, PRIMARY KEY (owner, key)
    );
    """,
    # 2: mobility: artifacts in chunk rows, the transfer journal, and the highest epoch per agent.
    """
    CREATE TABLE artifacts (
        artifact_id TEXT PRIMARY KEY, body BLOB NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
        complete INTEGER NOT NULL, expires_at REAL, created_at REAL NOT NULL
    );
    CREATE TABLE artifact_chunks (
        artifact_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (artifact_id, seq)
    );
    CREATE TABLE transfers (
        tid TEXT PRIMARY KEY, agent_id TEXT NOT NULL, direction TEXT NOT NULL, status TEXT NOT NULL,
        peer_url TEXT NOT NULL, epoch INTEGER NOT NULL, body BLOB, created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX transfers_by_status ON transfers(direction, status);
    CREATE TABLE epochs (agent_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL);
    ALTER TABLE agents ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN forward_url TEXT;
    """,
    # 3: state blobs in a table of their own: SQLite rewrites a whole row (big blob included)
    # when any column changes, and a paglet's status changes far more often than its state.
    """
    CREATE TABLE states (agent_id TEXT PRIMARY KEY, state BLOB NOT NULL, version INTEGER NOT NULL DEFAULT 0);
    INSERT INTO states (agent_id, state, version) SELECT agent_id, state, state_version FROM agents WHERE state IS NOT NULL;
    UPDATE agents SET state=NULL;
    """,
)


@dataclasses.dataclass(slots=True)
class _AgentRow:
    """One row of the agents table, decoded."""

    agent_id: str
    agent_class: str
    status: str
    state: bytes | None
    state_version: int = 0
    policy: DeactivationPolicy | None = None
    request: DeactivationRequest | None = None
    reason: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    updated_at: float = 0.0
    epoch: int = 0
    forward_url: str | None = None


_AGENT_COLUMNS = "a.agent_id, agent_class, status, s.state, s.version, policy, request, reason, meta, updated_at, epoch, forward_url"
_AGENT_FROM = "agents a LEFT JOIN states s ON s.agent_id = a.agent_id"
_AGENT_LIST_COLUMNS = "agent_id, agent_class, status, NULL, 0, policy, request, reason, meta, updated_at, epoch, forward_url"


def _store_blob(value: Any) -> bytes | None:
    if value is None:
        return None
    return _cbor_dumps(value.to_wire() if hasattr(value, "to_wire") else value)


def _store_unblob(blob: Any) -> Any:
    return None if blob is None else _cbor_loads(bytes(blob), untrusted=False)


class _Store:
    """The host's SQLite database.  Every method is one short transaction or one read."""

    #: Stores open in this process; while any is, a fork server must not be forked (section 15).
    open_count: ClassVar[int] = 0

    def __init__(self, data_dir: Path, *, event_capacity: int = EVENT_LOG_CAPACITY) -> None:
        self.data_dir = data_dir
        self.path = data_dir / _STORE_FILE
        self.event_capacity = event_capacity
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._lock_file = self._take_folder_lock()
        self._closed = False
        _Store.open_count += 1
        try:
            self._migrate(self._conn())
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------
    def _take_folder_lock(self) -> Any:
        """One live host per data folder: an flock the kernel drops when the process dies."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.data_dir / _STORE_LOCK_FILE, "a+")  # noqa: SIM115 - held for the store's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise HostError(f"{self.data_dir} is in use by another live host ({owner}); stop it or use another --data-dir") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    def _conn(self) -> apsw.Connection:
        if self._closed:
            raise HostError(f"the database {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._errors():
                conn = apsw.Connection(str(self.path))
                conn.setbusytimeout(10_000)
                conn.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA journal_size_limit=67108864")
            self._local.conn, self._local.sync = conn, "NORMAL"
        return conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """apsw errors become HostError with a sentence naming the file and the fix."""
        try:
            yield
        except (apsw.NotADBError, apsw.CorruptError) as exc:
            raise HostError(f"{self.path} is not a usable SQLite database ({exc}); move it away or use another --data-dir") from exc
        except (apsw.CantOpenError, apsw.PermissionsError, apsw.ReadOnlyError) as exc:
            raise HostError(f"cannot open {self.path} for writing ({exc}); check the folder's permissions") from exc
        except apsw.FullError as exc:
            raise HostError(f"the disk holding {self.path} is full ({exc})") from exc
        except apsw.Error as exc:
            raise HostError(f"database error in {self.path}: {exc}") from exc

    def _migrate(self, conn: apsw.Connection) -> None:
        with self._errors():
            version = next(iter(conn.execute("PRAGMA user_version")))[0]
            if version > len(_STORE_MIGRATIONS):
                raise HostError(
                    f"{self.path} was made by a newer paglets (schema {version}, this one knows "
                    f"{len(_STORE_MIGRATIONS)}); upgrade paglets.py or use another --data-dir"
                )
            for number in range(version, len(_STORE_MIGRATIONS)):
                with self.write(durable=True) as tx:
                    tx.execute(_STORE_MIGRATIONS[number])
                    tx.execute(f"PRAGMA user_version={number + 1}")

    def close(self) -> None:
        """Close this thread's connection and give up the folder lock (others close with their threads)."""
        if not self._closed:
            _Store.open_count -= 1
        self._closed = True
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            with contextlib.suppress(apsw.Error):
                conn.close()
            self._local.conn = None
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    @contextlib.contextmanager
    def write(self, *, durable: bool = False) -> Iterator[apsw.Connection]:
        """One write transaction (BEGIN IMMEDIATE); ``durable`` commits with synchronous=FULL."""
        conn = self._conn()
        wanted = "FULL" if durable else "NORMAL"
        with self._write_lock, self._errors():
            if self._local.sync != wanted:
                conn.execute(f"PRAGMA synchronous={wanted}")  # only between transactions
                self._local.sync = wanted
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read and fetch every row at once (no read transaction outlives the call)."""
        with self._errors():
            return list(self._conn().execute(sql, params))

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: "ok" for a sound database."""
        return str(self.rows("PRAGMA integrity_check")[0][0])

    def checkpoint_wal(self) -> None:
        """Fold the WAL back into the database file so it cannot grow without bound."""
        with contextlib.suppress(apsw.BusyError, apsw.LockedError):
            self.rows("PRAGMA wal_checkpoint(PASSIVE)")

    # -- paglets ---------------------------------------------------------------------------------
    def agent(self, agent_id: str) -> _AgentRow | None:
        """The row of one paglet, or None."""
        found = self.rows(f"SELECT {_AGENT_COLUMNS} FROM {_AGENT_FROM} WHERE a.agent_id=?", (agent_id,))
        return self._agent_row(found[0]) if found else None

    def agents(self, *statuses: str) -> list[_AgentRow]:
        """Rows of every paglet in one of these statuses (all when none is given), without states."""
        if not statuses:
            return [self._agent_row(r) for r in self.rows(f"SELECT {_AGENT_LIST_COLUMNS} FROM agents")]
        marks = ",".join("?" * len(statuses))
        found = self.rows(f"SELECT {_AGENT_LIST_COLUMNS} FROM agents WHERE status IN ({marks}) ORDER BY updated_at", statuses)
        return [self._agent_row(r) for r in found]

    @staticmethod
    def _agent_row(row: tuple[Any, ...]) -> _AgentRow:
        policy, request, meta = (_store_unblob(row[i]) for i in (5, 6, 8))
        return _AgentRow(
            agent_id=row[0],
            agent_class=row[1],
            status=row[2],
            state=None if row[3] is None else bytes(row[3]),
            state_version=row[4] or 0,
            policy=DeactivationPolicy.from_wire(policy) if policy is not None else None,
            request=DeactivationRequest.from_wire(request) if request is not None else None,
            reason=row[7],
            meta=meta or {},
            updated_at=row[9],
            epoch=row[10],
            forward_url=row[11],
        )

    def count_agents(self) -> dict[str, int]:
        """Number of paglets by status."""
        return dict(self.rows("SELECT status, count(*) FROM agents GROUP BY status"))

    def put_agent(self, row: _AgentRow, *, tx: apsw.Connection | None = None) -> None:
        """Insert or replace a paglet's row (durably, unless inside the caller's transaction)."""
        policy = row.policy
        values = (
            row.agent_id, row.agent_class, row.status, None, 0, _store_blob(policy),
            _store_blob(row.request), row.reason, policy.activate_at if policy else None,
            int(bool(policy and policy.activate_on_startup)), _store_blob(row.meta), time.time(), row.epoch,
            row.forward_url,
        )  # fmt: skip
        sql = (
            "INSERT OR REPLACE INTO agents (agent_id, agent_class, status, state, state_version, policy, request,"
            " reason, activate_at, activate_on_startup, meta, updated_at, epoch, forward_url)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        )
        if tx is not None:
            self._put_agent(tx, sql, values, row)
            return
        with self.write(durable=True) as conn:
            self._put_agent(conn, sql, values, row)

    @staticmethod
    def _put_agent(conn: apsw.Connection, sql: str, values: tuple[Any, ...], row: _AgentRow) -> None:
        conn.execute(sql, values)
        if row.state is not None:
            conn.execute("INSERT OR REPLACE INTO states (agent_id, state, version) VALUES (?,?,?)", (row.agent_id, row.state, row.state_version))

    def set_active(self, row: _AgentRow) -> None:
        """Mark a stored paglet active again, keeping its stored state (it did not change)."""
        with self.write(durable=True) as conn:
            conn.execute(
                "UPDATE agents SET status='active', policy=NULL, request=NULL, reason=NULL, activate_at=NULL,"
                " activate_on_startup=0, meta=?, epoch=?, forward_url=NULL, updated_at=? WHERE agent_id=?",
                (_store_blob(row.meta), row.epoch, time.time(), row.agent_id),
            )
            conn.execute("UPDATE states SET version=0 WHERE agent_id=?", (row.agent_id,))

    def checkpoint(self, agent_id: str, state: bytes, version: int) -> None:
        """Store an active paglet's state, unless a newer checkpoint is already stored."""
        with self.write(durable=True) as conn:
            conn.execute("UPDATE states SET state=?, version=? WHERE agent_id=? AND version<?", (state, version, agent_id, version))

    def set_meta(self, agent_id: str, meta: dict[str, Any]) -> None:
        """Replace a paglet's metadata (subscriptions, registered files)."""
        with self.write(durable=True) as conn:
            conn.execute("UPDATE agents SET meta=? WHERE agent_id=?", (_store_blob(meta), agent_id))

    def delete_agent(self, agent_id: str) -> None:
        """Forget a paglet, its queue and its services."""
        with self.write(durable=True) as conn:
            conn.execute("DELETE FROM agents WHERE agent_id=?", (agent_id,))
            conn.execute("DELETE FROM states WHERE agent_id=?", (agent_id,))
            conn.execute("DELETE FROM queue WHERE agent_id=?", (agent_id,))
            conn.execute("DELETE FROM services WHERE agent_id=?", (agent_id,))

    def due_activations(self, now: float) -> list[str]:
        """Inactive paglets whose activate_at has come."""
        found = self.rows("SELECT agent_id FROM agents WHERE status='inactive' AND activate_at<=? ORDER BY activate_at", (now,))
        return [r[0] for r in found]

    def next_activation(self) -> float | None:
        """The earliest activate_at of an inactive paglet."""
        return self.rows("SELECT min(activate_at) FROM agents WHERE status='inactive'")[0][0]  # type: ignore[no-any-return]

    def startup_activations(self) -> list[tuple[str, str]]:
        """(agent_id, reason) of paglets to start with the host: crashed actives and wake-on-start."""
        found = self.rows(
            "SELECT agent_id, status, reason FROM agents WHERE status IN ('active', 'arriving')"
            " OR (status='inactive' AND activate_on_startup=1) ORDER BY updated_at"
        )
        reasons = {"active": "recover", "arriving": "arrival"}
        return [(r[0], reasons.get(r[1]) or ("shutdown" if r[2] == "shutdown" else "startup")) for r in found]

    # -- durable message queues -------------------------------------------------------------------
    def enqueue(self, agent_id: str, message: bytes, oneway: bool) -> None:
        """Store a message for an inactive paglet (durably: the sender is told it is stored)."""
        with self.write(durable=True) as conn:
            conn.execute(
                "INSERT INTO queue (agent_id, message, oneway, created_at) VALUES (?,?,?,?)",
                (agent_id, message, int(oneway), time.time()),
            )

    def queued(self, agent_id: str, limit: int = 1000) -> list[tuple[int, bytes, bool]]:
        """The oldest queued messages of a paglet: (seq, message, oneway)."""
        found = self.rows("SELECT seq, message, oneway FROM queue WHERE agent_id=? ORDER BY seq LIMIT ?", (agent_id, limit))
        return [(r[0], bytes(r[1]), bool(r[2])) for r in found]

    def dequeue(self, seqs: list[int], agent_id: str, state: bytes | None, version: int) -> None:
        """Drop handled queued messages together with the checkpoint they produced, in one commit."""
        with self.write(durable=True) as conn:
            if state is not None:
                conn.execute("UPDATE states SET state=?, version=? WHERE agent_id=? AND version<?", (state, version, agent_id, version))
            conn.executemany("DELETE FROM queue WHERE seq=?", [(seq,) for seq in seqs])

    def queue_length(self, agent_id: str) -> int:
        """How many messages wait for a paglet."""
        return int(self.rows("SELECT count(*) FROM queue WHERE agent_id=?", (agent_id,))[0][0])

    # -- event log ---------------------------------------------------------------------------------
    def add_event(self, body: dict[str, Any]) -> int:
        """Append an event (not durable: losing the newest events in a power cut is acceptable)."""
        with self.write() as conn:
            conn.execute("INSERT INTO events (body) VALUES (?)", (_cbor_dumps(body),))
            event_id = conn.last_insert_rowid()
            if event_id % max(1, min(100, self.event_capacity // 10)) == 0:
                conn.execute("DELETE FROM events WHERE event_id<=?", (event_id - self.event_capacity,))
        return int(event_id)

    def events(self, since: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Events after ``since``, oldest first, with the ids they were stored under."""
        found = self.rows("SELECT event_id, body FROM events WHERE event_id>? ORDER BY event_id LIMIT ?", (since, limit))
        return [(r[0], _store_unblob(r[1])) for r in found]

    # -- properties and peers -----------------------------------------------------------------------
    def properties(self) -> dict[str, Any]:
        """Every host property."""
        return {key: _store_unblob(value) for key, value in self.rows("SELECT key, value FROM properties")}

    def set_property(self, key: str, value: Any) -> None:
        """Set (or with None, delete) a host property, durably."""
        with self.write(durable=True) as conn:
            if value is None:
                conn.execute("DELETE FROM properties WHERE key=?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO properties (key, value) VALUES (?,?)", (key, _cbor_dumps(value)))

    def peers(self) -> list[dict[str, Any]]:
        """Known peers as stored (wire maps of HostRef)."""
        return [_store_unblob(r[0]) for r in self.rows("SELECT body FROM peers ORDER BY url")]

    def put_peer(self, url: str, body: dict[str, Any]) -> None:
        """Remember a peer."""
        with self.write() as conn:
            conn.execute("INSERT OR REPLACE INTO peers (url, body, updated_at) VALUES (?,?,?)", (url, _cbor_dumps(body), time.time()))

    def delete_peer(self, url: str) -> None:
        """Forget a peer."""
        with self.write() as conn:
            conn.execute("DELETE FROM peers WHERE url=?", (url,))

    # -- services ------------------------------------------------------------------------------------
    def put_service(self, record: ServiceRecord) -> None:
        """Advertise (or refresh) a service record."""
        with self.write(durable=True) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO services (name, agent_id, body, expires_at) VALUES (?,?,?,?)",
                (record.name, record.agent_id, _cbor_dumps(record.to_wire()), record.expires_at),
            )

    def delete_services(self, agent_id: str, name: str | None = None) -> list[ServiceRecord]:
        """Withdraw one or every service of a paglet; returns what was removed."""
        removed = [r for r in self.services() if r.agent_id == agent_id and (name is None or r.name == name)]
        with self.write(durable=True) as conn:
            for record in removed:
                conn.execute("DELETE FROM services WHERE name=? AND agent_id=?", (record.name, record.agent_id))
        return removed

    def services(self, name: str | None = None) -> list[ServiceRecord]:
        """Service records that have not expired, by name (all when None)."""
        now = time.time()
        sql = "SELECT body FROM services WHERE (expires_at IS NULL OR expires_at>?)"
        found = self.rows(sql + " AND name=?", (now, name)) if name else self.rows(sql, (now,))
        return [ServiceRecord.from_wire(_store_unblob(r[0])) for r in found]

    def expire_services(self) -> None:
        """Drop service records whose TTL has passed."""
        with self.write() as conn:
            conn.execute("DELETE FROM services WHERE expires_at IS NOT NULL AND expires_at<=?", (time.time(),))

    # -- per-class persistent storage ------------------------------------------------------------------
    def storage_read(self, owner: str, key: str) -> bytes | None:
        """Stored bytes, or None."""
        found = self.rows("SELECT data FROM storage WHERE owner=? AND key=?", (owner, key))
        return bytes(found[0][0]) if found else None

    def storage_write(self, owner: str, key: str, data: bytes, quota: int) -> None:
        """Store bytes; StorageQuotaError (and nothing written) if the owner would pass its quota."""
        with self.write(durable=True) as conn:
            used = next(iter(conn.execute("SELECT coalesce(sum(size), 0) FROM storage WHERE owner=? AND key<>?", (owner, key))))[0]
            if used + len(data) > quota:
                raise StorageQuotaError(f"persistent storage of {owner} would hold {used + len(data)} bytes, over its quota of {quota}")
            conn.execute(
                "INSERT OR REPLACE INTO storage (owner, key, data, size, updated_at) VALUES (?,?,?,?,?)",
                (owner, key, data, len(data), time.time()),
            )

    def storage_delete(self, owner: str, key: str | None) -> None:
        """Delete one key, or (None) every key of an owner."""
        with self.write(durable=True) as conn:
            if key is None:
                conn.execute("DELETE FROM storage WHERE owner=?", (owner,))
            else:
                conn.execute("DELETE FROM storage WHERE owner=? AND key=?", (owner, key))

    def storage_keys(self, owner: str) -> list[str]:
        """Keys of an owner, sorted."""
        return [r[0] for r in self.rows("SELECT key FROM storage WHERE owner=? ORDER BY key", (owner,))]

    def storage_usage(self, owner: str) -> tuple[int, int]:
        """(bytes used, number of keys) of an owner."""
        used, files = self.rows("SELECT coalesce(sum(size), 0), count(*) FROM storage WHERE owner=?", (owner,))[0]
        return int(used), int(files)

    # -- the transfer journal (exactly-once movement, see section 18) ------------------------------
    def begin_departure(self, tid: str, agent_id: str, peer: str, epoch: int, state: bytes, kind: str) -> None:
        """Source, step 1: in one durable commit, the paglet is DEPARTING under ``tid`` and ``epoch``.

        A clone leaves its original as it is; only the journal row is written.
        """
        now = time.time()
        with self.write(durable=True) as conn:
            if kind != "clone":
                conn.execute("UPDATE agents SET status='departing', epoch=?, updated_at=? WHERE agent_id=?", (epoch, now, agent_id))
                same = list(conn.execute("SELECT state=? FROM states WHERE agent_id=?", (state, agent_id)))
                if not same or same[0][0] != 1:  # a checkpoint that is this state already is not rewritten
                    conn.execute("INSERT OR REPLACE INTO states (agent_id, state, version) VALUES (?,?,0)", (agent_id, state))
            conn.execute(
                "INSERT INTO transfers (tid, agent_id, direction, status, peer_url, epoch, body, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (tid, agent_id, "out", "departing", peer, epoch, _cbor_dumps({"kind": kind}), now, now),
            )

    def end_departure(self, tid: str, outcome: str) -> None:
        """Source, step 4 or 5: "accepted" leaves a tombstone that forwards; "refused" makes it active again."""
        found = self.rows("SELECT agent_id, peer_url, body FROM transfers WHERE tid=? AND direction='out'", (tid,))
        if not found:
            return
        agent_id, peer, body = found[0]
        kind = (_store_unblob(body) or {}).get("kind")
        with self.write(durable=True) as conn:
            conn.execute("UPDATE transfers SET status=?, updated_at=? WHERE tid=?", (outcome, time.time(), tid))
            if kind == "clone":
                return
            if outcome == "accepted":
                conn.execute(
                    "UPDATE agents SET status='gone', forward_url=?, updated_at=? WHERE agent_id=? AND status='departing'",
                    (peer, time.time(), agent_id),
                )
                conn.execute("DELETE FROM states WHERE agent_id=? AND NOT EXISTS (SELECT 1 FROM agents WHERE agent_id=? AND status<>'gone')",
                             (agent_id, agent_id))  # fmt: skip
            else:
                conn.execute("UPDATE agents SET status='active', updated_at=? WHERE agent_id=? AND status='departing'", (time.time(), agent_id))

    def open_departures(self) -> list[tuple[str, str, str, str, int]]:
        """Transfers this host started and never heard the end of: (tid, agent_id, peer, kind, epoch)."""
        found = self.rows("SELECT tid, agent_id, peer_url, body, epoch FROM transfers WHERE direction='out' AND status='departing'")
        return [(r[0], r[1], r[2], (_store_unblob(r[3]) or {}).get("kind", "dispatch"), r[4]) for r in found]

    def accept_arrival(self, tid: str, row: _AgentRow, peer: str) -> str:
        """Target, step 3, in one durable transaction keyed by ``tid``: "accepted" or "refused".

        Already accepted: "accepted" again (the source retried).  Already refused, an epoch not
        above the highest seen for this paglet, or the paglet living here already: "refused".
        """
        now = time.time()
        with self.write(durable=True) as conn:
            seen = list(conn.execute("SELECT status FROM transfers WHERE tid=? AND direction='in'", (tid,)))
            if seen:
                return str(seen[0][0])
            top = list(conn.execute("SELECT epoch FROM epochs WHERE agent_id=?", (row.agent_id,)))
            here = list(conn.execute("SELECT status FROM agents WHERE agent_id=?", (row.agent_id,)))
            stale = bool(top) and row.epoch <= top[0][0]
            taken = bool(here) and here[0][0] not in ("gone",)
            outcome = "refused" if stale or taken else "accepted"
            if outcome == "accepted":
                self.put_agent(row, tx=conn)
                conn.execute("INSERT OR REPLACE INTO epochs (agent_id, epoch) VALUES (?,?)", (row.agent_id, row.epoch))
            conn.execute(
                "INSERT INTO transfers (tid, agent_id, direction, status, peer_url, epoch, body, created_at, updated_at)"
                " VALUES (?,?,'in',?,?,?,NULL,?,?)",
                (tid, row.agent_id, outcome, peer, row.epoch, now, now),
            )
        return outcome

    def abort_arrival(self, tid: str, agent_id: str, peer: str, epoch: int) -> str:
        """Target, when the source gives up: "accepted" if it was, else a durable refusal.

        The journal row may be gone (rows are forgotten after a week); the highest epoch seen for
        the paglet is kept for ever, and an epoch at or above this transfer's means it arrived.
        """
        with self.write(durable=True) as conn:
            seen = list(conn.execute("SELECT status FROM transfers WHERE tid=? AND direction='in'", (tid,)))
            if seen:
                return str(seen[0][0])
            top = list(conn.execute("SELECT epoch FROM epochs WHERE agent_id=?", (agent_id,)))
            if epoch > 0 and top and top[0][0] >= epoch:
                return "accepted"
            now = time.time()
            conn.execute(
                "INSERT INTO transfers (tid, agent_id, direction, status, peer_url, epoch, body, created_at, updated_at)"
                " VALUES (?,?,'in','refused',?,0,NULL,?,?)",
                (tid, agent_id, peer, now, now),
            )
        return "refused"

    def forget_transfers(self, before: float) -> None:
        """Drop finished journal rows and tombstones older than ``before`` (epochs stay for ever)."""
        with self.write() as conn:
            conn.execute("DELETE FROM transfers WHERE status<>'departing' AND updated_at<?", (before,))
            conn.execute("DELETE FROM agents WHERE status='gone' AND updated_at<?", (before,))

    # -- artifacts: metadata in one table, content in chunk rows ----------------------------------------
    def artifact_begin(self, artifact_id: str, body: dict[str, Any], expires_at: float | None, quota: int, size: int) -> None:
        """Reserve an artifact of ``size`` bytes; StorageQuotaError if all artifacts would pass the quota."""
        with self.write() as conn:
            used = next(iter(conn.execute("SELECT coalesce(sum(size), 0) FROM artifacts")))[0]
            if used + size > quota:
                raise StorageQuotaError(f"artifacts would hold {used + size} bytes, over the host's quota of {quota}")
            conn.execute(
                "INSERT INTO artifacts (artifact_id, body, size, sha256, complete, expires_at, created_at) VALUES (?,?,?,?,0,?,?)",
                (artifact_id, _cbor_dumps(body), size, "", expires_at, time.time()),
            )

    def artifact_chunk(self, artifact_id: str, seq: int, data: bytes) -> None:
        """Store one chunk (one short transaction, so other writers never wait long)."""
        with self.write() as conn:
            conn.execute("INSERT OR REPLACE INTO artifact_chunks (artifact_id, seq, data) VALUES (?,?,?)", (artifact_id, seq, data))

    def artifact_finish(self, artifact_id: str, sha256: str, body: dict[str, Any]) -> None:
        """Mark an artifact complete (durably: its uploader is told it is stored)."""
        with self.write(durable=True) as conn:
            conn.execute(
                "UPDATE artifacts SET complete=1, sha256=?, body=? WHERE artifact_id=?", (sha256, _cbor_dumps(body), artifact_id)
            )

    def artifact(self, artifact_id: str) -> tuple[dict[str, Any], bool] | None:
        """(metadata, complete) of an artifact that has not expired, or None."""
        found = self.rows(
            "SELECT body, complete FROM artifacts WHERE artifact_id=? AND (expires_at IS NULL OR expires_at>?)", (artifact_id, time.time())
        )
        return (_store_unblob(found[0][0]), bool(found[0][1])) if found else None

    def artifacts(self, sha256: str | None = None) -> list[dict[str, Any]]:
        """Metadata of complete, unexpired artifacts (optionally with one SHA-256)."""
        sql = "SELECT body FROM artifacts WHERE complete=1 AND (expires_at IS NULL OR expires_at>?)"
        found = self.rows(sql + " AND sha256=? ORDER BY created_at", (time.time(), sha256)) if sha256 else self.rows(sql + " ORDER BY created_at", (time.time(),))
        return [_store_unblob(r[0]) for r in found]

    def artifact_chunks(self, artifact_id: str) -> Iterator[bytes]:
        """The content, one chunk (one short read) at a time."""
        seq = -1
        while True:
            found = self.rows("SELECT seq, data FROM artifact_chunks WHERE artifact_id=? AND seq>? ORDER BY seq LIMIT 1", (artifact_id, seq))
            if not found:
                return
            seq = found[0][0]
            yield bytes(found[0][1])

    def artifact_delete(self, artifact_id: str) -> bool:
        """Delete an artifact and its chunks; False if there was none."""
        with self.write() as conn:
            existed = bool(list(conn.execute("SELECT 1 FROM artifacts WHERE artifact_id=?", (artifact_id,))))
            conn.execute("DELETE FROM artifact_chunks WHERE artifact_id=?", (artifact_id,))
            conn.execute("DELETE FROM artifacts WHERE artifact_id=?", (artifact_id,))
        return existed

    def expired_artifacts(self) -> list[str]:
        """Artifacts past their expiry, and uploads abandoned for an hour."""
        now = time.time()
        found = self.rows(
            "SELECT artifact_id FROM artifacts WHERE (expires_at IS NOT NULL AND expires_at<=?) OR (complete=0 AND created_at<?)",
            (now, now - 3600),
        )
        return [r[0] for r in found]


# ==============================================================================
# 12. Files and artifacts
# ==============================================================================
# Owns: the data folder's layout: work folders (scratch), registered files of paglets, and the
# host side of persistent storage.  Artifacts (blobs in chunk rows) join with mobility.
# Layout: <data>/work/<agent_id>/ is cleared at start, dispatch and dispose;
#         <data>/files/<agent_id>/<name> holds registered files while the paglet lives here.


class _Files:
    """Work folders and registered files of the paglets on one host."""

    def __init__(self, data_dir: Path, store: _Store, storage_quota: int) -> None:
        self.work_root = data_dir / "work"
        self.files_root = data_dir / "files"
        self.store, self.storage_quota = store, storage_quota

    def clear_all_work(self) -> None:
        """At start: scratch of a previous run is gone."""
        shutil.rmtree(self.work_root, ignore_errors=True)

    def work_dir(self, agent_id: str, create: bool = True) -> Path:
        """A paglet's scratch folder."""
        path = self.work_root / _check_agent_id(agent_id)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_work(self, agent_id: str) -> None:
        """Forget a paglet's scratch (dispatch, dispose)."""
        shutil.rmtree(self.work_root / _check_agent_id(agent_id), ignore_errors=True)

    def files_dir(self, agent_id: str) -> Path:
        """Where a paglet's registered files are kept on this host."""
        return self.files_root / _check_agent_id(agent_id)

    def file_target(self, agent_id: str, name: str) -> Path:
        """Where one registered file of a paglet lands; never outside its folder (names come from
        other hosts)."""
        folder = self.files_dir(agent_id)
        target = folder / _safe_file_name(name)
        if target.resolve().parent != folder.resolve():
            raise ForbiddenError(f"file name {name!r} leaves the paglet's folder")
        return target

    def register(self, agent_id: str, source: Path, name: str | None, mode: str, host_url: str) -> PagletFileRef:
        """Describe a file a paglet will carry; it stays where it is until the paglet moves.

        On dispatch it travels to the target ("move" then deletes it here, "copy" leaves it);
        a clone always copies.
        """
        if mode not in ("copy", "move"):
            raise ForbiddenError(f"mode must be 'copy' or 'move', not {mode!r}")
        source = Path(source).resolve()
        if not source.is_file():
            raise FileNotFoundError(f"no such file: {source}")
        name = _safe_file_name(name or source.name)
        digest, size = _sha256_file(source)
        now = time.time()
        return PagletFileRef(name, host_url, str(source), now, now, digest, size, str(source), mode)

    def unregister(self, agent_id: str, name: str) -> None:
        """Delete the paglet's copy of a registered file."""
        with contextlib.suppress(FileNotFoundError):
            (self.files_dir(agent_id) / _safe_file_name(name)).unlink()

    def drop_agent(self, agent_id: str) -> None:
        """Forget every file of a paglet that left or ended."""
        self.clear_work(agent_id)
        shutil.rmtree(self.files_dir(agent_id), ignore_errors=True)

    def storage_call(self, owner: str, quota: int | None, op: str, key: str | None, data: bytes | None) -> Any:
        """The host side of PersistentStorage."""
        quota = self.storage_quota if quota is None else int(quota)
        if op == "read":
            return self.store.storage_read(owner, _safe_file_name(key))
        if op == "write":
            if not isinstance(data, bytes):
                raise SerializationError("storage writes take bytes")
            return self.store.storage_write(owner, _safe_file_name(key), data, quota)
        if op == "delete":
            return self.store.storage_delete(owner, _safe_file_name(key))
        if op == "clear":
            return self.store.storage_delete(owner, None)
        if op == "keys":
            return self.store.storage_keys(owner)
        if op == "status":
            used, files = self.store.storage_usage(owner)
            return [used, quota, files]
        raise ValueError(f"unknown storage operation {op!r}")


class _NoSuchArtifact(PagletError):
    """No artifact with that id here (404)."""

    http_status = 404


class _Artifacts:
    """Blobs in the host's database: streamed in and out in chunks, checked by size and SHA-256."""

    def __init__(self, store: _Store, host_url: str, quota: int) -> None:
        self.store, self.host_url, self.quota = store, host_url, quota

    def put(self, read: Callable[[int], bytes], size: int, name: str | None = None, owner: str = "",
            expires_at: float | None = None, compression: str = "", sha256: str | None = None) -> ArtifactRef:  # fmt: skip
        """Store ``size`` bytes from ``read`` chunk by chunk; the expected SHA-256 is checked if given."""
        if size < 0:
            raise RequestError("an artifact upload needs Content-Length", 411)
        artifact_id = _new_id()
        ref = ArtifactRef(self.host_url, artifact_id, _safe_file_name(name or artifact_id), size, "", compression,
                          time.time(), expires_at, owner)  # fmt: skip
        self.store.artifact_begin(artifact_id, ref.to_wire(), expires_at, self.quota, size)
        try:
            digest, seq, left = hashlib.sha256(), 0, size
            while left:
                chunk = read(min(ARTIFACT_CHUNK_BYTES, left))
                if not chunk:
                    raise RequestError(f"artifact body ended {left} bytes early")
                digest.update(chunk)
                self.store.artifact_chunk(artifact_id, seq, chunk)
                seq, left = seq + 1, left - len(chunk)
            if sha256 and digest.hexdigest() != sha256:
                raise SerializationError(f"artifact {ref.name!r}: SHA-256 is {digest.hexdigest()}, not {sha256}")
            ref = dataclasses.replace(ref, sha256=digest.hexdigest())
            self.store.artifact_finish(artifact_id, ref.sha256, ref.to_wire())
        except BaseException:
            self.store.artifact_delete(artifact_id)
            raise
        return ref

    def put_file(self, path: Path | str, **meta: Any) -> ArtifactRef:
        """Store a file as an artifact."""
        path = Path(path)
        with open(path, "rb") as handle:
            meta.setdefault("name", path.name)
            return self.put(handle.read, os.fstat(handle.fileno()).st_size, **meta)

    def ref(self, artifact_id: str) -> ArtifactRef:
        """The reference of a complete artifact; InvalidAgentError-like 404 if there is none."""
        found = self.store.artifact(artifact_id)
        if found is None or not found[1]:
            raise _NoSuchArtifact(f"no artifact {artifact_id!r} on {self.host_url}")
        return ArtifactRef.from_wire(found[0])

    def find(self, sha256: str) -> ArtifactRef | None:
        """A complete artifact with this content, if one is stored."""
        found = self.store.artifacts(sha256)
        return ArtifactRef.from_wire(found[-1]) if found else None

    def list(self) -> list[ArtifactRef]:
        """Every complete artifact."""
        return [ArtifactRef.from_wire(body) for body in self.store.artifacts()]

    def chunks(self, artifact_id: str) -> Iterator[bytes]:
        """The content of an artifact, chunk by chunk."""
        return self.store.artifact_chunks(artifact_id)

    def save(self, artifact_id: str, target: Path | str) -> ArtifactRef:
        """Write an artifact into a file (via a temporary name), checking size and SHA-256."""
        ref = self.ref(artifact_id)
        return _save_stream(self.chunks(artifact_id), Path(target), ref)

    def delete(self, artifact_id: str) -> None:
        """Delete an artifact; 404 if there is none."""
        if not self.store.artifact_delete(artifact_id):
            raise _NoSuchArtifact(f"no artifact {artifact_id!r} on {self.host_url}")

    def expire(self) -> None:
        """Drop expired artifacts and abandoned uploads."""
        for artifact_id in self.store.expired_artifacts():
            self.store.artifact_delete(artifact_id)


# ==============================================================================
# 13. Worker protocol
# ==============================================================================
# Owns: the frames between a host and its workers, and their encoding.  Each frame is a 4-byte
# big-endian length and a CBOR array [type, call_id, ...].  Call ids are per direction; 0 means
# "no reply wanted".  Values inside frames are wire trees (section 5), never pickles.
#
#   host -> worker   BOOT  [1, id, boot map]                         build the paglet
#                    HOOK  [2, id, step, args]                       a lifecycle step (holds the mailbox)
#                    MSG   [3, id, message wire, oneway, checkpoint] handle one message
#                    PEEK  [4, id]                                   the state now, under the state lock
#                    EXIT  [5, 0]                                    close resources and end
#   both ways        REPLY [6, id, ok, value or error, state, ready] state: a checkpoint or None;
#                                                                    ready: take the next message
#   worker -> host   REQ   [7, id, op, args]                         a context call (send, create, ...)
#                    READY [8, 0]                                    a handler waits: send the next message
#
# The host sends MSG only while the worker is ready, highest priority first; UNQUEUED messages
# skip the line and run beside the current handler.

_F_BOOT, _F_HOOK, _F_MSG, _F_PEEK, _F_EXIT, _F_REPLY, _F_REQ, _F_READY = range(1, 9)
#: The exit status of a worker that ran out of memory under its limit.
_EXIT_MEMORY = 70
_FRAME_HEADER = struct.Struct(">I")
_FRAME_MAX = 1 << 30


_CALL_LOCK = threading.Lock()


class _Call:
    """A lighter Future for calls between host and worker: one lock is the whole signal.

    concurrent.futures.Future waits on a Condition (a lock per waiter, a deque, notify_all); on
    the message path, where every microsecond shows, a released lock wakes the waiter directly.
    The first outcome wins; a later one is ignored (a reply that raced a crash).
    """

    __slots__ = ("_callbacks", "_error", "_set", "_signal", "_value")

    def __init__(self) -> None:
        self._signal = threading.Lock()
        self._signal.acquire()
        self._set = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[_Call], Any]] | None = None

    def done(self) -> bool:
        return self._set

    def _finish(self, value: Any, error: BaseException | None) -> None:
        with _CALL_LOCK:
            if self._set:
                return
            self._value, self._error, self._set = value, error, True
            callbacks, self._callbacks = self._callbacks, None
        self._signal.release()
        for callback in callbacks or ():
            callback(self)

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _wait(self, timeout: float | None) -> None:
        if not self._set:
            if not self._signal.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                raise TimeoutError("no reply in time")
            self._signal.release()  # and let any other waiter through

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error

    def add_done_callback(self, callback: Callable[[_Call], Any]) -> None:
        with _CALL_LOCK:
            if not self._set:
                self._callbacks = [*(self._callbacks or ()), callback]
                return
        callback(self)


def _frame(*items: Any) -> bytes:
    """One encoded frame, header included."""
    body = _cbor_dumps(list(items))
    return _FRAME_HEADER.pack(len(body)) + body


def _frame_recv(sock: socket.socket) -> list[Any] | None:
    """Read one frame, blocking; None at end of stream."""
    header = _frame_recv_exact(sock, 4)
    if header is None:
        return None
    (size,) = _FRAME_HEADER.unpack(header)
    if size > _FRAME_MAX:
        raise SerializationError(f"frame of {size} bytes is too large")
    body = _frame_recv_exact(sock, size)
    if body is None:
        return None
    frame = _cbor_loads(body, untrusted=False)
    if type(frame) is not list or len(frame) < 2:
        raise SerializationError("a frame must be an array [type, id, ...]")
    return frame


def _frame_recv_exact(sock: socket.socket, size: int) -> bytes | None:
    if size == 0:
        return b""
    data = sock.recv(size, socket.MSG_WAITALL)
    while 0 < len(data) < size:  # a signal can cut MSG_WAITALL short
        more = sock.recv(size - len(data), socket.MSG_WAITALL)
        if not more:
            return None
        data += more
    return data if data else None


class _FrameBuffer:
    """Collects bytes read without blocking and yields the whole frames among them."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[list[Any]]:
        self._data += chunk
        frames, data, pos = [], self._data, 0
        while len(data) - pos >= 4:
            (size,) = _FRAME_HEADER.unpack_from(data, pos)
            if size > _FRAME_MAX:
                raise SerializationError(f"frame of {size} bytes is too large")
            if len(data) - pos - 4 < size:
                break
            frames.append(_cbor_loads(bytes(data[pos + 4 : pos + 4 + size]), untrusted=False))
            pos += 4 + size
        if pos:
            del data[:pos]
        return frames


def _frame_error(exc: BaseException) -> dict[str, Any]:
    """An exception as it travels in a REPLY frame."""
    return _error_to_wire(exc, with_traceback=not isinstance(exc, PagletError))


# ==============================================================================
# 14. Worker process
# ==============================================================================
# Owns: the code that runs inside a worker: boot, the frame loop, the mailbox (one handler at a
# time; wait_message lets the next one in), lifecycle steps, run(), and _WorkerStub, the
# _HostPort that turns a paglet's context calls into REQ frames to the host.
# Threads: the main thread only reads frames.  Handlers and hooks run on mailbox threads (one
# normally; another only while a handler waits in wait_message); run() and UNQUEUED messages
# get threads of their own.  Any thread may send (under the link's lock).


class _WorkerExit(BaseException):
    """Ends the worker from any thread once a terminal step (dispatch, deactivate, dispose) is done."""


class _WorkerMailbox:
    """The token that lets one handler run at a time, and the wait_message/notify bookkeeping."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.owner: int | None = None
        self.depth = 0
        self.resuming = 0
        self.waiting = 0
        self.notes = 0
        self.pending = 0

    def enter(self) -> None:
        """Take the token (reentrant for the thread that holds it); resuming waiters go first."""
        me = threading.get_ident()
        with self.cond:
            if self.owner == me:
                self.depth += 1
                return
            self.cond.wait_for(lambda: self.owner is None and not self.resuming)
            self.owner, self.depth = me, 1

    def leave(self) -> bool:
        """Give the token back; True if the worker is now idle (the host may send the next message)."""
        with self.cond:
            self.depth -= 1
            if self.depth:
                return False
            self.owner = None
            self.cond.notify_all()
            return self.pending == 0 and not self.resuming

    def holds(self) -> bool:
        return self.owner == threading.get_ident()

    def wait_message(self, timeout: float | None, ready: Callable[[], None]) -> bool:
        """Release the token until notify_message (or timeout), then take it back before others."""
        with self.cond:
            if self.owner != threading.get_ident():
                raise LifecycleError("wait_message() works only inside a message handler")
            depth, self.owner, self.depth = self.depth, None, 0
            self.waiting += 1
            idle = self.pending == 0
            self.cond.notify_all()
        if idle:
            ready()
        with self.cond:
            notified = self.cond.wait_for(lambda: self.notes > 0, timeout)
            if notified:
                self.notes -= 1
            self.waiting -= 1
            self.resuming += 1
            self.cond.wait_for(lambda: self.owner is None)
            self.resuming -= 1
            self.owner, self.depth = threading.get_ident(), depth
        return bool(notified)

    def notify(self, everyone: bool) -> None:
        with self.cond:
            self.notes = self.waiting if everyone else min(self.waiting, self.notes + 1)
            self.cond.notify_all()


class _WorkerRuntime:
    """Everything inside one worker process."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock: socket.socket = sock  # type: ignore[assignment]  # a spare gets it later
        self.send_lock = threading.Lock()
        self.mailbox = _WorkerMailbox()
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.idle_lock = threading.Lock()
        self.idle_threads = 0
        self.calls: dict[int, _Call] = {}
        self.call_ids = itertools.count(1)
        self.resolve = _wire_resolver(None)
        self.terminal = False
        #: Inside on_creation/on_arrival/on_clone/on_activation: the host is still starting the
        #: paglet, so a move it asks for runs right after the hook (Aglets' onArrival -> dispatch).
        self.starting = False
        self.deferred: list[Callable[[], Any]] = []
        self.state_version = 0
        self.paglet: Paglet[Any] | None = None
        self.boot: dict[str, Any] = {}

    # -- link ----------------------------------------------------------------------------------
    def send(self, *items: Any) -> None:
        data = _frame(*items)
        with self.send_lock:
            self.sock.sendall(data)

    def request(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        """A context call to the host; waits for its reply and raises its error."""
        call_id = next(self.call_ids)
        future = _Call()
        self.calls[call_id] = future
        try:
            self.send(_F_REQ, call_id, op, list(args))  # arguments are wire trees already
            return future.result(timeout)
        finally:
            self.calls.pop(call_id, None)

    def serve(self) -> None:
        """Read frames until EXIT or end of stream (the host is gone), then end the process."""
        buffer = _FrameBuffer()
        while data := self.sock.recv(1 << 18):  # one system call per message, not one per header and body
            for frame in buffer.feed(data):
                handler = _WORKER_FRAMES.get(frame[0]) if type(frame) is list and len(frame) >= 2 else None
                if handler is None:
                    raise SerializationError(f"not a frame of this protocol: {str(frame)[:80]}")
                handler(self, frame)

    # -- mailbox threads ------------------------------------------------------------------------
    def prestart(self) -> None:
        """Start the first mailbox thread now, so the first hook does not wait for it."""
        with self.idle_lock:
            self.idle_threads += 1  # counted as idle from the start: the first job needs no new thread
        threading.Thread(target=self._mailbox_loop, args=(True,), name="paglet-mailbox", daemon=True).start()

    def post(self, job: Callable[[], None]) -> None:
        """Queue a job for a mailbox thread; start another thread only if none is free."""
        with self.mailbox.cond:
            self.mailbox.pending += 1
        with self.idle_lock:
            start = self.idle_threads == 0
            if start:
                self.idle_threads += 1
        self.inbox.put(job)
        if start:  # every thread waits in wait_message: one more takes the next job
            threading.Thread(target=self._mailbox_loop, args=(True,), name="paglet-mailbox", daemon=True).start()

    def _mailbox_loop(self, counted: bool = False) -> None:
        while True:
            if not counted:
                with self.idle_lock:
                    self.idle_threads += 1
            counted = False
            job = self.inbox.get()
            with self.idle_lock:
                self.idle_threads -= 1
            self.mailbox.enter()
            with self.mailbox.cond:
                self.mailbox.pending -= 1
            job()

    def done(self) -> None:
        """After a job's reply is sent: end the worker if the paglet left or ended meanwhile."""
        if self.terminal and self.mailbox.owner is None:
            self.exit()

    def exit(self) -> None:
        """Close the paglet's resources and end the process."""
        if self.paglet is not None:
            for exc in self.paglet.resources.close_all():
                _log.warning("closing a resource of %s failed: %s", self.paglet.agent_id, exc)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        os._exit(0)

    # -- paglet ---------------------------------------------------------------------------------
    def state_blob(self) -> bytes:
        """The paglet's state as CBOR bytes, captured under its lock (how state travels and is stored)."""
        assert self.paglet is not None
        with self.paglet.locked():
            self.state_version += 1
            return _cbor_dumps(_wire_encode(self.paglet.state, "state"))

    def start_run(self) -> None:
        if self.paglet is not None and type(self.paglet).run is not Paglet.run:  # no thread for the no-op default
            threading.Thread(target=self._run, name="paglet-run", daemon=True).start()

    def _run(self) -> None:
        assert self.paglet is not None
        try:
            self.paglet.run()
        except _WorkerExit:
            pass
        except MemoryError:
            os._exit(_EXIT_MEMORY)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.send(_F_REQ, 0, "log_error", ["run", _frame_error(exc)])

    def event_for(self, cls: type[PagletEvent], **fields: Any) -> Any:
        assert self.paglet is not None
        return cls(agent_id=self.paglet.agent_id, host_name=self.boot["host_name"], host_address=self.boot["host_address"], **fields)


def _worker_boot(rt: _WorkerRuntime, frame: list[Any]) -> None:
    _, call_id, boot = frame
    try:
        rt.boot = boot
        limit = boot.get("memory_limit")
        if limit:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
        cls = _resolve_class(boot["agent_class"], "paglet", None)
        blob = boot.get("state")
        state = None if blob is None else _wire_decode(_cbor_loads(blob, untrusted=False), rt.resolve)
        paglet = cls(state, agent_id=boot["agent_id"])
        paglet._context = PagletContext(_WorkerStub(rt), paglet.agent_id)
        rt.paglet = paglet
    except BaseException as exc:
        rt.send(_F_REPLY, call_id, False, _frame_error(exc), None, True)
        rt.exit()
    rt.send(_F_REPLY, call_id, True, os.getpid(), None, True)


def _worker_hook(rt: _WorkerRuntime, frame: list[Any]) -> None:
    _, call_id, step, args = frame

    def job() -> None:
        ok, value, state = True, None, None
        try:
            value = _WORKER_STEPS[step](rt, args)
            state = rt.state_blob()
        except MemoryError:
            os._exit(_EXIT_MEMORY)
        except BaseException as exc:
            ok, value = False, _frame_error(exc)
        rt.mailbox.leave()
        rt.send(_F_REPLY, call_id, ok, value, state, False)
        rt.done()

    rt.post(job)


def _worker_message(rt: _WorkerRuntime, frame: list[Any]) -> None:
    _, call_id, wire, oneway, checkpoint = frame
    if wire.get("priority") == UNQUEUED_PRIORITY:
        threading.Thread(target=_worker_handle, args=(rt, call_id, wire, oneway, False, False), daemon=True).start()
    else:
        rt.post(lambda: _worker_handle(rt, call_id, wire, oneway, checkpoint, True))


def _worker_handle(rt: _WorkerRuntime, call_id: int, wire: Any, oneway: bool, checkpoint: bool, queued: bool) -> None:
    """Run handle_message and send the reply (with a checkpoint when the class asks for one)."""
    assert rt.paglet is not None
    ok, value, state = True, None, None
    try:
        reply = rt.paglet.handle_message(Message.from_wire(wire, rt.resolve))
        if reply is NOT_HANDLED:
            raise NotHandledError(f"{type(rt.paglet).__name__} does not handle {wire.get('kind')!r}")
        value = None if oneway else _wire_encode(reply, "reply")
    except _WorkerExit:
        value = None
    except MemoryError:
        os._exit(_EXIT_MEMORY)  # over the memory limit: the host reports the crash with that reason
    except BaseException as exc:
        ok, value = False, _frame_error(exc)
    if checkpoint:
        with contextlib.suppress(Exception):
            state = [rt.state_blob(), rt.state_version]
    ready = rt.mailbox.leave() if queued else False
    rt.send(_F_REPLY, call_id, ok, value, state, ready and not rt.terminal)
    rt.done()


def _worker_peek(rt: _WorkerRuntime, frame: list[Any]) -> None:
    """The state now, on a thread of its own: it waits for the state lock, the reader must not."""

    def peek() -> None:
        try:
            blob = rt.state_blob()
            rt.send(_F_REPLY, frame[1], True, [blob, rt.state_version], None, False)
        except Exception as exc:
            rt.send(_F_REPLY, frame[1], False, _frame_error(exc), None, False)

    threading.Thread(target=peek, name="paglet-peek", daemon=True).start()


def _worker_exit(rt: _WorkerRuntime, frame: list[Any]) -> None:
    rt.exit()


def _worker_reply(rt: _WorkerRuntime, frame: list[Any]) -> None:
    _, call_id, ok, value = frame[:4]
    future = rt.calls.get(call_id)
    if future is None:
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(_error_from_wire(value))


#: What the worker does with each frame type (the main thread calls these; they must not block).
_WORKER_FRAMES: dict[int, Callable[[_WorkerRuntime, list[Any]], None]] = {
    _F_BOOT: _worker_boot,
    _F_HOOK: _worker_hook,
    _F_MSG: _worker_message,
    _F_PEEK: _worker_peek,
    _F_EXIT: _worker_exit,
    _F_REPLY: _worker_reply,
}


def _step_arrive(hook: str, event_cls: type[PagletEvent]) -> Callable[[_WorkerRuntime, Any], Any]:
    """A step that runs an arrival hook (creation, arrival, clone, activation), then run()."""

    def step(rt: _WorkerRuntime, args: Any) -> Any:
        assert rt.paglet is not None
        event = _value_from_wire(event_cls, args, rt.resolve)
        rt.starting = True
        try:
            getattr(rt.paglet, hook)(event)
        finally:
            rt.starting = False
        moves, rt.deferred = rt.deferred, []
        if moves:  # it asked to move on: do that once the host has it running (and skip run())
            threading.Thread(target=lambda: [move() for move in moves], name="paglet-move", daemon=True).start()
        else:
            rt.start_run()
        return None

    return step


def _step_hook(hook: str, event_cls: type[PagletEvent]) -> Callable[[_WorkerRuntime, Any], Any]:
    """A step that runs one hook and nothing else (dispatching, reverting, cloning, cloned, disposing)."""

    def step(rt: _WorkerRuntime, args: Any) -> Any:
        assert rt.paglet is not None
        getattr(rt.paglet, hook)(_value_from_wire(event_cls, args, rt.resolve))
        return None

    return step


def _step_deactivating(rt: _WorkerRuntime, args: Any) -> Any:
    """Ask the paglet for its policy (``deactivation_policy``, for every request), then on_deactivating."""
    assert rt.paglet is not None
    request = DeactivationRequest.from_wire(args)
    policy = rt.paglet.deactivation_policy(request)
    if not isinstance(policy, DeactivationPolicy):
        raise LifecycleError(f"{type(rt.paglet).__name__}.deactivation_policy() must return a DeactivationPolicy")
    event = rt.event_for(PersistencyEvent, reason=request.reason, request=request, policy=policy)
    rt.paglet.on_deactivating(event)
    return policy.to_wire()


#: Lifecycle steps a HOOK frame can ask for.
_WORKER_STEPS: dict[str, Callable[[_WorkerRuntime, Any], Any]] = {
    "creation": _step_arrive("on_creation", CreationEvent),
    "arrival": _step_arrive("on_arrival", MobilityEvent),
    "clone": _step_arrive("on_clone", CloneEvent),
    "activation": _step_arrive("on_activation", PersistencyEvent),
    "dispatching": _step_hook("on_dispatching", MobilityEvent),
    "reverting": _step_hook("on_reverting", MobilityEvent),
    "cloning": _step_hook("on_cloning", CloneEvent),
    "cloned": _step_hook("on_cloned", CloneEvent),
    "disposing": _step_hook("on_disposing", PersistencyEvent),
    "deactivating": _step_deactivating,
}


class _WorkerStub:
    """The _HostPort inside a worker: every call becomes a REQ frame to the host."""

    def __init__(self, rt: _WorkerRuntime) -> None:
        self._rt = rt

    @property
    def name(self) -> str:
        return str(self._rt.boot["host_name"])

    @property
    def address(self) -> str:
        return str(self._rt.boot["host_address"])

    def _decode(self, tree: Any) -> Any:
        return _wire_decode(tree, self._rt.resolve)

    def _proxy(self, tree: Any) -> PagletProxy | None:
        if tree is None:
            return None
        ref = PagletProxyRef.from_wire(tree)
        return PagletProxy(ref.host_url, ref.agent_id, self)

    def _is_self(self, agent_id: str) -> bool:
        return self._rt.paglet is not None and agent_id == self._rt.paglet.agent_id

    # -- _Transport ------------------------------------------------------------------------------
    def is_local_url(self, host_url: str) -> bool:
        return _normalize_url(host_url) == self.address

    def proxy_for(self, host_url: str, agent_id: str) -> PagletProxy:
        return PagletProxy(host_url, agent_id, self)

    def send_message(self, host_url: str, agent_id: str, message: Message, *, oneway: bool = False, timeout: float | None = None) -> Any:
        if (
            self._is_self(agent_id) and self.is_local_url(host_url) and not oneway
            and self._rt.mailbox.holds() and message.priority != UNQUEUED_PRIORITY
        ):  # fmt: skip
            raise LifecycleError("a handler cannot wait for its own reply; use send_oneway or UNQUEUED_PRIORITY")
        wait = CALL_TIMEOUT if timeout is None else timeout  # a cycle of paglets waiting on each other ends
        tree = self._rt.request("send", host_url, agent_id, message.to_wire(), oneway, wait, timeout=wait + 5.0)
        return self._decode(tree)

    def send_future(self, host_url: str, agent_id: str, message: Message, *, timeout: float | None = None) -> FutureReply:
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(self.send_message(host_url, agent_id, message, timeout=timeout))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return FutureReply(future)

    def agent_op(self, host_url: str, agent_id: str, op: str, arg: Any = None) -> PagletProxyRef | None:
        if self._is_self(agent_id) and self.is_local_url(host_url) and op in ("dispatch", "clone", "deactivate", "dispose"):
            proxy = getattr(self, op)(agent_id, *([] if op == "dispose" else [arg]))
            return proxy.ref() if proxy is not None else None
        tree = self._rt.request("agent_op", host_url, agent_id, op, arg.to_wire() if hasattr(arg, "to_wire") else arg)
        return PagletProxyRef.from_wire(tree) if tree else None

    def agent_info(self, host_url: str, agent_id: str) -> dict[str, Any]:
        return dict(self._rt.request("agent_info", host_url, agent_id))

    def upload_artifact(self, path: Path | str, *, host_url: str | None = None, **meta: Any) -> ArtifactRef:
        return ArtifactRef.from_wire(self._rt.request("upload_artifact", str(path), host_url, _wire_encode(meta, "meta")))

    # -- moving and ending oneself: hooks run here, in the calling thread, holding the mailbox ------
    def _defer(self, op: str, arg: Any) -> Any:
        """A move asked for in a startup hook: queued for right after the hook; its proxy now."""
        rt = self._rt
        assert rt.paglet is not None
        clone_id = _new_id() if op == "clone" else None

        def move() -> None:
            try:
                self._self_step(op, arg, clone_id)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    rt.send(_F_REQ, 0, "log_error", [op, _frame_error(exc)])

        rt.deferred.append(move)
        if op == "dispose":
            return None
        destination = arg.get("destination") if isinstance(arg, dict) and op != "deactivate" else arg
        url = self.resolve_url(destination) if op in ("dispatch", "clone") and destination else self.address
        return PagletProxyRef(url, clone_id or rt.paglet.agent_id).to_wire()

    def _self_step(self, op: str, arg: Any, clone_id: str | None = None) -> Any:
        """Dispatch, clone, deactivate or dispose oneself: hooks here, then the host completes it.

        The host does the exactly-once handoff while this worker still runs, so a failed move
        raises TransferError here and the paglet goes on where it was.
        """
        rt = self._rt
        assert rt.paglet is not None
        if rt.starting and rt.mailbox.holds():
            return self._defer(op, arg)
        rt.mailbox.enter()
        try:
            plan, extra = None, None
            if op in ("dispatch", "clone"):
                plan = rt.request("plan_" + op, arg, clone_id)
                event = _value_from_wire(MobilityEvent if op == "dispatch" else CloneEvent, plan["event"], rt.resolve)
                try:
                    (rt.paglet.on_dispatching if op == "dispatch" else rt.paglet.on_cloning)(event)
                except BaseException:
                    rt.request("abort_plan")  # vetoed: the host sends messages again
                    raise
            elif op == "deactivate":
                extra = _step_deactivating(rt, arg)
            else:
                rt.paglet.on_disposing(rt.event_for(PersistencyEvent, reason="dispose"))
            result = rt.request("complete_" + op, plan if plan is not None else arg, rt.state_blob(), extra)
            if op == "clone":
                rt.paglet.on_cloned(event)
            else:
                rt.terminal = True
            return result
        finally:
            rt.mailbox.leave()
            if rt.terminal and rt.mailbox.owner is None:
                rt.exit()  # called from run() or another thread of the paglet: nothing else to answer

    def dispatch(self, agent_id: str, target: str | TransferTicket) -> PagletProxy:
        if not self._is_self(agent_id):
            return self._proxy(self._rt.request("agent_op", self.address, agent_id, "dispatch", _ticket_wire(target)))  # type: ignore[return-value]
        return self._proxy(self._self_step("dispatch", _ticket_wire(target)))  # type: ignore[return-value]

    def clone(self, agent_id: str, target: str | TransferTicket | None = None) -> PagletProxy:
        if not self._is_self(agent_id):
            return self._proxy(self._rt.request("agent_op", self.address, agent_id, "clone", _ticket_wire(target)))  # type: ignore[return-value]
        return self._proxy(self._self_step("clone", _ticket_wire(target)))  # type: ignore[return-value]

    def deactivate(self, agent_id: str, request: DeactivationRequest | None = None) -> PagletProxy:
        request = request or DeactivationRequest(source="self")
        if not self._is_self(agent_id):
            return self._proxy(self._rt.request("agent_op", self.address, agent_id, "deactivate", request.to_wire()))  # type: ignore[return-value]
        return self._proxy(self._self_step("deactivate", request.to_wire()))  # type: ignore[return-value]

    def dispose(self, agent_id: str) -> None:
        if not self._is_self(agent_id):
            self._rt.request("agent_op", self.address, agent_id, "dispose", None)
            return
        self._self_step("dispose", None)

    def snapshot(self, agent_id: str) -> None:
        self._rt.request("snapshot", self._rt.state_blob(), self._rt.state_version)

    # -- the rest of _HostPort: plain requests ------------------------------------------------------
    def get_proxy(self, agent_id: str, include_inactive: bool = False, host_url: str | None = None) -> PagletProxy | None:
        if host_url and not self.is_local_url(host_url):
            return PagletProxy(host_url, agent_id, self)
        return self._proxy(self._rt.request("get_proxy", agent_id, include_inactive))

    def get_proxies(self, state: int = ACTIVE) -> list[PagletProxy]:
        return [p for p in map(self._proxy, self._rt.request("get_proxies", state)) if p is not None]

    def get_property(self, key: str, default: Any = None) -> Any:
        return self._decode(self._rt.request("get_property", key, _wire_encode(default, "default")))

    def set_property(self, key: str, value: Any) -> None:
        self._rt.request("set_property", key, _wire_encode(value, key))

    def create_paglet(self, cls: type | str, state: Any = None, init: Any = None, host_url: str | None = None) -> PagletProxy:
        name = cls if isinstance(cls, str) else _qualified_name(cls)
        state_tree, init_tree = _wire_encode(state, "state"), _wire_encode(init, "init")
        return self._proxy(self._rt.request("create", name, state_tree, init_tree, host_url))  # type: ignore[return-value]

    def resolve_url(self, name_or_url: str) -> str:
        return str(self._rt.request("resolve_url", name_or_url))

    def available_hosts(self, online_only: bool = True, include_self: bool = True) -> list[HostRef]:
        return [HostRef.from_wire(h) for h in self._rt.request("available_hosts", online_only, include_self)]

    def host_status(self, name_or_url: str) -> HostRef | None:
        tree = self._rt.request("host_status", name_or_url)
        return HostRef.from_wire(tree) if tree else None

    def wait_for_host(self, name_or_url: str, timeout: float = 10.0) -> HostRef:
        return HostRef.from_wire(self._rt.request("wait_for_host", name_or_url, timeout))

    def multicast_message(self, kind: str | Message, args: dict[str, Any] | None = None, exclude: Iterable[str] = ()) -> ReplySet:
        message = _as_message(kind, args)
        targets = [t for t in self._rt.request("subscribers", message.kind) if t not in set(exclude)]
        proxies = [PagletProxy(self.address, agent_id, self) for agent_id in targets]
        return ReplySet(p.send_future(Message.from_wire(message.to_wire())) for p in proxies)

    def subscribe_message(self, agent_id: str, kind: str) -> None:
        self._rt.request("subscribe", agent_id, kind)

    def unsubscribe_message(self, agent_id: str, kind: str | None = None) -> None:
        self._rt.request("unsubscribe", agent_id, kind)

    def wait_message(self, agent_id: str, timeout: float | None = None) -> bool:
        return self._rt.mailbox.wait_message(timeout, lambda: self._rt.send(_F_READY, 0))

    def notify_message(self, agent_id: str, everyone: bool = False) -> None:
        self._rt.mailbox.notify(everyone)

    def advertise_service(
        self, agent_id: str, name: str, capabilities: Iterable[str] = (), metadata: dict[str, Any] | None = None,
        scope: ServiceScope | str = ServiceScope.LOCAL, ttl: float | None = None,
    ) -> ServiceRecord:  # fmt: skip
        options = {"capabilities": list(capabilities), "metadata": metadata or {}, "scope": ServiceScope(scope).value, "ttl": ttl}
        return ServiceRecord.from_wire(self._rt.request("advertise_service", agent_id, name, _wire_encode(options, "options")))

    def unadvertise_service(self, agent_id: str, name: str) -> list[ServiceRecord]:
        return [ServiceRecord.from_wire(r) for r in self._rt.request("unadvertise_service", agent_id, name)]

    def lookup_services(
        self, name: str | None = None, capability: str | None = None, scope: ServiceScope = ServiceScope.LOCAL
    ) -> list[ServiceRecord]:
        return [ServiceRecord.from_wire(r) for r in self._rt.request("lookup_services", name, capability, ServiceScope(scope).value)]

    def work_dir(self, agent_id: str, create: bool = True) -> Path:
        return Path(self._rt.request("work_dir", agent_id, create))

    def storage_call(self, owner: str, quota: int | None, op: str, key: str | None = None, data: bytes | None = None) -> Any:
        return self._rt.request("storage", owner, quota, op, key, data)

    def register_file(self, agent_id: str, path: Path | str, name: str | None = None, mode: str = "copy") -> PagletFileRef:
        return PagletFileRef.from_wire(self._rt.request("register_file", agent_id, str(path), name, mode))

    def registered_files(self, agent_id: str) -> list[PagletFileRef]:
        return [PagletFileRef.from_wire(r) for r in self._rt.request("registered_files", agent_id)]

    def unregister_file(self, agent_id: str, name: str) -> None:
        self._rt.request("unregister_file", agent_id, name)

    def download_artifact(self, ref: ArtifactRef, target: Path | str, move: bool = False) -> ArtifactRef:
        return ArtifactRef.from_wire(self._rt.request("download_artifact", ref.to_wire(), str(target), move))

    def delete_artifact(self, ref: ArtifactRef) -> None:
        self._rt.request("delete_artifact", ref.to_wire())

    def lease_service(self, host_url: str, agent_id: str, ttl: float) -> tuple[str, float]:
        lease_id, expires_at = self._rt.request("lease_service", host_url, agent_id, ttl)
        return str(lease_id), float(expires_at)

    def release_lease(self, host_url: str, lease_id: str) -> None:
        self._rt.request("release_lease", host_url, lease_id)


def _ticket_wire(target: Any) -> Any:
    return target.to_wire() if isinstance(target, TransferTicket) else target


def _worker_main(sock: socket.socket | None, channel: socket.socket) -> None:
    """Entry of a worker process, right after the fork server forked it.

    A spare (``sock`` None) starts its mailbox thread, then waits on ``channel`` for the socket of
    the paglet it will run; it ends if the fork server closes the channel instead.
    """
    try:
        runtime = _WorkerRuntime(sock)
        runtime.prestart()
        if sock is None:
            _, fds, _, _ = socket.recv_fds(channel, 1, 1)
            if not fds:
                return
            runtime.sock = socket.socket(fileno=fds[0])
        channel.close()
        runtime.serve()
    except BaseException as exc:  # the host sees the end of the stream and reports the crash
        with contextlib.suppress(Exception):
            sys.stderr.write(f"paglets worker {os.getpid()} ended: {exc!r}\n")
    finally:
        os._exit(0)


# ==============================================================================
# 15. Fork server and workers
# ==============================================================================
# Owns: the fork server ("zygote") and the host's side of workers: _Worker (socket, mailbox
# queue, calls in flight), _WorkerHub (the thread that reads every worker's socket), and the
# psutil figures of workers.
# Why a zygote: forking the threaded host can deadlock the child on a lock another thread held,
# and spawn costs 40-95 ms per paglet.  The zygote is forked while the process still has one
# thread and no open database (else started as a fresh interpreter), imports what workers need,
# freezes the GC, and forks one worker per request.  Workers end when their host's end of the
# socket closes (the host stopped or died); the zygote kills its children when the host's end of
# its own socket closes.


def _zygote_warm() -> None:
    """Run the hot paths of a worker once here, so every worker starts with them warm."""
    message = Message.from_wire(Message("warm", {"n": 1}).to_wire(), _wire_resolver(None))
    _cbor_loads(_frame(_F_MSG, 1, message.to_wire(), False, False)[4:], untrusted=False)
    _wire_decode(_cbor_loads(_cbor_dumps(_wire_encode(PagletState())), untrusted=False), _wire_resolver(None))


#: Seconds of quiet before the fork server forks its next spare worker.
_ZYGOTE_SPARE_DELAY = 0.001


class _Zygote:
    """The fork server's side: fork workers on request, keep one spare forked ahead, report exits.

    The spare is a worker forked in advance with its mailbox thread running, waiting for the
    socket of the next paglet: a create then costs a hand-off instead of a fork (about 2 ms for a
    40 MB process) and a thread start; the next spare is forked while the host goes on.
    """

    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.children: set[int] = set()
        self.spare: tuple[int, socket.socket] | None = None
        self.wake_r, self.wake_w = os.pipe()

    def serve(self, forked: bool) -> None:
        try:
            if forked:
                os.closerange(3, self.ctl.fileno())  # sockets, databases and lock files of the host stay there
                os.closerange(self.ctl.fileno() + 1, 1 << 16)
                self.wake_r, self.wake_w = os.pipe()  # the old pair was closed just above
                os.setsid()  # a Ctrl-C on the host's terminal must not reach the workers
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.set_blocking(self.wake_w, False)
            signal.set_wakeup_fd(self.wake_w)
            signal.signal(signal.SIGCHLD, lambda signum, frame: None)
            _zygote_warm()
            gc.freeze()  # forked workers then share the zygote's objects instead of copying them on GC
            self.spare = self.fork(None)
            while True:
                # The next spare is forked after a millisecond of quiet: forking at once would take a
                # CPU from the worker just handed out, on a two-core board that is half the machine.
                pause = _ZYGOTE_SPARE_DELAY if self.spare is None else None
                readable, _, _ = select.select([self.ctl.fileno(), self.wake_r], [], [], pause)
                if not readable and self.spare is None:
                    self.spare = self.fork(None)
                    continue
                if self.wake_r in readable:
                    os.read(self.wake_r, 4096)
                    self.reap()
                if self.ctl.fileno() in readable and not self.request():
                    return
        finally:
            for pid in self.children:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            os._exit(0)

    def fork(self, fd: int | None) -> tuple[int, socket.socket]:
        """Fork a worker for the socket ``fd``, or (None) a spare that waits on a channel for one."""
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            self.ctl.close()
            ours.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _worker_main(None if fd is None else socket.socket(fileno=fd), theirs)
        theirs.close()
        self.children.add(pid)
        return pid, ours

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            if self.spare is not None and self.spare[0] == pid:
                self.spare[1].close()
                self.spare = None
            else:
                self.ctl.sendall(_frame(0, pid, status))

    def request(self) -> bool:
        """Read one request [id, modules] with the worker's socket attached; False at EOF."""
        header, fds, _, _ = socket.recv_fds(self.ctl, 4, 1, socket.MSG_WAITALL)
        if len(header) < 4:
            return False
        body = _frame_recv_exact(self.ctl, _FRAME_HEADER.unpack(header)[0])
        if body is None or not fds:
            return False
        request_id, modules = _cbor_loads(body, untrusted=False)
        try:
            fresh = [name for name in modules if name not in sys.modules]
            for name in fresh:  # the host only names modules it imported or allows itself
                importlib.import_module(name)
        except Exception as exc:
            os.close(fds[0])
            self.ctl.sendall(_frame(request_id, 0, f"cannot import {name!r} in the fork server: {exc}"))
            return True
        if fresh and self.spare is not None:  # forked before those imports: it would import them again
            self.retire_spare()
        if self.spare is not None:
            pid, channel = self.spare
            self.spare = None
            socket.send_fds(channel, [b"s"], [fds[0]])
            channel.close()
        else:
            pid, channel = self.fork(fds[0])
            channel.close()
        os.close(fds[0])
        self.ctl.sendall(_frame(request_id, pid, None))
        return True

    def retire_spare(self) -> None:
        assert self.spare is not None
        pid, channel = self.spare
        self.spare = None
        channel.close()  # it sees the end of its channel and exits
        self.children.add(pid)  # reaped like any child, but not reported


def _zygote_spawned(fd: int) -> None:
    """Entry of a fork server started as a fresh interpreter (when the host process had threads)."""
    _Zygote(socket.socket(fileno=fd)).serve(forked=False)


class _ForkServer:
    """The process-wide fork server: one per host process, shared by its hosts."""

    _shared: ClassVar[_ForkServer | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def shared(cls) -> _ForkServer:
        """The process's fork server, started (or restarted after it died) on first need."""
        with cls._shared_lock:
            server = cls._shared
            if server is None or not server.alive or server.owner_pid != os.getpid():
                server = cls._shared = cls()
            return server

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        ours, theirs = socket.socketpair()
        self.forked = threading.active_count() == 1 and _Store.open_count == 0
        if self.forked:
            self.pid = os.fork()
            if self.pid == 0:
                ours.close()
                _Zygote(theirs).serve(forked=True)
        else:
            self.pid = self._spawn(theirs)
        theirs.close()
        self.sock = ours
        self.alive = True
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._starts: dict[int, Future[int]] = {}
        self._exits: dict[int, int] = {}
        self._ids = itertools.count(1)
        threading.Thread(target=self._read_loop, name="paglets-forkserver", daemon=True).start()

    @staticmethod
    def _spawn(sock: socket.socket) -> int:
        code = "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); import paglets; paglets._zygote_spawned(int(sys.argv[2]))"
        path = json.dumps([p for p in sys.path if isinstance(p, str)])
        proc = subprocess.Popen([sys.executable, "-c", code, path, str(sock.fileno())], pass_fds=(sock.fileno(),), start_new_session=True)
        return proc.pid

    def _read_loop(self) -> None:
        try:
            while (frame := _frame_recv(self.sock)) is not None:
                request_id, pid, error = frame
                with self._cond:
                    if request_id == 0:
                        self._exits[pid] = error
                        while len(self._exits) > 1024:  # statuses nobody asked for (a worker ended by its host)
                            del self._exits[next(iter(self._exits))]
                        self._cond.notify_all()
                        continue
                    future = self._starts.pop(request_id, None)
                if future is not None:
                    future.set_exception(LifecycleError(error)) if error else future.set_result(pid)
        except (OSError, SerializationError):
            pass
        with self._cond:
            self.alive = False
            starts, self._starts = self._starts, {}
            self._cond.notify_all()
        for future in starts.values():
            future.set_exception(HostError("the fork server ended"))

    def start_worker(self, worker_sock: socket.socket, modules: Iterable[str]) -> Future[int]:
        """Ask for a worker that talks over ``worker_sock``; the future gets its pid."""
        future: Future[int] = Future()
        with self._cond:
            if not self.alive:
                raise HostError("the fork server ended")
            request_id = next(self._ids)
            self._starts[request_id] = future
        data = _frame(request_id, sorted(set(modules)))
        with self._send_lock:
            socket.send_fds(self.sock, [data], [worker_sock.fileno()])
        return future

    def exit_status(self, pid: int, timeout: float) -> int | None:
        """The wait status of an ended worker, if it arrives in time."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or not self.alive, timeout)
            return self._exits.pop(pid, None)


def _process_rss() -> int:
    """RSS of this process in bytes (for the bench's figures)."""
    return int(psutil.Process().memory_info().rss)


def _describe_exit(status: int | None) -> str:
    if status is None:
        return "its worker process ended"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == _EXIT_MEMORY:
        return "it went over its memory limit"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return f"its worker process was killed by {name}"
    return f"its worker process exited with status {os.WEXITSTATUS(status)}"


class _WorkerLeaving(LifecycleError):
    """The worker's paglet is being deactivated, moved or disposed: route the message anew."""


class _Worker:
    """The host's handle on one worker: socket, message queue (by priority), calls in flight."""

    def __init__(self, agent_id: str, agent_class: str, sock: socket.socket) -> None:
        self.agent_id, self.agent_class, self.sock = agent_id, agent_class, sock
        self.pid = 0
        self.started_at = time.time()
        self.cond = threading.Condition()
        self.queue: list[tuple[int, int, bytes, int, dict[str, Any], bool]] = []
        self.order = itertools.count()
        self.ids = itertools.count(1)
        self.calls: dict[int, _Call] = {}
        self.ready = True
        self.holds = 0
        self.alive = True
        #: Set when the paglet's unsent messages were taken away: no new ones are accepted.
        self.leaving = False
        self.error: PagletError | None = None
        self.buffer = _FrameBuffer()
        self.send_lock = threading.Lock()
        self.booted: _Call = _Call()
        self.started: Future[int] = Future()
        self.handled = 0
        self.last_used = time.monotonic()
        self.memory_limit: int | None = None
        #: Why the host killed the worker (reported instead of the bare exit status).
        self.kill_reason: str | None = None

    def _send(self, data: bytes) -> None:
        try:
            with self.send_lock:
                self.sock.sendall(data)
        except OSError:
            pass  # the hub sees the end of the stream and fails the calls

    def _next_frame(self) -> bytes | None:
        """Under cond: the next queued message, if the worker may take one now."""
        if self.ready and not self.holds and self.queue and self.alive:
            self.ready = False
            return heapq.heappop(self.queue)[2]
        return None

    def _check_alive(self) -> None:
        if not self.alive:
            raise self.error or PagletCrashedError(f"paglet {self.agent_id!r} crashed")

    def post(self, message: dict[str, Any], oneway: bool, checkpoint: bool) -> _Call:
        """Queue one message (or send it at once if UNQUEUED); the call gets (ok, value, state)."""
        future = _Call()
        priority = message.get("priority", NORMAL_PRIORITY)
        with self.cond:
            if self.leaving:
                raise _WorkerLeaving(f"paglet {self.agent_id!r} is leaving this worker")
            self._check_alive()
            call_id = next(self.ids)
            self.calls[call_id] = future
            data = _frame(_F_MSG, call_id, message, oneway, checkpoint)
            if priority == UNQUEUED_PRIORITY:
                send: bytes | None = data
            else:
                heapq.heappush(self.queue, (-priority, next(self.order), data, call_id, message, oneway))
                send = self._next_frame()
        if send is not None:
            self._send(send)
        return future

    def call(self, frame_type: int, *items: Any) -> _Call:
        """Send a BOOT, HOOK or PEEK frame at once; the call gets (ok, value, state)."""
        future = _Call()
        with self.cond:
            self._check_alive()
            call_id = next(self.ids)
            self.calls[call_id] = future
        self._send(_frame(frame_type, call_id, *items))
        return future

    def step(self, step: str, args: Any, timeout: float) -> tuple[Any, Any]:
        """Run one lifecycle step (the caller holds the mailbox); returns (value, state)."""
        return self.step_result(self.call(_F_HOOK, step, args), step, timeout)

    def step_result(self, future: _Call, step: str, timeout: float) -> tuple[Any, Any]:
        """The (value, state) of a lifecycle step sent earlier."""
        try:
            ok, value, state = future.result(timeout)
        except TimeoutError:
            raise LifecycleError(f"paglet {self.agent_id!r}: {step} did not finish within {timeout} s") from None
        if not ok:
            error = _error_from_wire(value)
            raise LifecycleError(f"paglet {self.agent_id!r}: {step} failed: {type(error).__name__}: {error}") from error
        return value, state

    def reply(self, frame: list[Any]) -> None:
        """A REPLY from the worker (on the hub thread)."""
        _, call_id, ok, value, state, ready = frame
        with self.cond:
            future = self.calls.pop(call_id, None)
            send = None
            if ready:
                self.ready = True
                send = self._next_frame()
                self.cond.notify_all()
        if send is not None:
            self._send(send)
        if future is not None:
            future.set_result((ok, value, state))

    def became_ready(self) -> None:
        """A READY frame: a handler waits in wait_message, the next message may go."""
        with self.cond:
            self.ready = True
            send = self._next_frame()
            self.cond.notify_all()
        if send is not None:
            self._send(send)

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """Stop sending messages and wait until the current handler is done (for a lifecycle step)."""
        with self.cond:
            self.holds += 1
            idle = self.cond.wait_for(lambda: self.ready or not self.alive, timeout)
        try:
            self._check_alive()
            if not idle:
                raise LifecycleError(f"paglet {self.agent_id!r} is busy: its handler ran longer than {timeout} s")
            yield
        finally:
            self.release_hold()

    def release_hold(self) -> None:
        """End one hold (a lifecycle step is over): messages flow again."""
        with self.cond:
            self.holds = max(0, self.holds - 1)
            send = self._next_frame()
        if send is not None:
            self._send(send)

    def take_queue(self) -> list[tuple[dict[str, Any], bool, _Call]]:
        """Remove the messages not yet sent (for a paglet that leaves): (message, oneway, future)."""
        with self.cond:
            self.leaving = True
            queued, self.queue = sorted(self.queue, key=lambda item: item[:2]), []
            return [(message, oneway, self.calls.pop(call_id)) for _, _, _, call_id, message, oneway in queued]

    def lost(self, error: PagletError) -> None:
        """The worker is gone: every call in flight or queued fails with ``error``."""
        with self.cond:
            if not self.alive:
                return
            self.alive, self.error = False, error
            calls, self.calls, self.queue = self.calls, {}, []
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.close()
        for future in calls.values():
            if not future.done():
                future.set_exception(error)

    def end(self, grace: float, ask: bool = True, wait: bool = True) -> None:
        """Ask the worker to end (or wait for it to); kill it if it is still there after ``grace`` s."""
        if ask:
            self._send(_frame(_F_EXIT, 0))
        if not wait:
            return
        with self.cond:
            self.cond.wait_for(lambda: not self.alive, grace)
        if self.alive:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the worker (a hung paglet)."""
        if self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def figures(self) -> dict[str, Any]:
        """RSS, CPU time and threads of the worker process, through psutil."""
        try:
            proc = psutil.Process(self.pid)
            with proc.oneshot():
                times = proc.cpu_times()
                return {
                    "pid": self.pid,
                    "rss": proc.memory_info().rss,
                    "cpu_time": round(times.user + times.system, 4),
                    "threads": proc.num_threads(),
                }
        except (psutil.Error, OSError):
            return {"pid": self.pid}

    def uss(self) -> int | None:
        """Unique set size (memory that ending the worker would free); costs ~1 ms, so on demand."""
        try:
            return int(psutil.Process(self.pid).memory_full_info().uss)
        except (psutil.Error, OSError, AttributeError):
            return None


class _WorkerHub:
    """One thread per host that reads every worker socket and routes the frames."""

    def __init__(self, on_request: Callable[[_Worker, list[Any]], None], on_lost: Callable[[_Worker], None]) -> None:
        self.on_request, self.on_lost = on_request, on_lost
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._adds: list[_Worker] = []
        self._lock = threading.Lock()
        self._running = True
        self.thread = threading.Thread(target=self._loop, name="paglets-hub", daemon=True)

    def add(self, worker: _Worker) -> None:
        """Start reading a worker's socket."""
        with self._lock:
            self._adds.append(worker)
        self._wake_w.send(b"x")

    def stop(self) -> None:
        """End the hub thread."""
        self._running = False
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(5)
        self._wake_r.close()
        self._wake_w.close()

    def _loop(self) -> None:
        while self._running:
            for key, _ in self.selector.select(1.0):
                if key.data is None:
                    self._take_adds()
                else:
                    self._read(key.data)
        self.selector.close()

    def _take_adds(self) -> None:
        self._wake_r.recv(4096)
        with self._lock:
            adds, self._adds = self._adds, []
        for worker in adds:
            self.selector.register(worker.sock, selectors.EVENT_READ, worker)

    def _read(self, worker: _Worker) -> None:
        try:
            data = worker.sock.recv(1 << 18)
            frames = worker.buffer.feed(data) if data else None
        except (OSError, SerializationError):
            frames = None
        if frames is None:
            self.selector.unregister(worker.sock)
            self.on_lost(worker)
            return
        for frame in frames:
            kind = frame[0]
            if kind == _F_REPLY:
                worker.reply(frame)
            elif kind == _F_REQ:
                self.on_request(worker, frame)
            elif kind == _F_READY:
                worker.became_ready()


# ==============================================================================
# 16. Mesh
# ==============================================================================
# Owns: MeshRegistry, what a host knows of other hosts: joining peers, gossip of known hosts,
# online/offline, names to URLs, and the mesh-version gate for movement targets.
# Threads: one gossip thread per host with peers; the registry itself is guarded by a lock.


class MeshRegistry:
    """The hosts a host knows: itself, its peers, and the hosts they told it about."""

    def __init__(self, config: HostConfig, client: HostClient, store: _Store, self_ref: Callable[[], HostRef]) -> None:
        self.config, self.client, self.store, self._self_ref = config, client, store, self_ref
        self._refs: dict[str, HostRef] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        for body in store.peers():
            with contextlib.suppress(SerializationError):
                ref = HostRef.from_wire(body)
                self._refs[ref.url] = dataclasses.replace(ref, online=False)
        for url in config.peers:
            self._refs.setdefault(_normalize_url(url), HostRef(name="", url=_normalize_url(url), online=False))

    # -- looking -------------------------------------------------------------------------------
    def self_ref(self) -> HostRef:
        """This host as others see it."""
        return self._self_ref()

    def hosts(self, online_only: bool = True, include_self: bool = True) -> list[HostRef]:
        """Known hosts (this one first), optionally only those that answered recently."""
        with self._lock:
            refs = [r for r in self._refs.values() if r.name and (r.online or not online_only)]
        refs.sort(key=lambda r: r.name)
        return ([self.self_ref()] if include_self else []) + refs

    def lookup(self, name_or_url: str) -> HostRef | None:
        """A known host by name or URL (this host included)."""
        me = self.self_ref()
        if name_or_url in (me.name, me.url) or _normalize_url(name_or_url) == me.url:
            return me
        with self._lock:
            if "://" in name_or_url or ":" in name_or_url:
                found = self._refs.get(_normalize_url(name_or_url))
                if found is not None:
                    return found
            named = [r for r in self._refs.values() if r.name == name_or_url]
        return max(named, key=lambda r: (r.online, r.last_seen)) if named else None

    def resolve_url(self, name_or_url: str) -> str:
        """The URL of a host given by name or URL; HostError for an unknown name."""
        ref = self.lookup(name_or_url)
        if ref is not None:
            return ref.url
        if "://" in name_or_url or re.fullmatch(r"[\w.\-\[\]:]+:\d+", name_or_url):
            return _check_url(name_or_url)
        raise HostNotFoundError(f"no known host named {name_or_url!r}")

    def wait_for_host(self, name_or_url: str, timeout: float = 10.0) -> HostRef:
        """Wait until a host is known and online (contacting a URL directly); HostError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            ref = self.lookup(name_or_url)
            if ref is not None and ref.online:
                return ref
            if ref is None and ("://" in name_or_url or ":" in name_or_url):
                with contextlib.suppress(PagletError):  # a host that calls itself by another URL answers here
                    joined = self.join(_normalize_url(name_or_url), timeout=max(0.2, min(2.0, deadline - time.monotonic())))
                    if joined.online:
                        return joined
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostError(f"host {name_or_url!r} did not come online within {timeout} s")
            with self._changed:
                self._changed.wait(min(remaining, 0.2))

    # -- learning ------------------------------------------------------------------------------
    def _learn(self, ref: HostRef, first_hand: bool) -> None:
        me = self.self_ref()
        if ref.url == me.url or not ref.url:
            return
        compatible = ref.mesh_version == self.config.mesh_version
        with self._lock:
            known = self._refs.get(ref.url)
            if first_hand:
                ref = dataclasses.replace(ref, online=True, last_seen=time.time(), error=None, compatible=compatible)
            elif known is not None and known.name:
                return  # what a third host says of a host we know ourselves does not overrule us
            else:
                ref = dataclasses.replace(ref, online=False, compatible=compatible)
            self._refs[ref.url] = ref
            self._changed.notify_all()
        if first_hand or known is None:
            self.store.put_peer(ref.url, ref.to_wire())

    def receive(self, caller: HostRef, known: Iterable[HostRef]) -> list[HostRef]:
        """A peer joined or gossiped: remember it and what it knows; answer with what we know."""
        self._learn(caller, first_hand=True)
        for ref in known:
            self._learn(ref, first_hand=False)
        return self.hosts(online_only=False)

    def join(self, url: str, timeout: float | None = None) -> HostRef:
        """Exchange what we know with one host; returns its HostRef."""
        body = {"host": self.self_ref().to_wire(), "hosts": [r.to_wire() for r in self.hosts(online_only=False, include_self=False)]}
        try:
            tree = self.client.call("POST", url, "/hosts/join", body, timeout=timeout or self.config.gossip_interval)
            refs = [HostRef.from_wire(item) for item in tree["hosts"]]
        except (PagletError, TimeoutError, KeyError, TypeError) as exc:
            self._mark_failed(url, exc)
            raise RemoteHostError(f"cannot join {url}: {exc}") from exc
        them = next((r for r in refs if r.url == _normalize_url(url)), refs[0] if refs else None)
        if them is None:
            raise RemoteHostError(f"{url} sent no description of itself")
        if them.url != _normalize_url(url):  # it calls itself by another URL (a proxy, a LAN address)
            self.forget(_normalize_url(url))
        self._learn(them, first_hand=True)
        for ref in refs:
            if ref.url != them.url:
                self._learn(ref, first_hand=False)
        return self.lookup(them.url) or them

    def _mark_failed(self, url: str, exc: BaseException) -> None:
        with self._lock:
            known = self._refs.get(url) or HostRef(name="", url=url, online=False)
            stale = time.time() - known.last_seen > self.config.offline_after
            self._refs[url] = dataclasses.replace(known, online=known.online and not stale, error=str(exc)[:200])
            self._changed.notify_all()

    def forget(self, url: str) -> None:
        """Drop a host from the registry and the database."""
        with self._lock:
            self._refs.pop(url, None)
        self.store.delete_peer(url)

    def gossip_once(self) -> None:
        """One round: exchange with every known host (offline ones too, so they can come back)."""
        with self._lock:
            urls = list(self._refs)
        for url in urls:
            with contextlib.suppress(RemoteHostError):
                self.join(url, timeout=min(self.config.gossip_interval, 3.0))

    # -- movement targets -----------------------------------------------------------------------
    def check_target(self, url: str, ticket: TransferTicket) -> HostRef:
        """The target of a move, checked: online, same mesh version, required tags, code version."""
        ref = self.lookup(url)
        if ref is None or not ref.online or not ref.name:
            ref = self.join(url, timeout=ticket.timeout)
        if not ref.compatible or ref.mesh_version != self.config.mesh_version:
            raise TransferError(
                f"host {ref.name or url} runs mesh version {ref.mesh_version!r}, this host {self.config.mesh_version!r}:"
                " it is not a movement target"
            )
        missing = [tag for tag in ticket.required_capabilities if tag not in ref.tags]
        if missing:
            raise TransferError(f"host {ref.name} lacks required capabilities {missing}")
        if ticket.expected_code_version and ref.code_version != ticket.expected_code_version:
            raise TransferError(f"host {ref.name} runs code version {ref.code_version}, not {ticket.expected_code_version}")
        return ref


# ==============================================================================
# 17. HTTP API
# ==============================================================================
# Owns: the remote API of SPEC section 6: the _ROUTES table, _build_wsgi_app(host), JSON/CBOR
# bodies with size limits, the error plugin, API-key auth, and _HttpServer, a threaded WSGI
# server that keeps HTTP/1.1 connections alive (Nagle off).  The only user of bottle.
# Threads: one thread per connection; handlers call the Host, which is thread-safe.


_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


def _http_read_body(request: Any, limit: int) -> bytes:
    """Read the request body ourselves: length checked first, never spooled to a temporary file."""
    if "chunked" in request.environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise RequestError("chunked request bodies are not accepted; send Content-Length", 411)
    length_text = request.environ.get("CONTENT_LENGTH") or "0"
    if not _CONTENT_LENGTH.fullmatch(length_text):
        raise RequestError("bad Content-Length", 400)
    length = int(length_text)
    if length > limit:
        raise PayloadTooLargeError(f"request body of {length} bytes is over the limit of {limit}")
    data = request.environ["wsgi.input"].read(length) if length else b""
    if len(data) != length:
        raise RequestError("request body shorter than its Content-Length", 400)
    return bytes(data)


def _http_decode(request: Any, limit: int) -> Any:
    """The request body as a wire tree (CBOR when the request says so, JSON otherwise)."""
    data = _http_read_body(request, limit)
    content_type = request.environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if not data:
        return {}
    if content_type == _CBOR_TYPE:
        return _cbor_loads(data, untrusted=True)
    if content_type in (_JSON_TYPE, "", "text/plain"):
        return _json_loads(data)
    raise RequestError(f"unsupported content type {content_type!r}; use {_JSON_TYPE} or {_CBOR_TYPE}", 415)


def _http_map(tree: Any, *keys: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise SerializationError("the request body must be a map")
    for key in keys:
        if key not in tree:
            raise SerializationError(f"the request body needs {key!r}")
    return tree


def _http_encode(request: Any, response: Any, status: int, tree: Any) -> bytes:
    """Answer CBOR when the client accepts it, JSON otherwise."""
    response.status = status
    if _CBOR_TYPE in request.environ.get("HTTP_ACCEPT", ""):
        response.content_type = _CBOR_TYPE
        return _cbor_dumps(tree)
    response.content_type = _JSON_TYPE
    return _json_dumps(tree)


def _http_int(query: Any, name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"-?\d{1,12}", text):
        raise RequestError(f"query parameter {name!r} must be an integer", 400)
    return max(low, min(high, int(text)))


# -- route handlers: (host, request, **url args) -> (status, tree) ---------------------------------
def _route_health(host: Host, request: Any) -> tuple[int, Any]:
    return 200, host.health()


def _route_hosts(host: Host, request: Any) -> tuple[int, Any]:
    online = request.query.get("online") in ("1", "true")
    return 200, {"hosts": [r.to_wire() for r in host.mesh.hosts(online_only=online)]}


def _route_join(host: Host, request: Any) -> tuple[int, Any]:
    body = _http_map(_http_decode(request, host.config.max_body_bytes), "host")
    caller = HostRef.from_wire(body["host"])
    caller = dataclasses.replace(caller, url=_check_url(caller.url))
    hosts = body.get("hosts", [])
    if not isinstance(hosts, list):
        raise SerializationError("hosts must be a list of HostRef maps")
    known = []
    for item in hosts[:1000]:  # what a peer says of third hosts: keep only what makes sense
        with contextlib.suppress(PagletError):
            ref = HostRef.from_wire(item)
            known.append(dataclasses.replace(ref, url=_check_url(ref.url)))
    return 200, {"hosts": [r.to_wire() for r in host.mesh.receive(caller, known)]}


def _route_events(host: Host, request: Any) -> tuple[int, Any]:
    since = _http_int(request.query, "since", 0, 0, 2**62)
    limit = _http_int(request.query, "limit", 100, 0, 10_000)
    return 200, {"events": [e.to_wire() for e in host.list_events(since, limit)]}


def _route_services(host: Host, request: Any) -> tuple[int, Any]:
    name, capability = request.query.get("name") or None, request.query.get("capability") or None
    scope = request.query.get("scope") or None
    records = host.lookup_services(name, capability, ServiceScope.LOCAL)
    if scope is not None:
        records = [r for r in records if r.scope.value == scope]
    return 200, {"services": [r.to_wire() for r in records]}


def _route_lease(host: Host, request: Any) -> tuple[int, Any]:
    body = _http_map(_http_decode(request, host.config.max_body_bytes), "agent_id", "ttl")
    if type(body["ttl"]) not in (int, float):
        raise SerializationError("ttl must be a number of seconds")
    lease_id, expires_at = host.lease_service(host.address, _check_agent_id(body["agent_id"]), body["ttl"])
    return 201, {"lease_id": lease_id, "expires_at": expires_at}


def _route_lease_release(host: Host, request: Any, lease_id: str) -> tuple[int, Any]:
    host.release_lease(host.address, _check_agent_id(lease_id, "lease"))
    return 200, {"released": True}


def _route_agents(host: Host, request: Any) -> tuple[int, Any]:
    state = request.query.get("state") or "active"
    if state not in ("active", "inactive", "all"):
        raise RequestError("state must be active, inactive or all", 400)
    return 200, {"agents": host.list_agents(state)}


def _route_create(host: Host, request: Any) -> tuple[int, Any]:
    body = _http_map(_http_decode(request, host.config.max_body_bytes), "agent_class")
    cls: Any = _resolve_class(body["agent_class"], "paglet", host.config.allow_modules)
    state = body.get("state")
    if isinstance(state, dict) and all(isinstance(key, str) and not key.startswith("$") for key in state):
        unknown = sorted(set(state) - {f.name for f in dataclasses.fields(cls.State)})
        if unknown:
            raise SerializationError(f"{cls.State.__qualname__} has no field {unknown[0]!r}")
        state = _wire_fields_tree(cls.State, state)  # a plain map holds the State's fields
    state = _wire_decode(state, host.resolve)
    init = _wire_decode(body.get("init"), host.resolve)
    agent_id = body.get("agent_id")
    proxy = host.create(cls, state, init=init, agent_id=None if agent_id is None else _check_agent_id(agent_id))
    return 201, {"agent_id": proxy.agent_id, "proxy": proxy.to_wire()}


def _route_agent(host: Host, request: Any, agent_id: str) -> tuple[int, Any]:
    return 200, host.agent_info(host.address, _check_agent_id(agent_id))


def _route_state(host: Host, request: Any, agent_id: str) -> tuple[int, Any]:
    return 200, {"state": host.get_state_tree(_check_agent_id(agent_id))}


def _route_message(host: Host, request: Any, agent_id: str) -> tuple[int, Any]:
    body = _http_map(_http_decode(request, host.config.max_body_bytes), "kind")
    message = Message.from_wire(body, host.resolve)
    oneway = body.get("oneway") is True
    timeout = body.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or not 0 < timeout <= 86400):
        raise SerializationError("timeout must be a number of seconds")
    reply = host.deliver_tree(_check_agent_id(agent_id), message, oneway=oneway, timeout=timeout or host.config.call_timeout)
    return (202, {"accepted": True}) if oneway else (200, {"reply": reply})


#: What each lifecycle endpoint takes in its body.
_AGENT_OP_ARGS: dict[str, set[str]] = {
    "dispatch": {"target", "ticket"}, "clone": {"target", "ticket"}, "retract": {"target", "ticket"},
    "deactivate": {"request"}, "activate": set(), "dispose": set(),
}  # fmt: skip


def _route_agent_op(op: str) -> Callable[..., tuple[int, Any]]:
    def handle(host: Host, request: Any, agent_id: str) -> tuple[int, Any]:
        body = _http_map(_http_decode(request, host.config.max_body_bytes))
        allowed = _AGENT_OP_ARGS[op]
        given = {key for key, value in body.items() if value is not None}
        if given - allowed or (op in ("dispatch", "retract") and not given):
            raise SerializationError(f"{op} takes {' or '.join(sorted(allowed)) or 'no arguments'}")
        arg: Any = None
        if "request" in given:
            arg = DeactivationRequest.from_wire(body["request"])
        elif "ticket" in given:
            arg = TransferTicket.from_wire(body["ticket"])
        elif "target" in given:
            arg = body["target"]
            if not isinstance(arg, str) or not arg:
                raise SerializationError("target must be a URL or a host name")
        ref = host.agent_op(host.address, _check_agent_id(agent_id), op, arg)
        return 200, {"proxy": ref.to_wire() if ref is not None else None}

    return handle


def _route_artifact_upload(host: Host, request: Any) -> tuple[int, Any]:
    query = request.query
    length = request.environ.get("CONTENT_LENGTH", "")
    if "chunked" in request.environ.get("HTTP_TRANSFER_ENCODING", "").lower() or not _CONTENT_LENGTH.fullmatch(length):
        raise RequestError("an artifact upload needs Content-Length (no chunked bodies)", 411)
    expires = query.get("expires_at")
    try:
        expires_at = float(expires) if expires else None
    except ValueError:
        raise RequestError("expires_at must be a Unix time", 400) from None
    sha256 = query.get("sha256") or None
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise RequestError("sha256 must be 64 lowercase hex digits", 400)
    ref = host._artifacts.put(
        request.environ["wsgi.input"].read, int(length), name=query.get("name") or None, owner=query.get("owner") or "",
        expires_at=expires_at, compression=query.get("compression") or "", sha256=sha256,
    )  # fmt: skip
    return 201, {"artifact": ref.to_wire()}


def _route_artifacts(host: Host, request: Any) -> tuple[int, Any]:
    sha256 = request.query.get("sha256")
    refs = [host._artifacts.find(sha256)] if sha256 else host._artifacts.list()
    return 200, {"artifacts": [ref.to_wire() for ref in refs if ref is not None]}


def _route_artifact(host: Host, request: Any, artifact_id: str) -> Any:
    ref = host._artifacts.ref(_check_agent_id(artifact_id, "artifact"))
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(ref.size), "X-Paglets-Sha256": ref.sha256}
    return bottle.HTTPResponse(host._artifacts.chunks(ref.artifact_id), 200, **headers)


def _route_artifact_metadata(host: Host, request: Any, artifact_id: str) -> tuple[int, Any]:
    return 200, {"artifact": host._artifacts.ref(_check_agent_id(artifact_id, "artifact")).to_wire()}


def _route_artifact_delete(host: Host, request: Any, artifact_id: str) -> tuple[int, Any]:
    host._artifacts.delete(_check_agent_id(artifact_id, "artifact"))
    return 200, {"deleted": True}


def _route_transfer(host: Host, request: Any) -> tuple[int, Any]:
    return 200, {"status": host.receive_transfer(_http_decode(request, host.config.max_body_bytes))}


def _route_transfer_abort(host: Host, request: Any, tid: str) -> tuple[int, Any]:
    body = _http_map(_http_decode(request, host.config.max_body_bytes), "agent_id", "source_url")
    return 200, {"status": host.abort_transfer(tid, body["agent_id"], str(body["source_url"]), body.get("epoch", 0))}


#: The remote API: (method, path, handler, needs auth).
_ROUTES: list[tuple[str, str, Callable[..., Any], bool]] = [
    ("GET", "/health", _route_health, False),
    ("GET", "/hosts", _route_hosts, True),
    ("POST", "/hosts/join", _route_join, True),
    ("GET", "/events", _route_events, True),
    ("GET", "/services", _route_services, True),
    ("POST", "/services/leases", _route_lease, True),
    ("POST", "/services/leases/<lease_id>/release", _route_lease_release, True),
    ("GET", "/agents", _route_agents, True),
    ("POST", "/agents", _route_create, True),
    ("GET", "/agents/<agent_id>", _route_agent, True),
    ("GET", "/agents/<agent_id>/state", _route_state, True),
    ("POST", "/agents/<agent_id>/messages", _route_message, True),
    ("POST", "/transfers", _route_transfer, True),
    ("POST", "/transfers/<tid>/abort", _route_transfer_abort, True),
    ("GET", "/artifacts", _route_artifacts, True),
    ("POST", "/artifacts", _route_artifact_upload, True),
    ("GET", "/artifacts/<artifact_id>", _route_artifact, True),
    ("DELETE", "/artifacts/<artifact_id>", _route_artifact_delete, True),
    ("GET", "/artifacts/<artifact_id>/metadata", _route_artifact_metadata, True),
]
_ROUTES += [
    ("POST", f"/agents/<agent_id>/{op}", _route_agent_op(op), True)
    for op in ("dispatch", "clone", "retract", "deactivate", "activate", "dispose")
]


def _http_authorized(host: Host, request: Any) -> bool:
    key = host.config.api_key
    if not key:
        return True
    given = request.environ.get("HTTP_AUTHORIZATION", "")
    expected = f"Bearer {key}"
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _http_wrap(host: Host, handler: Callable[..., Any], auth: bool) -> Callable[..., Any]:
    """Auth, then the handler; every error becomes ``{"error", "message"}`` with its status."""

    def callback(**url_args: Any) -> Any:
        request, response = bottle.request, bottle.response
        try:
            if not host.serving:
                raise RequestError(f"host {host.name} has stopped", 503)
            if auth and not _http_authorized(host, request):
                raise AuthenticationError("missing or wrong API key (Authorization: Bearer <key>)")
            result = handler(host, request, **url_args)
            if not isinstance(result, tuple):
                return result  # a streaming response (artifacts)
            status, tree = result
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            status, tree = _error_status(exc), _error_to_wire(exc)
            if status >= 500:
                _log.warning("%s %s failed: %r", request.method, request.path, exc, exc_info=status == 500)
                if status == 500 and not isinstance(exc, PagletError):
                    tree = {"error": "HostError", "message": f"internal error: {type(exc).__name__}"}
        return _http_encode(request, response, status, tree)

    return callback


def _build_wsgi_app(host: Host) -> bottle.Bottle:
    """The host's Bottle app: every route of _ROUTES, JSON errors for unknown paths."""
    app = bottle.Bottle()
    for method, path, handler, auth in _ROUTES:
        app.route(path, method, _http_wrap(host, handler, auth))

    def not_found(error: Any) -> bytes:
        exc = RequestError(f"no route {bottle.request.method} {bottle.request.path}", error.status_code)
        return _http_encode(bottle.request, bottle.response, error.status_code, _error_to_wire(exc))

    for code in (400, 404, 405, 413, 500):
        app.error(code)(not_found)
    return app


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 requests in a loop, each answered by the WSGI app."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a malformed request line still gets a status line back
    server_version = f"paglets/{__version__}"
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection.settimeout(self.server.keepalive_timeout)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        _log.debug("%s - %s", self.address_string(), format % args)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
            self.send_error(414, "request line too long")
            return
        if not self.parse_request():
            return
        lengths = self.headers.get_all("Content-Length") or []
        if len(set(lengths)) > 1 or (lengths and self.headers.get("Transfer-Encoding")):
            self.send_error(400, "conflicting Content-Length / Transfer-Encoding headers")  # no request smuggling
            return
        if lengths and not _CONTENT_LENGTH.fullmatch(lengths[0]):
            self.send_error(400, "bad Content-Length")
            return
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # its body is not read: the next bytes are not a request
        self._run_app()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found before the app runs also answer with a JSON error body, and close."""
        body = _json_dumps({"error": "RequestError", "message": message or explain or "bad request"})
        self.close_connection = True
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", _JSON_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass

    def _environ(self) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": self.headers.get("Content-Length", ""),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": _HttpInput(self.rfile, self.headers.get("Content-Length", "")),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for key, value in self.headers.items():
            name = "HTTP_" + key.upper().replace("-", "_")
            if name not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                environ[name] = value if name not in environ else environ[name] + "," + value
        return environ

    def _run_app(self) -> None:
        environ = self._environ()
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return lambda data: None

        result = self.server.app(environ, start_response)
        try:
            self._respond(started, result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not environ["wsgi.input"].drain():
            self.close_connection = True  # unread body left on the wire: the stream is out of step

    def _respond(self, started: list[Any], result: Iterable[bytes]) -> None:
        status, headers = started
        code, _, reason = status.partition(" ")
        names = {name.lower() for name, _ in headers}
        if "content-length" not in names:
            body = b"".join(result)
            headers = [*headers, ("Content-Length", str(len(body)))]
            result = [body]
        self.send_response(int(code), reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        for chunk in result:
            if chunk:
                self.wfile.write(chunk)
        self.wfile.flush()


class _HttpInput:
    """``wsgi.input`` that never reads past Content-Length, and can drain what the app left."""

    def __init__(self, rfile: Any, length: str) -> None:
        self._rfile = rfile
        self._left = int(length) if _CONTENT_LENGTH.fullmatch(length) else 0

    def read(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._rfile.read(size) if size else b""
        self._left -= len(data)
        return bytes(data)

    def readline(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._rfile.readline(size) if size else b""
        self._left -= len(data)
        return bytes(data)

    def drain(self, limit: int = 1 << 20) -> bool:
        """Read and drop what the app did not read (up to ``limit``); False if more was left."""
        if self._left > limit:
            return False
        while self._left:
            if not self.read(min(self._left, 65536)):
                return False
        return True


class _HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A threaded WSGI server bound at construction (port 0 picks a free port)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, bind_host: str, port: int, app: Any, config: HostConfig) -> None:
        self.address_family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self.app, self.keepalive_timeout = app, config.keepalive_timeout
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__((bind_host, port), _HttpHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=5.0):
            self.shutdown_request(request)  # too many connections: this one is closed at once
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self._slots.release()

    def close_connections(self) -> None:
        """End every kept-alive connection (a stopped host must not answer on old ones)."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.debug("connection from %s ended with an error", client_address, exc_info=True)


# ==============================================================================
# 18. Host
# ==============================================================================
# Owns: Host, assembled by composition: _Store (11), _Files (12), the fork server and a
# _WorkerHub (15), MeshRegistry (16), the Bottle app and _HttpServer (17).  The lifecycle
# (create, activate, deactivate, dispatch, clone, retract, dispose), message routing, events,
# properties, and _WORKER_OPS, the context calls a worker may make.
# Threads: callers of the public API, HTTP connection threads and the context-call pool all
# enter here.  _lock guards the tables of live workers; one lock per paglet serialises its
# lifecycle steps; messages take neither (a worker's own queue orders them).


@dataclasses.dataclass(frozen=True, slots=True)
class ResidentService:
    """A service paglet the host keeps: lazy (started on the first call, idles out) or eager.

    Its service record is advertised at host start, so a lazy one is found before it runs.
    """

    #: The paglet class, or its ``module:Qualname``.
    cls: type | str
    agent_id: str
    lifecycle: ResidentLifecycle = ResidentLifecycle.LAZY
    scope: ServiceScope = ServiceScope.LOCAL
    #: Seconds a lazy service may idle before it is deactivated (0: never).
    idle_timeout: float = RESIDENT_IDLE_TIMEOUT
    #: Initial state: an instance of the class's State, or a map of its fields.
    state: Any = None
    #: The contract to advertise (default: the class's CONTRACT); or a plain service name.
    contract: ServiceContract | None = None
    service: str | None = None


#: Resident services every host runs unless told otherwise (section 19 adds server-info).
_DEFAULT_RESIDENTS: list[ResidentService] = []


@dataclasses.dataclass(slots=True)
class _Live:
    """What the host keeps in memory for one active paglet."""

    worker: _Worker
    cls: type[Paglet[Any]]
    meta: dict[str, Any]
    epoch: int = 0
    leaving: bool = False
    #: Durably queued messages handled but not yet dropped from the queue, in handling order.
    handled: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
    #: Calls of messages posted from the durable queue (they must not be queued a second time).
    from_queue: set[Any] = dataclasses.field(default_factory=set)
    draining: bool = False


class Host:
    """A paglet host: worker processes, a SQLite database, an HTTP API and a place in a mesh.

    ``Host("edge-1", port=8765, data_dir="./data")``; use it as a context manager, or call
    ``start_background()`` / ``serve_forever()`` and ``shutdown()`` / ``stop()``.
    """

    def __init__(
        self,
        name: str = "paglets",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        data_dir: str | Path | None = None,
        persistence_dir: str | Path | None = None,
        api_key: str | None = None,
        peers: Iterable[str] = (),
        mesh_version: str | None = None,
        tags: Iterable[str] = (),
        properties: Mapping[str, Any] | None = None,
        allow_modules: Iterable[str] | None = None,
        public_url: str | None = None,
        resident_services: Iterable[ResidentService] | None = None,
        **knobs: Any,
    ) -> None:
        _ForkServer.shared()  # first of all: the process may still have a single thread
        data = data_dir if data_dir is not None else persistence_dir
        self._temp_dir = None if data is not None else tempfile.mkdtemp(prefix=f"paglets-{name}-")
        self.config = HostConfig(
            name=name, bind_host=host, port=port, data_dir=Path(data if data is not None else self._temp_dir),  # type: ignore[arg-type]
            api_key=api_key or None, peers=tuple(peers), mesh_version=mesh_version or "1", tags=tuple(tags),
            properties=dict(properties or {}), allow_modules=tuple(allow_modules or ()), public_url=public_url,
            resident_services=tuple(resident_services or ()), **knobs,
        )  # fmt: skip
        self.name = name
        self.data_dir: Path = self.config.data_dir  # type: ignore[assignment]
        self._store = _Store(self.data_dir, event_capacity=self.config.event_log_capacity)
        try:
            self.resolve = _wire_resolver(self.config.allow_modules)
            self.client = HostClient(api_key, allow=self.config.allow_modules)
            self.wsgi_app = _build_wsgi_app(self)
            self._server = _HttpServer(host, port, self.wsgi_app, self.config)
        except BaseException:
            self._store.close()
            raise
        self.port: int = self._server.server_address[1]
        self.address = _normalize_url(public_url) if public_url else self._bound_url()
        self._files = _Files(self.data_dir, self._store, self.config.storage_quota)
        self._artifacts = _Artifacts(self._store, self.address, self.config.artifact_quota)
        self.mesh = MeshRegistry(self.config, self.client, self._store, self._self_ref)
        self._live: dict[str, _Live] = {}
        self._starting: dict[str, _Live] = {}
        self._residents: dict[str, ResidentService] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._lock = threading.RLock()
        self._agent_locks: dict[str, threading.RLock] = {}
        self._listeners: list[Callable[[ContextEvent], Any]] = []
        self._hub = _WorkerHub(self._on_request, self._on_lost)
        self._pool = ThreadPoolExecutor(CONTEXT_THREADS, thread_name_prefix=f"paglets-{name}")
        self._tick = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = time.time()
        self._running = False
        self._stopped = False

    def _bound_url(self) -> str:
        bind = self.config.bind_host
        shown = _lan_address() if bind in ("0.0.0.0", "::", "") else bind
        return f"http://[{shown}]:{self.port}" if ":" in shown else f"http://{shown}:{self.port}"

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address!r})"

    @property
    def serving(self) -> bool:
        """Whether the host takes requests (false once stop() or shutdown() began)."""
        return not self._stopped

    # ==== running ===============================================================================
    def start_background(self) -> Host:
        """Serve HTTP and run paglets on background threads; restores paglets saved for restart."""
        if self._running or self._stopped:
            return self
        self._running = True
        self._hub.thread.start()
        self._files.clear_all_work()
        for key, value in self.config.properties.items():
            self._store.set_property(key, value)
        self._start_thread(self._server.serve_forever, "http", 0.25)
        self._start_thread(self._housekeeping, "housekeeping")
        self._start_thread(self._gossip, "gossip")
        self._recover()
        for spec in [*(_DEFAULT_RESIDENTS if self.config.builtin_services else []), *self.config.resident_services]:
            self._install_resident(spec)
        self._emit("host-started", data={"url": self.address})
        return self

    def _start_thread(self, target: Callable[..., Any], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"paglets-{self.name}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def serve_forever(self) -> None:
        """Start, then block until stop() or shutdown() (Ctrl-C shuts down)."""
        self.start_background()
        try:
            while not self._stopping.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.shutdown()

    def stop(self) -> None:
        """Stop at once: workers end without hooks; active paglets are recovered at the next start."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._tick.set()
        if self._running:
            self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        with self._lock:
            lives = list(self._live.values())
            self._live.clear()
        for live in lives:
            live.worker.end(0.2)
        self._hub.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self._store.close()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def shutdown(self) -> None:
        """Deactivate every active paglet (reason "shutdown", restored at the next start), then stop."""
        if self._stopped:
            return
        request = DeactivationRequest(reason="shutdown", source="shutdown")
        with self._lock:
            agent_ids = list(self._live)
        jobs = [self._pool.submit(self._deactivate_for_shutdown, agent_id, request) for agent_id in agent_ids]
        concurrent.futures.wait(jobs, timeout=self.config.hook_timeout + self.config.stop_grace + 5.0)
        self.stop()

    def __enter__(self) -> Host:
        return self.start_background()

    def __exit__(self, *exc_info: Any) -> None:
        # With a data folder, paglets are kept for the next start; a temporary folder keeps nothing.
        self.stop() if self._temp_dir else self.shutdown()

    # ==== creating and finding paglets =============================================================
    def create(self, cls: type[Paglet[Any]], state: Any = None, *, init: Any = None, agent_id: str | None = None) -> PagletProxy:
        """Create a paglet here: a worker process starts, ``on_creation`` runs, its state is stored."""
        self._check_paglet_class(cls)
        if state is not None and cls.State is not PagletState and not isinstance(state, cls.State):
            raise SerializationError(f"state of {cls.__name__} must be a {cls.State.__name__}, not {type(state).__name__}")
        agent_id = _check_agent_id(agent_id) if agent_id is not None else _new_id()
        blob = None if state is None else _cbor_dumps(_wire_encode(state, "state"))
        with self._agent_lock(agent_id):
            if agent_id in self._live or self._store.agent(agent_id) is not None:
                raise LifecycleError(f"a paglet {agent_id!r} already exists here")
            event = CreationEvent(agent_id, self.name, self.address, init=init)
            self._start(cls, agent_id, blob, "creation", event.to_wire(), {"created_at": time.time()}, 0)
        self._emit("created", agent_id, _qualified_name(cls))
        return PagletProxy(self.address, agent_id, self)

    def create_paglet(self, cls: type | str, state: Any = None, init: Any = None, host_url: str | None = None) -> PagletProxy:
        """Create here, or on another host (``host_url``); a class may be given by name."""
        if host_url and not self.is_local_url(host_url):
            return self.create_remote(host_url, cls, state, init=init)
        klass = _resolve_class(cls, "paglet", self.config.allow_modules) if isinstance(cls, str) else cls
        return self.create(klass, state, init=init)

    def create_remote(self, url: str, cls: type | str, state: Any = None, *, init: Any = None) -> PagletProxy:
        """Create a paglet on another host; the proxy works through this host."""
        proxy = self.client.create(self.mesh.resolve_url(url), cls, state, init=init)
        return PagletProxy(proxy.host_url, proxy.agent_id, self)

    def _check_paglet_class(self, cls: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Paglet)):
            raise LifecycleError(f"{cls!r} is not a Paglet subclass")
        if "<locals>" in cls.__qualname__:
            raise LifecycleError(f"{cls.__qualname__} is defined inside a function; workers find classes by module:name")

    def get_proxy(self, agent_id: str, include_inactive: bool = False, host_url: str | None = None) -> PagletProxy | None:
        """A proxy of a paglet here (active, or inactive too), or of one on another host."""
        if host_url and not self.is_local_url(host_url):
            return PagletProxy(host_url, agent_id, self)
        if agent_id in self._live:
            return PagletProxy(self.address, agent_id, self)
        row = self._store.agent(agent_id) if include_inactive else None
        known = row is not None and row.status in ("inactive", "active", "arriving")
        return PagletProxy(self.address, agent_id, self) if known else None

    def get_proxies(self, state: int = ACTIVE) -> list[PagletProxy]:
        """Proxies of this host's paglets in a state (ACTIVE, INACTIVE or ACTIVE | INACTIVE)."""
        ids: list[str] = []
        if state & ACTIVE:
            with self._lock:
                ids += list(self._live)
        if state & INACTIVE:
            ids += [row.agent_id for row in self._store.agents("inactive")]
        return [PagletProxy(self.address, agent_id, self) for agent_id in ids]

    def get_state(self, agent_id: str, state_cls: type | None = None) -> Any:
        """A paglet's state (current if active, stored if inactive), decoded."""
        state = _wire_decode(self.get_state_tree(agent_id), self.resolve)
        if state_cls is not None and not isinstance(state, state_cls):
            raise SerializationError(f"state of {agent_id!r} is a {type(state).__name__}, not a {state_cls.__name__}")
        return state

    def get_state_tree(self, agent_id: str) -> Any:
        """A paglet's state as a wire tree (for the HTTP API)."""
        return _cbor_loads(self._state_blob(agent_id), untrusted=False)

    def _state_blob(self, agent_id: str) -> bytes:
        return self._peek(agent_id)[0]

    def _peek(self, agent_id: str) -> tuple[bytes, int]:
        """(state blob, its version in the worker's count); a stored paglet's state has version 0."""
        live = self._live.get(agent_id)
        if live is not None:
            ok, value, _ = live.worker.call(_F_PEEK).result(self.config.hook_timeout)
            if not ok:
                raise _error_from_wire(value)
            return bytes(value[0]), int(value[1])
        row = self._store.agent(_check_agent_id(agent_id))
        if row is None or row.status not in ("inactive", "active", "crashed", "arriving") or row.state is None:
            raise InvalidAgentError(f"no paglet {agent_id!r} on {self.name}")
        return row.state, 0

    def list_agents(self, state: str = "active") -> list[dict[str, Any]]:
        """Info maps of this host's paglets: "active", "inactive" or "all"."""
        infos = []
        if state in ("active", "all"):
            with self._lock:
                ids = list(self._live)
            infos += [self._info(agent_id) for agent_id in ids]
        if state in ("inactive", "all"):
            statuses = ("inactive", "crashed", "arriving") if state == "all" else ("inactive",)
            infos += [self._row_info(row) for row in self._store.agents(*statuses)]
        return [info for info in infos if info]

    def _info(self, agent_id: str) -> dict[str, Any]:
        live = self._live.get(agent_id)
        if live is None:
            row = self._store.agent(agent_id)
            return self._row_info(row) if row is not None else {}
        info = {
            "agent_id": agent_id, "agent_class": live.worker.agent_class, "active": True, "status": "active",
            "host_url": self.address, "host_name": self.name, "started_at": live.worker.started_at,
            "handled": live.worker.handled,
        }  # fmt: skip
        info.update(live.worker.figures())
        return info

    def _row_info(self, row: _AgentRow) -> dict[str, Any]:
        return {
            "agent_id": row.agent_id, "agent_class": row.agent_class, "active": False, "status": row.status,
            "host_url": self.address, "host_name": self.name, "reason": row.reason, "updated_at": row.updated_at,
            "policy": row.policy.to_wire() if row.policy else None, "queued": self._store.queue_length(row.agent_id),
        }  # fmt: skip

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers."""
        counts = self._store.count_agents()
        return {
            "status": "ok", "name": self.name, "url": self.address, "version": __version__,
            "code_version": self.config.code_version, "mesh_version": self.config.mesh_version, "pid": os.getpid(),
            "uptime": round(time.time() - self._started_at, 3), "active": len(self._live),
            "inactive": counts.get("inactive", 0),
        }  # fmt: skip

    # ==== the worker of one paglet ===============================================================
    def _agent_lock(self, agent_id: str) -> threading.RLock:
        with self._lock:
            return self._agent_locks.setdefault(agent_id, threading.RLock())

    def _spawn(self, cls: type[Paglet[Any]], agent_id: str, state: bytes | None) -> _Worker:
        """Start a worker for a paglet and build the paglet in it (no hook has run yet)."""
        forks = _ForkServer.shared()
        if not forks.forked and cls.__module__ == "__main__":
            raise LifecycleError(
                f"{cls.__qualname__} is defined in __main__, which workers of this host cannot import: the first "
                "Host was created after other threads started. Move the class into a module, or create the Host earlier."
            )
        modules = {c.__module__ for c in (cls, cls.State)} - {"paglets", "__main__", "builtins"}
        ours, theirs = socket.socketpair()
        worker = _Worker(agent_id, _qualified_name(cls), ours)
        limit = getattr(cls, "MEMORY_LIMIT", None) or self.config.paglet_memory_limit
        worker.memory_limit = limit
        boot = {
            "agent_id": agent_id, "agent_class": _qualified_name(cls), "state": state, "host_name": self.name,
            "host_address": self.address, "memory_limit": limit,
        }  # fmt: skip
        try:
            started = forks.start_worker(theirs, modules)
        finally:
            theirs.close()
        self._hub.add(worker)
        worker.booted = worker.call(_F_BOOT, boot)  # after the fork request: a big state does not fit in the socket buffer
        worker.started = started
        return worker

    def _check_boot(self, worker: _Worker, cls: type) -> None:
        """Wait for the worker's pid and its answer to BOOT; a failure ends it with a clear error."""
        try:
            worker.pid = worker.started.result(self.config.hook_timeout)
            ok, value, _ = worker.booted.result(self.config.hook_timeout)
        except BaseException as exc:
            worker.kill()
            worker.lost(LifecycleError(f"worker of {worker.agent_id!r} did not start: {exc}"))
            raise LifecycleError(f"the worker of {worker.agent_id!r} did not start: {exc}") from exc
        if not ok:
            error = _error_from_wire(value)
            worker.lost(LifecycleError(str(error)))
            raise LifecycleError(f"cannot build {cls.__qualname__} in its worker: {type(error).__name__}: {error}") from error

    def _start(
        self, cls: type[Paglet[Any]], agent_id: str, state: bytes | None, step: str, event: Any, meta: dict[str, Any], epoch: int,
        before_publish: Callable[[_Live], Any] | None = None,
    ) -> _Live:  # fmt: skip
        """Spawn, run the arrival-type hook, store the checkpoint as active, then publish the worker.

        ``before_publish`` runs before any other message can reach the worker (the durable queue
        goes first, so nothing sent meanwhile overtakes it).
        """
        worker = self._spawn(cls, agent_id, state)
        live = _Live(worker, cls, meta, epoch)
        with self._lock:
            self._starting[agent_id] = live  # the hook may already subscribe or register files
        try:
            hooked = worker.call(_F_HOOK, step, event)  # right behind BOOT: one round trip for both
            self._check_boot(worker, cls)
            _, checkpoint = worker.step_result(hooked, step, self.config.hook_timeout)
            row = _AgentRow(agent_id, worker.agent_class, "active", checkpoint, 0, meta=live.meta, epoch=epoch)
            if state is not None and checkpoint == state and step != "creation":
                self._store.set_active(row)  # the hook left the stored state as it was: no rewrite of a big blob
            else:
                self._store.put_agent(row)
            if before_publish is not None:
                before_publish(live)
        except BaseException:
            worker.end(0.2)
            raise
        finally:
            with self._lock:
                self._starting.pop(agent_id, None)
        with self._lock:
            self._live[agent_id] = live
        return live

    def _retire(self, live: _Live, grace: float, ask: bool = True) -> None:
        """End a worker the paglet has left (dispatched, deactivated, disposed).

        When the paglet itself asked (``ask=False``), its worker ends on its own once the current
        handler has replied; it is killed only if it is still there after the hook timeout.
        """
        live.leaving = True
        with self._lock:
            if self._live.get(live.worker.agent_id) is live:
                del self._live[live.worker.agent_id]
        live.worker.end(grace, ask, wait=False)  # EXIT goes now; waiting (and killing) in the background
        self._in_pool(live.worker.end, grace if ask else self.config.hook_timeout, False)

    def _on_lost(self, worker: _Worker) -> None:
        """The hub saw a worker's socket close; find out why on a pool thread."""
        try:
            self._pool.submit(self._lost, worker)
        except RuntimeError:  # the host is stopping
            worker.lost(HostError("the host stopped"))

    def _lost(self, worker: _Worker) -> None:
        live = self._live.get(worker.agent_id)
        if live is None or live.worker is not worker or live.leaving:
            worker.lost(LifecycleError(f"paglet {worker.agent_id!r} left this host"))
            return
        status = _ForkServer.shared().exit_status(worker.pid, 0.5) if worker.pid else None
        reason = worker.kill_reason or _describe_exit(status)
        error = PagletCrashedError(f"paglet {worker.agent_id!r} crashed: {reason}")
        with self._agent_lock(worker.agent_id):
            # Crashed in the database first, so a call that misses the worker does not restart it.
            with contextlib.suppress(PagletError):
                row = self._store.agent(worker.agent_id)
                if row is not None and row.status == "active":
                    row.status, row.reason = "crashed", str(error)
                    self._store.put_agent(row)
            with self._lock:
                if self._live.get(worker.agent_id) is live:
                    del self._live[worker.agent_id]
        worker.lost(error)
        self._emit("crashed", worker.agent_id, worker.agent_class, error=str(error))

    # ==== activation and deactivation ===============================================================
    def activate(self, agent_id: str) -> PagletProxy:
        """Start an inactive (or crashed) paglet from its stored state."""
        self._activate(agent_id, "activate")
        return PagletProxy(self.address, agent_id, self)

    def _activate(self, agent_id: str, reason: str) -> _Live:
        with self._agent_lock(agent_id):
            live = self._live.get(agent_id)
            if live is not None:
                return live
            row = self._store.agent(agent_id)
            if row is None or row.status in ("gone", "departing"):
                raise InvalidAgentError(f"no paglet {agent_id!r} on {self.name}")
            if "arrival" in row.meta:  # arrived inactive: its first start is its arrival
                return self._arrive_row(row)
            cls = _resolve_class(row.agent_class, "paglet", None)  # our own database names it: trusted
            event = PersistencyEvent(agent_id, self.name, self.address, reason=reason, request=row.request, policy=row.policy)
            live = self._start(cls, agent_id, row.state, "activation", event.to_wire(), row.meta, row.epoch, self._deliver_queued)
        self._emit("activated", agent_id, row.agent_class, data={"reason": reason})
        return live

    def _deliver_queued(self, live: _Live) -> None:
        """Hand the durable queue to the new worker in order.

        A queued message was acknowledged as stored, so it leaves the queue only together with the
        checkpoint of the state it produced (one transaction): a crash neither loses nor repeats it.
        """
        agent_id = live.worker.agent_id
        for seq, blob, oneway in self._store.queued(agent_id, limit=1_000_000):
            future = live.worker.post(_cbor_loads(blob, untrusted=False), oneway, True)
            live.from_queue.add(future)
            future.add_done_callback(functools.partial(self._dequeued, live, seq))

    def _in_pool(self, work: Callable[..., Any], *args: Any) -> None:
        """Run a future's follow-up (database writes) on the pool, not on the hub thread that set it."""
        with contextlib.suppress(RuntimeError):  # the host is stopping
            self._pool.submit(work, *args)

    def _dequeued(self, live: _Live, seq: int, future: _Call) -> None:
        """On the hub thread, in handling order: note the message; one drain at a time writes them."""
        live.from_queue.discard(future)
        if future.exception() is not None:
            return
        with self._lock:
            live.handled.append((seq, future.result()[2]))
            start, live.draining = not live.draining, True
        if start:
            self._in_pool(self._drain_handled, live)

    def _drain_handled(self, live: _Live) -> None:
        """Drop handled messages from the queue with the newest checkpoint, batch by batch, in order.

        The checkpoint after a message includes every message handled before it, so a batch is
        dropped together with the last checkpoint in it, in one transaction.
        """
        while True:
            with self._lock:
                batch, live.handled = live.handled, []
                if not batch:
                    live.draining = False
                    return
            states = [state for _, state in batch if state is not None]
            with contextlib.suppress(PagletError):
                self._store.dequeue([seq for seq, _ in batch], live.worker.agent_id, *(states[-1] if states else (None, 0)))

    def deactivate(self, agent_id: str, request: DeactivationRequest | None = None) -> PagletProxy:
        """Store a paglet and end its worker; its policy (from ``deactivation_policy``) says what wakes it."""
        request = request or DeactivationRequest()
        with self._agent_lock(agent_id):
            live = self._require_live(agent_id, inactive_ok=True)
            if live is None:
                return PagletProxy(self.address, agent_id, self)
            with live.worker.hold(self.config.hook_timeout):
                policy_tree, state = live.worker.step("deactivating", request.to_wire(), self.config.hook_timeout)
                policy = DeactivationPolicy.from_wire(policy_tree)
                self._store_inactive(live, state, request, policy)
        return PagletProxy(self.address, agent_id, self)

    def _store_inactive(self, live: _Live, state: Any, request: DeactivationRequest, policy: DeactivationPolicy, ask: bool = True) -> None:
        """The paglet is asleep: row inactive (durable), unsent messages to the durable queue, worker ended."""
        agent_id = live.worker.agent_id
        if request.reason == "shutdown":
            policy = dataclasses.replace(policy, activate_on_startup=True)
        reason = "shutdown" if request.reason == "shutdown" else "deactivate"
        row = _AgentRow(
            agent_id, live.worker.agent_class, "inactive", state, 0, policy, request, reason, live.meta, epoch=live.epoch
        )
        self._store.put_agent(row)
        self._requeue(live, policy)
        self._retire(live, self.config.stop_grace, ask)
        self._tick.set()
        self._emit("deactivated", agent_id, live.worker.agent_class, data={"reason": request.reason})

    def _requeue(self, live: _Live, policy: DeactivationPolicy) -> None:
        """Messages that were waiting for a leaving worker go to the durable queue (or fail fast).

        Those that came from the durable queue are still in it: they stay where they are.
        """
        for message, oneway, future in live.worker.take_queue():
            if future in live.from_queue:
                future.set_exception(PagletInactiveError("back to the durable queue"))  # _dequeued leaves its row
            elif policy.queue_messages_when_inactive:
                self._store.enqueue(live.worker.agent_id, _cbor_dumps(message), oneway)
                future.set_result((True, None if oneway else {"queued": True, "message_id": message.get("message_id")}, None))
            else:
                future.set_exception(PagletInactiveError(f"paglet {live.worker.agent_id!r} was deactivated"))

    def _deactivate_for_shutdown(self, agent_id: str, request: DeactivationRequest) -> None:
        """Shutdown must not lose a paglet: if its hooks fail, its last checkpoint is kept for restart."""
        try:
            self.deactivate(agent_id, request)
        except Exception as exc:
            _log.warning("deactivating %s for shutdown failed (%s); its last checkpoint is kept", agent_id, exc)
            live = self._live.get(agent_id)
            row = self._store.agent(agent_id)
            if row is not None and row.status == "active":
                row.status, row.reason = "inactive", "shutdown"
                row.policy = DeactivationPolicy(activate_on_startup=True)
                self._store.put_agent(row)
            if live is not None:
                self._retire(live, 0.2)

    def _start_stored(self, agent_id: str, row: _AgentRow | None) -> _Live | None:
        """A paglet known only to the database: start it if it should run (it arrived, or it was
        active when the host died), refuse it if it is not here; None if it is inactive."""
        if row is None or row.status in ("gone", "departing"):
            moved = f" (it moved to {row.forward_url})" if row is not None and row.forward_url else ""
            raise InvalidAgentError(f"no paglet {agent_id!r} on {self.name}{moved}")
        if row.status == "crashed":
            raise PagletCrashedError(row.reason or f"paglet {agent_id!r} crashed")
        if row.status == "arriving":
            return self._arrive(agent_id)
        if row.status == "active":  # restored lazily after a crash of the host
            return self._activate(agent_id, "recover")
        return None

    def _check_known(self, agent_id: str) -> None:
        """That a paglet lives here (starting, running, or stored), without waking or waiting for it.

        Context calls made from a paglet's own hooks use this: its start holds its lock.
        """
        if agent_id in self._live or agent_id in self._starting:
            return
        row = self._store.agent(_check_agent_id(agent_id))
        if row is None or row.status in ("gone", "departing"):
            raise InvalidAgentError(f"no paglet {agent_id!r} on {self.name}")

    def _require_live(self, agent_id: str, inactive_ok: bool = False, wake: bool = False) -> _Live | None:
        """The running paglet; an inactive one is None (inactive_ok), started (wake) or an error."""
        live = self._live.get(agent_id)
        if live is not None:
            return live
        live = self._start_stored(agent_id, self._store.agent(_check_agent_id(agent_id)))
        if live is not None:
            return live
        if inactive_ok:
            return None
        if wake:
            return self._activate(agent_id, "activate")
        raise PagletInactiveError(f"paglet {agent_id!r} is inactive")

    def snapshot(self, agent_id: str) -> None:
        """Store an active paglet's current state as its checkpoint."""
        live = self._require_live(agent_id)
        assert live is not None
        self._store.checkpoint(agent_id, *self._peek(agent_id))  # the worker's own count: later checkpoints still win

    # ==== disposal ================================================================================
    def dispose(self, agent_id: str) -> None:
        """End a paglet for good: ``on_disposing`` (bounded by stop_grace), then its worker is ended."""
        with self._agent_lock(agent_id):
            live = self._live.get(agent_id)
            row = self._store.agent(_check_agent_id(agent_id)) if live is None else None
            if live is None and (row is None or row.status in ("gone", "departing")):
                raise InvalidAgentError(f"no paglet {agent_id!r} on {self.name}")
            if live is not None:
                self._dispose_live(live)
            self._forget(agent_id)
        self._emit("disposed", agent_id, live.worker.agent_class if live else row.agent_class if row else None)

    def _dispose_live(self, live: _Live) -> None:
        grace = self.config.stop_grace
        event = PersistencyEvent(live.worker.agent_id, self.name, self.address, reason="dispose")
        try:
            with live.worker.hold(grace):
                live.worker.step("disposing", event.to_wire(), grace)
        except PagletError as exc:
            self._emit("dispose-hook-failed", live.worker.agent_id, live.worker.agent_class, error=str(exc))
        self._fail_queue(live, InvalidAgentError(f"paglet {live.worker.agent_id!r} was disposed"))
        self._retire(live, grace)

    def _fail_queue(self, live: _Live, error: PagletError) -> None:
        for _, _, future in live.worker.take_queue():
            future.set_exception(error)

    def _forget(self, agent_id: str) -> None:
        self._store.delete_agent(agent_id)
        self._files.drop_agent(agent_id)
        with self._lock:
            self._agent_locks.pop(agent_id, None)

    # ==== messages ==================================================================================
    def deliver_message(self, agent_id: str, message: Message | str, oneway: bool = False, timeout: float | None = None) -> Any:
        """Send a message to a paglet here and wait for (and decode) the reply."""
        reply = self.deliver_tree(agent_id, _as_message(message), oneway=oneway, timeout=timeout)
        return None if oneway else _wire_decode(reply, self.resolve)

    def deliver_tree(self, agent_id: str, message: Message, oneway: bool = False, timeout: float | None = None) -> Any:
        """Deliver and return the reply as a wire tree (not decoded)."""
        live = self._live.get(agent_id)
        try:
            return self._deliver_to(live, agent_id, message, oneway, timeout) if live else self._deliver_slow(agent_id, message, oneway, timeout)
        except _WorkerLeaving:  # it was being deactivated or moved: route again, after that is done
            return self._deliver_slow(agent_id, message, oneway, timeout)

    def _deliver_slow(self, agent_id: str, message: Message, oneway: bool, timeout: float | None) -> Any:
        """A paglet that is not running here: wake it, queue the message, forward it, or refuse."""
        with self._agent_lock(_check_agent_id(agent_id)):  # waits for an activation handing over its queue
            live = self._live.get(agent_id)
            row = self._store.agent(agent_id) if live is None else None
            forward = row.forward_url if row is not None and row.status == "gone" else None
            if live is None and forward is None:
                live = self._wake_for(agent_id, row, message, oneway)
        if forward:
            return self._forward(forward, agent_id, message.to_wire(), oneway, timeout)
        if live is None:
            return None if oneway else {"queued": True, "message_id": message.message_id}
        return self._deliver_to(live, agent_id, message, oneway, timeout)

    def _deliver_to(self, live: _Live, agent_id: str, message: Message, oneway: bool, timeout: float | None) -> Any:
        checkpoint = live.cls.CHECKPOINT == "message"
        live.worker.last_used = time.monotonic()
        future = live.worker.post(message.to_wire(), oneway, checkpoint)
        if oneway:
            future.add_done_callback(functools.partial(self._oneway_done, agent_id, message.kind))
            return None
        try:
            ok, value, state = future.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"paglet {agent_id!r} did not answer {message.kind!r} within {timeout} s") from None
        live.worker.handled += 1
        if state is not None:
            self._store.checkpoint(agent_id, state[0], state[1])
        if not ok:
            raise _error_from_wire(value)
        return value

    def _oneway_done(self, agent_id: str, kind: str, future: _Call) -> None:
        """On the hub thread: a oneway message was handled; a checkpoint or an error goes to the pool."""
        if future.exception() is None:  # a crash is reported by itself
            ok, value, state = future.result()
            if state is not None or not ok:
                self._in_pool(self._oneway_after, agent_id, kind, ok, value, state)

    def _oneway_after(self, agent_id: str, kind: str, ok: bool, value: Any, state: Any) -> None:
        with contextlib.suppress(PagletError):
            if state is not None:
                self._store.checkpoint(agent_id, state[0], state[1])
            if not ok:  # nobody waits for this reply: the error goes to the event log
                error = value.get("message", "") if isinstance(value, dict) else str(value)
                kind_of = value.get("error", "") if isinstance(value, dict) else ""
                self._emit("message-failed", agent_id, data={"kind": kind}, error=f"{kind_of}: {error}")

    def _wake_for(self, agent_id: str, row: _AgentRow | None, message: Message, oneway: bool) -> _Live | None:
        """A message for a paglet that is not running: activate it, queue the message, or refuse."""
        if agent_id in self._residents and (row is None or row.status in ("inactive", "crashed")):
            return self._wake_resident(agent_id, "message")
        live = self._start_stored(agent_id, row)
        if live is not None or row is None:
            return live
        policy = row.policy or DeactivationPolicy()
        if policy.activate_on_message:
            return self._activate(agent_id, "message")
        if not policy.queue_messages_when_inactive:
            raise PagletInactiveError(f"paglet {agent_id!r} is inactive and its policy refuses messages")
        self._store.enqueue(agent_id, _cbor_dumps(message.to_wire()), oneway)
        self._emit("message-queued", agent_id, row.agent_class, message_id=message.message_id)
        return None

    def multicast_message(self, kind: str | Message, args: dict[str, Any] | None = None, exclude: Iterable[str] | None = None) -> ReplySet:
        """Send to every active paglet here that subscribed to the kind; the replies come in a ReplySet."""
        message = _as_message(kind, args)
        skip = set(exclude or ())
        targets = [agent_id for agent_id in self.subscribers(message.kind) if agent_id not in skip]
        return ReplySet(self.send_future(self.address, agent_id, Message.from_wire(message.to_wire())) for agent_id in targets)

    def subscribers(self, kind: str) -> list[str]:
        """Active paglets subscribed to a message kind."""
        with self._lock:
            return [agent_id for agent_id, live in self._live.items() if kind in live.meta.get("subscriptions", ())]

    def subscribe_message(self, agent_id: str, kind: str) -> None:
        """Subscribe a paglet to multicasts of a kind (kept while it sleeps and moves)."""
        self._update_meta(agent_id, lambda meta: meta.setdefault("subscriptions", []).append(kind)
                          if kind not in meta.get("subscriptions", []) else None)  # fmt: skip

    def unsubscribe_message(self, agent_id: str, kind: str | None = None) -> None:
        """Drop one subscription (or all, with None)."""
        self._update_meta(agent_id, lambda meta: meta.__setitem__(
            "subscriptions", [k for k in meta.get("subscriptions", []) if kind is not None and k != kind]))  # fmt: skip

    def _update_meta(self, agent_id: str, change: Callable[[dict[str, Any]], Any]) -> None:
        with self._lock:
            starting = self._starting.get(agent_id)
            if starting is not None:  # stored with the paglet's first checkpoint
                change(starting.meta)
                return
        live = self._require_live(agent_id)
        assert live is not None
        with self._lock:
            change(live.meta)
        self._store.set_meta(agent_id, live.meta)

    def wait_message(self, agent_id: str, timeout: float | None = None) -> bool:
        """Only a paglet's own handler can wait for messages (inside its worker)."""
        raise LifecycleError("wait_message() works only inside a paglet's handler")

    def notify_message(self, agent_id: str, everyone: bool = False) -> None:
        """Only a paglet's own handlers can be notified (inside its worker)."""
        raise LifecycleError("notify_message() works only inside a paglet")

    # ==== the _Transport of proxies ===================================================================
    def is_local_url(self, host_url: str) -> bool:
        """Whether a URL names this host."""
        return _normalize_url(host_url) == self.address

    def proxy_for(self, host_url: str, agent_id: str) -> PagletProxy:
        """A proxy through this host (local paglets directly, remote ones over HTTP)."""
        return PagletProxy(host_url, agent_id, self)

    def send_message(self, host_url: str, agent_id: str, message: Message, *, oneway: bool = False, timeout: float | None = None) -> Any:
        """Send to a paglet here or on another host; returns the decoded reply."""
        if self.is_local_url(host_url):
            return self.deliver_message(agent_id, message, oneway=oneway, timeout=timeout)
        return self.client.send_message(host_url, agent_id, message, oneway=oneway, timeout=timeout)

    def send_future(self, host_url: str, agent_id: str, message: Message, *, timeout: float | None = None) -> FutureReply:
        """Send and return at once; local messages need no extra thread."""
        if not self.is_local_url(host_url):
            return self.client.send_future(host_url, agent_id, message, timeout=timeout)
        live = self._live.get(agent_id)
        if live is None or live.cls.CHECKPOINT == "message":
            return FutureReply(self._pool.submit(self.deliver_message, agent_id, message, False, timeout))
        decoded: Future[Any] = Future()
        try:
            call = live.worker.post(message.to_wire(), False, False)
        except _WorkerLeaving:
            return FutureReply(self._pool.submit(self.deliver_message, agent_id, message, False, timeout))
        call.add_done_callback(functools.partial(self._decode_reply, decoded))
        return FutureReply(decoded)

    def _decode_reply(self, decoded: Future[Any], future: _Call) -> None:
        try:
            ok, value, _ = future.result()
            if not ok:
                raise _error_from_wire(value)
            decoded.set_result(_wire_decode(value, self.resolve))
        except BaseException as exc:
            decoded.set_exception(exc)

    def agent_op(self, host_url: str, agent_id: str, op: str, arg: Any = None) -> PagletProxyRef | None:
        """Lifecycle calls of proxies: dispatch, clone, retract, deactivate, activate, dispose."""
        if not self.is_local_url(host_url):
            if op == "retract":
                return self.retract(host_url, agent_id).ref()
            return self.client.agent_op(host_url, agent_id, op, arg)
        if op == "dispose":
            self.dispose(agent_id)
            return None
        if op == "retract":
            target = arg.destination if isinstance(arg, TransferTicket) else arg
            if not isinstance(target, str):
                raise SerializationError("retract needs the URL of the host to return to")
            return self._send_away(agent_id, TransferTicket(self.mesh.resolve_url(target)), "retract").ref()
        method = {"dispatch": self.dispatch, "clone": self.clone, "deactivate": self.deactivate, "activate": self.activate}
        if op not in method:
            raise LifecycleError(f"unknown operation {op!r}")
        proxy = method[op](agent_id) if op == "activate" else method[op](agent_id, arg)  # type: ignore[operator]
        return proxy.ref()

    def agent_info(self, host_url: str, agent_id: str) -> dict[str, Any]:
        """Info map of a paglet here or elsewhere; InvalidAgentError if unknown."""
        if not self.is_local_url(host_url):
            return self.client.agent_info(host_url, agent_id)
        info = self._info(_check_agent_id(agent_id))
        if not info or info.get("status") in ("gone", "departing"):
            raise InvalidAgentError(f"no paglet {agent_id!r} on {self.name}")
        return info

    # ==== movement ===================================================================================
    def dispatch(self, agent_id: str, target: str | TransferTicket) -> PagletProxy:
        """Move a paglet to another host (URL, host name or ticket); it arrives exactly once."""
        ticket = self._ticket(target)
        return self._send_away(agent_id, ticket, "dispatch")

    def clone(self, agent_id: str, target: str | TransferTicket | None = None) -> PagletProxy:
        """Copy a paglet, here (no target) or on another host; returns the copy's proxy."""
        ticket = self._ticket(target) if target is not None else TransferTicket(self.address)
        with self._agent_lock(agent_id):
            live = self._require_live(agent_id)
            assert live is not None
            clone_id = _new_id()
            target_ref = self._target(ticket)
            event = self._clone_event(agent_id, clone_id, target_ref)
            with live.worker.hold(self.config.hook_timeout):
                _, state = live.worker.step("cloning", event.to_wire(), self.config.hook_timeout)
                proxy = self._place_clone(live, clone_id, state, ticket, target_ref, event)
                live.worker.step("cloned", event.to_wire(), self.config.hook_timeout)
        return proxy

    def retract(self, remote_url: str, agent_id: str) -> PagletProxy:
        """Bring a paglet on another host back here (``on_reverting`` there, ``on_arrival`` here)."""
        ref = self.client.agent_op(self.mesh.resolve_url(remote_url), agent_id, "retract", self.address)
        return PagletProxy(ref.host_url if ref else self.address, agent_id, self)

    def _ticket(self, target: Any) -> TransferTicket:
        if isinstance(target, TransferTicket):
            return dataclasses.replace(target, destination=self.mesh.resolve_url(target.destination))
        if isinstance(target, dict):
            ticket = TransferTicket.from_wire(target)
            return dataclasses.replace(ticket, destination=self.mesh.resolve_url(ticket.destination))
        if not isinstance(target, str) or not target:
            raise SerializationError("a move needs a target: a URL, a host name or a TransferTicket")
        return TransferTicket(self.mesh.resolve_url(target))

    def _target(self, ticket: TransferTicket) -> HostRef:
        if self.is_local_url(ticket.destination):
            return self._self_ref()
        try:
            return self.mesh.check_target(ticket.destination, ticket)
        except (RemoteHostError, TimeoutError) as exc:
            raise TransferError(f"cannot move to {ticket.destination}: {exc}") from exc

    def _clone_event(self, agent_id: str, clone_id: str, target: HostRef) -> CloneEvent:
        return CloneEvent(
            agent_id, self.name, self.address, source_agent_id=agent_id, clone_agent_id=clone_id,
            source_host_name=self.name, source_host_address=self.address, target_host_name=target.name,
            target_host_address=target.url,
        )  # fmt: skip

    def _mobility_event(self, agent_id: str, target: HostRef, reason: str) -> MobilityEvent:
        return MobilityEvent(
            agent_id, self.name, self.address, source_host_name=self.name, source_host_address=self.address,
            target_host_name=target.name, target_host_address=target.url, reason=reason,
        )  # fmt: skip

    def _place_clone(
        self, live: _Live, clone_id: str, state: bytes, ticket: TransferTicket, target: HostRef, event: CloneEvent
    ) -> PagletProxy:
        """Start the copy here, or hand it to another host (exactly once, like a dispatch)."""
        meta = {"created_at": time.time(), "cloned_from": live.worker.agent_id, "subscriptions": list(live.meta.get("subscriptions", []))}
        if target.url == self.address:
            meta["files"] = self._copy_files(live.meta.get("files", []), clone_id)
            self._start(live.cls, clone_id, state, "clone", event.to_wire(), meta, 0)
        else:
            meta["files"] = live.meta.get("files", [])
            self._handoff(live, state, ticket, target, "clone", clone_id, 1, meta)
        self._emit("cloned", live.worker.agent_id, live.worker.agent_class, data={"clone": clone_id, "to": target.url})
        return PagletProxy(target.url, clone_id, self)

    def _copy_files(self, files: list[dict[str, Any]], agent_id: str) -> list[dict[str, Any]]:
        """A local clone gets its own copies of the registered files."""
        copies = []
        for item in files:
            ref = PagletFileRef.from_wire(item)
            target = self._files.file_target(agent_id, ref.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ref.current_path, target)
            copies.append(dataclasses.replace(ref, current_path=str(target), mode="copy").to_wire())
        return copies

    def _send_away(self, agent_id: str, ticket: TransferTicket, reason: str) -> PagletProxy:
        """Dispatch (or retract) a paglet: its hook, the exactly-once handoff, then its worker ends."""
        with self._agent_lock(agent_id):
            live = self._require_live(agent_id, wake=True)
            assert live is not None
            target = self._target(ticket)
            if target.url == self.address:
                return PagletProxy(self.address, agent_id, self)  # already here
            event = self._mobility_event(agent_id, target, reason)
            with live.worker.hold(self.config.hook_timeout):
                step = "dispatching" if reason == "dispatch" else "reverting"
                _, state = live.worker.step(step, event.to_wire(), self.config.hook_timeout)
                self._handoff(live, state, ticket, target, reason, agent_id, live.epoch + 1, live.meta)
                self._depart(live, target.url, ask=True)
        return PagletProxy(target.url, agent_id, self)

    # ==== the exactly-once handoff ======================================================================
    # 1. Source: no other message reaches the worker, and its state was captured with the hook.  Files
    #    go first, as artifacts addressed by SHA-256.  One durable commit marks the paglet DEPARTING
    #    with a new transfer id (tid) and epoch + 1; nothing is sent before that commit.
    # 2. The envelope goes to POST /transfers; a retry reuses the tid.
    # 3. Target, in one durable transaction keyed by tid, stores the paglet and answers "accepted"
    #    (again, for a retry) or "refused"; only after that commit does its worker start.
    # 4. Source, on "accepted": the paglet is GONE here (a tombstone that forwards messages).
    # 5. Source, on failure: it asks the target to abort tid.  "refused" (committed there) lets the
    #    paglet run here again; "accepted" means it arrived after all.  With no answer the move is in
    #    doubt and the paglet runs nowhere until the target answers (asked again in the background
    #    and at every start of this host).
    def _handoff(
        self, live: _Live, state: bytes, ticket: TransferTicket, target: HostRef, kind: str, agent_id: str, epoch: int,
        meta: dict[str, Any],
    ) -> None:  # fmt: skip
        files = [self._upload_file(item, target.url, agent_id) for item in meta.get("files", [])]
        tid = _new_id()
        envelope = {
            "tid": tid, "kind": kind, "agent_id": agent_id, "agent_class": live.worker.agent_class, "epoch": epoch,
            "source_agent_id": live.worker.agent_id, "source_name": self.name, "source_url": self.address,
            "arrival_mode": ticket.arrival_mode.value, "meta": {**meta, "files": files}, "state": state,
        }  # fmt: skip
        self._crash_point("before-begin")
        self._store.begin_departure(tid, agent_id, target.url, epoch, state, kind)
        outcome, error, unsent = self._send_envelope(target.url, envelope, ticket)
        if outcome is None:
            outcome = self._ask_abort(target.url, tid, agent_id, epoch, unsent)
        if outcome is None:
            self._emit("transfer-in-doubt", agent_id, live.worker.agent_class, error=str(error), data={"tid": tid, "to": target.url})
            if kind != "clone":
                self._retire(live, self.config.stop_grace)  # it may be running there: it must not run here too
            raise TransferError(f"moving {agent_id!r} to {target.url} is in doubt ({error}); it is resolved when that host answers")
        self._store.end_departure(tid, outcome)
        if outcome != "accepted":
            raise TransferError(f"{target.url} did not take {agent_id!r}: {error or 'refused'}")
        self._emit("dispatched" if kind != "clone" else "clone-sent", agent_id, live.worker.agent_class, data={"to": target.url})
        for item in meta.get("files", []):
            if kind != "clone" and item.get("mode") == "move":
                with contextlib.suppress(OSError):
                    os.unlink(item["current_path"])

    def _upload_file(self, item: dict[str, Any], url: str, agent_id: str) -> dict[str, Any]:
        """A registered file goes ahead of its paglet (skipped if the target already has that content)."""
        ref = PagletFileRef.from_wire(item)
        digest, size = _sha256_file(Path(ref.current_path))
        known = [a for a in self.client.artifacts(url, digest) if a.owner_agent_id == agent_id]  # an earlier try of ours
        artifact = known[0] if known else self.client.upload_artifact(
            ref.current_path, host_url=url, name=ref.name, owner_agent_id=agent_id, sha256=digest, expires_at=time.time() + 86400
        )  # fmt: skip
        return {**dataclasses.replace(ref, sha256=digest, size=size).to_wire(), "artifact_id": artifact.artifact_id}

    def _send_envelope(self, url: str, envelope: dict[str, Any], ticket: TransferTicket) -> tuple[str | None, Exception | None, bool]:
        """Step 2: (outcome or None, last error, whether nothing was ever sent)."""
        error: Exception | None = None
        unsent = True
        for attempt in range(ticket.retries + 1):
            if attempt:
                time.sleep(ticket.retry_interval)  # back off before the same tid goes again
            try:
                self._crash_point("before-send")
                tree = self.client.call("POST", url, "/transfers", envelope, timeout=ticket.timeout)
                self._crash_point("after-send")
                return str(tree["status"]), None, False
            except _Unreachable as exc:
                error = exc
            except (PagletError, TimeoutError, KeyError, TypeError) as exc:
                error, unsent = exc, False
        return None, error, unsent

    def _ask_abort(self, url: str, tid: str, agent_id: str, epoch: int, unsent: bool) -> str | None:
        """Step 5: "accepted" or "refused" as the target says; None when it cannot be asked."""
        body = {"agent_id": agent_id, "source_url": self.address, "epoch": epoch}
        try:
            tree = self.client.call("POST", url, f"/transfers/{tid}/abort", body, timeout=5.0)
            return str(tree["status"])
        except (PagletError, TimeoutError, KeyError, TypeError):
            return "refused" if unsent else None  # never sent: it cannot be there

    def _depart(self, live: _Live, url: str, ask: bool) -> None:
        """After step 4: messages waiting for the paglet follow it; its worker and files here go."""
        agent_id = live.worker.agent_id
        for message, oneway, future in live.worker.take_queue():
            self._pool.submit(self._forward_into, future, url, agent_id, message, oneway)
        self._retire(live, self.config.stop_grace, ask)
        self._files.drop_agent(agent_id)
        self._store.delete_services(agent_id)

    def _forward_into(self, future: _Call, url: str, agent_id: str, message: dict[str, Any], oneway: bool) -> None:
        try:
            future.set_result((True, self._forward(url, agent_id, message, oneway, self.config.call_timeout), None))
        except BaseException as exc:
            future.set_exception(exc)

    def _forward(self, url: str, agent_id: str, message: dict[str, Any], oneway: bool, timeout: float | None) -> Any:
        """Pass a message on to the host a paglet moved to; returns the reply tree."""
        body = {**message, "oneway": oneway}
        tree = self.client.call("POST", url, f"/agents/{agent_id}/messages", body, timeout=(timeout or self.config.call_timeout) + 5)
        return None if oneway else tree.get("reply")

    def _crash_point(self, step: str) -> None:
        """In test mode only: die here, as a power cut would, so tests can prove exactly-once.

        Steps: before-begin, before-send, after-send (source); before-accept, after-accept (target).
        """
        if os.environ.get(ENV_TEST_MODE) == "1" and os.environ.get(ENV_CRASH_AT) == step:
            os._exit(86)

    def resolve_transfers(self) -> None:
        """Ask about every move that is still in doubt; a refused one runs here again."""
        for tid, agent_id, url, kind, epoch in self._store.open_departures():
            outcome = self._ask_abort(url, tid, agent_id, epoch, unsent=False)
            if outcome is None:
                continue
            self._store.end_departure(tid, outcome)
            self._emit("transfer-resolved", agent_id, data={"tid": tid, "outcome": outcome, "to": url})
            if outcome == "refused" and kind != "clone" and agent_id not in self._live:
                self._activate_quietly(agent_id, "recover")

    # ==== arrivals (the target's side) =====================================================================
    def receive_transfer(self, envelope: Any) -> str:
        """Step 3 on this host: check the envelope, store the paglet under its tid, start it."""
        env = _http_map(envelope, "tid", "kind", "agent_id", "agent_class", "epoch", "state", "source_url")
        kind, tid = env["kind"], env["tid"]
        if kind not in ("dispatch", "clone", "retract") or not isinstance(tid, str) or not _AGENT_ID.fullmatch(tid):
            raise SerializationError("bad transfer kind or id")
        agent_id = _check_agent_id(env["agent_id"])
        cls = _resolve_class(env["agent_class"], "paglet", self.config.allow_modules)
        state, epoch, source = env["state"], env["epoch"], _normalize_url(str(env["source_url"]))
        if not isinstance(state, bytes) or type(epoch) is not int:
            raise SerializationError("the envelope's state must be bytes and its epoch an integer")
        _cbor_check(state)
        _wire_decode(_cbor_loads(state, untrusted=True), self.resolve)  # every class it names must be allowed here
        meta = self._arrival_meta(env, agent_id, cls, source)
        inactive = env.get("arrival_mode") == ArrivalMode.INACTIVE.value
        row = _AgentRow(
            agent_id, _qualified_name(cls), "inactive" if inactive else "arriving", state, 0,
            DeactivationPolicy() if inactive else None, DeactivationRequest(reason="arrival", source="transfer") if inactive else None,
            "arrival" if inactive else None, meta, epoch=epoch,
        )  # fmt: skip
        self._crash_point("before-accept")
        outcome = self._store.accept_arrival(tid, row, source)
        self._crash_point("after-accept")
        if outcome == "accepted" and not inactive:
            self._pool.submit(self._arrive_quietly, agent_id)
        self._emit("transfer-" + outcome, agent_id, row.agent_class, data={"tid": tid, "from": source, "kind": kind})
        return outcome

    def _arrival_meta(self, env: dict[str, Any], agent_id: str, cls: type, source: str) -> dict[str, Any]:
        """What an envelope says besides the state, checked: it came from the network."""
        given = env.get("meta") or {}
        subscriptions, items = given.get("subscriptions", []) if isinstance(given, dict) else None, given.get("files", [])
        if not isinstance(subscriptions, list) or not all(isinstance(k, str) for k in subscriptions) or not isinstance(items, list):
            raise SerializationError("the envelope's meta must hold a list of subscriptions and a list of files")
        files = []
        for item in items[:1000]:
            if not isinstance(item, dict):
                raise SerializationError("each travelling file must be a map")
            ref = PagletFileRef.from_wire({k: v for k, v in item.items() if k != "artifact_id"})
            _safe_file_name(ref.name)
            if ref.mode not in ("copy", "move"):
                raise SerializationError(f"file {ref.name!r}: mode must be copy or move")
            artifact = self._artifacts.ref(_check_agent_id(item.get("artifact_id"), "artifact"))
            if artifact.sha256 != ref.sha256:
                raise RequestError(f"file {ref.name!r} of {agent_id!r} has not arrived intact", 409)
            files.append({**ref.to_wire(), "artifact_id": artifact.artifact_id})
        if env["kind"] == "clone":
            event: PagletEvent = CloneEvent(
                agent_id, self.name, self.address, source_agent_id=str(env.get("source_agent_id", "")), clone_agent_id=agent_id,
                source_host_name=str(env.get("source_name", "")), source_host_address=source,
                target_host_name=self.name, target_host_address=self.address,
            )  # fmt: skip
        else:
            event = MobilityEvent(
                agent_id, self.name, self.address, source_host_name=str(env.get("source_name", "")), source_host_address=source,
                target_host_name=self.name, target_host_address=self.address, reason=env["kind"],
            )  # fmt: skip
        step = "clone" if env["kind"] == "clone" else "arrival"
        return {"subscriptions": subscriptions, "files": files, "arrival": {"step": step, "event": event.to_wire()}}

    def abort_transfer(self, tid: str, agent_id: str, source: str, epoch: int = 0) -> str:
        """Step 5 on this host: "accepted" if the paglet arrived, else a durable refusal."""
        if not _AGENT_ID.fullmatch(tid) or type(epoch) is not int:
            raise SerializationError("bad transfer id or epoch")
        return self._store.abort_arrival(tid, _check_agent_id(agent_id), _normalize_url(source), epoch)

    def _arrive(self, agent_id: str) -> _Live:
        """Start a paglet that arrived: its files land first, then on_arrival / on_clone runs."""
        with self._agent_lock(agent_id):
            live = self._live.get(agent_id)
            if live is not None:
                return live
            row = self._store.agent(agent_id)
            if row is None or "arrival" not in row.meta:
                return self._activate(agent_id, "recover")
            return self._arrive_row(row)

    def _arrive_row(self, row: _AgentRow) -> _Live:
        """Under the paglet's lock: land its files, run its arrival hook, hand it its queue."""
        arrival = row.meta.pop("arrival", {})
        row.meta["files"] = [self._land_file(row.agent_id, item) for item in row.meta.get("files", [])]
        cls = _resolve_class(row.agent_class, "paglet", None)  # accepted into our own database: trusted
        step, event = arrival.get("step", "arrival"), arrival.get("event")
        live = self._start(cls, row.agent_id, row.state, step, event, row.meta, row.epoch, self._deliver_queued)
        self._emit("arrived", row.agent_id, row.agent_class)
        return live

    def _land_file(self, agent_id: str, item: dict[str, Any]) -> dict[str, Any]:
        ref = PagletFileRef.from_wire({k: v for k, v in item.items() if k != "artifact_id"})
        target = self._files.file_target(agent_id, ref.name)
        if "artifact_id" in item:
            with contextlib.suppress(_NoSuchArtifact):  # landed before a crash: the file is there already
                self._artifacts.save(item["artifact_id"], target)
                self._artifacts.delete(item["artifact_id"])
        return dataclasses.replace(ref, current_path=str(target), updated_at=time.time()).to_wire()

    def _arrive_quietly(self, agent_id: str) -> None:
        try:
            self._arrive(agent_id)
        except PagletError as exc:
            _log.warning("arrival of %s failed: %s", agent_id, exc)
            self._emit("arrival-failed", agent_id, error=str(exc))

    # ==== artifacts ======================================================================================
    def upload_artifact(self, path: Path | str, *, host_url: str | None = None, **meta: Any) -> ArtifactRef:
        """Store a file as an artifact here (or, with host_url, on another host)."""
        if host_url and not self.is_local_url(host_url):
            return self.client.upload_artifact(path, host_url=self.mesh.resolve_url(host_url), **meta)
        owner = meta.pop("owner_agent_id", "") or ""
        return self._artifacts.put_file(path, owner=owner, **meta)

    def download_artifact(self, ref: ArtifactRef, target: Path | str, move: bool = False) -> ArtifactRef:
        """Copy an artifact into a file (from whichever host holds it), checking its SHA-256."""
        if not self.is_local_url(ref.host_url):
            return self.client.download_artifact(ref, target, move)
        self._artifacts.save(ref.artifact_id, target)
        if move:
            self._artifacts.delete(ref.artifact_id)
        return ref

    def delete_artifact(self, ref: ArtifactRef) -> None:
        """Delete an artifact on the host that holds it."""
        if not self.is_local_url(ref.host_url):
            self.client.delete_artifact(ref)
            return
        self._artifacts.delete(ref.artifact_id)

    def list_artifacts(self) -> list[ArtifactRef]:
        """Artifacts stored on this host."""
        return self._artifacts.list()

    # ==== events, properties, mesh, services ===========================================================
    def _emit(self, kind: str, agent_id: str | None = None, class_name: str | None = None, *, message_id: str | None = None,
              service_name: str | None = None, data: dict[str, Any] | None = None, error: str | None = None) -> None:  # fmt: skip
        body = {
            "kind": kind, "host_name": self.name, "host_address": self.address, "timestamp": time.time(),
            "agent_id": agent_id, "class_name": class_name, "message_id": message_id, "service_name": service_name,
            "data": _wire_encode(data or {}, "data"), "error": error,
        }  # fmt: skip
        try:
            event_id = self._store.add_event(body)
        except PagletError as exc:
            _log.warning("event %s not stored: %s", kind, exc)
            return
        if self._listeners:
            event = ContextEvent.from_wire({"event_id": event_id, **body})
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    _log.exception("event listener %r failed", listener)

    def add_listener(self, listener: Callable[[ContextEvent], Any]) -> None:
        """Call ``listener(event)`` for every new ContextEvent (on the thread that caused it)."""
        with self._lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[ContextEvent], Any]) -> None:
        """Stop calling a listener."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def list_events(self, since: int = 0, limit: int = 100) -> list[ContextEvent]:
        """Events after ``since``, oldest first (ids keep increasing across restarts)."""
        return [ContextEvent.from_wire({"event_id": event_id, **body}) for event_id, body in self._store.events(since, limit)]

    def get_property(self, key: str, default: Any = None) -> Any:
        """A host property (persisted)."""
        return self._store.properties().get(key, default)

    def set_property(self, key: str, value: Any) -> None:
        """Set a host property (persisted; None deletes it)."""
        _wire_encode(value, key)
        self._store.set_property(key, value)

    def _self_ref(self) -> HostRef:
        counts = self._store.count_agents()
        return HostRef(
            name=self.name, url=self.address, code_version=self.config.code_version, online=True, last_seen=time.time(),
            active_count=len(self._live), inactive_count=counts.get("inactive", 0), tags=self.config.tags,
            properties={k: v for k, v in self._store.properties().items() if isinstance(v, (str, int, float, bool))},
            mesh_version=self.config.mesh_version,
        )  # fmt: skip

    def resolve_url(self, name_or_url: str) -> str:
        """The URL of a host given by name or URL."""
        return self.mesh.resolve_url(name_or_url)

    def available_hosts(self, online_only: bool = True, include_self: bool = True) -> list[HostRef]:
        """Hosts of the mesh this host knows."""
        return self.mesh.hosts(online_only, include_self)

    def host_status(self, name_or_url: str) -> HostRef | None:
        """What this host knows of another."""
        return self.mesh.lookup(name_or_url)

    def wait_for_host(self, name_or_url: str, timeout: float = 10.0) -> HostRef:
        """Wait until a host is known and online."""
        return self.mesh.wait_for_host(name_or_url, timeout)

    def advertise_service(self, agent_id: str, name: str, capabilities: Iterable[str] = (), metadata: dict[str, Any] | None = None,
                          scope: ServiceScope | str = ServiceScope.LOCAL, ttl: float | None = None) -> ServiceRecord:  # fmt: skip
        """Advertise a service offered by a paglet of this host."""
        self._check_known(agent_id)
        record = ServiceRecord(
            name, agent_id, self.address, tuple(capabilities), dict(metadata or {}), ServiceScope(scope),
            None if ttl is None else time.time() + float(ttl),
        )  # fmt: skip
        self._store.put_service(record)
        self._emit("service-advertised", agent_id, service_name=name)
        return record

    def unadvertise_service(self, agent_id: str, name: str) -> list[ServiceRecord]:
        """Withdraw a service of a paglet."""
        return self._store.delete_services(agent_id, name)

    def lookup_services(self, name: str | None = None, capability: str | None = None,
                        scope: ServiceScope | str = ServiceScope.LOCAL) -> list[ServiceRecord]:  # fmt: skip
        """Services by name and capability, on this host (LOCAL) or on every compatible host (MESH).

        A mesh lookup asks every online compatible host at once and waits at most
        ``mesh_lookup_timeout``; hosts that do not answer in time are left out.
        """
        records = [r for r in self._store.services(name) if capability is None or capability in r.capabilities]
        if ServiceScope(scope) is ServiceScope.LOCAL:
            return records
        peers = [h for h in self.mesh.hosts(online_only=True, include_self=False) if h.compatible]
        timeout = self.config.mesh_lookup_timeout
        asks = [self._pool.submit(self.client.services, h.url, name, capability, "mesh", timeout=timeout) for h in peers]
        done, _ = concurrent.futures.wait(asks, timeout=timeout + 0.5)
        seen = {(r.host_url, r.agent_id, r.name) for r in records}
        for ask in done:
            for record in ask.result() if ask.exception() is None else []:
                if (record.host_url, record.agent_id, record.name) not in seen and record.scope is ServiceScope.MESH:
                    seen.add((record.host_url, record.agent_id, record.name))
                    records.append(record)
        return records

    def lease_service(self, host_url: str, agent_id: str, ttl: float) -> tuple[str, float]:
        """Keep a provider (here or elsewhere) running for ``ttl`` seconds; returns (lease id, expiry)."""
        if not self.is_local_url(host_url):
            return self.client.lease_service(host_url, agent_id, ttl)
        if not 0 < float(ttl) <= 86400:
            raise ServiceContractError("a lease lasts between 0 and 86400 seconds")
        if agent_id in self._residents:
            self._wake_resident(agent_id)
        else:
            self._require_live(agent_id, wake=True)
        lease_id, expires_at = _new_id(), time.time() + float(ttl)
        with self._lock:
            self._leases[lease_id] = (agent_id, expires_at)
        return lease_id, expires_at

    def release_lease(self, host_url: str, lease_id: str) -> None:
        """End a lease early."""
        if not self.is_local_url(host_url):
            self.client.release_lease(host_url, lease_id)
            return
        with self._lock:
            self._leases.pop(lease_id, None)

    def _leased(self, agent_id: str) -> bool:
        now = time.time()
        with self._lock:
            for lease_id, (_, expires_at) in list(self._leases.items()):
                if expires_at <= now:
                    del self._leases[lease_id]
            return any(owner == agent_id for owner, _ in self._leases.values())

    # ==== resident services ===============================================================================
    def _install_resident(self, spec: ResidentService) -> None:
        """Advertise a resident service now; start it now if eager."""
        try:
            cls = _resolve_class(spec.cls, "paglet", None) if isinstance(spec.cls, str) else spec.cls  # the operator's own config
            self._check_paglet_class(cls)
            contract = spec.contract or getattr(cls, "CONTRACT", None)
            name = spec.service or (contract.name if contract else _qualified_name(cls))
            metadata = {CONTRACT_METADATA_KEY: contract.metadata(), "resident": spec.lifecycle.value} if contract else {"resident": spec.lifecycle.value}
            capabilities = contract.capabilities if contract else ()
            self._store.put_service(ServiceRecord(name, spec.agent_id, self.address, capabilities, metadata, ServiceScope(spec.scope)))
            self._residents[spec.agent_id] = dataclasses.replace(spec, cls=cls)
            if ResidentLifecycle(spec.lifecycle) is ResidentLifecycle.EAGER:
                self._wake_resident(spec.agent_id)
        except PagletError as exc:
            _log.warning("resident service %s not started: %s", spec.agent_id, exc)
            self._emit("resident-failed", spec.agent_id, error=str(exc))

    def _wake_resident(self, agent_id: str, reason: str = "activate") -> _Live:
        """A resident service's paglet: created on first use, activated after idling, restarted
        from its last checkpoint after a crash (a resident service does not stay down)."""
        spec = self._residents[agent_id]
        with self._agent_lock(agent_id):
            live = self._live.get(agent_id)
            if live is not None:
                return live
            row = self._store.agent(agent_id)
            if row is not None and row.status == "arriving":
                return self._arrive(agent_id)
            if row is not None and row.status != "gone":
                return self._activate(agent_id, "recover" if row.status in ("crashed", "active") else reason)
            cls = spec.cls
            assert isinstance(cls, type)
            state = spec.state
            if isinstance(state, dict):
                state = _wire_decode(_wire_fields_tree(cls.State, state), _wire_resolver(None))  # type: ignore[attr-defined]
            self.create(cls, state, agent_id=agent_id, init={"resident": True})
            return self._live[agent_id]

    def _idle_residents(self) -> None:
        """Deactivate lazy resident services that idled past their timeout and hold no lease."""
        now = time.monotonic()
        for agent_id, spec in list(self._residents.items()):
            live = self._live.get(agent_id)
            if live is None or ResidentLifecycle(spec.lifecycle) is not ResidentLifecycle.LAZY or spec.idle_timeout <= 0:
                continue
            busy = not live.worker.ready or bool(live.worker.queue)
            if busy or now - live.worker.last_used < spec.idle_timeout or self._leased(agent_id):
                continue
            policy = DeactivationPolicy(activate_on_message=True)
            with contextlib.suppress(PagletError):
                self.deactivate(agent_id, DeactivationRequest(reason="idle", source="host", policy=policy))

    def _police_memory(self) -> None:
        """End workers whose RSS went over their memory limit (the limit inside catches most sooner)."""
        with self._lock:
            lives = [live for live in self._live.values() if live.worker.memory_limit]
        for live in lives:
            rss = live.worker.figures().get("rss", 0)
            limit = live.worker.memory_limit or 0
            if rss > limit:
                live.worker.kill_reason = f"its worker used {rss} bytes of memory, over its limit of {limit}"
                live.worker.kill()

    def lookup_service(
        self, name: str, capability: str | None = None, scope: ServiceScope | str = ServiceScope.LOCAL
    ) -> ServiceRecord | None:
        """The first matching service record, or None."""
        records = self.lookup_services(name, capability, scope)
        return records[0] if records else None

    # ==== storage and files ===========================================================================
    def work_dir(self, agent_id: str, create: bool = True) -> Path:
        """A paglet's scratch folder."""
        return self._files.work_dir(agent_id, create)

    def storage_call(self, owner: str, quota: int | None, op: str, key: str | None = None, data: bytes | None = None) -> Any:
        """Persistent storage of a paglet class (see PersistentStorage)."""
        return self._files.storage_call(owner, quota, op, key, data)

    def register_file(self, agent_id: str, path: Path | str, name: str | None = None, mode: str = "copy") -> PagletFileRef:
        """Take a file into a paglet's keeping; it travels with the paglet."""
        ref = self._files.register(agent_id, Path(path), name, mode, self.address)
        self._update_meta(agent_id, lambda meta: meta.__setitem__(
            "files", [f for f in meta.get("files", []) if f["name"] != ref.name] + [ref.to_wire()]))  # fmt: skip
        return ref

    def registered_files(self, agent_id: str) -> list[PagletFileRef]:
        """The files a paglet carries."""
        live = self._live.get(agent_id) or self._starting.get(agent_id)  # its hooks see where files landed
        meta = live.meta if live is not None else (self._store.agent(agent_id) or _AgentRow("", "", "", None)).meta
        return [PagletFileRef.from_wire(item) for item in meta.get("files", [])]

    def unregister_file(self, agent_id: str, name: str) -> None:
        """Stop carrying a file and delete the paglet's copy."""
        self._update_meta(agent_id, lambda meta: meta.__setitem__("files", [f for f in meta.get("files", []) if f["name"] != name]))
        self._files.unregister(agent_id, name)

    # ==== background work ==============================================================================
    def _recover(self) -> None:
        """At start: moves in doubt, paglets saved for restart, paglets active when the host died."""
        self.resolve_transfers()
        jobs = [self._pool.submit(self._activate_quietly, agent_id, reason) for agent_id, reason in self._store.startup_activations()]
        for job in jobs:
            job.exception()

    def _activate_quietly(self, agent_id: str, reason: str) -> None:
        try:
            self._arrive(agent_id) if reason == "arrival" else self._activate(agent_id, reason)
        except PagletError as exc:
            _log.warning("could not activate %s (%s): %s", agent_id, reason, exc)
            with contextlib.suppress(PagletError):
                row = self._store.agent(agent_id)
                if row is not None and row.status in ("active", "inactive") and agent_id not in self._live:
                    row.status, row.reason = "crashed", f"activation ({reason}) failed: {exc}"
                    self._store.put_agent(row)
            self._emit("activation-failed", agent_id, error=str(exc), data={"reason": reason})

    def _housekeeping(self) -> None:
        last_sweep = 0.0
        while not self._stopping.is_set():
            wake_at = self._store.next_activation() if not self._stopped else None
            wait = (
                self.config.housekeeping_interval
                if wake_at is None
                else max(0.0, min(wake_at - time.time(), self.config.housekeeping_interval))
            )
            self._tick.wait(wait)
            self._tick.clear()
            if self._stopping.is_set():
                return
            try:
                for agent_id in self._store.due_activations(time.time()):
                    if agent_id not in self._live:
                        self._activate_quietly(agent_id, "timer")
                if time.monotonic() - last_sweep >= self.config.housekeeping_interval:
                    last_sweep = time.monotonic()
                    self._store.expire_services()
                    self._artifacts.expire()
                    self._store.checkpoint_wal()
                    self._store.forget_transfers(time.time() - 7 * 86400)
                    if self._store.open_departures():
                        self.resolve_transfers()
                    self._idle_residents()
                self._police_memory()
            except PagletError as exc:
                if not self._stopping.is_set():
                    _log.warning("housekeeping: %s", exc)

    def _gossip(self) -> None:
        while not self._stopping.is_set():  # the first round at once: a new host joins its peers now
            try:
                self.mesh.gossip_once()
            except PagletError as exc:
                _log.debug("gossip: %s", exc)
            if self._stopping.wait(self.config.gossip_interval):
                return

    # ==== context calls of workers ========================================================================
    def _on_request(self, worker: _Worker, frame: list[Any]) -> None:
        try:
            self._pool.submit(self._serve_request, worker, frame)
        except RuntimeError:
            pass  # stopping

    def _serve_request(self, worker: _Worker, frame: list[Any]) -> None:
        _, call_id, op, args = frame
        handler = _WORKER_OPS.get(op)
        try:
            if handler is None:
                raise LifecycleError(f"unknown context call {op!r}")
            result = handler(self, worker, *args)  # handlers answer with wire trees
            if isinstance(result, (_Call, Future)):  # answered when that completes; no thread waits meanwhile
                result.add_done_callback(functools.partial(self._answer_later, worker, call_id))
                return
            reply = _frame(_F_REPLY, call_id, True, result, None, False)
        except BaseException as exc:
            reply = _frame(_F_REPLY, call_id, False, _frame_error(exc), None, False)
        if call_id:
            worker._send(reply)

    def _answer_later(self, worker: _Worker, call_id: int, pending: Any) -> None:
        error = pending.exception()
        ok, value = (True, pending.result()) if error is None else (False, _frame_error(error))
        if call_id:
            worker._send(_frame(_F_REPLY, call_id, ok, value, None, False))

    def deliver_pending(self, agent_id: str, message: Message, timeout: float | None) -> _Call | Future[Any]:
        """A message to a paglet here, as something that completes with the reply tree.

        A running paglet's reply completes it directly; anything slower (waking, a checkpoint to
        store) runs on the pool.  So a paglet waiting for another holds no host thread.
        """
        live = self._live.get(agent_id)
        if live is not None and live.cls.CHECKPOINT != "message":
            try:
                call = live.worker.post(message.to_wire(), False, False)
            except _WorkerLeaving:
                call = None
            if call is not None:
                live.worker.last_used = time.monotonic()
                out = _Call()
                call.add_done_callback(functools.partial(_reply_into, out))
                return out
        return self._pool.submit(self.deliver_tree, agent_id, message, False, timeout)


def _reply_into(out: _Call, call: _Call) -> None:
    """A worker's reply (ok, value, state) as the outcome of another call: the value or the error."""
    error = call.exception()
    if error is not None:
        out.set_exception(error)
        return
    ok, value, _ = call.result()
    out.set_result(value) if ok else out.set_exception(_error_from_wire(value))


def _op_send(host: Host, worker: _Worker, url: str, agent_id: str, wire: Any, oneway: bool, timeout: float | None) -> Any:
    message = Message.from_wire(wire, host.resolve)
    if host.is_local_url(url):
        if oneway:
            return host.deliver_tree(agent_id, message, oneway=True, timeout=timeout)
        return host.deliver_pending(agent_id, message, timeout)
    return _wire_encode(host.client.send_message(url, agent_id, message, oneway=oneway, timeout=timeout))


def _op_agent_op(host: Host, worker: _Worker, url: str, agent_id: str, op: str, arg: Any) -> Any:
    if isinstance(arg, dict):
        arg = DeactivationRequest.from_wire(arg) if op == "deactivate" else TransferTicket.from_wire(arg)
    ref = host.agent_op(url, agent_id, op, arg)
    return ref.to_wire() if ref is not None else None


def _op_proxy(proxy: PagletProxy | None) -> Any:
    return proxy.to_wire() if proxy is not None else None


def _op_create(host: Host, worker: _Worker, name: str, state: Any, init: Any, url: str | None) -> Any:
    decoded_state, decoded_init = _wire_decode(state, host.resolve), _wire_decode(init, host.resolve)
    return host.create_paglet(name, decoded_state, decoded_init, url).to_wire()


def _op_log_error(host: Host, worker: _Worker, where: str, error: Any) -> None:
    message = error.get("message", "") if isinstance(error, dict) else str(error)
    kind = error.get("error", "") if isinstance(error, dict) else ""
    host._emit(f"{where}-failed", worker.agent_id, worker.agent_class, error=f"{kind}: {message}")


def _op_snapshot(host: Host, worker: _Worker, state: bytes, version: int) -> None:
    host._store.checkpoint(worker.agent_id, state, version)


def _op_live(host: Host, worker: _Worker) -> _Live:
    with host._agent_lock(worker.agent_id):  # a paglet that is still starting is published first
        live = host._live.get(worker.agent_id)
    if live is None or live.worker is not worker:
        raise LifecycleError(f"paglet {worker.agent_id!r} is not active here")
    return live


def _op_complete_deactivate(host: Host, worker: _Worker, request: Any, state: Any, policy: Any) -> Any:
    """A paglet deactivated itself (its hooks ran in its worker); store it and let the worker end."""
    live = _op_live(host, worker)
    with host._agent_lock(worker.agent_id):
        host._store_inactive(live, state, DeactivationRequest.from_wire(request), DeactivationPolicy.from_wire(policy), ask=False)
    return PagletProxyRef(host.address, worker.agent_id).to_wire()


def _op_complete_dispose(host: Host, worker: _Worker, request: Any, state: Any, extra: Any) -> None:
    """A paglet disposed of itself (on_disposing ran in its worker)."""
    live = _op_live(host, worker)
    with host._agent_lock(worker.agent_id):
        host._fail_queue(live, InvalidAgentError(f"paglet {worker.agent_id!r} was disposed"))
        host._retire(live, 0, ask=False)
        host._forget(worker.agent_id)
    host._emit("disposed", worker.agent_id, worker.agent_class)


def _op_plan_move(kind: str) -> Callable[..., Any]:
    """A paglet moves itself: the host checks the target and stops sending it messages meanwhile."""

    def plan(host: Host, worker: _Worker, target: Any, clone_id: str | None = None) -> Any:
        _op_live(host, worker)  # it must be running here
        ticket = host._ticket(target) if target is not None else TransferTicket(host.address)
        ref = host._target(ticket)
        if kind == "clone":
            event: PagletEvent = host._clone_event(worker.agent_id, _check_agent_id(clone_id or _new_id()), ref)
        else:
            event = host._mobility_event(worker.agent_id, ref, "dispatch")
        with worker.cond:
            worker.holds += 1  # released by complete_* (or when the worker ends)
        return {"ticket": ticket.to_wire(), "target": ref.to_wire(), "event": event.to_wire()}

    return plan


def _op_complete_move(kind: str) -> Callable[..., Any]:
    def complete(host: Host, worker: _Worker, plan: Any, state: bytes, extra: Any) -> Any:
        live = _op_live(host, worker)
        ticket, target = TransferTicket.from_wire(plan["ticket"]), HostRef.from_wire(plan["target"])
        try:
            with host._agent_lock(worker.agent_id):
                if kind == "clone":
                    event = CloneEvent.from_wire(plan["event"])
                    return host._place_clone(live, event.clone_agent_id, state, ticket, target, event).to_wire()
                if target.url == host.address:
                    return PagletProxyRef(host.address, worker.agent_id).to_wire()
                host._handoff(live, state, ticket, target, "dispatch", worker.agent_id, live.epoch + 1, live.meta)
                host._depart(live, target.url, ask=False)
                return PagletProxyRef(target.url, worker.agent_id).to_wire()
        finally:
            worker.release_hold()

    return complete


def _op_abort_plan(host: Host, worker: _Worker) -> None:
    """A paglet vetoed its own move (its hook raised): messages flow again."""
    worker.release_hold()


def _op_upload_artifact(host: Host, worker: _Worker, path: str, url: str | None, meta: Any) -> Any:
    return host.upload_artifact(path, host_url=url, **_wire_decode(meta, host.resolve)).to_wire()


#: Context calls a worker may make (REQ frames), each run on the host's context-call pool.
_WORKER_OPS: dict[str, Callable[..., Any]] = {
    "send": _op_send,
    "agent_op": _op_agent_op,
    "agent_info": lambda host, w, url, agent_id: host.agent_info(url, agent_id),
    "get_proxy": lambda host, w, agent_id, inactive: _op_proxy(host.get_proxy(agent_id, include_inactive=inactive)),
    "get_proxies": lambda host, w, state: [p.to_wire() for p in host.get_proxies(state)],
    "get_property": lambda host, w, key, default: _wire_encode(host.get_property(key, _wire_decode(default, host.resolve))),
    "set_property": lambda host, w, key, value: host.set_property(key, _wire_decode(value, host.resolve)),
    "create": _op_create,
    "resolve_url": lambda host, w, name: host.resolve_url(name),
    "available_hosts": lambda host, w, online, me: [h.to_wire() for h in host.available_hosts(online, me)],
    "host_status": lambda host, w, name: (lambda r: r.to_wire() if r else None)(host.host_status(name)),
    "wait_for_host": lambda host, w, name, timeout: host.wait_for_host(name, timeout).to_wire(),
    "subscribers": lambda host, w, kind: host.subscribers(kind),
    "subscribe": lambda host, w, agent_id, kind: host.subscribe_message(agent_id, kind),
    "unsubscribe": lambda host, w, agent_id, kind: host.unsubscribe_message(agent_id, kind),
    "advertise_service": lambda host, w, agent_id, name, options: host.advertise_service(
        agent_id, name, **_wire_decode(options, host.resolve)
    ).to_wire(),
    "unadvertise_service": lambda host, w, agent_id, name: [r.to_wire() for r in host.unadvertise_service(agent_id, name)],
    "lookup_services": lambda host, w, name, cap, scope: [r.to_wire() for r in host.lookup_services(name, cap, scope)],
    "work_dir": lambda host, w, agent_id, create: str(host.work_dir(agent_id, create)),
    "storage": lambda host, w, owner, quota, op, key, data: host.storage_call(owner, quota, op, key, data),
    "register_file": lambda host, w, agent_id, path, name, mode: host.register_file(agent_id, path, name, mode).to_wire(),
    "registered_files": lambda host, w, agent_id: [r.to_wire() for r in host.registered_files(agent_id)],
    "unregister_file": lambda host, w, agent_id, name: host.unregister_file(agent_id, name),
    "snapshot": _op_snapshot,
    "log_error": _op_log_error,
    "complete_deactivate": _op_complete_deactivate,
    "complete_dispose": _op_complete_dispose,
    "plan_dispatch": _op_plan_move("dispatch"),
    "plan_clone": _op_plan_move("clone"),
    "complete_dispatch": _op_complete_move("dispatch"),
    "complete_clone": _op_complete_move("clone"),
    "abort_plan": _op_abort_plan,
    "upload_artifact": _op_upload_artifact,
    "download_artifact": lambda host, w, ref, target, move: host.download_artifact(ArtifactRef.from_wire(ref), target, move).to_wire(),
    "delete_artifact": lambda host, w, ref: host.delete_artifact(ArtifactRef.from_wire(ref)),
    "lease_service": lambda host, w, url, agent_id, ttl: list(host.lease_service(url, agent_id, ttl)),
    "release_lease": lambda host, w, url, lease_id: host.release_lease(url, lease_id),
}


if typing.TYPE_CHECKING:  # mypy proves that a Host and a worker's stub both serve as a paglet's host
    _HOST_IS_A_PORT: _HostPort = typing.cast(Host, None)
    _STUB_IS_A_PORT: _HostPort = typing.cast(_WorkerStub, None)
    _CLIENT_IS_A_TRANSPORT: _Transport = typing.cast(HostClient, None)


# ==============================================================================
# 19. Built-in paglets
# ==============================================================================
# Owns: paglets that ship with the runtime (server-info, the demo traveller).


@dataclasses.dataclass
class ServerInfoRequest:
    """What to report: disk usage of these paths (default: the root file system)."""

    paths: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServerInfoReply:
    """A host machine at a glance (from psutil)."""

    host_name: str
    host_url: str
    platform: str
    python: str
    cpu_count: int
    load_average: list[float]
    memory_total: int
    memory_available: int
    memory_percent: float
    disks: dict[str, dict[str, int]]
    boot_time: float
    uptime: float
    active_paglets: int
    inactive_paglets: int


#: The typed contract of the built-in server-info service.
SERVER_INFO_CONTRACT = ServiceContract("server-info", "1", (ServiceOperation("info", ServerInfoRequest, ServerInfoReply),))


class ServerInfo(Paglet[PagletState]):
    """Built-in resident service: load, CPUs, memory, disks, uptime and paglet counts of its host."""

    CONTRACT = SERVER_INFO_CONTRACT

    def handle_message(self, message: Message) -> Any:
        """Answers the contract's "info" operation."""
        return SERVER_INFO_CONTRACT.route(message, {"info": self.info}, default=self.not_handled())

    def info(self, request: ServerInfoRequest) -> ServerInfoReply:
        """The figures, measured now."""
        memory = psutil.virtual_memory()
        disks = {}
        for path in request.paths or ["/"]:
            with contextlib.suppress(OSError):
                usage = psutil.disk_usage(path)
                disks[path] = {"total": usage.total, "used": usage.used, "free": usage.free}
        me = self.context.host_status(self.context.address)
        boot = psutil.boot_time()
        return ServerInfoReply(
            host_name=self.context.name, host_url=self.context.address, platform=sys.platform,
            python=sys.version.split()[0], cpu_count=psutil.cpu_count() or 1, load_average=[round(x, 2) for x in os.getloadavg()],
            memory_total=memory.total, memory_available=memory.available, memory_percent=memory.percent, disks=disks,
            boot_time=boot, uptime=round(time.time() - boot, 1), active_paglets=me.active_count if me else 0,
            inactive_paglets=me.inactive_count if me else 0,
        )  # fmt: skip


_DEFAULT_RESIDENTS.append(ResidentService(ServerInfo, "service.server-info", ResidentLifecycle.LAZY, ServiceScope.MESH, 30.0))


@dataclasses.dataclass
class TravellerState(PagletState):
    """Where the traveller goes, and where it has been (each hop with its time)."""

    itinerary: ItineraryPlan = dataclasses.field(default_factory=ItineraryPlan)
    hops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    departed_at: float = 0.0


class Traveller(ItineraryAgentMixin, Paglet[TravellerState]):
    """Visits the hosts of its itinerary in order, timing each hop (``python paglets.py demo``)."""

    State = TravellerState

    def on_creation(self, event: CreationEvent) -> None:
        """Starts its log where it is born."""
        self.state.hops.append({"host": event.host_name, "from": None, "hop_ms": 0.0})

    def on_dispatching(self, event: MobilityEvent) -> None:
        """Notes the time it leaves."""
        self.state.departed_at = time.time()

    def on_arrival(self, event: MobilityEvent) -> None:
        """Notes where it arrived and how long the hop took."""
        hop_ms = round((time.time() - self.state.departed_at) * 1000, 2)
        self.state.hops.append({"host": event.host_name, "from": event.source_host_name, "hop_ms": hop_ms})

    def run(self) -> None:
        """Goes on to the next destination (run() starts after every arrival)."""
        self.go_to_next_destination()

    def handle_message(self, message: Message) -> Any:
        """"hops": the log; "done": whether the itinerary is complete."""
        if message.kind == "hops":
            return list(self.state.hops)
        if message.kind == "done":
            return self.state.itinerary.completed
        return self.not_handled()


# ==============================================================================
# 20. Demo and bench
# ==============================================================================
# Owns: ``python paglets.py demo`` and ``python paglets.py bench`` (SPEC section 8).
# The bench measures medians after a warm-up and prints each figure beside the floor measured in
# the same run: a bare fork + socketpair round trip, and a bare loopback HTTP round trip through
# the same server and client classes the hosts use.


def _demo(out: Callable[[str], Any] = print, timeout: float = 30.0) -> int:
    """Three hosts in this process; a Traveller visits beta, gamma and comes home to alpha."""
    hosts = [Host(name).start_background() for name in ("alpha", "beta", "gamma")]
    try:
        for a, b in itertools.permutations(hosts, 2):
            a.mesh.join(b.address)
        out("hosts: " + ", ".join(f"{h.name} at {h.address}" for h in hosts))
        plan = ItineraryPlan(destinations=["beta", "gamma", "alpha"])
        started = time.perf_counter()
        traveller = hosts[0].create(Traveller, TravellerState(itinerary=plan))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(PagletError):
                if hosts[0].get_state(traveller.agent_id).itinerary.completed:
                    break
            time.sleep(0.02)  # polling the traveller's home host; a demo, not a test
        else:
            out(f"the traveller did not finish within {timeout} s")
            return 1
        for hop in hosts[0].get_state(traveller.agent_id).hops:
            out(f"  {hop['from'] or 'born':>6} -> {hop['host']:<6} {hop['hop_ms']:8.2f} ms")
        out(f"round trip of 3 hops in {(time.perf_counter() - started) * 1000:.1f} ms")
        return 0
    finally:
        for host in hosts:
            host.stop()


@dataclasses.dataclass
class _BenchState(PagletState):
    blob: bytes = b""
    count: int = 0


class _BenchPaglet(Paglet[_BenchState]):
    """The benchmark's paglet: answers "ping" with the size of its state; "add" counts."""

    State = _BenchState

    def handle_message(self, message: Message) -> Any:
        if message.kind == "add":
            self.state.count += 1
            return self.state.count
        return len(self.state.blob) if message.kind == "ping" else self.not_handled()


class _BenchCheckpointed(_BenchPaglet):
    """The same, storing its state after every message before it replies."""

    CHECKPOINT = "message"


def _bench_rate(run: Callable[[], Any], seconds: float) -> float:
    """How many ``run()`` per second, one after another, for about ``seconds``."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        count += 1
    return count / (time.perf_counter() - started)


def _bench_concurrent(make: Callable[[], Callable[[], Any]], clients: int, seconds: float) -> float:
    """Calls per second from ``clients`` threads at once (each with its own client)."""
    counts = [0] * clients
    stop = threading.Event()

    def client(index: int) -> None:
        run = make()
        while not stop.is_set():
            run()
            counts[index] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    return sum(counts) / (time.perf_counter() - started)


def _bench_artifacts(url: str, size_mib: int) -> tuple[float, float]:
    """(upload, download) MiB/s of one artifact of ``size_mib`` MiB over loopback HTTP."""
    client = HostClient()
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "blob"
        with open(source, "wb") as handle:
            for _ in range(size_mib):
                handle.write(os.urandom(1 << 20))
        started = time.perf_counter()
        ref = client.upload_artifact(source, host_url=url)
        upload = size_mib / (time.perf_counter() - started)
        started = time.perf_counter()
        client.download_artifact(ref, Path(folder) / "copy")
        download = size_mib / (time.perf_counter() - started)
        client.delete_artifact(ref)
    client.close()
    return upload, download


def _bench_median(run: Callable[[], Any], repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``run()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _bench_floor_fork(repeat: int) -> tuple[float, float]:
    """(fork + first reply, socketpair round trip): the physical floor of a worker, in seconds."""
    starts, trips = [], []
    for _ in range(max(5, repeat // 20)):
        ours, theirs = socket.socketpair()
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the floor's child: no locks, no imports, only the socket
            ours.close()
            while theirs.recv(64):
                theirs.sendall(b"x")
            os._exit(0)
        theirs.close()
        ours.sendall(b"x")
        ours.recv(64)
        starts.append(time.perf_counter() - started)
        for _ in range(repeat // 5):
            begin = time.perf_counter()
            ours.sendall(b"x")
            ours.recv(64)
            trips.append(time.perf_counter() - begin)
        ours.close()
        os.waitpid(pid, 0)
    return statistics.median(starts), statistics.median(trips)


def _bench_floor_http(repeat: int) -> float:
    """A loopback HTTP round trip through our server and client classes with a trivial app."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", _CBOR_TYPE), ("Content-Length", "1")])
        return [b"\xf6"]

    server = _HttpServer("127.0.0.1", 0, app, HostConfig("floor"))
    threading.Thread(target=server.serve_forever, args=(0.25,), daemon=True).start()
    client = HostClient()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        return _bench_median(lambda: client.call("POST", url, "/echo", {"kind": "ping"}), repeat)
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def _bench_memory(host: Host, count: int) -> tuple[float, float]:
    """Median USS and RSS (MiB) of ``count`` idle workers."""
    proxies = [host.create(_BenchPaglet) for _ in range(count)]
    uss, rss = [], []
    for proxy in proxies:
        live = host._live[proxy.agent_id]
        uss.append((live.worker.uss() or 0) / 2**20)
        rss.append(live.worker.figures().get("rss", 0) / 2**20)
    for proxy in proxies:
        proxy.dispose()
    return statistics.median(uss), statistics.median(rss)


def _bench_start(repeat: int) -> float:
    """``python paglets.py serve`` from exec to the first /health 200, in seconds.

    Measured as on a normal install, with Python's bytecode cache on (a first, unmeasured run
    fills it): compiling the 8,000-line script itself is part of every start all the same.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = []
    for attempt in range(repeat + 1):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "serve", "--port", "0", "--data-dir", folder, "--log-level", "error"],
                stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            try:
                line = proc.stdout.readline() if proc.stdout else ""
                url = line.rsplit(" ", 1)[-1].strip()
                client = HostClient(timeout=5)
                while True:
                    with contextlib.suppress(PagletError, TimeoutError):
                        client.health(url)
                        break
                if attempt:
                    times.append(time.perf_counter() - started)
                client.close()
            finally:
                proc.terminate()
                proc.wait(30)
    return statistics.median(times)


def _bench_start_inprocess(repeat: int) -> float:
    """``Host(...)`` and ``start_background()`` in this process to the first /health 200, in seconds."""
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            host = Host("bench-start", data_dir=folder).start_background()
            client = HostClient(timeout=5)
            client.health(host.address)
            times.append(time.perf_counter() - started)
            client.close()
            host.stop()
    return statistics.median(times)


def _bench_scaling(host: Host, levels: Iterable[int]) -> list[dict[str, Any]]:
    """How create time and memory grow with the number of idle paglets."""
    rows: list[dict[str, Any]] = []
    proxies: list[PagletProxy] = []
    for level in levels:
        times = []
        while len(proxies) < level:
            started = time.perf_counter()
            proxies.append(host.create(_BenchPaglet))
            times.append(time.perf_counter() - started)
        uss = sum((host._live[p.agent_id].worker.uss() or 0) for p in proxies) / 2**20
        host_rss = _process_rss() / 2**20
        rows.append({"paglets": level, "create_ms": round(statistics.median(times) * 1000, 2) if times else None,
                     "workers_uss_mib": round(uss, 1), "host_rss_mib": round(host_rss, 1)})  # fmt: skip
    for proxy in proxies:
        proxy.dispose()
    return rows


def _bench_hopper(a: Host, b: Host, blob: bytes) -> Callable[[], None]:
    """A hop between two hosts and the first reply on arrival, as one timed step."""
    mover = [a.create(_BenchPaglet, _BenchState(blob))]

    def hop() -> None:
        mover[0] = mover[0].dispatch(b.address if mover[0].host_url == a.address else a.address)
        mover[0].send("ping")

    return hop


def _bench(quick: bool = False) -> dict[str, Any]:
    """Every figure of SPEC section 8 on this machine (medians), with floors from the same run."""
    n = 200 if quick else 2000
    fork_start, fork_trip = _bench_floor_fork(n)  # before any host thread exists: forking is safe here
    figures: dict[str, Any] = {"floor_fork_start_ms": fork_start * 1e3, "floor_fork_rt_us": fork_trip * 1e6}
    figures["floor_http_rt_us"] = _bench_floor_http(n) * 1e6
    with Host("bench-a") as a, Host("bench-b") as b:
        figures["create_first_reply_ms"] = _bench_median(lambda: a.create(_BenchPaglet).send("ping"), 10 if quick else 50) * 1e3
        proxy = a.create(_BenchPaglet)
        figures["local_rt_us"] = _bench_median(lambda: proxy.send("ping"), n) * 1e6
        batch = 200 if quick else 2000
        started = time.perf_counter()
        ReplySet(proxy.send_future("ping") for _ in range(batch)).wait_for_all_replies(60)
        figures["local_throughput_per_s"] = batch / (time.perf_counter() - started)
        remote = PagletProxy(a.address, proxy.agent_id, HostClient())
        figures["remote_rt_us"] = _bench_median(lambda: remote.send("ping"), n // 2) * 1e6
        for key, blob in (("dispatch_hop_ms", b""), ("dispatch_hop_1mib_ms", os.urandom(1 << 20))):
            figures[key] = _bench_median(_bench_hopper(a, b, blob), 5 if quick else 20, warmup=2) * 1e3
        sleeper = a.create(_BenchPaglet)

        def nap() -> None:
            sleeper.deactivate()
            sleeper.activate()
            sleeper.send("ping")

        figures["deactivate_activate_ms"] = _bench_median(nap, 5 if quick else 30) * 1e3
        seconds = 0.5 if quick else 2.0
        plain, stored = a.create(_BenchPaglet), a.create(_BenchCheckpointed)
        figures["plain_msgs_per_s"] = _bench_rate(lambda: plain.send("add"), seconds)
        figures["checkpointed_msgs_per_s"] = _bench_rate(lambda: stored.send("add"), seconds)
        target = proxy.agent_id
        figures["health_rps_8"] = _bench_concurrent(lambda: functools.partial(HostClient().health, a.address), 8, seconds)
        figures["remote_msg_rps_8"] = _bench_concurrent(
            lambda: functools.partial(PagletProxy(a.address, target, HostClient()).send, "ping"), 8, seconds
        )  # fmt: skip
        figures["artifact_upload_mib_s"], figures["artifact_download_mib_s"] = _bench_artifacts(a.address, 8 if quick else 64)
        figures["idle_uss_mib"], figures["idle_rss_mib"] = _bench_memory(a, 5 if quick else 20)
        figures["scaling"] = _bench_scaling(a, (10, 50) if quick else (10, 100, 250, 500))
    figures["host_start_inprocess_ms"] = _bench_start_inprocess(3 if quick else 10) * 1e3
    figures["host_start_health_ms"] = _bench_start(2 if quick else 5) * 1e3
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}


#: (key, label, unit, SPEC target or None, floor key or None) of the figures bench prints.
_BENCH_ROWS: tuple[tuple[str, str, str, float | None, str | None], ...] = (
    ("create_first_reply_ms", "create + first reply", "ms", 5.0, "floor_fork_start_ms"),
    ("local_rt_us", "local message round trip", "us", 150.0, "floor_fork_rt_us"),
    ("local_throughput_per_s", "local messages per second (futures)", "/s", None, None),
    ("remote_rt_us", "remote round trip (loopback HTTP)", "us", 600.0, "floor_http_rt_us"),
    ("dispatch_hop_ms", "dispatch hop + first reply", "ms", 15.0, None),
    ("dispatch_hop_1mib_ms", "dispatch hop, 1 MiB state", "ms", 40.0, None),
    ("deactivate_activate_ms", "deactivate + activate + reply", "ms", 10.0, None),
    ("plain_msgs_per_s", "messages per second, one after another", "/s", None, None),
    ("checkpointed_msgs_per_s", "the same with CHECKPOINT = message", "/s", None, None),
    ("health_rps_8", "GET /health per second, 8 clients", "/s", None, None),
    ("remote_msg_rps_8", "remote messages per second, 8 clients", "/s", None, None),
    ("artifact_upload_mib_s", "artifact upload (loopback)", "MiB/s", None, None),
    ("artifact_download_mib_s", "artifact download (loopback)", "MiB/s", None, None),
    ("idle_uss_mib", "idle paglet memory (USS)", "MiB", 3.0, None),
    ("idle_rss_mib", "idle paglet memory (RSS)", "MiB", None, None),
    ("host_start_health_ms", "serve: exec to /health 200", "ms", 300.0, None),
    ("host_start_inprocess_ms", "Host() start to /health (in process)", "ms", None, None),
)


def _bench_report(figures: dict[str, Any]) -> list[str]:
    """The bench table: figure, ours, floor, ratio to the floor, SPEC target."""
    lines = [f"{'figure':<48}{'ours':>10}{'floor':>10}{'ratio':>8}{'target':>10}"]
    for key, label, unit, target, floor_key in _BENCH_ROWS:
        ours, floor = figures.get(key), figures.get(floor_key) if floor_key else None
        ratio = f"{ours / floor:.1f}x" if ours and floor else "-"
        shown_floor = f"{floor:.1f}" if floor else "-"
        aim = f"<= {target:g}" if target else "-"
        lines.append(f"{label + ' (' + unit + ')':<48}{ours:>10.1f}{shown_floor:>10}{ratio:>8}{aim:>10}")
    lines.append("")
    lines.append(f"{'idle paglets':>12}{'create ms':>12}{'workers USS MiB':>18}{'host RSS MiB':>15}")
    for row in figures.get("scaling", []):
        lines.append(f"{row['paglets']:>12}{row['create_ms']:>12}{row['workers_uss_mib']:>18}{row['host_rss_mib']:>15}")
    return lines


# ==============================================================================
# 21. Command line
# ==============================================================================
# Owns: the argument parser, one _cli_<command>(args) -> int per command, main().
# Exit status: 0 success, 1 a call failed, 2 bad usage; errors are one line on stderr.


class _CliError(Exception):
    """A usage error found after parsing (exit status 2)."""


def _cli_client(args: argparse.Namespace) -> HostClient:
    return HostClient(os.environ.get(args.api_key_env or ENV_API_KEY) or None, timeout=args.timeout)


def _cli_json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _CliError(f"{what} is not valid JSON: {exc}") from exc


def _cli_print(args: argparse.Namespace, tree: Any, rows: list[list[Any]] | None = None, header: list[str] | None = None) -> None:
    if args.json or rows is None:
        print(_json_dumps(tree).decode("utf-8") if args.json else tree)
        return
    table = [header or []] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _cli_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = os.environ.get(args.api_key_env or ENV_API_KEY) or None
    if not _is_loopback(args.host) and not api_key and not args.insecure:
        raise _CliError(f"refusing to listen on {args.host} without an API key: set {args.api_key_env or ENV_API_KEY}, or pass --insecure")
    for folder in reversed(args.path or []):
        sys.path.insert(0, str(Path(folder).resolve()))
    for module in args.allow or []:
        if module != "*":
            try:
                importlib.import_module(module)  # warm: the fork server then has it for every worker
            except ImportError as exc:
                _log.warning("--allow %s: not importable now (%s)", module, exc)
    properties = dict(_cli_property(item) for item in args.property or [])
    data_dir = Path(args.data_dir) if args.data_dir else Path("paglets-data") / args.name
    residents = _cli_launch_file(args.config) if args.config else []
    host = Host(
        args.name, args.host, args.port, data_dir=data_dir, api_key=api_key, peers=args.peer or [], mesh_version=args.mesh_version,
        tags=args.tag or [], properties=properties, allow_modules=args.allow or [], resident_services=residents,
    )  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    host.start_background()
    _log.info("paglets host %s serving at %s (data in %s)", host.name, host.address, data_dir)
    print(f"paglets host {host.name} serving at {host.address}", flush=True)
    while not stop.wait(0.5):
        pass
    _log.info("shutting down")
    host.shutdown()
    return 0


def _cli_property(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise _CliError(f"--property takes KEY=VALUE, not {item!r}")
    return key, value


def _cli_agents(args: argparse.Namespace) -> int:
    agents = _cli_client(args).agents(args.host_url, args.state)
    rows = [[a["agent_id"], a["agent_class"], a.get("status", ""), a.get("pid", "")] for a in agents]
    _cli_print(args, agents, rows, ["AGENT", "CLASS", "STATUS", "PID"])
    return 0


def _cli_create(args: argparse.Namespace) -> int:
    state = _cli_json_arg(args.state, "--state")
    proxy = _cli_client(args).create(args.host_url, args.agent_class, state, init=_cli_json_arg(args.init, "--init"))
    _cli_print(args, proxy.to_wire() if args.json else proxy.agent_id)
    return 0


def _cli_send(args: argparse.Namespace) -> int:
    body = _cli_json_arg(args.args, "--args") or {}
    if not isinstance(body, dict):
        raise _CliError("--args must be a JSON object")
    client = _cli_client(args)
    reply = client.send_message(args.host_url, args.agent, Message(args.kind, body), oneway=args.oneway, timeout=args.call_timeout)
    if not args.oneway:
        _cli_print(args, _wire_encode(reply) if args.json else reply)
    return 0


def _cli_agent_op(op: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        target = getattr(args, "target", None)
        ref = _cli_client(args).agent_op(args.host_url, args.agent, op, target)
        _cli_print(args, ref.to_wire() if ref and args.json else (f"{ref.agent_id} at {ref.host_url}" if ref else "ok"))
        return 0

    return run


def _cli_events(args: argparse.Namespace) -> int:
    events = _cli_client(args).events(args.host_url, args.since, args.limit)
    rows = [[e.event_id, time.strftime("%H:%M:%S", time.localtime(e.timestamp)), e.kind, e.agent_id or "", e.error or ""] for e in events]
    _cli_print(args, [e.to_wire() for e in events], rows, ["ID", "TIME", "KIND", "AGENT", "ERROR"])
    return 0


def _cli_hosts(args: argparse.Namespace) -> int:
    hosts = _cli_client(args).hosts(args.host_url)
    rows = [[h.name, h.url, "online" if h.online else "offline", h.mesh_version, h.active_count, ",".join(h.tags)] for h in hosts]
    _cli_print(args, [h.to_wire() for h in hosts], rows, ["NAME", "URL", "STATE", "MESH", "ACTIVE", "TAGS"])
    return 0


def _cli_services(args: argparse.Namespace) -> int:
    services = _cli_client(args).services(args.host_url)
    rows = [[s.name, s.agent_id, s.scope.value, ",".join(s.capabilities)] for s in services]
    _cli_print(args, [s.to_wire() for s in services], rows, ["SERVICE", "AGENT", "SCOPE", "CAPABILITIES"])
    return 0


def _cli_demo(args: argparse.Namespace) -> int:
    return _demo()


def _cli_bench(args: argparse.Namespace) -> int:
    figures = _bench(quick=args.quick)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"paglets {__version__} bench on {sys.platform}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]} (medians)")
        print("\n".join(_bench_report(figures)))
    return 0


def _cli_artifacts(args: argparse.Namespace) -> int:
    refs = _cli_client(args).artifacts(args.host_url)
    rows = [[r.artifact_id, r.name, r.size, r.sha256[:12], r.owner_agent_id] for r in refs]
    _cli_print(args, [r.to_wire() for r in refs], rows, ["ARTIFACT", "NAME", "BYTES", "SHA256", "OWNER"])
    return 0


def _cli_info(args: argparse.Namespace) -> int:
    client = _cli_client(args)
    records = [r for r in client.services(args.host_url, SERVER_INFO_CONTRACT.name) if SERVER_INFO_CONTRACT.matches_record(r)]
    if not records:
        raise ServiceNotFoundError(f"{args.host_url} offers no server-info service")
    reply = ServiceHandle(SERVER_INFO_CONTRACT, records[0], client).call("info", ServerInfoRequest(list(args.path or [])))
    if args.json:
        print(_json_dumps(dataclasses.asdict(reply)).decode("utf-8"))
        return 0
    mib = 2**20
    print(f"{reply.host_name} at {reply.host_url}: {reply.platform}, Python {reply.python}, {reply.cpu_count} CPUs")
    print(f"load {' '.join(map(str, reply.load_average))}; memory {reply.memory_available // mib} of {reply.memory_total // mib} MiB free")
    for path, usage in reply.disks.items():
        print(f"disk {path}: {usage['free'] // mib} of {usage['total'] // mib} MiB free")
    print(f"up {reply.uptime / 3600:.1f} h; paglets: {reply.active_paglets} active, {reply.inactive_paglets} inactive")
    return 0


def _cli_launch_file(path: str) -> list[ResidentService]:
    """Resident services of a TOML launch file; a bad one is a one-line error naming entry and field."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise _CliError(f"{path}: {exc}") from exc
    entries = data.get("resident_services", [])
    if not isinstance(entries, list):
        raise _CliError(f"{path}: resident_services must be an array of tables ([[resident_services]])")
    return [spec for index, entry in enumerate(entries) if (spec := _cli_resident(entry, f"{path}: resident_services[{index}]"))]


#: Fields of a [[resident_services]] entry and how each is checked.
_CLI_RESIDENT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "class": lambda v: _resolve_class(v, "paglet", ("*",)),
    "agent_id": _check_agent_id,
    "lifecycle": ResidentLifecycle,
    "scope": ServiceScope,
    "idle_timeout": lambda v: float(v) if type(v) in (int, float) and v >= 0 else _cli_fail("a number of seconds, 0 or more"),
    "state": lambda v: v if isinstance(v, dict) else _cli_fail("a table of the class's State fields"),
    "service": lambda v: v if isinstance(v, str) and v else _cli_fail("a service name"),
    "enabled": lambda v: v if isinstance(v, bool) else _cli_fail("true or false"),
    "singleton": lambda v: v,
}


def _cli_fail(what: str) -> Any:
    raise ValueError(f"must be {what}")


def _cli_resident(entry: Any, where: str) -> ResidentService | None:
    """One launch-file entry, every field checked; errors name the entry and the field."""
    if not isinstance(entry, dict):
        raise _CliError(f"{where}: must be a table ([[resident_services]] with key = value lines)")
    unknown = sorted(set(entry) - set(_CLI_RESIDENT_FIELDS))
    if unknown:
        raise _CliError(f"{where}: unknown field {unknown[0]!r}")
    checked = {}
    for field in ("class", "agent_id"):
        if field not in entry:
            raise _CliError(f"{where}.{field}: required")
    for field, value in entry.items():
        try:
            checked[field] = _CLI_RESIDENT_FIELDS[field](value)
        except (PagletError, ValueError, TypeError) as exc:
            raise _CliError(f"{where}.{field}: {exc}") from exc
    if not checked.get("enabled", True):
        return None
    cls, state = checked["class"], checked.get("state")
    if state is not None:
        unknown = sorted(set(state) - {f.name for f in dataclasses.fields(cls.State)})
        if unknown:
            raise _CliError(f"{where}.state.{unknown[0]}: not a field of {cls.State.__qualname__}")
        try:
            state = _wire_decode(_wire_fields_tree(cls.State, state), _wire_resolver(None))
        except PagletError as exc:
            raise _CliError(f"{where}.state: {exc}") from exc
    return ResidentService(
        cls, checked["agent_id"], checked.get("lifecycle", ResidentLifecycle.LAZY), checked.get("scope", ServiceScope.LOCAL),
        checked.get("idle_timeout", RESIDENT_IDLE_TIMEOUT), state, None, checked.get("service"),
    )  # fmt: skip


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paglets", description="paglets.py: a mobile-agent runtime in one file.")
    parser.add_argument("--version", action="version", version=f"paglets {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--host-url", default=f"http://127.0.0.1:{DEFAULT_PORT}", help="the host to talk to (default %(default)s)")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the host (default %(default)s)")
        sub.add_argument("--api-key-env", default=ENV_API_KEY, help="environment variable holding the API key (default %(default)s)")
        return sub

    serve = commands.add_parser("serve", help="run a host until SIGINT/SIGTERM", description="Run a host until SIGINT or SIGTERM.")
    serve.add_argument(
        "--name", default=socket.gethostname().split(".")[0] or "paglets", help="host name in the mesh (default: this machine's)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; others need an API key)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0 picks a free one)")
    serve.add_argument("--data-dir", help="database and files (default ./paglets-data/<name>/)")
    serve.add_argument("--peer", action="append", metavar="URL", help="join this host's mesh (repeatable)")
    serve.add_argument("--mesh-version", help="hosts of another mesh version are not movement targets")
    serve.add_argument("--tag", action="append", help="a capability tag of this host (repeatable)")
    serve.add_argument("--property", action="append", metavar="K=V", help="a host property (repeatable)")
    serve.add_argument(
        "--allow",
        action="append",
        metavar="MODULE",
        help="module or package whose classes may arrive over the network; '*' for any (repeatable)",
    )
    serve.add_argument("--path", action="append", metavar="DIR", help="folder to import agent modules from (repeatable)")
    serve.add_argument("--api-key-env", default=ENV_API_KEY, help="environment variable holding the API key (default %(default)s)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without an API key (trusted LAN only)")
    serve.add_argument("--config", metavar="FILE", help="TOML launch file with [[resident_services]] entries")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default %(default)s)")
    serve.set_defaults(run=_cli_serve)

    sub = client_command("agents", "list paglets of a host")
    sub.add_argument("--state", default="active", choices=["active", "inactive", "all"])
    sub.set_defaults(run=_cli_agents)
    sub = client_command("create", "create a paglet (CLASS is module:Qualname, allowed on that host)")
    sub.add_argument("agent_class", metavar="CLASS")
    sub.add_argument("--state", help="initial state as a JSON object of State fields")
    sub.add_argument("--init", help="JSON value given to on_creation as event.init")
    sub.set_defaults(run=_cli_create)
    sub = client_command("send", "send a message and print the reply")
    sub.add_argument("agent", metavar="AGENT")
    sub.add_argument("kind", metavar="KIND")
    sub.add_argument("--args", help="message arguments as a JSON object")
    sub.add_argument("--oneway", action="store_true", help="do not wait for a reply")
    sub.add_argument("--call-timeout", type=float, default=None, help="seconds the paglet may take")
    sub.set_defaults(run=_cli_send)
    for op, help_text, target in (
        ("dispatch", "move a paglet to another host", True),
        ("clone", "copy a paglet (TARGET: another host)", None),
        ("deactivate", "store a paglet and end its worker", False),
        ("activate", "start an inactive paglet", False),
        ("dispose", "end a paglet for good", False),
    ):
        sub = client_command(op, help_text)
        sub.add_argument("agent", metavar="AGENT")
        if target is not None or op == "clone":
            sub.add_argument("target", metavar="TARGET", nargs=None if target else "?", help="URL or host name")
        sub.set_defaults(run=_cli_agent_op(op))
    sub = client_command("events", "print the host's event log")
    sub.add_argument("--since", type=int, default=0)
    sub.add_argument("--limit", type=int, default=100)
    sub.set_defaults(run=_cli_events)
    client_command("hosts", "list the hosts a host knows").set_defaults(run=_cli_hosts)
    client_command("services", "list a host's advertised services").set_defaults(run=_cli_services)
    client_command("artifacts", "list the artifacts stored on a host").set_defaults(run=_cli_artifacts)
    sub = client_command("info", "print the host machine's figures (the server-info service)")
    sub.add_argument("--path", action="append", help="also report disk usage of this path (repeatable)")
    sub.set_defaults(run=_cli_info)
    sub = commands.add_parser("demo", help="three hosts in this process; a traveller visits each", description="Three hosts in this process; a traveller visits each and prints its hops.")
    sub.set_defaults(run=_cli_demo)
    sub = commands.add_parser("bench", help="measure the figures of SPEC section 8 on this machine", description="Measure create, message, dispatch, memory and start-up figures (medians) beside the floors of the same run.")
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_argument("--quick", action="store_true", help="fewer repetitions")
    sub.set_defaults(run=_cli_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python paglets.py COMMAND ...``; returns the exit status."""
    parser = _cli_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except _CliError as exc:
        print(f"paglets: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not isinstance(exc, (PagletError, TimeoutError, OSError)) and not getattr(exc, "_paglets_remote", False):
            raise  # a bug of this program: the traceback helps
        kind = next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))
        print(f"paglets: {kind}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

