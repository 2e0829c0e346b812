#!/usr/bin/env python3
"""Where a sync's time goes: one provider's emulator in its own process, an initial sync, then the
phase you ask for, in this process — with the CPU seconds of this process and of the emulator, the
time this process spent in the cyclic garbage collector, and optionally a py-spy profile of that
phase (all threads). The numbers in docs/benchmarks.md
"Where the remaining time goes" come from this.

    .venv/bin/python scripts/profile_sync.py --provider entra_id --users 100000 --groups 2000
    .venv/bin/python scripts/profile_sync.py --provider bamboohr --phase initial --py-spy prof.txt
    .venv/bin/python scripts/profile_sync.py --provider entra_id --phase pull   # the connector alone

`--py-spy FILE` needs py-spy (`.venv/bin/pip install py-spy`; not a test dependency): FILE gets the
raw folded stacks, and the script prints the functions with the most samples.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402

from dirpull.config import load_config  # noqa: E402
from dirpull.connectors import make_connector  # noqa: E402
from dirpull.connectors.base import Done  # noqa: E402
from dirpull.storage.store import Store  # noqa: E402
from dirpull.sync.collector import fewer_collections  # noqa: E402
from dirpull.sync.runner import Runner  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CollectorTime:
    """Time spent in CPython's cyclic garbage collector (all threads), by generation."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started
            self.counts[info["generation"]] += 1

    def reset(self) -> None:
        self.seconds, self.counts = [0.0, 0.0, 0.0], [0, 0, 0]

    def __str__(self) -> str:
        total, full = sum(self.seconds), self.seconds[2]
        return f"{total:.2f} s in {sum(self.counts)} collections ({self.counts[2]} full: {full:.2f} s)"


def top_frames(raw: Path, n: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        total += int(count)
        threads[frames[0].split(":")[-1].strip() or frames[0]] += int(count)
        if len(frames) > 1:
            own[re.sub(r" \(/.*?([^/]+\.py):(\d+)\)", r" (\1:\2)", frames[-1])] += int(count)
    by_thread = ", ".join(f"{t} {100 * c / total:.0f}%" for t, c in threads.most_common())
    lines = [f"{total} samples; by thread: {by_thread}"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    return "\n".join(lines)


def pull_alone(config: Any) -> Any:
    """The connector's pull, each page counted and dropped (`scripts/bench.py`'s "connector alone",
    in this process): a sync's work without the diff and the store, under a sync's collector setting."""
    connector = make_connector("t", config.tenant("t"))
    users = groups = members = 0
    status, requests = "no Done", 0
    with fewer_collections():
        for item in connector.pull(None, full=True):
            if isinstance(item, Done):
                status, requests = "succeeded", item.requests
                break
            users, groups = users + len(item.users), groups + len(item.groups)
            members += sum(1 for _ in item.pairs())
    counts = {"users": users, "groups": groups, "members": members, "rows_written": 0}
    return SimpleNamespace(status=status, duration_s=0.0, requests=requests, counts=counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", required=True, choices=bench.PROVIDERS)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--phase", choices=("initial", "full", "full_1pct", "incremental", "pull"), default="full",
                    help="what to measure (default: full; full_1pct: a full resync after changes to 1%% of the "
                         "users; incremental: a run from the stored cursor, nothing changed; pull: the "
                         "connector alone, every page read and dropped, no store)")
    ap.add_argument("--emulator-workers", type=int, default=None, metavar="N",
                    help="processes serving the emulator, where it can run several (default: the benchmark's)")
    ap.add_argument("--py-spy", type=Path, metavar="FILE", help="profile the phase with py-spy into FILE")
    ap.add_argument("--gil", action="store_true",
                    help="with --py-spy: sample only the thread holding the GIL (where the CPU goes; "
                         "without it, threads waiting for the GIL count too)")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.py_spy and not Path(spy).exists():
        ap.error("--py-spy: py-spy is not installed (.venv/bin/pip install py-spy)")

    collector = CollectorTime()
    with tempfile.TemporaryDirectory(prefix="dirpull-profile-") as tmp:
        work = Path(tmp)
        with bench.EmulatorProcess(
            args.provider, args.users, args.groups, args.seed, work, args.emulator_workers
        ) as em:
            config_path = work / "dirpull.toml"
            bench.write_config(config_path, f"sqlite:///{work / 'store.db'}", "t", em.info["tenant"])
            emulator_pids = [em.info["pid"], *em.info.get("worker_pids", [])]  # every worker's CPU counts
            emu0, cpu0 = sum(map(cpu_seconds, emulator_pids)), time.process_time()
            fetch = bench.baseline_fetch(args.provider, em.info["tenant"], 1)
            cpu, emu = time.process_time() - cpu0, sum(map(cpu_seconds, emulator_pids)) - emu0
            print(f"baseline fetch: {fetch['s']:.2f} s, {fetch['requests']} requests; "
                  f"CPU: this process {cpu:.2f} s, emulator {emu:.2f} s")
            config = load_config(str(config_path))
            store = Store(config.store.url)
            store.upgrade()
            runner = Runner(config, store)
            if args.phase not in ("initial", "pull"):
                first = runner.sync("t")
                print(f"initial (not measured): {first.status} in {first.duration_s:.2f} s")
            if args.phase == "full_1pct":
                done = em.control("/_emulator/changes", {"random": args.users // 100, "seed": args.seed})
                print(f"changes: {len(done.get('changes', []))}")
            profiler = None
            if args.py_spy:
                cmd = [spy, "record", "-r", "200", "--threads", "--nonblocking", "-f", "raw", "-o", str(args.py_spy),
                       "-p", str(os.getpid()), *(["--gil"] if args.gil else [])]  # fmt: skip
                profiler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.5)  # py-spy attaches
            emu0, cpu0, wall0 = sum(map(cpu_seconds, emulator_pids)), time.process_time(), time.monotonic()
            collector.reset()
            if args.phase == "pull":
                result = pull_alone(config)
            else:
                result = runner.sync("t", full=args.phase in ("full", "full_1pct"))
            wall = time.monotonic() - wall0
            cpu, emu = time.process_time() - cpu0, sum(map(cpu_seconds, emulator_pids)) - emu0
            if profiler is not None:
                time.sleep(0.5)
                profiler.send_signal(2)  # SIGINT: py-spy writes its file and exits
                profiler.wait(60)
            store.close()
    if args.phase == "pull":
        result.duration_s = wall
        print(f"pulled: {result.counts['users']} users, {result.counts['groups']} groups, "
              f"{result.counts['members']} memberships")
    print(
        f"{args.phase}: {result.status} in {result.duration_s:.2f} s "
        f"({result.duration_s / fetch['s']:.2f}× the fetch); "
        f"CPU: this process {cpu:.2f} s, emulator {emu:.2f} s; {result.requests} requests, "
        f"{result.counts.get('rows_written', 0)} rows; garbage collection {collector}"
    )
    if args.py_spy and args.py_spy.exists():
        print(top_frames(args.py_spy))
    return 0 if result.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
