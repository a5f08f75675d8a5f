"""The run report: one self-contained HTML file."""

from genstress_ray.report.html import build_report, write_report

__all__ = ["build_report", "write_report"]
