"""Ranks agree on what was logged before rank 0 plans; parts rank 0 cannot see travel to it.

Every rank writes its event parts to its own disk. On a shared file system rank 0
sees them all; across nodes without one it does not, and would silently plan
from its own node's events. So at every epoch end each rank describes its parts
(name, size, sha256, rows), rank 0 compares that with what it sees, and the
parts it lacks are shipped to it as bytes over the process group (as the plan
travels back), then written atomically. Nothing here is unpickled: parts are
Parquet bytes, the inventories JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from hsm.train import distributed
from hsm.mining.events import event_dir, list_event_files
from hsm.mining.ledger import record_digests, recorded_digests
from hsm.io import file_sha256, write_bytes_atomic

__all__ = ["EventSyncError", "rank_inventory", "missing_parts", "sync_epoch_events"]


class EventSyncError(RuntimeError):
    """Ranks disagree on the event log in a way shipping parts cannot fix."""


def rank_inventory(hsm_dir: str | Path, epoch: int, rank: int) -> dict:
    """``{"rank", "parts": [{"name", "size", "sha256", "recorded", "rows"}]}`` of this rank's parts of ``epoch``.

    ``sha256`` is the bytes' digest now, ``recorded`` the one the rank's ledger holds (None if none):
    a receiver records ``recorded`` (so a part that rotted before shipping stays detectably corrupt).
    """
    parts = []
    ledger = recorded_digests(event_dir(hsm_dir, epoch, rank))
    for path in list_event_files(hsm_dir, epoch, rank=rank):
        parts.append({"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path),
                      "recorded": ledger.get(path.name), "rows": pq.ParquetFile(path).metadata.num_rows})
    return {"rank": rank, "parts": parts}


def missing_parts(hsm_dir: str | Path, epoch: int, inventories: list[dict], *,
                  local_rank: int | None = None) -> list[tuple[int, str]]:
    """``(rank, part name)`` of every part a rank reported that is not here byte for byte.

    ``local_rank``'s inventory was taken from this disk by this process, so its parts are
    here by construction and are not read again (at 10M events an epoch, a second sha256
    pass over rank 0's own parts).

    Raises :class:`EventSyncError` when this disk holds a part of some rank that the
    rank itself does not report (or a different file under a reported name that the
    rank cannot resend): the log would not be what the ranks logged.
    """
    missing = []
    for inventory in inventories:
        rank = inventory["rank"]
        reported = {p["name"]: p for p in inventory["parts"]}
        here = {p.name: p for p in list_event_files(hsm_dir, epoch, rank=rank)}
        extra = sorted(set(here) - set(reported))
        if extra:
            raise EventSyncError(
                f"{event_dir(hsm_dir, epoch, rank)}: holds {', '.join(extra)}, which rank {rank} did not log "
                f"(it reports {len(reported)} part(s)); remove them or restore rank {rank}'s event directory"
            )
        if rank == local_rank:
            continue
        for name, part in sorted(reported.items()):
            path = here.get(name)
            if path is None or path.stat().st_size != part["size"] or file_sha256(path) != part["sha256"]:
                missing.append((rank, name))
    return missing


def _pack(paths: list[Path]) -> bytes:
    header = json.dumps([[p.name, p.stat().st_size] for p in paths]).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(p.read_bytes() for p in paths)


def _unpack(payload: bytes) -> list[tuple[str, bytes]]:
    size = int.from_bytes(payload[:8], "little")
    entries = json.loads(payload[8:8 + size])
    out, offset = [], 8 + size
    for name, length in entries:
        out.append((name, payload[offset:offset + length]))
        offset += length
    return out


def sync_epoch_events(hsm_dir: str | Path, epoch: int, world) -> dict[str, int]:
    """Collective: after it returns, rank 0's disk holds every rank's parts of ``epoch``.

    Returns (on every rank) ``{"ranks", "parts", "rows", "shipped"}`` of the agreed log.
    In one process it only takes the inventory.
    """
    inventory = rank_inventory(hsm_dir, epoch, world.rank)
    inventories = [json.loads(b) for b in distributed.all_gather_bytes(json.dumps(inventory).encode())]
    wanted = missing_parts(hsm_dir, epoch, inventories, local_rank=world.rank) if distributed.on_main(world) else []
    wanted = json.loads(distributed.broadcast_bytes(json.dumps(wanted).encode()))
    for rank in sorted({r for r, _ in wanted}):
        names = [n for r, n in wanted if r == rank]
        payload = _pack([event_dir(hsm_dir, epoch, rank) / n for n in names]) if world.rank == rank else b""
        payload = distributed.broadcast_bytes(payload, src=rank)
        if distributed.on_main(world):
            expected = {p["name"]: p for p in inventories[rank]["parts"]}
            for name, data in _unpack(payload):
                target = event_dir(hsm_dir, epoch, rank) / name
                write_bytes_atomic(data, target)
                if file_sha256(target) != expected[name]["sha256"]:
                    target.unlink()
                    raise EventSyncError(f"{target}: the bytes shipped from rank {rank} do not match its sha256")
                record_digests(target.parent, {name: expected[name]["recorded"] or expected[name]["sha256"]})
    parts = sum(len(i["parts"]) for i in inventories)
    rows = sum(p["rows"] for i in inventories for p in i["parts"])
    return {"ranks": len(inventories), "parts": parts, "rows": rows, "shipped": len(wanted)}
