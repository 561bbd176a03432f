"""The lock (requirements/cpu.txt) that `make setup` installs: it must satisfy pyproject.toml's ranges
(a dependency added or a range moved without `make lock` fails here), pin every package with hashes,
and be what this venv holds (a figure in BENCHMARKS.md comes from that set of versions)."""
from __future__ import annotations

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

LOCK = ROOT / "requirements" / "cpu.txt"
EXTRAS = ("test", "tracking", "heic")   # what `make setup` installs besides the dependencies
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def locked() -> dict[str, tuple[Version, list[str]]]:
    """{canonical name: (version, its hashes)} of every pin in the lock."""
    pins, current = {}, None
    for line in LOCK.read_text().splitlines():
        if (match := PIN.match(line)):
            current = canonicalize_name(match.group(1))
            pins[current] = (Version(match.group(2)), [])
        elif line.strip().startswith("--hash=") and current is not None:
            pins[current][1].append(line.strip().removeprefix("--hash=").rstrip(" \\"))
        elif line.strip() and not line.lstrip().startswith(("#", "--")):
            raise AssertionError(f"{LOCK.name}: a line that is no pin: {line!r}")
    return pins


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != "vlp"]


def test_the_lock_satisfies_pyproject():
    pins = locked()
    wrong = []
    for req in requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            wrong.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pin[0], prereleases=True):
            wrong.append(f"{req} but the lock pins {pin[0]}")
    assert not wrong, "run `make lock`: " + "; ".join(wrong)


def test_every_pin_has_a_hash():
    unhashed = [name for name, (_, hashes) in locked().items() if not hashes]
    assert not unhashed, f"pins without hashes (pip --require-hashes refuses them): {unhashed}"


def test_this_venv_is_the_lock():
    drift = []
    for name, (version, _) in locked().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{name} {version} not installed")
            continue
        if installed != version:
            drift.append(f"{name} {installed} (lock: {version})")
    assert not drift, "this venv is not the lock's (`make setup` installs it): " + "; ".join(drift)
