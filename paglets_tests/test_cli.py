"""The command line (SPEC section 7, issue 4): `python paglets.py ...` as real subprocesses against a
real `serve` subprocess; exit codes 0 / 1 / 2 with one-line errors; help; API keys; signals."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paglets import HostClient, Message
from paglets_tests.conftest import PAGLETS_PY, ROOT, ServeProcess

Serve = Callable[..., ServeProcess]
COUNTER = "paglets_tests.agents:Counter"
PROVIDER = "paglets_tests.agents_http:Provider"


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGLETS_API_KEY", raising=False)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PAGLETS_API_KEY"}
    return {**env, "PYTHONPATH": str(ROOT), **(extra or {})}


def run_many(*commands: list[str], env: dict[str, str] | None = None, timeout: float = 30.0) -> list[subprocess.CompletedProcess[str]]:
    """Run several `python paglets.py ...` at once (they are independent); results in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(PAGLETS_PY), *args],
            cwd=str(ROOT),
            env=_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"paglets {' '.join(args)} did not finish in {timeout} s") from None
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_many(list(args), env=env)[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit status `code` and exactly one error line on stderr (argparse's usage lines aside)."""
    assert result.returncode == code, (result.args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("usage:", " "))]
    assert len(errors) == 1, (result.args, result.stderr)
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


# -- help ---------------------------------------------------------------------------------------------
def test_help_documents_every_command_and_option() -> None:
    client_commands = ["agents", "create", "send", "dispatch", "deactivate", "activate", "dispose", "events", "hosts", "services"]
    results = run_many(["--help"], ["serve", "--help"], *[[name, "--help"] for name in client_commands])
    top, serve_help, *client_help = map(ok, results)
    for name in ["serve", *client_commands]:
        assert re.search(rf"^\s+{name}\b", top, re.M), name
    for option in ["--name", "--host", "--port", "--data-dir", "--peer", "--mesh-version", "--tag", "--property", "--allow", "--path",
                   "--api-key-env", "--insecure", "--log-level"]:  # fmt: skip
        assert option in serve_help, option
    assert "127.0.0.1" in serve_help  # the default bind is said
    helps = dict(zip(client_commands, client_help, strict=True))
    for name, text in helps.items():
        assert "--host-url" in text and "--api-key-env" in text, name
    for listing in ["agents", "events", "hosts", "services"]:
        assert "--json" in helps[listing], listing
    assert "CLASS" in helps["create"] and "--state" in helps["create"]
    assert "AGENT" in helps["send"] and "KIND" in helps["send"] and "--args" in helps["send"]
    assert "--state" in helps["agents"] and "--since" in helps["events"] and "--limit" in helps["events"]
    for name in ["deactivate", "activate", "dispose"]:
        assert "AGENT" in helps[name]


# -- the client commands against `serve` -----------------------------------------------------------------
def test_client_commands_against_a_running_host(serve: Serve) -> None:
    srv = serve("svc").start()
    url = ["--host-url", srv.url]
    baseline = {a["agent_id"] for a in HostClient().agents(srv.url, "all")}  # built-in residents, if any

    counter = ok(run("create", COUNTER, "--state", '{"count": 2}', *url)).strip()
    # (one create first: concurrent first uses of a module are a separate test, in test_http_api.py)
    created, provider_r = run_many(["create", COUNTER, "--init", "5", "--json", *url], ["create", PROVIDER, *url])
    created_wire, provider = as_json(created), ok(provider_r).strip()
    other = created_wire["agent_id"]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", counter) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", provider)
    assert created_wire["host_url"] == srv.url

    added, other_get, advertised = run_many(
        ["send", counter, "add", "--args", '{"by": 3}', *url], ["send", other, "get", "--json", *url],
        ["send", provider, "advertise", "--args", '{"name": "calc"}', *url],
    )  # fmt: skip
    assert ok(added).strip() == "5"
    assert as_json(other_get) == 5  # --init reached on_creation
    assert ok(advertised).strip() == "calc"
    got, echoed = run_many(
        ["send", counter, "get", "--json", *url], ["send", counter, "echo", "--args", '{"value": {"a": [1, "x", null]}}', "--json", *url]
    )
    assert as_json(got) == 5 and as_json(echoed) == {"a": [1, "x", None]}
    assert ok(run("send", counter, "add", "--oneway", *url)).strip() == ""
    assert as_json(run("send", counter, "get", "--json", *url)) == 6  # the one-way message was handled first

    listing, table, services, services_table, hosts, hosts_table, events = run_many(
        ["agents", "--json", *url], ["agents", *url], ["services", "--json", *url], ["services", *url],
        ["hosts", "--json", *url], ["hosts", *url], ["events", "--json", "--limit", "1000", *url],
    )  # fmt: skip
    infos = {a["agent_id"]: a for a in as_json(listing) if a["agent_id"] not in baseline}
    assert set(infos) == {counter, other, provider}
    assert infos[counter]["agent_class"] == COUNTER and infos[counter]["active"] is True
    table_text = ok(table)
    assert "AGENT" in table_text.splitlines()[0] and all(aid in table_text for aid in (counter, other, provider))
    (record,) = [r for r in as_json(services) if r["agent_id"] == provider]
    assert record["name"] == "calc" and sorted(record["capabilities"]) == ["add", "echo"]
    assert "calc" in ok(services_table) and provider in ok(services_table)
    assert srv.url in [h["url"] for h in as_json(hosts)] and "svc" in [h["name"] for h in as_json(hosts)]
    assert "svc" in ok(hosts_table) and srv.url in ok(hosts_table)
    kinds = [(e["kind"], e["agent_id"]) for e in as_json(events)]
    assert ("created", counter) in kinds and ("created", provider) in kinds
    last = max(e["event_id"] for e in as_json(events))

    assert ok(run("deactivate", counter, *url))
    active, inactive, newer = run_many(
        ["agents", "--json", *url],
        ["agents", "--state", "inactive", "--json", *url],
        ["events", "--since", str(last), "--limit", "1", "--json", *url],
    )
    assert counter not in {a["agent_id"] for a in as_json(active)}
    (asleep,) = [a for a in as_json(inactive) if a["agent_id"] not in baseline]
    assert asleep["agent_id"] == counter and asleep["active"] is False
    (event,) = as_json(newer)
    assert event["event_id"] > last and (event["kind"], event["agent_id"]) == ("deactivated", counter)

    assert ok(run("activate", counter, *url))
    active, got, table = run_many(["agents", "--json", *url], ["send", counter, "get", "--json", *url], ["events", *url])
    assert counter in {a["agent_id"] for a in as_json(active)}
    assert as_json(got) == 6  # state kept across deactivation
    assert "created" in ok(table) and "deactivated" in ok(table)

    assert ok(run("dispose", counter, *url))
    gone, everything = run_many(["send", counter, "get", *url], ["agents", "--state", "all", "--json", *url])
    failed(gone, 1, "InvalidAgentError")
    assert counter not in {a["agent_id"] for a in as_json(everything)}


