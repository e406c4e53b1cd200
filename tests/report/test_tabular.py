"""Rounding and the Markdown / CSV / LaTeX renderings of a report table."""

import csv
import io
import math

from duplus.report.tabular import Column, Table, fmt, fmt_mean_std, latex_escape


def test_fmt_rounds_by_kind_and_marks_missing():
    assert fmt(0.91234, "score") == "0.912"
    assert fmt(3.456, "hd95") == "3.5"
    assert fmt(1.23456, "seconds") == "1.23"
    assert fmt(812.6, "mb") == "813"
    assert fmt(math.nan, "score") is None
    assert fmt(None, "score") is None
    assert fmt("n/a", "score") is None
    assert fmt(math.inf, "hd95") == "inf"
    assert fmt(-0.0001, "score") == "0.000"  # no "-0.000"
    assert fmt(4.0, "int") == "4"


def test_fmt_mean_std():
    assert fmt_mean_std(0.65432, 0.04321, "score") == "0.654 ± 0.043"
    assert fmt_mean_std(0.65432, math.nan, "score") == "0.654"
    assert fmt_mean_std(math.nan, 0.1, "score") is None


def test_latex_escape_specials():
    assert latex_escape("demo_abdomen_ct 50% a&b #1") == r"demo\_abdomen\_ct 50\% a\&b \#1"
    assert latex_escape("0.69 ± 0.02") == r"0.69 $\pm$ 0.02"
    assert latex_escape("x^2 ~ {y}") == r"x\textasciicircum{}2 \textasciitilde{} \{y\}"


def _table() -> Table:
    return Table("t_x", "A title_1", [Column("name", "name", numeric=False), Column("v", "value"),
                                      Column("p", "ref", published=True)],
                 [{"name": "a_b", "v": "0.500", "p": None}, {"name": "c|d", "v": None, "p": "0.8308"}],
                 ["note_1"])


def test_markdown_alignment_missing_and_pipe_escape():
    md = _table().to_markdown()
    lines = md.splitlines()
    assert "| name | value | ref (published) |" in lines
    assert "|:---|---:|---:|" in lines
    assert "| a_b | 0.500 | — |" in lines
    assert "| c\\|d | — | 0.8308 |" in lines
    assert lines[-1] == "- note_1"


def test_csv_round_trips_with_empty_missing():
    rows = list(csv.reader(io.StringIO(_table().to_csv())))
    assert rows == [["name", "value", "ref (published)"], ["a_b", "0.500", ""], ["c|d", "", "0.8308"]]


def test_latex_is_booktabs_and_escaped():
    tex = _table().to_latex()
    assert "\\begin{tabular}{lrr}" in tex
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "a\\_b & 0.500 & -- \\\\" in tex
    assert "\\caption{A title\\_1}" in tex and "\\label{tab:t_x}" in tex  # \\ref{tab:t_x} finds it
    # no unescaped underscore anywhere outside the label
    body = tex.replace("\\_", "").replace("\\label{tab:t_x}", "")
    assert "_" not in body


def test_write_creates_three_formats(tmp_path):
    paths = _table().write(tmp_path)
    assert [p.name for p in paths] == ["t_x.md", "t_x.csv", "t_x.tex"]
    assert all(p.read_text(encoding="utf-8") for p in paths)
