"""Mining: from the event log to a plan, with no torch.

events (read the per-sample event log) -> state (fold an epoch into the per-sample
difficulty state, with the engines in ``engines/``) -> select (rank and choose the hard
set) -> plan (the plan file and its manifest); ``planner`` runs these steps for one
epoch, ``trigger`` decides when a plan applies, ``suspects`` finds label-noise
suspects, ``queries`` opens the run's DuckDB views (read-only), ``checks`` verifies
the run's files before training starts.
"""
