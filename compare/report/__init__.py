"""What a run leaves behind: ``results.json`` (``results``: meta and writing), ``report.md``
(``markdown``), the console summary (``console``) and the PNG figures (``plots``). Reads
records; computes nothing that a check or benchmark should."""

__all__ = ["console", "markdown", "plots", "results"]
