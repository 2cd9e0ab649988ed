"""Shipped DuckDB queries (``*.sql``) and the planner's SQL (``planner/``); data, not code."""
