"""The mesh between hosts: regressions found in review."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import paglets
from paglets import HostError, HostRef

HostFactory = Callable[..., paglets.Host]


def test_wait_for_a_host_that_calls_itself_by_another_url_keeps_its_deadline(make_host: HostFactory) -> None:
    # The host at this port answers joins, but says its URL is another one: the URL asked for never
    # becomes a known, online host.  wait_for_host must end by its deadline, not join again and again.
    elsewhere = make_host("elsewhere", public_url="http://127.0.0.1:9")
    alpha = make_host("alpha")
    url = f"http://127.0.0.1:{elsewhere.port}"
    outcome: list[HostRef | BaseException] = []

    def wait() -> None:
        try:
            outcome.append(alpha.wait_for_host(url, timeout=1))
        except HostError as exc:
            outcome.append(exc)

    started = time.monotonic()
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive(), "wait_for_host(timeout=1) still waiting after 5 s"
    assert time.monotonic() - started < 5
    assert len(outcome) == 1
    if isinstance(outcome[0], HostRef):
        assert outcome[0].name == "elsewhere"
