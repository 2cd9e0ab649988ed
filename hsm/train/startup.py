"""The start-up protections every training stack gets before step 0: one run per folder, one writer per run.

:func:`claim_run` runs before anything is written (``hsm train`` calls it before the model loads; a
foreign trainer's :class:`hsm.train.session.MiningSession` calls it when its ``train()`` starts). Rank 0
takes the run's lock (held until training ends, so a second training on the folder is refused at once),
refuses a fresh run into a folder that already holds an hsm run (naming what is there; the overwrite
opt-in removes its ``hsm/`` first, and only a resume continues it), resolves the checkpoint to resume
from (:func:`hsm.train.checkpoints.resolve_resume`) and checks every file of the run
(:func:`hsm.mining.checks.check_run_files`). Rank 0's verdict is every rank's.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from hsm.layout import RunPaths

__all__ = ["RunExists", "StartRequest", "claim_run", "probe_run"]


class RunExists(ValueError):
    """A fresh training into an output folder that already holds an hsm run."""


@dataclass(frozen=True)
class StartRequest:
    """What a training start asks of :func:`claim_run`.

    Attributes:
        paths: the run's layout.
        resume: the checkpoint asked for (None: a fresh run; ``last``: the newest complete one).
        overwrite: replace an hsm run already in the folder (its ``hsm/`` is removed first).
        check_files: verify the run's files (events against their ledgers, states, plans) before step 0.
        source: what the values came from (a config file, or the stack's name), for the error messages.
        how_to_resume: how a user of this stack continues a run (named in the refusal).
        how_to_overwrite: how a user of this stack opts in to replacing a run (named in the refusal).
    """

    paths: RunPaths
    resume: str | None = None
    overwrite: bool = False
    check_files: bool = True
    source: str = "<config>"
    how_to_resume: str = "training.resume_from_checkpoint=last (or a checkpoint-N folder)"
    how_to_overwrite: str = "training.overwrite_output_dir=true"


def claim_run(held: contextlib.ExitStack, request: StartRequest) -> str | None:
    """Claim the run for one training; returns the checkpoint to resume from (None: fresh), agreed over ranks.

    Collective: call it on every rank. Writes nothing but the lock (and, with ``overwrite``, the removal of
    the old run); the lock stays in ``held`` on rank 0 until the caller closes it.

    Raises:
        ConfigError: the checkpoint asked for is not a complete one.
        RunLocked: another training or ``hsm plan`` holds the run's lock.
        RunExists: a fresh run into a folder with an hsm run in it, without ``overwrite``.
        RunFileError: a file of the run does not match its record.
    """
    from hsm.mining.checks import RunFileError, check_run_files, run_contents
    from hsm.mining.plan import run_lock
    from hsm.train import distributed
    from hsm.train.checkpoints import resolve_resume

    hsm_dir = request.paths.root
    verdict = b""
    resume = failure = None
    if distributed.on_main(distributed.current_world()):
        created = not hsm_dir.exists()
        try:
            resume = resolve_resume(hsm_dir.parent, request.resume, request.source)
            held.enter_context(run_lock(hsm_dir))
            found = run_contents(hsm_dir)
            if found and resume is None:
                if not request.overwrite:
                    raise _run_exists(request, found)
                _remove_run(hsm_dir, request.how_to_overwrite)
            if request.check_files:
                check_run_files(hsm_dir)  # before step 0: a bad part or state fails now, not after an epoch
        except Exception as e:  # every rank must hear of it, or the others wait at the next collective
            held.close()
            if created:  # leave no hsm/ behind that holds only the lock file
                shutil.rmtree(hsm_dir, ignore_errors=True)
            failure, verdict = e, f"{type(e).__name__}\0{e}".encode()
    verdict = distributed.broadcast_bytes(verdict)
    if failure is not None:
        raise failure
    if verdict:
        name, _, message = verdict.decode().partition("\0")
        raise RunExists(message) if name == "RunExists" else RunFileError(f"rank 0 refused the start: {message}")
    return distributed.broadcast_bytes((resume or "").encode()).decode() or None


def probe_run(request: StartRequest) -> None:
    """The refusals :func:`claim_run` would give that need no library and no process group: another process holds
    the run's lock, or a fresh run (no ``resume``) into a folder holding an hsm run without ``overwrite``.

    For the command line, on rank 0, before torch and transformers load, so a refused start takes a second
    instead of the imports and the rendezvous. Writes nothing (the lock is tried and released only when its file
    exists); :func:`claim_run` still decides, under the lock.

    Raises:
        RunLocked: another training or ``hsm plan`` holds the run's lock.
        RunExists: a fresh run into a folder with an hsm run in it, without ``overwrite``.
    """
    from hsm.mining.checks import run_contents
    from hsm.mining.plan import check_unlocked

    paths = request.paths
    check_unlocked(paths.root)
    found = run_contents(paths.root) if paths.root.is_dir() else []
    if found and request.resume is None and not request.overwrite:
        raise _run_exists(request, found)


def _run_exists(request: StartRequest, found: list[str]) -> RunExists:
    hsm_dir = request.paths.root
    return RunExists(
        f"{hsm_dir}: already holds an hsm run ({', '.join(found)}); a fresh run would mix two runs in one log. "
        f"Continue it with {request.how_to_resume}, replace it with {request.how_to_overwrite} (removes {hsm_dir} "
        f"and the checkpoint-N folders beside it first), or choose another output_dir")


def _remove_run(hsm_dir: Path, how: str) -> None:
    """Remove the replaced run: every entry of ``hsm_dir`` but its lock file (held by this process: removing it
    would unlock) and the ``checkpoint-N`` folders beside it (its weights: ``resume_from_checkpoint=last`` would
    otherwise resume them into the new run's log)."""
    lock = RunPaths.at(hsm_dir).lock
    for entry in hsm_dir.iterdir():
        if entry == lock:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    checkpoints = sorted(p for p in hsm_dir.parent.glob("checkpoint-*") if p.is_dir() and not p.is_symlink())
    for path in checkpoints:
        shutil.rmtree(path)
    also = f" and its {len(checkpoints)} checkpoint folder(s)" if checkpoints else ""
    warnings.warn(f"hsm: removed the previous hsm run in {hsm_dir}{also} ({how})", stacklevel=4)
