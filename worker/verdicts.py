"""Verdicts of ``explainer detect`` written as they come: JSON lines, CSV, or rows of a table printed at the end.

A verdict here is the dict the stream publishes (:func:`worker.detect.detect_requests`), so a file judged by
``explainer detect`` and the same image sent through the stream carry the same fields and numbers.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from rich.markup import escape
from rich.table import Table

from worker import wire


def printable(value: object) -> str:
    """``value`` as text safe for a terminal: control characters (terminal escapes among them) shown as
    ``\\xNN`` escapes, and Rich markup shown as typed, never interpreted (ids and errors come from producers)."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))
    return escape(text)


def watch_line(verdict: dict) -> str:
    """One line of ``explainer watch`` for a verdict or an alert episode (``worker.wire.decode_alert``), as Rich
    markup in which only our own styling is markup."""
    if verdict.get("kind") in wire.EPISODE_KINDS:
        marked = ", ".join(printable(e.get("id")) for e in verdict.get("entries", []))
        what = "flagged" if verdict["kind"] == "episode" else "small edits of its recent images (a query attack?)"
        return (f"[red]ALERT[/red] source {printable(verdict.get('source'))}: {len(verdict.get('entries', []))} of "
                f"its last {printable(verdict.get('n'))} images {what} ({marked})")
    source = f"  source {printable(verdict['source'])}" if verdict.get("source") else ""
    mark = "[red]ADVERSARIAL[/red]" if verdict.get("is_adversarial") else "[green]clean[/green]"
    if verdict.get("error"):
        mark = f"[yellow]error: {printable(verdict['error'])}[/yellow]"
    return (f"{printable(verdict.get('id'))}  model {printable(verdict.get('model'))}  class "
            f"{printable(verdict.get('predicted_class'))}  score {printable(verdict.get('score'))}  {mark}  "
            f"{printable(verdict.get('latency_ms'))} ms{source}")


COLUMNS = ("file", "model", "is_adversarial", "score", "threshold", "fpr", "rule", "predicted_class", "confidence",
           "entropy_original", "entropy_denoised", "prediction_shift", "map_shift")


class VerdictWriter:
    """``fmt``: "jsonl", "csv" or None (a table, :meth:`table`); to ``path``, or stdout when None. CSV has one
    column per field of :data:`COLUMNS`, one per configured signal without a field of its own, and ``error``."""

    def __init__(self, fmt: str | None, path: Path | None, signals: Iterable[str] = ()) -> None:
        self.fmt, self.path = fmt, path
        self.extra = [s for s in signals if s not in COLUMNS]
        self.rows: list[tuple[str, dict]] = []
        self._fh: IO[str] | None = None
        self._csv: Any = None

    def __enter__(self) -> VerdictWriter:
        if self.fmt is not None:
            self._fh = open(self.path, "w", newline="") if self.path is not None else sys.stdout  # noqa: SIM115
            if self.fmt == "csv":
                self._csv = csv.writer(self._fh)
                self._csv.writerow([*COLUMNS, *self.extra, "error"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.close()
        elif self._fh is not None:
            self._fh.flush()

    def write(self, file: str, verdict: dict) -> None:
        """One image's verdict (an ``error`` verdict for an image that could not be judged)."""
        if self.fmt == "jsonl":
            row = {"file": file, **{k: v for k, v in verdict.items() if k not in ("v", "id")}}
            self._fh.write(json.dumps(row) + "\n")
        elif self.fmt == "csv":
            signals = verdict.get("signals") or {}
            values = [file, *(verdict.get(k) for k in COLUMNS[1:])]
            self._csv.writerow([*values, *(signals.get(s) for s in self.extra), verdict.get("error") or ""])
        else:
            self.rows.append((file, verdict))

    def table(self) -> Table:
        """The table of every verdict written (``fmt`` None). File names and errors are shown as text, never
        read as Rich markup."""
        table = Table("file", "class", "conf", "H(orig)", "H(denoised)", "score", "verdict")
        for file, v in self.rows:
            if v.get("error"):
                table.add_row(printable(file), "-", "-", "-", "-", "-", f"[red]error: {printable(v['error'])}[/red]")
                continue
            verdict = "[red]ADVERSARIAL[/red]" if v["is_adversarial"] else "[green]clean[/green]"
            table.add_row(printable(file), str(v["predicted_class"]), f"{v['confidence']:.3f}",
                          f"{v['entropy_original']:.3f}", f"{v['entropy_denoised']:.3f}",
                          f"{v['score']:.3f} / {v['threshold']:.3f}", verdict)
        return table
