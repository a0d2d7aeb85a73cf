"""requirements.lock and pyproject.toml agree, and the environment running the tests is the locked one."""
import re
from importlib import metadata

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked(repo_root) -> dict[str, list[tuple[Version, Marker | None]]]:
    """name -> [(version, marker)] of every pin in requirements.lock."""
    pins: dict[str, list] = {}
    lines = (repo_root / "requirements.lock").read_text().splitlines()
    for line in lines:
        m = PIN.match(line)
        if m:
            name, version, marker = m.groups()
            pins.setdefault(canonicalize_name(name), []).append((Version(version), Marker(marker) if marker else None))
    return pins


def direct_requirements(repo_root) -> list[Requirement]:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_pin_has_a_hash(repo_root):
    """pip installs the lock with --require-hashes: a pin without its hashes would stop every install."""
    text = (repo_root / "requirements.lock").read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    pins = [b for b in blocks if PIN.match(b.splitlines()[0])]
    assert len(pins) > 50
    for block in pins:
        assert "--hash=sha256:" in block, block.splitlines()[0]


def test_lock_satisfies_pyproject(repo_root):
    """Every dependency pyproject.toml declares is locked at a version inside its range (a changed range or a new
    dependency without `make lock` fails here)."""
    pins = locked(repo_root)
    for req in direct_requirements(repo_root):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        for version, _ in pins[name]:
            assert req.specifier.contains(version, prereleases=True), \
                f"requirements.lock pins {req.name}=={version}, outside pyproject's {req.specifier}: run `make lock`"


def test_spiga_locked_at_the_makefile_version(repo_root):
    version = re.search(r"^SPIGA_VERSION := (\S+)", (repo_root / "Makefile").read_text(), re.M).group(1)
    assert [v for v, _ in locked(repo_root)["spiga"]] == [Version(version)]


@pytest.mark.parametrize("package", ["torch", "transformers", "diffusers", "datasets", "pyarrow", "numpy", "dvc",
                                     "accelerate", "clean-fid", "torchmetrics", "spiga", "pillow", "opencv-python-headless"])
def test_installed_versions_are_the_locked_ones(repo_root, package):
    """The suite runs in the environment the lock describes (what `make test` builds), so its results are the
    tested ones; a stale .venv fails here rather than in a hash comparison later."""
    candidates = [v for v, marker in locked(repo_root)[canonicalize_name(package)] if marker is None or marker.evaluate()]
    installed = Version(metadata.version(package))
    assert Version(installed.base_version) in candidates or installed in candidates, \
        f"{package} {installed} is installed, requirements.lock says {candidates}: rerun `make env`"
