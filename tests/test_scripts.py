"""scripts/setup, the first step of the README's quick start, run against a stand-in Python (no
packages are installed): it must get from any state a fresh machine can leave to a working .venv."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for python3: `-m venv [--clear] DIR` makes DIR/bin/python, a stand-in venv Python with
# pip; every call is logged. `-c` (the version check) succeeds.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >>"$LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  dir=${@: -1}
  rm -rf "$dir"; mkdir -p "$dir/bin"
  cat >"$dir/bin/python" <<'EOF'
#!/usr/bin/env bash
echo "venv-python $*" >>"$LOG"
exit 0
EOF
  chmod +x "$dir/bin/python"
fi
exit 0
"""

# What `python3 -m venv` leaves on Debian/Ubuntu without python3-venv: bin/python, and no pip.
BROKEN_VENV_PYTHON = """#!/usr/bin/env bash
echo "broken-python $*" >>"$LOG"
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "No module named pip" >&2; exit 1; fi
exit 0
"""


def _checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup", repo / "scripts" / "setup")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "LOG": str(log)}
    return repo, env


def _setup(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / "scripts" / "setup")], env=env, capture_output=True, text=True, timeout=60
    )


def test_setup_remakes_a_venv_left_without_pip_by_a_failed_first_attempt(tmp_path):
    """Before, a .venv whose bin/python existed was kept as it was, so once a first run had failed
    (no python3-venv on the machine) every later run failed with "No module named pip", even after
    python3-venv was installed."""
    repo, env = _checkout(tmp_path)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(BROKEN_VENV_PYTHON)
    (bin_dir / "python").chmod(0o755)

    done = _setup(repo, env)

    assert done.returncode == 0, done.stderr
    calls = Path(env["LOG"]).read_text().splitlines()
    assert "python -m venv --clear .venv" in calls
    assert any(c.startswith("venv-python -m pip install") and "-e .[dev]" in c for c in calls)
    assert (repo / ".venv" / ".dirpull-installed").exists()


def test_setup_keeps_a_working_venv_and_installs_once(tmp_path):
    repo, env = _checkout(tmp_path)
    assert _setup(repo, env).returncode == 0
    Path(env["LOG"]).write_text("")
    assert _setup(repo, env).returncode == 0
    calls = Path(env["LOG"]).read_text().splitlines()
    assert not any("venv" in c.split()[:3] and c.startswith("python ") for c in calls)
    assert not any("pip install" in c for c in calls)  # the stamp is newer than pyproject.toml
