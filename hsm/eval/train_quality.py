"""The ``det_f1`` mining metric: the model's own detection quality on each target training image.

At the end of epochs ``0, every, 2 * every, ...`` (not after the last, whose plan
nothing uses) each rank generates greedy answers on its shard of the target train set
(``records[rank::world_size]``), scores each answer against its record at IoU 0.5
(:func:`hsm.eval.metrics.match_boxes`, the matching ``hsm eval`` reports), and appends one
event row per image to the event log, before the epoch's planning reads it:
``det_f1`` = F1 of that image's answer, ``loss`` and ``token_acc`` NaN and ``n_tokens``
0 (no training step made it), positions from :data:`POSITION_BASE` so the row never
shares an identity with a training event of the same step. The planner folds these rows
as it folds any nullable metric (training events have ``det_f1`` null: not observations),
with ``1 - det_f1`` as difficulty. The pass's cost is kept in ``seconds`` and logged.
"""

from __future__ import annotations

import time

import numpy as np
from transformers import TrainerCallback

from hsm.config import DetF1Config
from hsm.data.answer import needs_resized, resized_size
from hsm.data.fusion import sample_id_of
from hsm.data.records import Record
from hsm.eval.generation import generate_answers
from hsm.eval.metrics import match_boxes, predict_sample
from hsm.mining.event_writer import EventBatch
from hsm.train import distributed

__all__ = ["POSITION_BASE", "sample_f1", "DetF1Callback", "should_measure"]

POSITION_BASE = 1 << 24  # above any micro-batch position of a training step


def sample_f1(answer: str | None, record: Record, coord_format: str, categories, resized=None) -> float:
    """Detection F1 at IoU 0.5 of one answer against its record.

    TP are greedy same-label matches at IoU >= 0.5; FP every other predicted box,
    unknown labels included; FN the unmatched ground truth. ``2 TP / (2 TP + FP + FN)``,
    and 1.0 when the image has no object and the answer none.

    Args:
        answer: the raw answer text (None: no answer).
        record: the record it answers.
        coord_format: ``rel1000`` or ``abs``.
        categories: the dataset's labels.
        resized: the processor-resized ``(width, height)`` for ``abs``.
    """
    pred = predict_sample(answer, record, coord_format, categories, resized)
    gt_boxes = np.array([obj.bbox for obj in record.objects], dtype=np.float64).reshape(-1, 4)
    tp = len(match_boxes(pred.boxes, pred.labels, gt_boxes, [obj.label for obj in record.objects]))
    fp = len(pred.labels) + pred.n_unknown_label - tp
    fn = len(record.objects) - tp
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


def should_measure(epoch: int, every: int, num_train_epochs: float) -> bool:
    """Measure after ``epoch`` when it is a multiple of ``every`` and a later epoch will use the plan."""
    return epoch % every == 0 and epoch + 1 < num_train_epochs


class DetF1Callback(TrainerCallback):
    """Writes ``det_f1`` events for the target train set; register it before the mining callback."""

    def __init__(self, trainer, config: DetF1Config, processor, coord_format: str):
        self.trainer = trainer
        self.config = config
        self.processor = processor
        self.coord_format = coord_format
        self.seconds = 0.0
        self.passes = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        t = self.trainer
        epoch = t.mining.sampler.epoch
        if not should_measure(epoch, self.config.every, t.mining.num_train_epochs):
            return
        started = time.perf_counter()
        self.measure(epoch, state.global_step)
        self.seconds += time.perf_counter() - started
        self.passes += 1
        if distributed.on_main(t.mining.world):
            t.log({f"{t.mining.log_prefix}det_f1_seconds": time.perf_counter() - started})

    def measure(self, epoch: int, global_step: int) -> np.ndarray:
        """Generate on this rank's shard of the target, append its events; returns the shard's F1."""
        t = self.trainer
        dataset, world = t.train_dataset, t.mining.world
        records = dataset.records[0]
        index = np.arange(world.rank, len(records), world.world_size, dtype=np.int64)
        mine = [records[i] for i in index]
        categories = sorted({obj.label for record in records for obj in record.objects})
        # Batches of images with equally many objects end their answers together (no batch waits for one long answer).
        order = sorted(range(len(mine)), key=lambda k: len(mine[k].objects))
        generated = generate_answers(t.model, self.processor, [mine[k] for k in order], dataset.prompts[0],
                                     max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                                     max_image_side=dataset.fusion.max_image_side)
        answers: list[str] = [""] * len(mine)
        for k, answer in zip(order, generated):
            answers[k] = answer
        resized = [None] * len(mine)
        if needs_resized(self.coord_format):
            resized = [resized_size(self.processor, r.width, r.height) for r in mine]
        f1 = np.array([sample_f1(a, r, self.coord_format, categories, z) for a, r, z in zip(answers, mine, resized)],
                      dtype=np.float32)
        n = len(mine)
        nan = np.full(n, np.nan, dtype=np.float32)
        t.mining.writer.append(EventBatch(
            epoch=epoch, global_step=global_step, dataset=[dataset.names[0]] * n, base_idx=index,
            sample_id=[sample_id_of(r, dataset.names[0], int(i)) for r, i in zip(mine, index)], loss=nan,
            token_acc=nan, n_tokens=np.zeros(n, np.int32), aug_seed=np.zeros(n, np.int64),
            drawn_as_hard=np.zeros(n, bool), position_offset=POSITION_BASE, metrics={"det_f1": f1},
        ))
        return f1
