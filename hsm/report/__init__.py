"""``hsm report``: one static HTML page per run (difficulty plots, galleries, data map, suspects).

Depends on the core (events, plans, suspects) and never the other way round.
"""

from hsm.report.data import ReportError
from hsm.report.render import ReportResult, build_report

__all__ = ["ReportError", "ReportResult", "build_report"]
