"""Serve one vendor emulator in its own process (benchmarks, manual testing).

    python -m dirpull.emulators serve --provider okta --people 100000 --groups 2000 --seed 1 \\
        [--port 0] [--workdir DIR] [--tenant bench] [--age 86400] [--kw rate_limit=1000000] [--workers 2]

Builds `Org.generate(people, groups=groups, seed=seed)`, starts the provider's emulator on
127.0.0.1 and prints ONE JSON line on stdout:

    {"base_url": "http://127.0.0.1:PORT", "tenant": {<the [tenants.<tenant>] table>}, "pid": PID,
     "provider": "okta", "people": N, "groups": G, "memberships": M, "startup_s": 1.2,
     "workers": ["http://127.0.0.1:PORT2", …], "worker_pids": [PID2, …]}

With --workers N (emulators that allow it: Graph, Google) N processes serve the port (workers.py); each
also answers on its own URL in "workers", where control requests must go — to each of them.

Credential files a tenant needs (Google's service-account key) are written into --workdir.
It serves until SIGTERM/SIGINT, or until stdin closes when stdin is a pipe (so a parent that dies
takes its emulator with it). Everything else goes to stderr.

Besides the control endpoints every emulator serves (/_emulator/health, /faults, /changes), this
process adds two for benchmarks:
  GET  /_emulator/request_log?after=N   {"total": T, "log": [[method, path?query], …]} (entries after N)
  POST /_emulator/request_log/clear     forget the log (keeps memory flat over long runs)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dirpull.emulators import EMULATOR_CLASSES, emulator_class
from dirpull.emulators.org import Org
from dirpull.emulators.server import LOOPBACK, Emulator, Request, Response


def _parse_kw(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--kw expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _add_bench_routes(emulator: Emulator) -> None:
    def request_log(req: Request) -> Response:
        after = int(req.arg("after", "0") or 0)
        with emulator._lock:
            log = list(emulator.request_log[after:])
            total = len(emulator.request_log)
        return Response(200, {"total": total, "requests": emulator.requests, "log": log})

    def clear(req: Request) -> Response:
        with emulator._lock:
            emulator.request_log.clear()
        return Response(200, {"ok": True})

    emulator.route("GET", r"/_emulator/request_log", request_log)
    emulator.route("POST", r"/_emulator/request_log/clear", clear)


SPREAD = 365 * 86400.0


def backdate(org: Org, age: float, spread: float = SPREAD) -> None:
    """Make the generated organization look grown, not born a second ago: its objects' timestamps
    are spread evenly over `spread` seconds (in the order they were made), the newest `age` seconds
    in the past. Without this every object shares the same second, and a timestamp cursor with a
    hold-back or overlap window (Okta's cursor_holdback, BambooHR's changed_overlap) re-lists the
    whole organization on every incremental run. Versions are untouched; later changes are stamped
    with the real clock, after all of these."""
    with org.lock:
        objs = sorted([*org.people.values(), *org.groups.values()], key=lambda o: o.updated_at)
        if not objs:
            return
        newest = time.time() - age
        step = spread / len(objs)
        for i, obj in enumerate(objs):
            ts = newest - (len(objs) - 1 - i) * step
            obj.created_at = obj.updated_at = ts
        for g in org.groups.values():
            g.members_updated_at = g.updated_at


def _stdin_is_pipe() -> bool:
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def serve(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.workers < 1 or (args.workers > 1 and not emulator_class(args.provider).parallel):
        raise SystemExit(f"--workers {args.workers}: the {args.provider} emulator serves from one process only")
    org = Org.generate(args.people, groups=args.groups, seed=args.seed)
    if args.age:
        backdate(org, args.age)
    emulator = emulator_class(args.provider)(org, **_parse_kw(args.kw))
    _add_bench_routes(emulator)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dirpull-emulator-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    emulator.start(LOOPBACK, args.port, workers=args.workers)
    try:
        line = {
            "base_url": emulator.base_url,
            "tenant": emulator.tenant_config(args.tenant, workdir),
            "pid": os.getpid(),
            "provider": args.provider,
            "people": len(org.people),
            "groups": len(org.groups),
            "memberships": sum(len(g.members) for g in org.groups.values()),
            "startup_s": round(time.monotonic() - started, 3),
            "workers": emulator.worker_urls or [emulator.base_url],
            "worker_pids": emulator.worker_pids,
        }
        sys.stdout.write(json.dumps(line, default=str) + "\n")
        sys.stdout.flush()
        if _stdin_is_pipe():

            def watch_stdin() -> None:
                try:
                    while sys.stdin.buffer.read(65536):
                        pass
                except (OSError, ValueError):
                    pass
                stop.set()

            threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
        deadline = None if not args.max_seconds else time.monotonic() + args.max_seconds
        while not stop.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        emulator.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dirpull.emulators", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve one provider's emulator on 127.0.0.1")
    s.add_argument("--provider", required=True, choices=sorted(EMULATOR_CLASSES))
    s.add_argument("--people", type=int, default=200)
    s.add_argument("--groups", type=int, default=None, help="default: people // 50, at least 8")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--workdir", default=None, help="where credential files go (default: a temp dir)")
    s.add_argument("--tenant", default="bench", help="tenant name passed to tenant_config")
    s.add_argument("--kw", action="append", default=[], help="emulator constructor argument key=JSON")
    s.add_argument(
        "--age",
        type=float,
        default=0.0,
        help="spread the generated organization's timestamps over the past year, the newest "
        "this many seconds old (benchmarks: 86400)",
    )
    s.add_argument("--workers", type=int, default=1,
                   help="processes serving the port (more than 1: emulators whose state allows it)")
    s.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0: never)")
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
