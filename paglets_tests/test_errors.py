"""Section 3, errors: statuses, the wire form, and rebuilding the same class on the other side."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import paglets
from paglets import PagletError

#: The status each error travels with (SPEC section 6: 400, 401, 403, 404, 409, 413, 500; and 502
#: for "another host failed us", the gateway case, which SPEC's list does not name).
STATUS = {
    "PagletError": 500,
    "HostError": 500,
    "HostNotFoundError": 404,
    "InvalidAgentError": 404,
    "LifecycleError": 409,
    "NotHandledError": 400,
    "PagletCrashedError": 500,
    "PagletInactiveError": 409,
    "RemoteHostError": 502,
    "SerializationError": 400,
    "TransferError": 502,
    "AuthenticationError": 401,
    "ForbiddenError": 403,
    "ServiceContractError": 400,
    "ServiceNotFoundError": 404,
    "StorageQuotaError": 413,
    "PayloadTooLargeError": 413,
    "RequestError": 400,
}

SPEC_ERRORS = [
    "HostError", "InvalidAgentError", "LifecycleError", "NotHandledError", "PagletCrashedError", "PagletInactiveError",
    "RemoteHostError", "SerializationError", "TransferError", "AuthenticationError", "ForbiddenError",
    "ServiceContractError", "ServiceNotFoundError", "StorageQuotaError",
]  # fmt: skip


def _paglets_errors() -> list[type[PagletError]]:
    return [cls for cls in paglets._ERRORS.values() if cls.__module__ == "paglets" and not cls.__name__.startswith("_")]


class AppError(Exception):
    """A user's exception class in an imported module."""


class Outer:
    class InnerError(ValueError):
        """A nested one."""


class AppPagletError(PagletError):
    """A user's own PagletError subclass with its own status."""

    http_status = 418


