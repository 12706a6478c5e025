"""The container's lock file (``deploy/requirements.lock``) stays in step with
``pyproject.toml``: every runtime dependency (and the ``redis`` extra the image installs)
is pinned at a version its range allows, every pin carries hashes, and the build backend
is locked too, since the image builds the package without build isolation."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "deploy" / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)")
CONTAINER = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}


def pins() -> dict[str, tuple[str, int]]:
    """Name → (version, number of hashes) for each pin in the lock file."""
    found: dict[str, tuple[str, int]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            found[name] = (match.group(2), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = found[name]
            found[name] = (version, hashes + 1)
    return found


def required() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = project["build-system"]["requires"]
    runtime = project["project"]["dependencies"]
    extra = project["project"]["optional-dependencies"]["redis"]
    requirements = [Requirement(text) for text in [*build, *runtime, *extra]]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(CONTAINER)]


def test_every_dependency_of_the_image_is_pinned_within_its_range() -> None:
    locked = pins()
    for requirement in required():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in {LOCK.name}: refresh it (deploy/README.md)"
        version, _ = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} in {LOCK.name} is outside {requirement}: refresh the lock"
        )


def test_every_pin_carries_its_hashes() -> None:
    locked = pins()
    assert len(locked) > len(required())  # the transitive dependencies are locked too
    unhashed = sorted(name for name, (_, hashes) in locked.items() if hashes == 0)
    assert unhashed == [], f"pins without --hash: {unhashed}"
