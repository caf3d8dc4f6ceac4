"""The sweep and study report (``collafuse-hpc report``): make.py reads the results
files and writes the report, tables.py its rows and tables, stats.py the comparisons
with c = 1 and the convergence check, figures.py the figures (matplotlib, optional)."""

from collafuse_hpc.report.make import make_report

__all__ = ["make_report"]
