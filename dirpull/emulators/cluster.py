"""Start several vendor emulators over one organization and write the dirpull configuration that
points a tenant at each (`dirpull emulate`, `dirpull demo`, benchmarks)."""

from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirpull.connectors import is_available as connector_available
from dirpull.emulators import EMULATOR_CLASSES, emulator_class
from dirpull.emulators import is_available as emulator_available
from dirpull.emulators.org import Org
from dirpull.emulators.server import Emulator

log = logging.getLogger(__name__)

TENANT_NAMES = {
    "entra_id": "demo-entra",
    "google_workspace": "demo-google",
    "okta": "demo-okta",
    "workday": "demo-workday",
    "bamboohr": "demo-bamboohr",
}

# The first line of every configuration `dirpull emulate` and `dirpull demo` write: a file that
# starts with it may be written over again, any other is someone's own configuration.
CONFIG_HEADER = "# Written by dirpull: tenants pointed at local emulators (loopback only)."


@dataclass
class Cluster:
    org: Org
    emulators: dict[str, Emulator] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def start(self, providers: list[str] | None = None, *, require_connector: bool = False) -> None:
        for provider in providers or list(EMULATOR_CLASSES):
            if not emulator_available(provider):
                self.skipped[provider] = "its emulator is not built yet"
                continue
            if require_connector and not connector_available(provider):
                self.skipped[provider] = "its connector is not built yet"
                continue
            emulator = emulator_class(provider)(self.org)
            emulator.start()
            self.emulators[provider] = emulator

    def stop(self) -> None:
        for emulator in self.emulators.values():
            emulator.stop()
        self.emulators.clear()

    def tenants(self, workdir: Path, *, key_prefix: str = "") -> dict[str, dict[str, Any]]:
        """Each emulator's tenant table; a key file an emulator writes into `workdir` (Google's)
        has its name begin with `key_prefix`."""
        out = {}
        for p, emulator in self.emulators.items():
            extra = {"key_prefix": key_prefix} if p == "google_workspace" else {}
            out[TENANT_NAMES[p]] = emulator.tenant_config(TENANT_NAMES[p], workdir, **extra)
        return out

    def config_toml(self, workdir: Path, *, store_url: str, schedule: str = "15m", key_prefix: str = "") -> str:
        lines = [
            CONFIG_HEADER,
            "[store]",
            f"url = {_toml(store_url)}",
            "",
            "[defaults]",
            f"schedule = {_toml(schedule)}",
        ]
        for name, table in self.tenants(workdir, key_prefix=key_prefix).items():
            lines += ["", f"[tenants.{name}]"]
            nested = {k: v for k, v in table.items() if isinstance(v, dict)}
            lines += [f"{k} = {_toml(v)}" for k, v in table.items() if k not in nested]
            for key, sub in nested.items():
                lines += ["", f"[tenants.{name}.{key}]"] + [f"{k} = {_toml(v)}" for k, v in sub.items()]
        text = "\n".join(lines) + "\n"
        tomllib.loads(text)  # what we print must load
        return text


def holds_another_config(path: Path) -> bool:
    """Whether writing an emulator configuration to `path` would destroy one it did not write
    (`dirpull emulate --write-config dirpull.toml` beside the operator's real one)."""
    if not path.is_file():  # not there, or a folder or a pipe (never opened: it would wait for a writer)
        return False
    try:
        with open(path, "rb") as existing:
            head = existing.read(len(CONFIG_HEADER.encode()) + 1)
    except OSError:  # not readable: the write says what is wrong
        return False
    return head.strip() != b"" and not head.startswith(CONFIG_HEADER.encode())


def write_private(path: Path, text: str) -> None:
    """Write a configuration the owner alone can read: it holds the emulators' client secrets, API
    tokens and passwords inline, and under the usual umask 022 it came out 0644, readable by every
    local account, unlike the store and the Google key file beside it. An existing file keeps the
    mode its owner gave it (never loosened to the umask's)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as out:
        out.write(text)


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def _escape_control(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        # TOML's basic strings take no control character but tab as is: a line break in a value
        # (a `dirpull demo --schedule` of "5m\n") made a file that does not load.
        escaped = _CONTROL.sub(_escape_control, value.replace("\\", "\\\\").replace('"', '\\"'))
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
