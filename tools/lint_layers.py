"""Run import-linter's layer contracts over the package as it is installed.

The repository keeps the typer app in ``cli/`` and the queries in ``sql/`` (the design card's top
level); setuptools installs them as ``hsm.cli`` and ``hsm.sql``. import-linter finds a package's
modules by walking its folder, so it would not see ``hsm.cli`` in the source tree. This copies the
tree into the installed shape in a temporary folder and lints that, with the contracts from
``pyproject.toml``::

    python tools/lint_layers.py        # what `make test` runs; exit status of lint-imports
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def assemble(into: Path) -> Path:
    """Copy each package folder to where ``[tool.setuptools.package-dir]`` installs it; returns ``into``."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(package_dir.items()):  # "hsm" before "hsm.cli"
        shutil.copytree(REPO / folder, into / package.replace(".", "/"), ignore=ignore, dirs_exist_ok=True)
    shutil.copy2(REPO / "pyproject.toml", into / "pyproject.toml")
    return into


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="hsm-lint-") as tmp:
        root = assemble(Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(root)}
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.run([str(lint)], cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
