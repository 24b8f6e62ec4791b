"""requirements.lock (what `make install` installs) against pyproject.toml (what library users get): every declared
dependency is pinned inside its range, torch's own dependencies are pinned, and nothing CUDA-only slipped in."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("quant", "test", "lint")  # the extras the Makefile installs (LOCK_EXTRAS)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def read_lock(path: Path) -> dict[str, Version]:
    """{canonical name: pinned version} from a pip-style lock; comments and `# via` lines are skipped."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = PIN.match(text)
        assert match, f"{path.name}:{number}: not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


@pytest.fixture(scope="module")
def lock() -> dict[str, Version]:
    return read_lock(ROOT / "requirements.lock")


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        texts += project["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


def test_no_torch_and_nothing_cuda_only(lock):
    cuda_only = [name for name in lock if name.startswith("nvidia-") or name == "triton"]
    assert cuda_only == []
    assert "torch" not in lock  # pip installs the CPU wheel first; uv must never replace it
    assert len(lock) > 50  # the whole transitive closure, not just the direct dependencies


def test_every_declared_dependency_is_pinned_inside_its_range(lock):
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in lock, f"{requirement} is declared in pyproject.toml but not pinned: run `make lock`"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{name}=={lock[name]} in requirements.lock is outside pyproject's {requirement}: run `make lock`")


def test_torch_dependencies_are_pinned(lock):
    """torch is installed with --no-deps, so the lock must carry what the installed torch needs."""
    needed = [Requirement(text) for text in importlib.metadata.requires("torch") or []]
    needed = [r for r in needed if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert needed, "the installed torch declares no dependencies: cannot check the lock against it"
    missing = [str(r) for r in needed if canonicalize_name(r.name) not in lock]
    assert missing == []
    outside = [f"{r} (locked {lock[canonicalize_name(r.name)]})" for r in needed
               if not r.specifier.contains(lock[canonicalize_name(r.name)], prereleases=True)]
    assert outside == []
