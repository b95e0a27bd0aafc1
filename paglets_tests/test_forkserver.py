"""The fork server: workers never outlive their host process, even one killed with SIGKILL."""

from __future__ import annotations

from collections.abc import Callable

import psutil

import paglets
from paglets_tests.conftest import ServeProcess, process_gone, wait_until


def test_workers_and_fork_server_die_with_a_killed_host(serve: Callable[..., ServeProcess]) -> None:
    proc = serve("doomed").start()
    client = paglets.HostClient(timeout=10)
    busy = client.create(proc.url, "paglets_tests.agents:Crashy")
    idle = client.create(proc.url, "paglets_tests.agents:Counter")
    pids = [int(client.agent_info(proc.url, p.agent_id)["pid"]) for p in (busy, idle)]
    busy.send_oneway("spin")  # a worker stuck in pure Python, holding its GIL
    wait_until(lambda: psutil.Process(pids[0]).cpu_times().user > 0.05)
    fork_server = psutil.Process(pids[0]).ppid()
    spares = [c.pid for c in psutil.Process(fork_server).children() if c.pid not in pids]
    proc.kill()  # SIGKILL: no shutdown code runs in the host
    wait_until(lambda: all(process_gone(pid) for pid in [*pids, fork_server, *spares]), timeout=15)


def test_a_spare_worker_is_ready_before_the_first_paglet(make_host: Callable[..., paglets.Host]) -> None:
    host = make_host("warm")
    server = paglets._ForkServer.shared()
    zygote = psutil.Process(server.pid)
    def alive_children() -> list[psutil.Process]:
        return [c for c in zygote.children() if not process_gone(c.pid)]

    wait_until(lambda: len(alive_children()) == 1)  # only the spare, forked ahead (workers of earlier tests are gone)
    spare = alive_children()[0].pid
    proxy = host.create(paglets.ServerInfo)
    assert proxy.info()["pid"] == spare  # the first paglet runs in the spare; no fork on its path
    wait_until(lambda: any(c.pid != spare for c in zygote.children()))  # and the next spare follows