class NeedsTwoArgs(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def wire_round_trip(exc: BaseException, via: str = "dict") -> BaseException:
    body = paglets._error_to_wire(exc)
    if via == "json":
        body = json.loads(json.dumps(body))
    elif via == "cbor":
        body = paglets.from_cbor(paglets.to_cbor(body))
    return paglets._error_from_wire(body)


# -- classes and statuses --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_ERRORS)
def test_spec_errors_exist_under_paglet_error(name: str) -> None:
    cls = getattr(paglets, name)
    assert issubclass(cls, PagletError) and name in paglets.__all__


@pytest.mark.parametrize("name", sorted(STATUS))
def test_each_error_has_its_status(name: str) -> None:
    cls = getattr(paglets, name)
    assert cls("x").http_status == STATUS[name]
    if cls is not paglets.RequestError:  # its status is per instance
        assert cls.http_status == STATUS[name]


def test_every_public_error_class_has_a_decided_status() -> None:
    assert sorted(cls.__name__ for cls in _paglets_errors()) == sorted(STATUS)


def test_request_error_carries_the_status_it_was_given() -> None:
    assert paglets.RequestError("no such route", 404).http_status == 404
    assert paglets.RequestError("bad").http_status == 400
    assert paglets.RequestError("gone", 404).http_status == 404 and paglets.RequestError("bad").http_status == 400


def test_error_status_of_foreign_exceptions() -> None:
    assert paglets._error_status(paglets.ForbiddenError("x")) == 403
    assert paglets._error_status(TimeoutError()) == 504
    assert paglets._error_status(ValueError("local bug")) == 500
    assert paglets._error_status(wire_round_trip(ValueError("a paglet's own error"))) == 422
    assert paglets._error_status(wire_round_trip(AppPagletError("teapot"))) == 418


# -- the wire form ---------------------------------------------------------------------------------


def test_wire_form_is_kind_and_message() -> None:
    assert paglets._error_to_wire(paglets.InvalidAgentError("no such paglet: 'x'")) == {
        "error": "InvalidAgentError",
        "message": "no such paglet: 'x'",
    }
    body = paglets._error_to_wire(ValueError("bad"))
    assert body["error"] == "ValueError" and body["message"] == "bad" and body["exception"] == "builtins:ValueError"


def test_traceback_only_when_asked() -> None:
    def fail_here(message: str) -> None:
        raise ValueError(message)

    for message in ("short", "x" * 10_000):
        try:
            fail_here(message)
        except ValueError as exc:
            assert "traceback" not in paglets._error_to_wire(exc)
            body = paglets._error_to_wire(exc, with_traceback=True)
        assert len(body["traceback"]) <= 4000
    try:
        fail_here("short")
    except ValueError as exc:
        assert "fail_here" in paglets._error_to_wire(exc, with_traceback=True)["traceback"]


@pytest.mark.parametrize("via", ["dict", "json", "cbor"])
@pytest.mark.parametrize("name", sorted(STATUS))
def test_every_paglet_error_comes_back_as_itself(name: str, via: str) -> None:
    exc = getattr(paglets, name)(f"{name} happened: 'quoted' \u00e9")
    back = wire_round_trip(exc, via)
    assert type(back) is type(exc)
    assert str(back) == str(exc)


BUILTIN = [
    ValueError("bad value 3"),
    TypeError("wrong type"),
    RuntimeError("boom"),
    ZeroDivisionError("division by zero"),
    IndexError("list index out of range"),
    LookupError("nope"),
    AssertionError("assert 1 == 2"),
    NotImplementedError("later"),
    FileNotFoundError(2, "No such file or directory", "/nowhere"),
    PermissionError("denied"),
    ConnectionRefusedError("refused"),
    OSError("generic"),
    TimeoutError("too slow"),
    UnicodeError("bad text"),
    ArithmeticError(""),
    Exception("plain"),
]


@pytest.mark.parametrize("via", ["dict", "json", "cbor"])
@pytest.mark.parametrize("exc", BUILTIN, ids=[type(e).__name__ + str(i) for i, e in enumerate(BUILTIN)])
def test_builtin_exceptions_come_back_as_themselves(exc: BaseException, via: str) -> None:
    back = wire_round_trip(exc, via)
    assert type(back) is type(exc)
    assert str(back) == str(exc)


@pytest.mark.parametrize("via", ["dict", "json", "cbor"])
def test_a_key_error_comes_back_with_its_key_and_message(via: str) -> None:
    for key in ("k", "it's"):
        back = wire_round_trip(KeyError(key), via)
        assert type(back) is KeyError
        assert back.args == (key,) and str(back) == str(KeyError(key))
        assert str(wire_round_trip(back, via)) == str(KeyError(key))  # relayed through a second host


@pytest.mark.parametrize("exc", [AppError("app failed"), Outer.InnerError("inner failed"), AppPagletError("teapot")], ids=repr)
def test_user_exceptions_of_imported_modules_come_back_as_themselves(exc: BaseException) -> None:
    for via in ("dict", "json", "cbor"):
        back = wire_round_trip(exc, via)
        assert type(back) is type(exc)
        assert str(back) == str(exc)


def test_a_stdlib_exception_of_an_imported_module_comes_back() -> None:
    back = wire_round_trip(subprocess.SubprocessError("child failed"))
    assert type(back) is subprocess.SubprocessError and str(back) == "child failed"


# -- fallbacks: never import, never run, keep kind and message -------------------------------------


def _assert_fallback(back: BaseException, kind: str, message: str, exception: str | None) -> None:
    assert isinstance(back, PagletError)
    assert type(back).__module__ == "paglets"
    assert message in str(back)
    again = paglets._error_to_wire(back)  # relayed on: the same kind, message and class name
    assert again["error"] == kind and again["message"] == message
    assert again.get("exception") == (exception or kind)


def _local_error_instance() -> Exception:
    class LocalError(Exception):
        pass

    return LocalError("local")


@pytest.mark.parametrize(
    "exception",
    [
        "os:system",
        "builtins:eval",
        "builtins:SystemExit",
        "builtins:KeyboardInterrupt",
        "builtins:GeneratorExit",
        "builtins:BaseException",
        "builtins:__import__",
        "builtins:NoSuchError",
        "sys:exit",
        "subprocess:Popen",
        "subprocess:CalledProcessError",  # a real exception class, but it needs more than a message
        "os:error",  # an alias of OSError: the name is not the class's own
        "paglets:Message",
        "paglets:_resolve_class",
        "paglets_tests.test_errors:AppError.__class__",
        "paglets_tests.test_errors:NeedsTwoArgs",
        "paglets_tests.test_errors:Outer",
        "nosuchmod:Err",
        "nosuch.pkg.mod:Err",
        "",
        ":",
        "no-colon",
        "a:b:c",
    ],
)
def test_unknown_or_unsafe_names_fall_back_to_a_paglet_error(exception: str) -> None:
    body = {"error": "WeirdError", "message": "it went wrong: 'x'", "exception": exception}
    back = paglets._error_from_wire(body)
    assert not isinstance(back, (SystemExit, KeyboardInterrupt, GeneratorExit))
    _assert_fallback(back, "WeirdError", "it went wrong: 'x'", exception)


def test_a_local_class_falls_back_and_keeps_its_name() -> None:
    exc = _local_error_instance()
    body = paglets._error_to_wire(exc)
    _assert_fallback(paglets._error_from_wire(body), "LocalError", "local", body["exception"])


def test_a_fallback_error_reads_as_its_message() -> None:
    """What a user logs with ``str(exc)`` is the message (perhaps after the kind), not a tuple."""
    back = paglets._error_from_wire({"error": "WeirdError", "message": "it went wrong", "exception": "nosuchmod:WeirdError"})
    assert str(back) in ("it went wrong", "WeirdError: it went wrong"), f"str() of the fallback is {str(back)!r}"


def test_an_unknown_kind_without_a_class_name_falls_back() -> None:
    _assert_fallback(paglets._error_from_wire({"error": "NoSuchKind", "message": "m"}), "NoSuchKind", "m", None)


@pytest.mark.parametrize("body", [None, "text", 5, [], {}, {"error": 5}, {"message": "m"}], ids=repr)
def test_a_body_that_is_not_an_error_gives_the_default_class(body: Any) -> None:
    back = paglets._error_from_wire(body)
    assert type(back) is paglets.RemoteHostError
    assert type(paglets._error_from_wire(body, default=paglets.TransferError)) is paglets.TransferError


def test_naming_a_module_that_is_not_imported_never_imports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"paglets_err_probe_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\nclass Err(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for exception in (f"{name}:Err", f"{name}.sub:Err"):
        back = paglets._error_from_wire({"error": "Err", "message": "m", "exception": exception})
        _assert_fallback(back, "Err", "m", exception)
    assert [m for m in sys.modules if m.startswith(name)] == []
    assert not marker.exists()


# -- the registry by kind --------------------------------------------------------------------------


def test_a_user_error_named_like_ours_does_not_take_over_our_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defining ``class HostError(PagletError)`` in an app must not change what "HostError" means."""
    monkeypatch.setitem(paglets._ERRORS, "HostError", paglets.HostError)  # restored after the test

    class HostError(PagletError):  # the point of the test: an app's class with our name
        pass

    assert HostError is not paglets.HostError
    assert type(paglets._error_from_wire({"error": "HostError", "message": "m"})) is paglets.HostError


def test_a_kind_naming_a_user_error_class_never_escapes_as_a_type_error() -> None:
    assert "NeedsArgsError" not in paglets._ERRORS

    class NeedsArgsError(PagletError):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}/{b}")

    try:
        back = paglets._error_from_wire({"error": "NeedsArgsError", "message": "m"})
        assert isinstance(back, PagletError) and "m" in str(back)
    finally:
        if paglets._ERRORS.get("NeedsArgsError") is NeedsArgsError:
            del paglets._ERRORS["NeedsArgsError"]


# -- _translating ----------------------------------------------------------------------------------


def test_translating_turns_foreign_errors_into_ours() -> None:
    with (
        pytest.raises(paglets.SerializationError, match="bad CBOR: broken") as info,
        paglets._translating((ValueError,), paglets.SerializationError, "bad CBOR"),
    ):
        raise ValueError("broken")
    assert isinstance(info.value.__cause__, ValueError)


def test_translating_leaves_our_errors_and_other_errors_alone() -> None:
    original = paglets.ForbiddenError("no")
    with pytest.raises(paglets.ForbiddenError) as info, paglets._translating((Exception,), paglets.SerializationError, "x"):
        raise original
    assert info.value is original
    with pytest.raises(KeyError), paglets._translating((ValueError,), paglets.SerializationError, "x"):
        raise KeyError("k")
