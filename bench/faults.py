"""Fault injection over a small run: kills, concurrent planners, corruption, disk full, hostile ``hsm sql``,
bad images and hostile eval answers.

Every case ends in one of three outcomes, printed as a table:

- ``uninterrupted result``: the command (or its re-run) gives byte for byte what an
  undisturbed run gives;
- ``clear error naming file``: exit 2 with a message naming the damaged file (or the
  refused statement), and nothing wrong published;
- ``SILENT DIFFERENCE``: exit 0 with another result than the undisturbed run's.

Run: ``python bench/faults.py [--trials 20]`` (as root for the disk-full cases, which
mount small tmpfs file systems; they are skipped otherwise). A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from eventlog import TARGET, random_rows, write_rows  # noqa: E402  (the tests' event-log builder)

OK, ERROR, SILENT = "uninterrupted result", "clear error naming file", "SILENT DIFFERENCE"
# Runs `hsm plan` and dies (like SIGKILL: no cleanup) just before its N-th file-system step.
_KILLER = """
import os, shutil, sys
import hsm.io
n = int(os.environ["HSM_FAULT_AT"]); seen = [0]
def at_step(f):
    def wrapped(*a, **k):
        seen[0] += 1
        if seen[0] == n:
            os._exit(137)
        return f(*a, **k)
    return wrapped
os.replace, os.rename, os.fsync, shutil.rmtree = (at_step(os.replace), at_step(os.rename), at_step(os.fsync),
                                                  at_step(shutil.rmtree))
