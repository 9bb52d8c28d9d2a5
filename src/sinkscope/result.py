"""What every experiment result can do: `.table()`, `.to_dict()`, `.save(outdir, plots=True)`.

Experiment results are dataclasses that inherit `Result`. The methods only delegate to the report layer
(`sinkscope.report`), which owns every table, JSON payload and plot; experiments never print or write.

    res = ss.scan(lm, prompts)
    print(res.table())            # exactly what the CLI prints
    res.to_dict()                 # the JSON content (provenance included)
    res.save("results")           # JSON (+ PNGs); returns the paths written
"""

from __future__ import annotations

from pathlib import Path


class Result:
    """Mixin for result dataclasses. `meta` holds the run's provenance (set by the API, see provenance.py)."""

    meta: dict | None = None

    def table(self) -> str:
        """The text the CLI prints for this result."""
        from . import report
        return report.table(self)

    def to_dict(self) -> dict:
        """The JSON content: every printed number under its printed name, plus `provenance`."""
        from . import report
        return report.to_dict(self)

    def save(self, outdir: str | Path = "results", plots: bool = True) -> list[Path]:
        """Write this result's JSON (and plots) under `outdir`, replacing the previous run's set of files for
        the same output (stale plots included); returns the paths written."""
        from . import report
        return report.save(self, outdir, plots=plots)
