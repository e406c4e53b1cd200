"""A report table (header, rows of formatted cells, notes) and its Markdown, CSV, LaTeX renderings.

Cells are already-rounded strings, so every format shows the same digits; None is a missing value.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from duplus.atomic import write_text

MISSING_TEXT = "—"
PUBLISHED_SUFFIX = " (published)"

# Decimals per kind of number, the same in every table.
DECIMALS = {"score": 3, "hd95": 1, "seconds": 2, "mb": 0, "size_mb": 2, "percent": 2, "ratio": 2,
            "millions": 2, "giga": 2}


def fmt(value: object, kind: str) -> str | None:
    """Round ``value`` for a column of ``kind`` (see DECIMALS); None for missing or NaN."""
    if value is None:
        return None
    if kind == "int":
        try:
            return str(int(value))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if math.isnan(number):
        return None
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    text = f"{number:.{DECIMALS[kind]}f}"
    # "-0.000" reads as a sign error; it is zero at this precision.
    return text[1:] if re.fullmatch(r"-0\.?0*", text) else text


def fmt_mean_std(mean: object, std: object, kind: str) -> str | None:
    """``"0.712 ± 0.031"``; just the mean when the spread is missing."""
    mean_text = fmt(mean, kind)
    if mean_text is None:
        return None
    std_text = fmt(std, kind)
    return mean_text if std_text is None else f"{mean_text} ± {std_text}"


@dataclass(frozen=True)
class Column:
    """A column: ``key`` into each row, printed ``header``, numeric (right-aligned) or not."""

    key: str
    header: str
    numeric: bool = True
    published: bool = False

    @property
    def title(self) -> str:
        return self.header + PUBLISHED_SUFFIX if self.published else self.header


@dataclass
class Table:
    """One report table; ``name`` is the file stem, ``notes`` print under it."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, str | None]]
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[list[str | None]]:
        return [[row.get(col.key) for col in self.columns] for row in self.rows]

    def to_markdown(self) -> str:
        header = "| " + " | ".join(_md_escape(c.title) for c in self.columns) + " |"
        rule = "|" + "|".join("---:" if c.numeric else ":---" for c in self.columns) + "|"
        lines = [f"**{_md_escape(self.title)}**", "", header, rule]
        for cells in self.cells():
            lines.append("| " + " | ".join(_md_escape(c) if c is not None else MISSING_TEXT for c in cells) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {_md_escape(note)}" for note in self.notes)
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([c.title for c in self.columns])
        for cells in self.cells():
            writer.writerow(["" if c is None else c for c in cells])
        return buffer.getvalue()

    def to_latex(self) -> str:
        spec = "".join("r" if c.numeric else "l" for c in self.columns)
        lines = [
            "% requires \\usepackage{booktabs}",
            "\\begin{table}[ht]",
            "\\centering",
            f"\\caption{{{latex_escape(self.title)}}}",
            f"\\label{{tab:{self.name}}}",  # a label is an identifier, not text: no escaping
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
            " & ".join(latex_escape(c.title) for c in self.columns) + " \\\\",
            "\\midrule",
        ]
        for cells in self.cells():
            lines.append(" & ".join("--" if c is None else latex_escape(c) for c in cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if self.notes:
            lines.append("\\par\\smallskip")
            lines.extend(f"{{\\footnotesize {latex_escape(note)}}}\\par" for note in self.notes)
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> list[Path]:
        """Write ``{name}.md``, ``.csv`` and ``.tex`` into ``folder``; return their paths."""
        written = []
        for suffix, text in ((".md", self.to_markdown()), (".csv", self.to_csv()), (".tex", self.to_latex())):
            path = Path(folder) / f"{self.name}{suffix}"
            write_text(path, text)
            written.append(path)
        return written


def _md_escape(text: str) -> str:
    # A pipe would split the cell.
    return text.replace("|", "\\|")


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "—": "--",
    "†": r"$^\dagger$",
    "×": r"$\times$",
}
_LATEX_PATTERN = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (underscores included) and spell the few non-ASCII signs we use."""
    return _LATEX_PATTERN.sub(lambda m: _LATEX_SPECIAL[m.group(0)], text)
