"""`dirpull demo` end to end: five emulators, the real daemon, events printed for every tenant."""

from __future__ import annotations

from dirpull.demo import run_demo
from dirpull.emulators.cluster import TENANT_NAMES


def test_demo_syncs_every_provider_and_prints_events(tmp_path, capsys):
    assert run_demo(people=20, duration=9, schedule="2s", workdir=tmp_path) == 0
    out = capsys.readouterr().out
    for tenant in TENANT_NAMES.values():
        assert f"[{tenant}] run" in out, f"no events printed for {tenant}"
    assert "user.created" in out and "directory change:" in out
    assert (tmp_path / "dirpull.toml").is_file() and (tmp_path / "demo.db").is_file()
    # the config holds every emulator's secrets inline
    assert oct((tmp_path / "dirpull.toml").stat().st_mode & 0o777) == "0o600"
