"""The built wheel, installed into a fresh venv with no source tree in sight, runs the pipeline's entry points.

An editable install hides packaging drift (a subpackage or a data file missing from the wheel), so this
builds the wheel, installs it alone into a new venv and runs the commands users run. The heavy
dependencies come from the running interpreter's site-packages through a ``.pth`` that lists that
directory as a plain path: its own ``.pth`` files (among them the editable finder that maps ``hsm`` to
a source tree) are not executed, so ``hsm`` can only come from the wheel, and the test asserts it does.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from eventlog import TARGET, random_rows, write_rows

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from; everything else of the checkout (tests, .venv, build/) stays behind.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "hsm", "cli", "sql")

pytestmark = pytest.mark.slow


def _run(args: list, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding hsm from the wheel only; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in WHEEL_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src], cwd=root)
    (wheel,) = (root / "dist").glob("hsm-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    deps = sysconfig.get_paths()["purelib"]
    lines = [deps]
    if (Path(deps) / "_hsm_torchvision_cpu.py").exists():  # the Makefile's CPU shim for torchvision, if installed
        lines.append("import _hsm_torchvision_cpu")
    (site / "_hsm_test_deps.pth").write_text("\n".join(lines) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], cwd=root)
    return venv / "bin"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    rows = random_rows(np.random.default_rng(3), n_target=20, n_epochs=3, n_ranks=2, max_obs=2)
    write_rows(run / "hsm", rows)
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": 5}},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (run / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_hsm_imports_from_the_wheel(installed, tmp_path):
    code = ("import hsm, hsm.integrations, hsm.sql, hsm.report, hsm.cli; "
            "print(hsm.__file__); print(hsm.integrations.__file__); print(hsm.sql.__file__); print(hsm.report.__file__)")
    files = _run([installed / "python", "-c", code], cwd=tmp_path).stdout.split()
    venv = installed.parent.resolve()
    for file in files:
        assert Path(file).resolve().is_relative_to(venv), f"{file} is not from the installed wheel"
        assert not Path(file).resolve().is_relative_to(REPO)


def test_cli_from_the_wheel(installed, run_dir, tmp_path):
    hsm = installed / "hsm"
    assert "plan" in _run([hsm, "--help"], cwd=tmp_path).stdout
    _run([hsm, "plan", "--run-dir", run_dir, "--epoch", "2"], cwd=tmp_path)
    # The default engine, the SQL one (its query is package data) and numpy agree byte for byte on the next plan.
    other, third = tmp_path / "other", tmp_path / "third"
    shutil.copytree(run_dir, other)
    shutil.copytree(run_dir, third)
    _run([hsm, "plan", "--run-dir", run_dir, "--epoch", "3", "--engine", "duckdb"], cwd=tmp_path)
    _run([hsm, "plan", "--run-dir", other, "--epoch", "3"], cwd=tmp_path)
    _run([hsm, "plan", "--run-dir", third, "--epoch", "3", "--engine", "numpy"], cwd=tmp_path)
    plan = Path("hsm", "plans", "epoch=3", "plan.parquet")
    assert pq.read_table(run_dir / plan).equals(pq.read_table(other / plan))
    assert pq.read_table(third / plan).equals(pq.read_table(other / plan))
    trend = json.loads(_run([hsm, "sql", "--run-dir", run_dir, "difficulty_trend", "--format", "json"], cwd=tmp_path).stdout)
    assert {row["epoch"] for row in trend} == {2, 3}
    out = tmp_path / "report.html"
    _run([hsm, "report", "--run-dir", run_dir, "--out", out], cwd=tmp_path)
    assert "<html" in out.read_text().lower()


def test_demo_config_and_integrations_ship_with_the_wheel(installed, tmp_path):
    """From the wheel alone (one fresh interpreter: each start imports torch and transformers): ``hsm demo``'s
    default config is the wheel's own file and loads for training, the ms-swift plugin file is the wheel's, and the
    TRL integration imports from it."""
    code = ("from hsm.cli.demo import packaged_demo_config; from hsm.config_load import load_config; "
            "p = packaged_demo_config(); load_config(p, for_training=True); print(p); "
            "from hsm.integrations.swift import plugin_path; print(plugin_path()); "
            "import hsm.integrations.trl as m; print(m.__file__)")
    demo, plugin, trl = map(Path, _run([installed / "python", "-c", code], cwd=tmp_path).stdout.split())
    venv = installed.parent.resolve()
    assert demo.is_file() and demo.resolve().is_relative_to(venv)
    assert demo.read_bytes() == (REPO / "configs" / "demo.yaml").read_bytes()
    assert plugin.is_file() and plugin.resolve().is_relative_to(venv)
    assert trl.resolve().is_relative_to(venv)
    # The README's plugin line: `python -m hsm.integrations.swift` prints the same file.
    assert Path(_run([installed / "python", "-m", "hsm.integrations.swift"], cwd=tmp_path).stdout.strip()) == plugin


# Packages whose every release requires one exact torch version: naming one makes pip replace the user's torch.
TORCH_PINNED = ("torchvision", "torchaudio")


def test_no_requirement_can_replace_the_users_torch():
    """Installing hsm (any extra) keeps an installed torch >= 2.4: no torch-pinned package is required."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements]
    assert not set(names) & set(TORCH_PINNED), requirements
    torch = [r for r, name in zip(requirements, names) if name == "torch"]
    assert torch and all(re.fullmatch(r"torch>=[\d.]+", r.replace(" ", "")) for r in torch), torch  # a floor, no ceiling
    # hsm's own code never imports them (transformers' video processor may, when the user installs it).
    for path in [p for folder in ("hsm", "cli", "sql") for p in (REPO / folder).rglob("*.py")]:
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & set(TORCH_PINNED), path


def test_wheel_holds_the_card_top_level(installed):
    # cli/ and sql/ install inside the hsm namespace: no top-level `cli` or `sql` in site-packages.
    site = next(installed.parent.glob("lib/python*/site-packages"))
    assert not (site / "cli").exists() and not (site / "sql").exists()
    assert (site / "hsm" / "cli" / "app.py").is_file() and (site / "hsm" / "sql" / "planner" / "fold_epoch.sql").is_file()


def test_every_package_folder_is_installed():
    # pyproject lists the packages by hand (package-dir maps cli/ and sql/ into hsm); a new subpackage must be listed.
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package: Path(folder) for package, folder in setuptools["package-dir"].items()}
    on_disk = set()
    for package, folder in folders.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join((package, *parts)))
    assert on_disk == set(setuptools["packages"])


def test_only_distributed_imports_torch_distributed():
    # The layers contract (pyproject.toml, lint-imports) sees torch only as one external package, so
    # this one rule about a torch submodule is checked here, on every import statement of the package.
    importers = set()
    for path in [p for folder in ("hsm", "cli", "sql") for p in (REPO / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if any(name == "torch.distributed" or name.startswith("torch.distributed.") for name in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"hsm/train/distributed.py"}
