"""The content of a report as plain data (sections of text, tables, figures, notices) that
one HTML and one Markdown template render; the builders never write markup themselves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class RunLink:
    label: str
    url: str


@dataclass
class Text:
    text: str
    kind: str = "text"


@dataclass
class Bullets:
    items: list[str]
    kind: str = "bullets"


@dataclass
class Markdown:
    """Trusted Markdown rendered from this package's own templates (no user strings)."""

    source: str
    kind: str = "markdown"


@dataclass
class Notice:
    """Missing data: what is missing and the command that fills it."""

    text: str
    command: str | None = None
    kind: str = "notice"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    kind: str = "table"

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, caption: str = "", digits: int = 4) -> Table:
        return cls([str(c) for c in frame.columns],
                   [[cell(v, digits) for v in row] for row in frame.itertuples(index=False)],
                   caption)


@dataclass
class Figure:
    name: str
    """File stem under figures/ and the image's id."""
    title: str
    caption: str
    png: bytes
    runs: list[RunLink] = field(default_factory=list)
    number: int = 0
    kind: str = "figure"


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return "".join(ch if ch.isalnum() else "-" for ch in self.title.lower()).strip("-")


@dataclass
class Missing:
    what: str
    command: str


@dataclass
class Report:
    name: str
    """File stem: name.html and name.md."""
    title: str
    summary: str
    built_from: list[tuple[str, str]]
    sections: list[Section]
    missing: list[Missing] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]

    def number_figures(self) -> None:
        """Figure 1, 2, ... in reading order."""
        for number, fig in enumerate(self.figures(), start=1):
            fig.number = number


def cell(value, digits: int = 4) -> str:
    """A table cell as text: numbers to `digits` significant digits, missing as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.{digits}g}"
    return str(value)


def ci_text(mean: float, lo: float, hi: float, digits: int = 4) -> str:
    """`mean [lo, hi]`, or just the mean when no interval exists (one seed)."""
    if not math.isfinite(mean):
        return "—"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"
