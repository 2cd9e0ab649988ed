"""Several 2-rank runs in one launch: ``torchrun --nproc_per_node 2 tests/dist_runs.py SCRIPT ARGS [-- ARGS ...]``.

Runs ``SCRIPT`` (``tests/dist_train.py`` or ``tests/dist_trl.py``) once per ``--``-separated argument list, one
after another in the same two processes, then tears the process group down once. An argument list that starts
with a ``*.py`` path runs that script instead of ``SCRIPT``. A launch costs every rank an
import of torch, transformers and DeepSpeed and a rendezvous, which is most of a tiny run's time; runs that share
a launch pay it once. Put runs without DeepSpeed before runs with it: once a run has used DeepSpeed, accelerate
keeps its DeepSpeed state for the rest of the process.
"""

import runpy
import sys

from hsm.train import distributed

__all__ = ["split_runs"]


def split_runs(argv: list[str]) -> list[list[str]]:
    """``["a", "b", "--", "c"]`` -> ``[["a", "b"], ["c"]]``: one argument list per run."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


if __name__ == "__main__":
    script = sys.argv[1]
    for args in split_runs(sys.argv[2:]):
        run_script, args = (args[0], args[1:]) if args and args[0].endswith(".py") else (script, args)
        sys.argv = [run_script, *args]
        runpy.run_path(run_script, run_name="dist_run")  # the script tears nothing down unless run as __main__
    distributed.destroy_process_group()
