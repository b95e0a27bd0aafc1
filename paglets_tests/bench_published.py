"""Compare `python paglets.py bench` with the published `paglets==2.0.0`, in one run.

Not a test (pytest does not collect it, CI does not run it). From the repo root:

    python paglets_tests/bench_published.py [--json] [--quick]

The published package is installed once into a cached virtual environment
(~/.cache/paglets-bench/published-2.0.0; delete it to rebuild) and driven there by an
embedded workload, so nothing of it is imported into this process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PUBLISHED = "paglets==2.0.0"
REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "paglets-bench" / "published-2.0.0"
MARKER = CACHE / ".installed"

# (JSON key, figure, unit, SPEC section 8 target); `paglets.py bench --json` uses the same keys.
FIGURES: list[tuple[str, str, str, str]] = [
    ("create_first_reply_ms", "create + first reply", "ms", "<= 5 ms"),
    ("local_rt_us", "local message round trip", "us", "<= 150 us"),
    ("local_throughput_per_s", "local message throughput", "msgs/s", "-"),
    ("remote_rt_us", "remote message round trip (loopback HTTP)", "us", "<= 600 us"),
    ("dispatch_hop_ms", "dispatch hop + first reply", "ms", "<= 15 ms"),
    ("dispatch_hop_1mib_ms", "dispatch hop with 1 MiB state", "ms", "<= 40 ms"),
    ("deactivate_activate_ms", "deactivate + activate + reply", "ms", "<= 10 ms"),
    ("idle_uss_mib", "idle paglet memory (USS)", "MiB", "<= 3 MiB"),
    ("idle_rss_mib", "idle paglet memory (RSS)", "MiB", "-"),
    ("host_start_health_ms", "host start to /health 200", "ms", "<= 300 ms"),
    ("floor_fork_start_ms", "floor: bare fork + first reply", "ms", "-"),
    ("floor_fork_rt_us", "floor: fork + socketpair round trip", "us", "-"),
    ("floor_http_rt_us", "floor: bare loopback HTTP round trip", "us", "-"),
]
KEYS: list[str] = [key for key, *_ in FIGURES]

# Both modules are written to a temporary directory put on PYTHONPATH, so that the paglet
# processes the published hosts spawn can import the test paglet by its module path. The
# paglet has a module of its own so that its worker processes import nothing else.
AGENTS = r'''
from __future__ import annotations

from dataclasses import dataclass

from paglets.core.agent import Paglet, PagletState
from paglets.core.messages import Message


@dataclass
class EchoState(PagletState):
    blob: bytes = b""


class Echo(Paglet[EchoState]):
    State = EchoState

    def handle_message(self, message: Message) -> object:
        return "pong"
'''

WORKLOAD = r'''
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from paglets.core.messages import Message
from paglets.remote.client import HostClient
from paglets.remote.proxy import PagletProxy
from paglets.runtime.host import Host
from pub_bench_agents import Echo, EchoState

MIB = 1024 * 1024


def ping() -> Message:
    return Message(kind="ping")


def ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


def timed(fn, reps: int, warm: int = 1) -> list[float]:
    """Milliseconds of each of `reps` calls of fn, after `warm` untimed calls."""
    out = []
    for i in range(warm + reps):
        t0 = time.perf_counter_ns()
        fn()
        if i >= warm:
            out.append(ms(t0))
    return out


def serve() -> None:
    """A lean host process: Host.serve_forever from a -c script, so no heavy __main__."""
    name, port, folder = sys.argv[1:4]
    host = Host(name, port=int(port), mesh=False, persistence_dir=folder)
    signal.signal(signal.SIGTERM, lambda *_: (host.stop(), sys.exit(0)))
    host.serve_forever()


def start_host(tmp: Path, name: str, cli: bool) -> tuple[subprocess.Popen, str]:
    """Start a host process and return once its /health answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    if cli:  # the published command line, with mesh off and an empty launch config
        cmd = [str(Path(sys.executable).parent / "paglets"), "host", "--name", name, "--port", str(port), "--no-mesh",
               "--persistence-dir", str(folder), "--launch-config", str(folder / "launch.toml"), "--no-sync-launch-config"]
    else:
        cmd = [sys.executable, "-c", "from pub_bench_workload import serve; serve()", name, str(port), str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc, url
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                raise
        time.sleep(0.002)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def idle_mib(a: Host, proc: subprocess.Popen, url: str, n: int) -> tuple[float, float, int]:
    """Median USS and RSS of the idle paglet workers, found as children of the host process."""
    for _ in range(n):
        a.create_remote(url, Echo)
    time.sleep(1.0)
    pids = {x["pid"] for x in HostClient().get_json(url + "/agents")["agents"]}
    infos = [c.memory_full_info() for c in psutil.Process(proc.pid).children(recursive=True) if c.pid in pids]
    return statistics.median(i.uss for i in infos) / MIB, statistics.median(i.rss for i in infos) / MIB, len(infos)


def main() -> None:
    reps, msgs, n_tp, n_idle = (3, 100, 200, 3) if "--quick" in sys.argv else (10, 500, 1000, 5)
    res: dict[str, object] = {}
    notes: dict[str, str] = {}
    tmp = Path.cwd() / "run"  # inside the driver's temporary directory
    a = Host("bench-a", port=0, mesh=False, persistence_dir=tmp / "a")
    a.start_background()

    def start_ms(cli: bool, n: int) -> float:
        samples = []
        for _ in range(n + 1):  # the first start warms the page cache
            t0 = time.perf_counter_ns()
            proc = start_host(tmp, "start", cli)[0]
            samples.append(ms(t0))
            stop(proc)
        return statistics.median(samples[1:])

    res["host_start_health_ms"] = start_ms(False, reps)
    cli_ms = start_ms(True, max(2, reps // 3))
    cli_proc, cli_url = start_host(tmp, "cli", True)
    try:
        cli_uss, cli_rss, _ = idle_mib(a, cli_proc, cli_url, 2)
    finally:
        stop(cli_proc)
    notes["host_start_health_ms"] = (
        f"a python -c script running Host.serve_forever; "
        f"the `paglets host --no-mesh` command (empty launch config) takes {cli_ms:.0f} ms: it imports its whole CLI")

    b_proc, b_url = start_host(tmp, "bench-b", False)
    try:
        def create() -> None:
            proxy = a.create(Echo)
            a.deliver_message(proxy.agent_id, ping())
            created.append(proxy.agent_id)

        created: list[str] = []
        res["create_first_reply_ms"] = statistics.median(timed(create, reps))
        for agent_id in created:
            a.dispose(agent_id)
        notes["create_first_reply_ms"] = "Host.create + Host.deliver_message, in the host process"

        local = a.create(Echo)
        lid = local.agent_id
        res["local_rt_us"] = 1000 * statistics.median(timed(lambda: a.deliver_message(lid, ping()), msgs, 50))
        via_proxy = 1000 * statistics.median(timed(lambda: local.send(ping()), msgs // 2, 20))
        notes["local_rt_us"] = (f"Host.deliver_message in the host process; PagletProxy.send, which the published "
                                f"package always routes over HTTP, even to its own host, takes {via_proxy:.0f} us")

        def burst() -> None:
            for _ in range(n_tp - 1):
                a.deliver_message(lid, ping(), oneway=True)
            a.deliver_message(lid, ping())

        res["local_throughput_per_s"] = n_tp / (statistics.median(timed(burst, 3)) / 1000)
        notes["local_throughput_per_s"] = f"{n_tp} messages from one caller: {n_tp - 1} oneway, then one awaited"

        remote = a.create_remote(b_url, Echo)
        remote = PagletProxy(remote.host_url, remote.agent_id, HostClient())
        res["remote_rt_us"] = 1000 * statistics.median(timed(lambda: remote.send(ping()), msgs, 50))
        notes["remote_rt_us"] = "PagletProxy.send from the benchmark process to a separate host process"

        for key, blob in (("dispatch_hop_ms", b""), ("dispatch_hop_1mib_ms", os.urandom(MIB))):
            hops = [a.create(Echo, EchoState(blob=blob))]

            def hop(hops: list[PagletProxy] = hops) -> None:
                hops.append(hops[-1].dispatch(b_url if len(hops) % 2 else a.address))
                assert hops[-1].send(ping()) == "pong"

            res[key] = statistics.median(timed(hop, reps))
            hops[-1].dispose()
        notes["dispatch_hop_ms"] = "PagletProxy.dispatch + PagletProxy.send, alternately to host B (own process) and A"

        def cycle() -> None:
            a.deactivate(lid)
            a.activate(lid)
            a.deliver_message(lid, ping())

        res["deactivate_activate_ms"] = statistics.median(timed(cycle, reps))
        notes["deactivate_activate_ms"] = "Host.deactivate + Host.activate + Host.deliver_message"

        uss, rss, count = idle_mib(a, b_proc, b_url, n_idle)
        res["idle_uss_mib"], res["idle_rss_mib"] = uss, rss
        notes["idle_uss_mib"] = (f"median over {count} idle workers of the host process; workers of a `paglets host` "
                                 f"command re-import its CLI (pandas, scikit-learn): USS {cli_uss:.1f}, RSS {cli_rss:.1f} MiB")
    finally:
        stop(b_proc)
        a.stop()
    print(json.dumps({**res, "notes": notes}))
'''


def venv_python() -> Path:
    return CACHE / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    """Create the cached venv with the published package, unless it is complete already."""
    if not MARKER.exists():
        shutil.rmtree(CACHE, ignore_errors=True)
        print(f"installing {PUBLISHED} into {CACHE} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(CACHE)], check=True)
        pip = [str(venv_python()), "-m", "pip", "install", "--quiet", PUBLISHED]
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"pip failed: {done.stderr.strip()[-1500:]}")
        MARKER.write_text(PUBLISHED + "\n")
    return venv_python()


def run_json(cmd: list[str], what: str, **kwargs: Any) -> tuple[dict[str, Any] | None, str]:
    """Run cmd and return the last JSON object it printed, or None and why not."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{what} did not run: {exc}"
    if proc.returncode != 0:
        return None, f"{what} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            obj = json.loads(line)
            if isinstance(obj, dict):
                return obj, ""
    return None, f"{what} printed no JSON object"


def run_published(quick: bool) -> tuple[dict[str, Any] | None, str]:
    try:
        python = ensure_venv()
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"could not install {PUBLISHED}: {exc}"
    with tempfile.TemporaryDirectory(prefix="paglets-bench-") as tmp:
        (Path(tmp) / "pub_bench_workload.py").write_text(WORKLOAD)
        (Path(tmp) / "pub_bench_agents.py").write_text(AGENTS)
        (Path(tmp) / "home").mkdir()  # the published host writes below ~/.paglets
        env = {k: v for k, v in os.environ.items() if k != "PAGLETS_API_KEY"}
        env.update(PYTHONPATH=tmp, HOME=str(Path(tmp) / "home"), PYTHONDONTWRITEBYTECODE="1")
        cmd = [str(python), "-c", "import pub_bench_workload as w; w.main()", *(["--quick"] if quick else [])]
        return run_json(cmd, f"the {PUBLISHED} workload", cwd=tmp, env=env)


def run_ours(quick: bool) -> tuple[dict[str, Any] | None, str]:
    cmd = [sys.executable, "paglets.py", "bench", "--json", *(["--quick"] if quick else [])]
    return run_json(cmd, "`paglets.py bench --json`", cwd=REPO)


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def build_report(quick: bool) -> dict[str, Any]:
    ours, ours_error = run_ours(quick)
    published, published_error = run_published(quick)
    notes: dict[str, str] = dict((published or {}).get("notes") or {})
    rows: list[dict[str, Any]] = []
    for key, figure, unit, target in FIGURES:
        mine = number((ours or {}).get(key))
        floor = key.startswith("floor_")
        theirs = None if floor else number((published or {}).get(key))
        if published is not None and theirs is None and not floor:
            notes.setdefault(key, "not measured: the published workload did not report it")
        ratio = theirs / mine if theirs is not None and mine else None
        rows.append({"key": key, "figure": figure, "unit": unit, "target": target, "ours": mine, "published": theirs, "ratio": ratio})
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "python": platform.python_version(),
        "command": "python paglets_tests/bench_published.py" + (" --quick" if quick else ""),
        "published_package": PUBLISHED,
        "rows": rows,
        "ours_error": ours_error or None,
        "published_error": published_error or None,
        "published_notes": notes,
    }


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if unit in ("ms", "MiB") else f"{value:,.0f}"


def print_table(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(f"paglets.py vs {PUBLISHED}, medians, {report['date']}: {report['command']}")
    print(f"machine: {machine['platform']} ({machine['machine']}), {machine['cpu_count']} CPUs, Python {report['python']}")
    header = ("figure", "unit", "ours", "published", "ratio", "target")
    lines = [
        (r["figure"], r["unit"], fmt(r["ours"], r["unit"]), fmt(r["published"], r["unit"]),
         "-" if r["ratio"] is None else f"{r['ratio']:,.1f}x", r["target"])
        for r in report["rows"]
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *lines]:
        cells = [c.ljust(w) if i in (0, 1, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())
    print("ratio = published / ours (for throughput, below 1x means ours is faster)")
    if report["ours_error"]:
        print(f"ours: missing -- {report['ours_error']}")
    if report["published_error"]:
        print(f"published: missing -- {report['published_error']}")
    for key, note in report["published_notes"].items():
        print(f"published {key}: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare paglets.py with the published paglets 2.0.0.")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    report = build_report(args.quick)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
