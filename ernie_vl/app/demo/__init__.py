"""The end-to-end demo (``ernie-vl demo``): stages, figures, report.html, summary table.

``run_demo(DemoConfig(...))`` runs or resumes it; ``DemoConfig.quick(out)`` is the 1-2 minute size.
"""
from __future__ import annotations

from encoders.lazy import lazy_exports

_EXPORTS = {
    "DemoConfig": "ernie_vl.app.demo.config",
    "run_demo": "ernie_vl.app.demo.pipeline",
    "build_stages": "ernie_vl.app.demo.pipeline",
    "Stage": "ernie_vl.app.demo.runner",
    "StageRunner": "ernie_vl.app.demo.runner",
    "write_report_html": "ernie_vl.app.demo.report",
    "write_report_json": "ernie_vl.app.demo.report",
    "format_summary": "ernie_vl.app.demo.summary",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