hsm.io._exchange = at_step(hsm.io._exchange)
from hsm.cli.app import app
sys.argv = ["hsm", *sys.argv[1:]]
app()
"""


def make_run(root: Path, k: int = 3) -> Path:
    """Events of epochs 0..2 (2 ranks), a config, and plans for epochs 2 and 3."""
    write_rows(root / "hsm", random_rows(np.random.default_rng(7), n_target=40, n_epochs=3, n_ranks=2, max_obs=2))
    set_k(root, k)
    for epoch in (2, 3):
        hsm(root, "plan", "--epoch", str(epoch), check=True)
    return root


def set_k(run: Path, k: int) -> None:
    config = {"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": k}, "dump": True},
                         "fusion_config": {"target": {"name": TARGET}}}}
    (run / "hsm" / "config.yaml").write_text(yaml.safe_dump(config))


def hsm(run: Path, command: str, *args: str, check: bool = False, env: dict | None = None,
        killer: bool = False) -> subprocess.CompletedProcess:
    """``hsm COMMAND --run-dir RUN ARGS``: in this process (typer's runner), or as a killable subprocess."""
    if killer:
        argv = [sys.executable, "-c", _KILLER, command, "--run-dir", str(run), *args]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    else:
        from typer.testing import CliRunner

        from hsm.cli.app import app

        result = CliRunner().invoke(app, [command, "--run-dir", str(run), *args])
        done = subprocess.CompletedProcess(command, result.exit_code, result.output, result.output)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            done = subprocess.CompletedProcess(command, 1, result.output, repr(result.exception))
    if check and done.returncode != 0:
        raise RuntimeError(f"hsm {command} {run}: {done.stderr[-2000:]}")
    return done


def published(run: Path) -> dict[int, str | None]:
    """Plan epoch -> its checksum if plan and manifest agree, else 'TORN' (what any reader would see)."""
    from hsm.mining.plan import PlanError, plan_epochs, verify_plan

    out = {}
    for epoch in plan_epochs(run / "hsm"):
        try:
            manifest = verify_plan(run / "hsm", epoch)
            out[epoch] = None if manifest is None else manifest["checksum"]
        except PlanError:
            out[epoch] = "TORN"
    return out


def sql_view(run: Path) -> str:
    done = hsm(run, "sql", "plan_summary", "--format", "csv")
    return done.stdout if done.returncode == 0 else f"exit {done.returncode}"


def kill_points(base: Path, work: Path) -> list[tuple[str, str, str]]:
    """`hsm plan --epoch 3 --force --refold` with k=6 over a run planned with k=3, killed at each step."""
    reference = work / "reference"
    shutil.copytree(base, reference)
    set_k(reference, 6)
    hsm(reference, "plan", "--epoch", "3", "--force", "--refold", check=True)
    want = published(reference)
    before = published(base)
    outcomes = Counter()
    n = 0
    while True:
        n += 1
        run = work / f"kill{n}"
        shutil.copytree(base, run)
        set_k(run, 6)
        done = hsm(run, "plan", "--epoch", "3", "--force", "--refold", env={"HSM_FAULT_AT": str(n)}, killer=True)
        finished = done.returncode == 0
        seen = published(run)
        torn_now = any(v == "TORN" for v in seen.values())
        mixed = any(seen.get(e) not in (before.get(e), want.get(e)) for e in seen)
        rerun = hsm(run, "plan", "--epoch", "3", "--force")
        final = published(run)
        if torn_now or mixed or rerun.returncode != 0 or final != want:
            outcomes[SILENT] += 1
            print(f"  kill before step {n}: published {seen}, after re-run {final} (want {want})", file=sys.stderr)
        else:
            outcomes[OK] += 1
        shutil.rmtree(run)
        if finished:
            break
    detail = f"{n - 1} kill points; after each: old or new plan whole, re-run = uninterrupted"
    return [("kill at each write step of hsm plan (+ re-run)", _summary(outcomes), detail)]


def concurrent(base: Path, work: Path, trials: int) -> list[tuple[str, str, str]]:
    """Two `hsm plan --epoch 3 --force` with different k on one run, started together."""
    expected = {}
    for k in (4, 7):
        run = work / f"alone{k}"
        shutil.copytree(base, run)
        set_k(run, k)
        hsm(run, "plan", "--epoch", "3", "--force", check=True)
        expected[k] = published(run)[3]
        shutil.rmtree(run)
    outcomes, refused = Counter(), 0
    original = published(base)[3]
    for trial in range(trials):
        run = work / f"race{trial}"
        shutil.copytree(base, run)
        configs = []
        for k in (4, 7):
            path = work / f"race{trial}-k{k}.yaml"
            path.write_text(yaml.safe_dump({"custom": {"hard_sample_mining": {"enabled": True, "selector": {"k": k}},
                                                       "fusion_config": {"target": {"name": TARGET}}}}))
            configs.append(path)
        argv = [[sys.executable, "-m", "hsm.cli.app", "plan", "--run-dir", str(run), "--epoch", "3", "--force",
                 "--config", str(c)] for c in configs]
        procs = [subprocess.Popen(a, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}) for a in argv]
        results = [(p.wait(), p.stderr.read()) for p in procs]
        final = published(run)[3]
        codes = sorted(code for code, _ in results)
        lost = [err for code, err in results if code != 0]
        refused += len(lost)
        clear = all("another hsm plan or training is writing this run" in err for err in lost)
        winners = {expected[k] for (code, _), k in zip(results, (4, 7)) if code == 0}
        if clear and codes[0] == 0:
            outcome = OK if final in winners else SILENT
        else:  # nobody won: every process refused (a clear error) and the run's plan is the one it had
            outcome = ERROR if clear and final == original else SILENT
        if outcome == SILENT:
            print(f"  race {trial}: exit codes {[c for c, _ in results]}, published "
                  f"{'a winner' if final in winners else 'other'}; stderr: "
                  + " | ".join(err.strip()[-300:] for _, err in results), file=sys.stderr)
        outcomes[outcome] += 1
        shutil.rmtree(run)
    return [(f"2 concurrent hsm plan x {trials}", _summary(outcomes),
             f"{refused} refused at once by the run lock; published plan = a winner's, never torn")]