def test_exit_codes_and_one_line_errors(serve: Serve) -> None:
    srv = serve("svc").start()
    url = ["--host-url", srv.url]
    counter = HostClient().create(srv.url, COUNTER).agent_id
    provider = HostClient().create(srv.url, PROVIDER).agent_id
    calls = [
        (["send", "ghost", "get", *url], "InvalidAgentError"),
        (["deactivate", "ghost", *url], "InvalidAgentError"),
        (["dispose", "ghost", *url], "InvalidAgentError"),
        (["send", counter, "no-such-kind", *url], "NotHandledError"),
        (["send", counter, "raise", "--args", '{"value": 1}', *url], "bad value 1"),  # the paglet's own ValueError
        (["send", provider, "over-quota", "--args", '{"limit": 2}', *url], "quota of 2 exceeded"),
        (["send", provider, "key-error", *url], "missing"),
        (["create", "os:system", *url], "ForbiddenError"),
        (["agents", "--host-url", "http://127.0.0.1:1"], ""),  # nobody listens there
    ]
    usage = [
        [],
        ["frobnicate"],
        ["send", *url],
        ["send", counter, "add", "--args", "[1, 2]", *url],
        ["create", COUNTER, "--state", "nope", *url],
        ["agents", "--state", "sleeping", *url],
        ["serve", "--property", "no-equals-sign", "--port", "0", "--data-dir", str(Path(srv.data_dir).parent / "unused")],
    ]
    results = run_many(*[args for args, _ in calls], *usage)
    problems = []
    for (args, word), result in zip(calls, results[: len(calls)], strict=True):
        try:
            line = failed(result, 1, word)
            assert line.startswith("paglets"), line
        except AssertionError as exc:
            problems.append((args[:3], str(exc)[-300:]))
    for args, result in zip(usage, results[len(calls) :], strict=True):
        try:
            failed(result, 2)
            assert result.stdout == "", result.stdout
        except AssertionError as exc:
            problems.append((args[:3], str(exc)[-300:]))
    assert not problems, "\n".join(map(repr, problems))
    assert HostClient().send_message(srv.url, counter, Message("get")) == 0  # nothing happened


