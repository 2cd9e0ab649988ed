"""The public surface: ``import hsm`` is cheap, and every exported name resolves to what its module defines."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import hsm

REPO = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_planning_and_sql_names_do_not_import_torch():
    out = _fresh("import sys, hsm; print(hsm.__version__, hsm.MiningConfig.__name__, hsm.plan_epoch.__name__, "
                 "hsm.connect.__name__, hsm.load_config.__name__); print('torch' in sys.modules, 'transformers' in sys.modules)")
    first, second = out.splitlines()
    assert first.split() == [hsm.__version__, "MiningConfig", "plan_epoch", "connect", "load_config"]
    assert second == "False False"


@pytest.mark.parametrize("name", [n for n in hsm.__all__ if n != "__version__"])
def test_every_export_is_its_modules_object(name):
    value = getattr(hsm, name)
    assert value is getattr(importlib.import_module(hsm._EXPORTS[name]), name)
    assert name in dir(hsm)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'MiningKonfig'"):
        hsm.MiningKonfig  # noqa: B018


def test_version_is_the_packages_version():
    # pyproject.toml reads the version from hsm.__version__ (one source), and the installed metadata agrees.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hsm.__version__"}
    assert importlib.metadata.version("hsm") == hsm.__version__


def test_readme_recipes_import_from_hsm_only():
    text = (REPO / "README.md").read_text()
    blocks = text.split("```python")[1:]
    imports = [line.strip() for block in blocks for line in block.split("```")[0].splitlines()
               if line.strip().startswith(("from hsm", "import hsm"))]
    assert imports, "the README has no Python recipe"
    assert all(line.startswith("from hsm import ") or line == "import hsm" for line in imports), imports


def test_no_export_is_shadowed_by_a_subpackage():
    # Importing hsm.train.x sets the attribute hsm.train to the subpackage: an export of that name would be lost.
    packages = {p.parent.name for p in (REPO / "hsm").glob("*/__init__.py")} | {p.stem for p in (REPO / "hsm").glob("*.py")} | {"cli", "sql"}
    assert not packages & set(hsm.__all__)
