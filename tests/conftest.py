"""Shared test fixtures: the synthetic corpus and the demo config pointed at it.

Test helpers (``oracle``, ``eventlog``, ``browser``) import as top-level modules: this folder is on
``sys.path``. Tests mirror the package: ``tests/<package>/test_<module>.py``.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def pytest_collection_modifyitems(config, items):
    """Start the ``slow`` tests first (the order within each class is the collection order).

    pytest-xdist hands out whole files in collection order (``--dist loadfile --no-loadscope-reorder``,
    pyproject.toml), so the multi-process and multi-epoch runs start at once on both workers and the short tests
    fill in behind them: both workers finish together instead of one running a long test alone at the end. Whole
    files, because a file's module-scoped fixture (a trained run, a built wheel) is then built by one worker only.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def make_corpus(tmp_path_factory):
    """``make_corpus(n_target, n_source, n_val)``: :func:`hsm.data.synth.synthesize`'s paths, built once per
    session and size. Shared between tests: read it, never write into it (copy it first)."""
    from hsm.data.synth import synthesize

    built: dict[tuple[int, int, int], dict[str, Path]] = {}

    def make(n_target: int, n_source: int, n_val: int) -> dict[str, Path]:
        key = (n_target, n_source, n_val)
        if key not in built:
            built[key] = synthesize(tmp_path_factory.mktemp(f"corpus-{n_target}-{n_source}-{n_val}"),
                                    n_target=n_target, n_source=n_source, n_val=n_val)
        return built[key]

    return make


def corpus_overrides(corpus: dict[str, Path], *, val: bool = False) -> list[str]:
    """``configs/demo.yaml`` overrides that train on ``corpus`` (target ``bbu``, sources ``lvis`` and ``coco``)."""
    val_jsonl = corpus["bbu"].with_name("val.jsonl") if val else "null"
    return [f"custom.fusion_config.target.train_jsonl={corpus['bbu']}",
            f"custom.fusion_config.target.val_jsonl={val_jsonl}",
            f"custom.fusion_config.sources.0.train_jsonl={corpus['lvis']}",
            f"custom.fusion_config.sources.1.train_jsonl={corpus['coco']}"]


@pytest.fixture(scope="session")
def demo_config():
    """``demo_config(corpus, out, *overrides, val=False)``: ``configs/demo.yaml`` on ``corpus``, writing to
    ``out``, batch 4, no checkpoints or report, then ``overrides`` (they win)."""
    from hsm.config_load import load_config

    def load(corpus: dict[str, Path], out: Path, *overrides: str, val: bool = False):
        return load_config(DEMO_CONFIG, [*corpus_overrides(corpus, val=val), f"training.output_dir={out}",
                                         "training.per_device_train_batch_size=4", "training.save_strategy='no'",
                                         "training.report_to=[]", *overrides])

    return load


@pytest.fixture(scope="session")
def demo_overrides():
    """``demo_overrides(corpus, val=False)``: the ``hsm train configs/demo.yaml`` arguments that train on ``corpus``."""
    return corpus_overrides


@pytest.fixture(scope="session")
def mining_run(tmp_path_factory, make_corpus, demo_config):
    """One uninterrupted 3-epoch mining run of ``configs/demo.yaml`` on ``make_corpus(24, 8, 4)``, trained in this
    process (TensorBoard on, every step logged, no checkpoints): ``{"corpus", "out", "summary"}`` (``train``'s
    summary). Tests that need exactly this run read it instead of training their own; never write into ``out``."""
    from hsm.run import train

    corpus = make_corpus(24, 8, 4)
    out = tmp_path_factory.mktemp("mining_run") / "run"
    cfg = demo_config(corpus, out, "training.num_train_epochs=3", "training.report_to=[tensorboard]",
                      "training.logging_steps=1", "custom.hard_sample_mining.enabled=true")
    return {"corpus": corpus, "out": out, "summary": train(cfg)}