# -- security -----------------------------------------------------------------------------------------------
def test_serve_refuses_a_public_bind_without_a_key(tmp_path: Path) -> None:
    results = run_many(
        ["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "a")],
        ["serve", "--host", "::", "--port", "0", "--data-dir", str(tmp_path / "b")],
        ["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "c"), "--api-key-env", "EMPTY_KEY"],
        env={"EMPTY_KEY": ""},
    )
    for result in results:
        failed(result, 2, "--insecure")
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before anything was set up


def _health(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def test_serve_with_insecure_binds_everywhere(serve: Serve) -> None:
    srv = serve("open", extra=["--host", "0.0.0.0", "--insecure"]).start()
    port = urllib.parse.urlsplit(srv.url).port
    assert _health(srv.url) == 200
    assert HostClient().health(srv.url)["name"] == "open"  # at the address it announces (this machine's LAN address)
    assert isinstance(as_json(run("agents", "--json", "--host-url", f"http://127.0.0.1:{port}")), list)
    assert srv.terminate() == 0


def test_api_key_from_the_environment(serve: Serve) -> None:
    srv = serve("locked", extra=["--host", "0.0.0.0"], env={"PAGLETS_API_KEY": "sekrit"}).start()  # a key makes the public bind fine
    port = urllib.parse.urlsplit(srv.url).port
    url = ["--host-url", f"http://127.0.0.1:{port}"]
    assert _health(srv.url) == 200
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/agents")
    assert conn.getresponse().status == 401
    conn.close()
    no_key, other_var = run_many(["agents", *url], ["agents", "--json", "--api-key-env", "MY_KEY", *url], env={"MY_KEY": "sekrit"})
    failed(no_key, 1, "AuthenticationError")  # MY_KEY is not read without --api-key-env
    listed = as_json(other_var)
    assert isinstance(listed, list) and as_json(run("agents", "--json", *url, env={"PAGLETS_API_KEY": "sekrit"})) == listed
    for result in run_many(["agents", *url], ["create", COUNTER, *url], env={"PAGLETS_API_KEY": "wrong"}):
        failed(result, 1, "AuthenticationError")
    created = ok(run("create", COUNTER, *url, env={"PAGLETS_API_KEY": "sekrit"})).strip()
    assert created in [a["agent_id"] for a in HostClient(api_key="sekrit").agents(f"http://127.0.0.1:{port}")]

    # serve --api-key-env names another variable
    other = serve("other", extra=["--api-key-env", "HOST_KEY"], env={"HOST_KEY": "k2"}).start()
    a, b = run_many(["agents", "--host-url", other.url], ["agents", "--json", "--host-url", other.url], env={"PAGLETS_API_KEY": "k2"})
    assert isinstance(as_json(b), list) and ok(a)
    failed(run("agents", "--host-url", other.url, env={"PAGLETS_API_KEY": "sekrit"}), 1, "AuthenticationError")


# -- signals --------------------------------------------------------------------------------------------------
def _port_closed(url: str) -> bool:
    port = urllib.parse.urlsplit(url).port
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_shuts_down_cleanly_on_a_signal(serve: Serve, tmp_path: Path, signum: int) -> None:
    data = tmp_path / "svc-data"
    srv = serve("svc", data_dir=data).start()
    proxy = HostClient().create(srv.url, COUNTER, init=41)
    assert proxy.send("add") == 42
    assert srv.proc is not None
    srv.proc.send_signal(signum)
    code = srv.proc.wait(30)
    if signum == signal.SIGTERM:
        assert code == 0
    else:
        assert code in (0, 130), code  # Ctrl-C: a clean stop, 0 or the shell's 128 + SIGINT
    assert "Traceback" not in srv.stderr()
    assert _port_closed(srv.url)
    # a clean shutdown keeps the paglet for the next start
    again = serve("svc", data_dir=data).start()
    (info,) = [a for a in HostClient().agents(again.url, "all") if a["agent_id"] == proxy.agent_id]
    assert info["active"] is True
    assert HostClient().send_message(again.url, proxy.agent_id, Message("get")) == 42
    assert again.terminate() == 0
