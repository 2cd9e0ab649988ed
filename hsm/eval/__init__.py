"""Detection evaluation of VLM answers: parse, score with COCO metrics, write the report.

Layers: :mod:`hsm.eval.metrics` (pure: answers + records -> metrics and tables),
:mod:`hsm.eval.scoring` (files in and out), :mod:`hsm.eval.generation` (greedy
answers from a model), :mod:`hsm.eval.callback` (the same during training).
This package depends on the core (``hsm.data.answer``, ``hsm.data.records``, ...), never the
other way round.
"""

__all__: list[str] = []
