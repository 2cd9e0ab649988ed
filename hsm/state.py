"""Per-sample running state, and the rules that fold one epoch of events into it.

For one sample with prior state ``(n, mean, ema)`` and this epoch's metric
values ``x_1..x_k`` in observation order ``(epoch, global_step, rank, position)``:

    ema  = x_1 if n == 0 else decay * ema + (1 - decay) * x_1
    ema  = decay * ema + (1 - decay) * x_j          for j = 2..k
    s    = ((x_1 + x_2) + ...) + x_k               (summed in observation order)
    mean = (mean * n + s) / (n + k);  n = n + k;  last = x_k
    score = ema if aggregate == "ema" and n >= 3 else mean

with ``x = loss`` or ``x = 1 - token_acc``. Both engines in :mod:`hsm.engines`
implement exactly these operations in this order, so they agree bit for bit;
``tests/oracle.py`` holds them to a naive full recomputation.

This module owns the state files: ``<hsm_dir>/state/epoch=E/state.parquet`` with
its provenance in the Parquet key-value metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hsm.events import write_parquet_atomic
from hsm.schemas import STATE_SCHEMA, SchemaError, conform

__all__ = [
    "StateInfo",
    "StateMismatch",
    "state_path",
    "find_states",
    "read_state",
    "read_state_info",
    "write_state",
]

_META_KEY = b"hsm.state"


class StateMismatch(ValueError):
    """A stored state was built with other folding parameters than those asked for."""


@dataclass
class StateInfo:
    """Provenance of a state file: what it folded and how."""

    epoch: int
    metric: str
    ema_decay: float
    aggregate: str
    events_digest: str
    # epoch -> {"mean_loss": float, "n_events": int}; feeds plateau detection.
    epoch_stats: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        payload = self.__dict__ | {"epoch_stats": {str(k): v for k, v in self.epoch_stats.items()}}
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StateInfo":
        payload = json.loads(text)
        payload["epoch_stats"] = {int(k): v for k, v in payload.get("epoch_stats", {}).items()}
        return cls(**payload)

    def check_params(self, metric: str, ema_decay: float, aggregate: str, where: str) -> None:
        asked = (metric, float(ema_decay), aggregate)
        stored = (self.metric, float(self.ema_decay), self.aggregate)
        if asked != stored:
            raise StateMismatch(
                f"{where}: state was folded with (metric, ema_decay, aggregate)={stored}, "
                f"the config asks for {asked}; delete the run's hsm/state directory to refold "
                f"from the event log"
            )


def state_path(hsm_dir: str | Path, epoch: int) -> Path:
    """``<hsm_dir>/state/epoch=E/state.parquet``."""
    return Path(hsm_dir) / "state" / f"epoch={epoch}" / "state.parquet"


def find_states(hsm_dir: str | Path) -> list[int]:
    """Epochs that have a committed state file, ascending."""
    root = Path(hsm_dir) / "state"
    if not root.is_dir():
        return []
    epochs = []
    for child in root.iterdir():
        name, _, value = child.name.partition("=")
        if name == "epoch" and value.isdigit() and (child / "state.parquet").is_file():
            epochs.append(int(value))
    return sorted(epochs)


def _info_from(meta: dict | None, path: Path) -> StateInfo:
    if not meta or _META_KEY not in meta:
        raise SchemaError(f"{path}: no hsm.state metadata; not written by hsm")
    return StateInfo.from_json(meta[_META_KEY].decode())


def read_state_info(hsm_dir: str | Path, epoch: int) -> StateInfo:
    """The provenance of the state after ``epoch``, from the file footer only."""
    path = state_path(hsm_dir, epoch)
    try:
        return _info_from(pq.read_schema(path).metadata, path)
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{path}: not a readable state file ({e}); delete it to refold") from e


def read_state(hsm_dir: str | Path, epoch: int) -> tuple[pa.Table, StateInfo]:
    """Read and check the state after ``epoch``."""
    path = state_path(hsm_dir, epoch)
    try:
        table = pq.read_table(path, read_dictionary=["dataset"])
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{path}: not a readable state file ({e}); delete it to refold") from e
    info = _info_from(table.schema.metadata, path)
    return conform(table, STATE_SCHEMA, str(path), keep_dictionary=True), info


def write_state(hsm_dir: str | Path, state: pa.Table, info: StateInfo) -> Path:
    """Atomically write the state after ``info.epoch`` with its provenance."""
    path = state_path(hsm_dir, info.epoch)
    table = conform(state, STATE_SCHEMA, str(path)).replace_schema_metadata({_META_KEY: info.to_json().encode()})
    write_parquet_atomic(table, path, compression="zstd", compression_level=1, use_dictionary=["dataset"])
    return path
