#!/usr/bin/env python3
"""What a fresh `dirpull sync` process pays that a running daemon does not (issue 9, 10k targets).

    .venv/bin/python scripts/fresh_process.py --provider entra_id --users 10000 --groups 200
    .venv/bin/python scripts/fresh_process.py --provider bamboohr --users 10000 --groups 200 --rounds 5

One provider's emulator in its own process, the wire floor (scripts/bench.py's baseline fetch,
best of three) and an initial sync; then, --rounds times, alternating, two kinds of child process,
each running three full no-change resyncs with `Runner.sync` and reporting the runner's own
durations (lease → commit, what the benchmark's ratios use):

  * fresh: nothing imported but dirpull's own modules, as `dirpull sync` starts its run. Its first
    run imports the connector's HTTP stack (the vendor's SDK, `requests`, httpx); the child lists
    the modules that first run imported;
  * preloaded: the same, but with the modules the fresh child's first run imported imported before
    the first run (timed). Its first run still pays every other first-call cost (a TLS context,
    SQLAlchemy's statement caches, the SDK's first calls).

Second and third runs, in either child, are what a daemon's runs cost. The table shows, per kind,
the fastest and the median over the rounds and the ratio of the fastest to the floor. Only loopback.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TENANT = "t"
RUNS = 3  # per child: the first, then two as a daemon would run them


def child(config_path: str, preload: list[str]) -> dict[str, Any]:
    """Runs in the child process: RUNS full resyncs, timed by the runner."""
    from dirpull.config import load_config
    from dirpull.storage.store import Store
    from dirpull.sync.runner import Runner

    config = load_config(config_path)
    store = Store(config.store.url)
    runner = Runner(config, store)
    started = time.perf_counter()
    failed = []
    for name in preload:
        try:
            __import__(name)
        except Exception:  # a module only importable as its package's side effect: its package imports it
            failed.append(name)
    preload_s = time.perf_counter() - started
    before = set(sys.modules)
    runs, imported = [], []
    for i in range(RUNS):
        result = runner.sync(TENANT, full=True)
        if result.status != "succeeded" or result.counts.get("rows_written"):
            raise SystemExit(f"run {i + 1}: {result.status}, {result.counts.get('rows_written')} rows: {result.error}")
        runs.append(result.duration_s)
        if i == 0:
            imported = [m for m in sys.modules if m not in before]
    store.close()
    return {"runs": runs, "imported": imported, "preload_s": preload_s, "preload_failed": failed}


def spawn(config_path: Path, preload: list[str], timeout: float) -> dict[str, Any]:
    import bench

    cmd = [sys.executable, __file__, "--child", str(config_path)]
    out = subprocess.run(cmd, input=json.dumps(preload), capture_output=True, text=True, timeout=timeout,
                         env=bench.child_env(), cwd=ROOT)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"child exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def requests(floor: dict[str, Any]) -> str:
    n = floor["requests"]
    return f"{n} request" if n == 1 else f"{n} requests"


def row(name: str, samples: list[float], floor: float | None) -> str:
    best, median = min(samples), statistics.median(samples)
    ratio = f"{best / floor:5.2f}×" if floor else " " * 6
    return f"  {name:<44} {best:6.3f} s  {ratio}   median {median:.3f} s over {len(samples)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # the measured process: nothing imported but what dirpull imports
        print(json.dumps(child(argv[1], json.loads(sys.stdin.read() or "[]"))))
        return 0
    import bench  # requests and the benchmark's helpers: kept out of the measured children

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", required=True, choices=bench.PROVIDERS)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="child processes of each kind (default 3)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for each child process")
    args = ap.parse_args(argv)
    bench.compile_package()

    fresh: list[dict[str, Any]] = []
    preloaded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dirpull-fresh-") as tmp:
        work = Path(tmp)
        with bench.EmulatorProcess(args.provider, args.users, args.groups, args.seed, work, None) as em:
            config_path = work / "dirpull.toml"
            bench.write_config(config_path, f"sqlite:///{work / 'store.db'}", TENANT, em.info["tenant"])
            floor = bench.baseline_fetch(args.provider, em.info["tenant"], 3)
            initial = bench.sync_phase(config_path, TENANT, full=False, timeout=args.timeout, workdir=work)
            bench.log(f"floor {floor['s']} s ({requests(floor)}); initial sync {initial['sync_s']} s")
            for i in range(max(1, args.rounds)):
                fresh.append(spawn(config_path, [], args.timeout))
                preloaded.append(spawn(config_path, fresh[-1]["imported"], args.timeout))
                bench.log(f"round {i + 1}: fresh {fresh[-1]['runs']}, preloaded {preloaded[-1]['runs']} "
                          f"(imports {preloaded[-1]['preload_s']:.3f} s)")  # fmt: skip

    f = floor["s"]
    imported = fresh[-1]["imported"]
    failed = sorted({m for p in preloaded for m in p["preload_failed"]})
    print(f"{args.provider}, {args.users} users, {args.groups} groups: wire floor {f:.3f} s "
          f"({requests(floor)}); runner durations, fastest ({'×'} the floor) and median")  # fmt: skip
    print(row("fresh process, first run", [p["runs"][0] for p in fresh], f))
    print(row("fresh process, its modules imported before", [p["runs"][0] for p in preloaded], f))
    print(row("second and third runs (as a daemon runs)", [s for p in fresh + preloaded for s in p["runs"][1:]], f))
    print(row("importing those modules", [p["preload_s"] for p in preloaded], None))
    print(f"  modules a fresh process's first run imports: {len(imported)}"
          + (f" (not importable on their own, left to their packages: {len(failed)})" if failed else ""))  # fmt: skip
    top = sorted({m.split(".")[0] for m in imported})
    print(f"  packages among them: {', '.join(top)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
