"""Mining: from the event log to a plan, with no torch.

The pipeline, module by module:

- ``events``: the log's layout (``events/epoch=E/rank=R/part-NNNNN.parquet``);
  ``event_writer`` writes it (one writer per rank), ``ledger`` records and checks each
  part's sha256, ``event_reader`` reads one epoch (verified, de-duplicated, latest attempt);
- ``fold``: one epoch's events folded into the per-sample state by an engine
  (``engines/``: Polars, numpy or DuckDB), in memory or out of core; ``state``: the state and
  id-table files; ``update``: brings the stored state up to date (reuses what is unchanged);
- ``plan_table`` + ``select``: the plan's rows from the state (rank, choose the hard set,
  weights); ``plan``: the plan file, its manifest, the run lock, atomic publishing;
- ``planner``: ``plan_epoch``, the one call ``hsm plan`` and training make;
  ``trigger`` decides when a plan applies; ``suspects`` finds label-noise suspects;
- ``queries`` opens the run's read-only DuckDB views (``hsm sql``); ``checks`` verifies
  the run's files before training starts.
"""