def _damage(path: Path, how: str) -> None:
    """``mid``: 4 bytes flipped mid-file; ``footer``: one byte flipped mid-footer (Parquet); ``delete``: the file removed."""
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "footer":
        footer = int.from_bytes(data[-8:-4], "little")
        data[len(data) - 8 - footer // 2] ^= 0x01
    else:
        at = len(data) // 2
        for i in range(4):
            data[min(at + i, len(data) - 1)] ^= 0x5A
    path.write_bytes(bytes(data))


def corruptions(base: Path, work: Path) -> list[tuple[str, str, str]]:
    """Every file of the run damaged in turn (4 bytes flipped mid-file, a Parquet footer byte flipped,
    the file deleted); `hsm plan --epoch 3` and `hsm sql`."""
    reference = work / "corrupt-ref"
    shutil.copytree(base, reference)
    hsm(reference, "plan", "--epoch", "3", "--force", check=True)
    want_plan, want_sql = published(reference)[3], sql_view(reference)
    rows, by_kind = [], {}
    files = sorted(p.relative_to(base) for p in (base / "hsm").rglob("*") if p.is_file() and not p.name.startswith("."))
    for rel in files:
        if rel.name == "config.yaml":
            continue
        for how in ("mid", "footer", "delete") if rel.suffix == ".parquet" else ("mid", "delete"):
            run = work / "corrupt"
            shutil.copytree(base, run)
            _damage(run / rel, how)
            plan = hsm(run, "plan", "--epoch", "3", "--force")
            outcome_plan = _judge(plan, published(run).get(3) == want_plan, rel)
            view = hsm(run, "sql", "plan_summary", "--format", "csv")
            outcome_sql = _judge(view, view.stdout == want_sql, rel)
            kind = f"{how} {rel.parts[1]}/{rel.name.split('-')[0]}"
            by_kind.setdefault(kind, Counter()).update([outcome_plan, outcome_sql])
            if SILENT in (outcome_plan, outcome_sql):
                print(f"  {how} {rel}: plan {outcome_plan}, sql {outcome_sql}", file=sys.stderr)
            shutil.rmtree(run)
    for kind, outcomes in sorted(by_kind.items()):
        rows.append((f"{kind} (plan + sql)", _summary(outcomes), ""))
    return rows


def _judge(done: subprocess.CompletedProcess, same: bool, rel: Path) -> str:
    if done.returncode == 0:
        return OK if same else SILENT
    named = str(rel.name) in done.stderr or str(rel.parent) in done.stderr
    return ERROR if done.returncode == 2 and named else f"exit {done.returncode}: {done.stderr.strip()[-120:]}"


def _mounted(size_kib: int):
    mount = Path(tempfile.mkdtemp(prefix="hsm-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)], check=True)
    return mount


def _unmount(mount: Path) -> None:
    import gc

    gc.collect()  # memory-mapped state files of the in-process run keep the mount busy until collected
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=True)
    mount.rmdir()


def disk_full(base: Path, levels: int = 9) -> list[tuple[str, str, str]]:
    """`hsm plan --epoch 3 --force --refold` (k=6) with 0, 4, 8, ... KiB free beyond the run's own size (tmpfs)."""
    if os.geteuid() != 0:
        return [("disk full", "skipped", "needs root to mount tmpfs")]
    mount = _mounted(1 << 16)
    try:
        shutil.copytree(base, mount / "run")
        used_kib = shutil.disk_usage(mount).used // 1024
    finally:
        _unmount(mount)
    outcomes, details = Counter(), []
    before = published(base)
    for level in range(levels):
        mount = _mounted(used_kib + 4 * level)
        try:
            run = mount / "run"
            shutil.copytree(base, run)
            set_k(run, 6)
            done = hsm(run, "plan", "--epoch", "3", "--force", "--refold")
            now = published(run)
            if done.returncode == 0:
                outcomes[OK] += 1
            elif done.returncode == 2 and "cannot write" in done.stderr and now == before:
                outcomes[ERROR] += 1
            else:
                outcomes[SILENT] += 1
                details.append(f"+{4 * level} KiB: exit {done.returncode}, published {now}: {done.stderr[-300:]}")
        finally:
            _unmount(mount)
    for line in details:
        print(f"  disk full {line}", file=sys.stderr)
    return [(f"disk full: {levels} levels, 0..{4 * (levels - 1)} KiB free", _summary(outcomes),
             "exit 2 leaves the previous plan published")]


def hostile_sql(base: Path, work: Path) -> list[tuple[str, str, str]]:
    statements = [f"COPY (SELECT 1) TO '{work}/x.csv'", f"ATTACH '{work}/x.db'", "INSTALL httpfs",
                  "SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM glob('/root/*')",
                  "SET enable_external_access = true"]
    outcomes = Counter()
    for statement in statements:
        done = hsm(base, "sql", "-e", statement)
        wrote = any(work.glob("x.*"))
        outcomes[ERROR if done.returncode == 2 and not wrote else SILENT] += 1
    return [(f"hostile hsm sql ({len(statements)} statements)", _summary(outcomes), "COPY, ATTACH, INSTALL, SET refused; "
             "other paths: DuckDB permission error")]


def _run_bytes(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def confined_sql(base: Path, work: Path) -> list[tuple[str, str, str]]:
    """``hsm sql`` read-only and confined: statements that write or read past the views, links and
    folders from outside the run, off-schema files, a runaway query (timeout, Ctrl-C). Each must exit
    non-zero with a clear message, write nothing (every byte of the run and of ``work`` compared) and
    print no traceback; an event log without the nullable metric columns must read."""
    run = work / "confined"
    shutil.copytree(base, run)
    hsm_dir = run / "hsm"
    part = next((hsm_dir / "events").rglob("part-*.parquet"))
    manifest = next((hsm_dir / "plans").rglob("manifest.json"))
    notes = work / ".tmp" / "notes.txt"
    notes.parent.mkdir(exist_ok=True)
    notes.write_text("outside the run")
    statements = [
        f"EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",
        f"SELECT 1; COPY (SELECT * FROM plans) TO '{part}' (FORMAT parquet); SELECT 2",
        f"COPY (SELECT '{{}}' AS m) TO '{manifest}' (FORMAT csv, QUOTE '', HEADER false)",
        f"SELECT sha256(content) FROM read_blob('{manifest}')",
        "SELECT content FROM read_blob('/etc/hostname')",
        f"SELECT content FROM read_text('{notes}')",
        "INSTALL httpfs",
    ]
    outcomes, writes, tracebacks = Counter(), 0, 0

    def judge(done: subprocess.CompletedProcess, codes: tuple[int, ...] = (2,)) -> None:
        nonlocal writes, tracebacks, before
        wrote = _run_bytes(run) != before or sorted(work.iterdir()) != listing
        writes += wrote
        tracebacks += "Traceback" in done.stderr or done.returncode == 1
        outcomes[ERROR if done.returncode in codes and not wrote else SILENT] += 1
        if wrote:  # the next case starts from the undisturbed run
            print(f"  wrote: {done.args}", file=sys.stderr)
            shutil.rmtree(run)
            shutil.copytree(base, run)
            before = _run_bytes(run)

    before, listing = _run_bytes(run), sorted(work.iterdir())
    cwd = os.getcwd()
    os.chdir(work)  # DuckDB's default temp folder is <cwd>/.tmp
    try:
        for statement in statements:
            judge(hsm(run, "sql", "-e", statement))
    finally:
        os.chdir(cwd)
    judge(hsm(run, "sql", "-e", "SELECT count(*) FROM range(1000000000000)", "--timeout", "2"))
    # Ctrl-C in a real process: SIGINT once the query runs; exit 130 within seconds.
    argv = [sys.executable, "-m", "hsm.cli.app", "sql", "--run-dir", str(run), "-e",
            "SELECT count(*) FROM range(1000000000000)"]
    private = work / "tmpdir"
    private.mkdir()
    listing = sorted(work.iterdir())
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(private)})
    deadline = time.monotonic() + 60
    while not list(private.glob("hsm-sql-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += "\n(still running 30 s after SIGINT: killed)"
    judge(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), codes=(130,))
    rows = [(f"hostile statements, timeout, Ctrl-C ({sum(outcomes.values())})", _summary(outcomes),
             f"{writes} writes, {tracebacks} tracebacks: EXPLAIN ANALYZE COPY, scripts, COPY (FORMAT csv), "
             "read_blob / read_text outside the views, INSTALL refused; --timeout 2 and SIGINT stop range(1e12)")]

    outcomes, writes, tracebacks = Counter(), 0, 0
    other = work / "other"
    write_rows(other / "hsm", random_rows(np.random.default_rng(11), n_target=8, n_epochs=1, n_ranks=1, max_obs=2))
    foreign_ids = next((base / "hsm" / "sample_ids").rglob("*.parquet"))  # another run's id table

    def link_ids(run: Path) -> None:
        (run / "hsm" / "sample_ids" / "epoch=99").mkdir()
        (run / "hsm" / "sample_ids" / "epoch=99" / "sample_ids.parquet").symlink_to(foreign_ids)

    def link_events(run: Path) -> None:
        (run / "hsm" / "events" / "epoch=7").symlink_to(other / "hsm" / "events" / "epoch=0")

    def copy_events(run: Path) -> None:
        shutil.copytree(other / "hsm" / "events" / "epoch=0", run / "hsm" / "events" / "epoch=7")
        for ledger in (run / "hsm" / "events" / "epoch=7").rglob("_sha256.json"):
            ledger.unlink()

    def off_schema(run: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = run / "hsm" / "sample_ids" / "epoch=99" / "sample_ids.parquet"
        path.parent.mkdir()
        pq.write_table(pa.table({"dataset": [TARGET], "base_idx": pa.array([1], pa.int32()), "sample_id": ["x"]}), path)

    for change in (link_ids, link_events, copy_events, off_schema):
        shutil.rmtree(run)
        shutil.copytree(base, run)
        change(run)
        before, listing = _run_bytes(run), sorted(work.iterdir())
        done = hsm(run, "sql", "plan_summary", "--format", "csv")
        judge(done)
        if done.returncode != 2 or "epoch=" not in done.stderr:
            print(f"  {change.__name__}: exit {done.returncode} {done.stderr[-200:]}", file=sys.stderr)
    rows.append((f"run files from outside the run ({sum(outcomes.values())})", _summary(outcomes),
                 f"{writes} writes, {tracebacks} tracebacks: id table and events folder linked from another run, "
                 "events folder copied without ledger, off-schema id table; each named"))

    # A log written without the nullable box-aware columns (an older log, another tool) reads them as NULL.
    from hsm.io import file_sha256
    from hsm.metrics import NULLABLE_EVENT_COLUMNS
    from hsm.mining.ledger import record_digests
    import pyarrow.parquet as pq

    old = work / "old-log"
    write_rows(old / "hsm", random_rows(np.random.default_rng(12), n_target=8, n_epochs=2, n_ranks=1, max_obs=2))
    for path in (old / "hsm" / "events").rglob("part-*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns([c for c in NULLABLE_EVENT_COLUMNS if c in table.column_names]), path)
        record_digests(path.parent, {path.name: file_sha256(path)})
    done = hsm(old, "sql", "-e", "SELECT count(coord_loss) AS c, count(value) AS v FROM event_values", "--format", "csv")
    outcome = OK if done.returncode == 0 and done.stdout.split()[1].startswith("0,") else f"exit {done.returncode}"
    rows.append(("event log without the nullable metric columns: `event_values`", f"{outcome} 1",
                 "read as NULL, as `hsm plan` reads them"))
    return rows


def bad_inputs(work: Path) -> list[tuple[str, str, str]]:
    """Bad images through `hsm data validate` (each must be named by file:line, exit 2) and hostile answers
    through `hsm eval score` (each must be counted as a parse problem, exit 0, bounded memory)."""
    import struct
    import zlib

    from PIL import Image
    from typer.testing import CliRunner

    from hsm.cli.app import app
    from hsm.data.images import decode_bound

    root = work / "inputs"
    root.mkdir()

    def png_header(path: Path, side: int) -> None:  # a bomb's header: dimensions, no pixel data
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                         + chunk(b"IEND", b""))

    Image.effect_noise((10, 8), 60).convert("RGB").save(root / "full.png")
    data = (root / "full.png").read_bytes()
    images = {"0-byte file": (b"", 10, 8), "not an image": (b"hello\n", 10, 8),
              "truncated PNG": (data[: len(data) // 2], 10, 8), "width/height mismatch": (data, 12, 8)}
    side = int(decode_bound() ** 0.5) + 10
    png_header(root / "bomb.png", side)
    png_header(root / "huge.png", 100_000)
    cases = [(name, f"{k}.png", w, h) for k, (name, (raw, w, h)) in enumerate(images.items())
             if (root / f"{k}.png").write_bytes(raw) is not None]
    cases += [("decompression bomb (over Pillow's bound)", "bomb.png", side, side),
              ("decompression bomb (over twice the bound)", "huge.png", 100_000, 100_000)]
    rows, runner = [], CliRunner()
    for name, image, width, height in cases:
        jsonl = root / "one.jsonl"
        good = {"image": "full.png", "width": 10, "height": 8, "objects": []}
        jsonl.write_text(json.dumps(good) + "\n" + json.dumps({**good, "image": image, "width": width,
                                                                "height": height}) + "\n")
        result = runner.invoke(app, ["data", "validate", str(jsonl)])
        traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
        named = result.exit_code == 2 and "one.jsonl:2: image" in " ".join(result.output.split())
        outcome = ERROR if named and not traceback else f"exit {result.exit_code}: {result.output.strip()[-120:]}"
        rows.append((f"hsm data validate: {name}", f"{outcome} 1", "file:line named, nothing decoded past a bad header"))
    records = root / "val.jsonl"
    Image.new("RGB", (100, 100)).save(root / "v.png")
    records.write_text(json.dumps({"id": "a", "image": "v.png", "width": 100, "height": 100,
                                   "objects": [{"label": "x", "bbox": [0, 0, 10, 10]}]}) + "\n")
    answers = {"100,000 boxes in one answer": json.dumps([{"bbox_2d": [0, 0, 100, 100], "label": "x"}] * 100_000),
               "[[[...]]]": "[[[...]]]", "[[]]": "[[]]"}
    for name, answer in answers.items():
        (root / "answers.jsonl").write_text(json.dumps({"id": "a", "answer": answer}) + "\n")
        result = runner.invoke(app, ["eval", "score", "--records", str(records), "--answers", str(root / "answers.jsonl"),
                                     "--out", str(root / "eval"), "--name", "v"])
        metrics = json.loads((root / "eval" / "v" / "metrics.json").read_text())["v"] if result.exit_code == 0 else {}
        counted = metrics.get("boxes_over_cap", 0) > 0 or metrics.get("parse_failures", 0) == 1
        outcome = "counted, exit 0" if counted else (SILENT if result.exit_code == 0 else f"exit {result.exit_code}")
        rows.append((f"hsm eval score: {name}", f"{outcome} 1", "counted as a parse problem (boxes_over_cap / "
                     "parse_failures)"))
    return rows


def _with_records(run: Path) -> None:
    """The run records training writes (config, dataset, epochs), each with its sha256 record."""
    from hsm.io import write_recorded

    hsm_dir = run / "hsm"
    write_recorded((hsm_dir / "config.yaml").read_bytes(), hsm_dir / "config.yaml")
    dataset = {"target": {"name": TARGET, "size": 40, "fingerprint": "f" * 64}, "datasets": [{"name": TARGET, "size": 40}]}
    write_recorded(json.dumps(dataset).encode(), hsm_dir / "dataset.json")
    write_recorded(json.dumps({"num_train_epochs": 4.0, "max_steps": 40}).encode(), hsm_dir / "run.json")


def _tamper_cases(run: Path) -> dict[str, tuple[str, object]]:
    """Damage that leaves every file well-formed: ``{case: (path named in the error, damage)}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hsm.io import file_sha256
    from hsm.mining.plan import manifest_digest

    hsm_dir = run / "hsm"
    ids = hsm_dir / "sample_ids" / "epoch=0" / "sample_ids.parquet"
    part = sorted((hsm_dir / "events" / "epoch=1" / "rank=0").glob("part-*.parquet"))[0]
    manifest = hsm_dir / "plans" / "epoch=3" / "manifest.json"

    def relabel():
        table = pq.read_table(ids)
        names = table.column("sample_id").to_pylist()
        names[0], names[1] = names[1], names[0]
        pq.write_table(table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(names)), ids)

    def rewrite_part():
        table = pq.read_table(part)
        pq.write_table(table.set_column(table.schema.get_field_index("loss"), "loss",
                                        pa.array(np.full(table.num_rows, 9.0, np.float32))), part)
        ledger = part.parent / "_sha256.json"
        ledger.write_text(json.dumps({**json.loads(ledger.read_text()), part.name: file_sha256(part)}))

    def recount():
        m = json.loads(manifest.read_text())
        m["counts"]["hard"] += 1
        m["manifest_sha256"] = manifest_digest(m)
        manifest.write_text(json.dumps(m))

    def edit(name: str, old: bytes, new: bytes):
        return lambda: (hsm_dir / name).write_bytes((hsm_dir / name).read_bytes().replace(old, new))

    def flip(name: str):
        def damage():
            data = bytearray((hsm_dir / name).read_bytes())
            data[len(data) // 2] ^= 0x80
            (hsm_dir / name).write_bytes(bytes(data))
        return damage

    def truncate(name: str):
        return lambda: (hsm_dir / name).write_bytes((hsm_dir / name).read_bytes()[:-9])

    cases = {
        "id table relabelled (2 ids swapped)": (ids, relabel),
        "folded part rewritten, ledger updated": (part, rewrite_part),
        "folded epoch removed (events/epoch=1)": (part.parent.parent, lambda: shutil.rmtree(part.parent.parent)),
        "manifest counts.hard edited, own sha256 redone": (manifest, recount),
    }
    for name in ("config.yaml", "dataset.json", "run.json"):
        cases[f"{name} flipped"] = (hsm_dir / name, flip(name))
        cases[f"{name} truncated"] = (hsm_dir / name, truncate(name))
    cases["config.yaml edited (k 3 -> 5)"] = (hsm_dir / "config.yaml", edit("config.yaml", b"k: 3", b"k: 5"))
    cases["dataset.json fingerprint edited"] = (hsm_dir / "dataset.json", edit("dataset.json", b"f" * 64, b"e" * 64))
    cases["run.json epochs edited"] = (hsm_dir / "run.json", edit("run.json", b"4.0", b"8.0"))

    def unrecorded(name: str, old: bytes, new: bytes):
        def damage():  # the record deleted (the others kept), then the file edited: no checksum left to tell
            (hsm_dir / name).with_name(f"{Path(name).stem}.sha256.json").unlink()
            edit(name, old, new)()
        return damage

    cases["config.yaml record deleted, k 3 -> 5"] = (hsm_dir / "config.yaml", unrecorded("config.yaml", b"k: 3", b"k: 5"))
    cases["dataset.json record deleted, fingerprint edited"] = (
        hsm_dir / "dataset.json", unrecorded("dataset.json", b"f" * 64, b"e" * 64))
    return cases


def tampered_files(base: Path, work: Path) -> list[tuple[str, str, str]]:
    """Well-formed damage nothing but a recorded sha256 or count can tell: `hsm plan --epoch 3 --force`
    (also with `--allow-empty`), `hsm sql plan_summary`, `hsm report` (on the files it reads) and the
    training start-up check; 0 silent differences and 0 tracebacks expected."""
    from hsm.mining.checks import RunFileError, check_run_files

    reference = work / "tamper-ref"
    shutil.copytree(base, reference)
    _with_records(reference)
    hsm(reference, "plan", "--epoch", "3", "--force", check=True)
    want_plan, want_sql = published(reference)[3], sql_view(reference)
    rows = []
    for case in _tamper_cases(reference):
        run = work / "tamper"
        shutil.copytree(reference, run)
        named, damage = _tamper_cases(run)[case]
        damage()
        rel = named.relative_to(run)
        outcomes = Counter()
        # The readers first: a plan that succeeds rewrites what it replaces.
        view = hsm(run, "sql", "plan_summary", "--format", "csv")
        outcomes[_judge(view, view.stdout == want_sql, rel)] += 1
        if "run.json" not in case:  # the report reads the config, the dataset record, the id table, plans, events
            report = hsm(run, "report", "--out", str(work / "tamper-report.html"))
            outcomes[_judge(report, False, rel)] += 1
        if not any(name in case for name in ("config.yaml", "dataset.json", "run.json")):  # training rewrites those
            try:
                check_run_files(run / "hsm")
                outcomes[SILENT] += 1
            except RunFileError as e:
                outcomes[ERROR if rel.name in str(e) or str(rel.parent) in str(e) else f"unnamed: {e}"] += 1
        for flags in (["--force"], ["--force", "--allow-empty"]):
            plan = hsm(run, "plan", "--epoch", "3", *flags)
            outcomes[_judge(plan, published(run).get(3) == want_plan, rel)] += 1
        if any(o not in (OK, ERROR) for o in outcomes):
            print(f"  {case}: {dict(outcomes)}", file=sys.stderr)
        ran = ["plan x2", "sql"] + (["report"] if "run.json" not in case else []) + (
            ["start-up"] if not any(name in case for name in ("config.yaml", "dataset.json", "run.json")) else [])
        rows.append((f"{case} ({', '.join(ran)})", _summary(outcomes), ""))
        shutil.rmtree(run)
    return rows


def startup_refusals(work: Path) -> list[tuple[str, str, str]]:
    """`hsm train` into a folder holding a run, beside a training that holds its lock, and resuming from a
    half-written checkpoint: each refused before the model loads, the folder's files unchanged."""
    import time

    from typer.testing import CliRunner

    from hsm.cli.app import app
    from hsm.data.synth import synthesize

    corpus = synthesize(work / "corpus", n_target=8, n_source=4, n_val=0)
    data = [f"custom.fusion_config.target.train_jsonl={corpus['bbu']}", "custom.fusion_config.target.val_jsonl=null",
            f"custom.fusion_config.sources.0.train_jsonl={corpus['lvis']}",
            f"custom.fusion_config.sources.1.train_jsonl={corpus['coco']}"]
    run = work / "startup"
    shutil.copytree(work / "base", run)
    _with_records(run)
    complete = run / "checkpoint-6"
    complete.mkdir()
    (complete / "model.safetensors").write_bytes(b"")
    (complete / "trainer_state.json").write_text('{"global_step": 6}')
    (run / "checkpoint-9").mkdir()  # a save killed before its trainer_state.json

    def files() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}

    cases = {"fresh hsm train into a folder holding a run": ([], "already holds an hsm run", None),
             "resume from a half-written checkpoint-9": ([f"training.resume_from_checkpoint={run / 'checkpoint-9'}"],
                                                         "checkpoint-6", None),
             "second hsm train while one holds the lock": (["training.resume_from_checkpoint=last"],
                                                           "another hsm plan or training", run / "hsm" / ".lock")}
    import transformers  # noqa: F401  (imported once here: the times below are the refusals' own)

    rows = []
    for case, (extra, expected, lock) in cases.items():
        before = files()
        if lock is not None:  # another process's lock: a child holds it
            holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                                       "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(120)",
                                       str(lock)], stdout=subprocess.PIPE, text=True)
            holder.stdout.readline()
        started = time.perf_counter()
        result = CliRunner().invoke(app, ["train", str(ROOT / "configs" / "demo.yaml"), *data,
                                          f"training.output_dir={run}", "training.report_to=[]", *extra])
        seconds = time.perf_counter() - started
        if lock is not None:
            holder.kill()
            holder.wait()
        text = " ".join(result.output.split())
        traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
        refused = result.exit_code == 2 and expected in text and files() == before and not traceback
        rows.append((case, ERROR if refused else (f"exit {result.exit_code}" if not traceback else "TRACEBACK"),
                     f"refused in {seconds:.1f} s, files unchanged"))
    return rows


def _summary(outcomes: Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in outcomes.most_common())


def nonfinite_values(work: Path) -> list[tuple[str, str, str]]:
    """NaN and +inf losses in the log: not observations. ``hsm plan`` must count them, keep the samples' scores
    from their finite values (a NaN does not stick, +inf does not win) and write strict JSON."""
    import math

    run = work / "nonfinite"
    rows = random_rows(np.random.default_rng(13), n_target=12, n_epochs=2, n_ranks=1, max_obs=3)
    target = [r for r in rows if r["dataset"] == TARGET and r["epoch"] == 1]
    poisoned = {target[0]["base_idx"]: math.nan, target[1]["base_idx"]: math.inf}
    for r in target[:2]:
        r["loss"] = poisoned[r["base_idx"]]
    write_rows(run / "hsm", rows)
    set_k(run, 3)
    done = hsm(run, "plan", "--epoch", "2")

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"non-standard JSON {c}")))

    problems = []
    if done.returncode != 0:
        problems.append(f"exit {done.returncode}")
    else:
        manifest_path = next((run / "hsm" / "plans").rglob("manifest.json"))
        try:
            manifest = strict(manifest_path.read_text())
        except ValueError as e:
            problems.append(str(e))
            manifest = {}
        if manifest.get("counts", {}).get("nonfinite") != 2:
            problems.append(f"counts.nonfinite {manifest.get('counts', {}).get('nonfinite')}, expected 2")
        import pyarrow.parquet as pq

        plan = pq.read_table(next((run / "hsm" / "plans").rglob("plan.parquet"))).to_pylist()
        if any(not math.isfinite(r["score"]) for r in plan):
            problems.append("a non-finite score in the plan")
    outcome = f"{OK} 1" if not problems else f"{SILENT} 1"
    return [("NaN and +inf losses in the event log (`hsm plan`)", outcome,
             "not observations: counted (`counts.nonfinite` 2), every score finite, the manifest strict JSON"
             + (f"; {'; '.join(problems)}" if problems else ""))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="Concurrent-planner trials.")
    parser.add_argument("--only-disk-full", action="store_true", help="Run the disk-full cases only.")
    parser.add_argument("--only-corruptions", action="store_true", help="Run the corruption cases only.")
    parser.add_argument("--only-concurrent", action="store_true", help="Run the concurrent-planner cases only.")
    parser.add_argument("--only-sql", action="store_true", help="Run the hostile and confined hsm sql cases only.")
    parser.add_argument("--only-inputs", action="store_true", help="Run the bad-image and hostile-answer cases only.")
    parser.add_argument("--only-nonfinite", action="store_true", help="Run the non-finite event values case only.")
    parser.add_argument("--only-tampered", action="store_true",
                        help="Run the well-formed tampering and hsm train start-up cases only.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hsm-faults-") as tmp:
        work = Path(tmp)
        if args.only_inputs:
            _print(bad_inputs(work))
            return
        if args.only_nonfinite:
            _print(nonfinite_values(work))
            return
        base = make_run(work / "base")
        rows = []
        if args.only_tampered:
            _print(tampered_files(base, work) + startup_refusals(work))
            return
        if args.only_concurrent:
            _print(concurrent(base, work, args.trials))
            return
        if args.only_sql:
            _print(hostile_sql(base, work) + confined_sql(base, work))
            return
        if args.only_disk_full or args.only_corruptions:
            rows += disk_full(base) if args.only_disk_full else corruptions(base, work)
            _print(rows)
            return
        rows += kill_points(base, work)
        rows += concurrent(base, work, args.trials)
        rows += corruptions(base, work)
        rows += disk_full(base)
        rows += hostile_sql(base, work)
        rows += confined_sql(base, work)
        rows += bad_inputs(work)
        rows += tampered_files(base, work)
        rows += startup_refusals(work)
        rows += nonfinite_values(work)
    _print(rows)


def _print(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"| {'case'.ljust(width)} | outcome | note |")
    print(f"|{'-' * (width + 2)}|---------|------|")
    for case, outcome, note in rows:
        print(f"| {case.ljust(width)} | {outcome} | {note} |")
    print(json.dumps({"silent": sum(SILENT in r[1] for r in rows)}))


if __name__ == "__main__":
    main()
