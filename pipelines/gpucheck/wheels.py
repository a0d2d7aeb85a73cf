"""The wheels the GPU check needs on a bare GPU machine, at the versions of requirements.lock (``make gpu-wheels``).

The GPU machine has its own python with torch, transformers, accelerate, numpy, pillow, OpenCV, pyarrow, pandas
and scipy, but not diffusers, datasets, spiga or clean-fid, and its transformers is another version than the tested
one. :data:`CARRIED` are the packages carried, pinned as the lock pins them for the
GPU machine's python (3.12), with the lock's hashes: ``python -m pipelines.gpucheck.wheels DEST`` downloads them
(``pip download --no-deps --only-binary :all:`` for CPython 3.12 on manylinux x86-64, hashes required); on the GPU
machine ``make gpu-check`` installs them into a folder put first on ``PYTHONPATH`` (torch stays the machine's).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

#: What the GPU check imports that the GPU machine lacks or has at another version, and what those need beyond it.
#: huggingface-hub stays the machine's (1.33.0 in 2026-11, the version the lock pins for python < 3.11, within what
#: these need): the lock's 2.x wants httpx2 and a newer hf-xet, which the machine lacks.
CARRIED = ("diffusers", "transformers", "tokenizers", "safetensors", "datasets", "dill", "multiprocess", "spiga",
           "clean-fid")
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)(?:\s*;\s*(.+?))?\s*\\?$")


def pinned(lock_text: str, names: tuple[str, ...] = CARRIED, python_version: str = PYTHON_VERSION) -> list[str]:
    """Requirement lines (``name==version --hash=...``) of ``names`` from a uv/pip-compile lock, the entry whose
    marker holds for ``python_version``; a name without one is an error."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    wanted = {canonicalize_name(n) for n in names}
    found: dict[str, str] = {}
    lines = lock_text.splitlines()
    for i, line in enumerate(lines):
        m = _PIN.match(line)
        if not m or canonicalize_name(m.group(1)) not in wanted:
            continue
        if m.group(3) and not Marker(m.group(3)).evaluate(env):
            continue
        hashes = []
        for follow in lines[i + 1:]:
            h = re.match(r"^\s+--hash=(\S+)", follow)
            if not h:
                break
            hashes.append(h.group(1))
        found[canonicalize_name(m.group(1))] = f"{m.group(1)}=={m.group(2)} " + " ".join(f"--hash={h}" for h in hashes)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"requirements.lock pins no {', '.join(missing)} for python {python_version}")
    return [found[canonicalize_name(n)] for n in names]


def download(dest: str | Path, lock: str | Path = "requirements.lock") -> list[Path]:
    """Download the :data:`CARRIED` wheels into ``dest`` (emptied of other wheels first); the files written."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    requirements = dest / "requirements.txt"
    requirements.write_text("\n".join(pinned(Path(lock).read_text())) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest), "-r", str(requirements)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", nargs="?", default=".whl", help="folder for the wheels (default: %(default)s)")
    parser.add_argument("--lock", default="requirements.lock", help="the lock file (default: %(default)s)")
    args = parser.parse_args(argv)
    files = download(args.dest, args.lock)
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files)} wheels, {total / 2 ** 20:.1f} MiB in {args.dest}: " + ", ".join(f.name for f in files))


if __name__ == "__main__":
    main()
