"""Renders the report's index.html: every table as HTML, every figure embedded, provenance.

The page is self-contained (inline CSS, figures as data URIs, no scripts, no remote resources):
it shows the same opened from disk, moved elsewhere, or inside `snakemake --report`, which
embeds index.html alone. The tables' CSV / Markdown / LaTeX files and the figures' PDFs are
linked by relative path, beside it in results/report/.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import jinja2

from duplus.atomic import write_text
from duplus.report.tabular import MISSING_TEXT, Table


@dataclass(frozen=True)
class FigureRef:
    """A figure: ``src`` the PNG as a data URI (``png_data_uri``), ``pdf`` its path relative to index.html."""

    src: str
    caption: str
    pdf: str | None = None


def png_data_uri(path: str | Path) -> str:
    """The PNG at ``path`` as a data URI, for an ``<img src>`` that needs no file beside the page."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@dataclass
class Section:
    """A stage's part of the page; ``missing`` replaces the content when the stage left no metrics."""

    key: str
    title: str
    tables: list[Table] = field(default_factory=list)
    detail_tables: list[Table] = field(default_factory=list)
    figures: list[FigureRef] = field(default_factory=list)
    missing: str | None = None


# Long lines break after a block tag ({% ... %}), whose newline trim_blocks drops, or with a
# backslash, which Python drops: the rendered page is the same as with one line.
TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
caption { text-align: left; font-weight: bold; padding-bottom: .3em; }
th, td { border-top: 1px solid #ddd; padding: .25em .6em; }
thead th { border-bottom: 2px solid #444; border-top: 2px solid #444; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.published, td.published, tr.published td { background: #f3f0ff; font-style: italic; }
.notes { font-size: .8em; color: #555; margin: 0 0 1em 0; }
.links { font-size: .8em; }
.missing { background: #fff6e0; border-left: 4px solid #e0a800; padding: .5em 1em; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #444; }
nav a { margin-right: 1em; }
code { font-size: .9em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p>{{ subtitle }}</p>
<nav>{% for s in sections %}<a href="#{{ s.key }}">{{ s.title }}</a>{% endfor %}<a href="#provenance">Provenance</a></nav>
{% if missing_notes %}
<div class="missing" id="missing">
<strong>Not in this report:</strong>
<ul>{% for note in missing_notes %}<li>{{ note }}</li>{% endfor %}</ul>
</div>
{% endif %}
{% macro cell_class(c) %}{% set names = (['num'] if c.numeric else []) + (['published'] if c.published else []) %}
{% if names %} class="{{ names|join(' ') }}"{% endif %}{% endmacro %}
{% macro render_table(t) %}
<table id="{{ t.name }}">
<caption>{{ t.title }}</caption>
<thead><tr>{% for c in t.columns %}
<th{% if c.published %} class="published" title="published value, not measured here"{% endif %}>{{ c.title }}</th>{% endfor %}
</tr></thead>
<tbody>
{% for row in t.rows %}
<tr{% if (row.get('source') or '').startswith('published') %} class="published"{% endif %}>{% for c in t.columns %}
<td{{ cell_class(c) }}>{{ row.get(c.key) if row.get(c.key) is not none else missing_text }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% if t.notes %}<ul class="notes">{% for n in t.notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}
<p class="links">Download: <a href="tables/{{ t.name }}.csv">CSV</a> · <a href="tables/{{ t.name }}.md">Markdown</a> · \
<a href="tables/{{ t.name }}.tex">LaTeX</a></p>
{% endmacro %}
{% for s in sections %}
<section id="{{ s.key }}">
<h2>{{ s.title }}</h2>
{% if s.missing %}<p class="missing">{{ s.missing }}</p>{% endif %}
{% for t in s.tables %}{{ render_table(t) }}{% endfor %}
{% if s.detail_tables %}
<details><summary>Per-class tables ({{ s.detail_tables|length }})</summary>
{% for t in s.detail_tables %}{{ render_table(t) }}{% endfor %}
</details>
{% endif %}
{% for f in s.figures %}
<figure><img src="{{ f.src }}" alt="{{ f.caption }}">\
<figcaption>{{ f.caption }}{% if f.pdf %} (<a href="{{ f.pdf }}">PDF</a>){% endif %}</figcaption></figure>
{% endfor %}
</section>
{% endfor %}
<section id="provenance">
<h2>Provenance</h2>
<table>
<tbody>
{% for key, value in provenance_rows %}<tr><th scope="row">{{ key }}</th><td><code>{{ value }}</code></td></tr>
{% endfor %}
</tbody>
</table>
<p class="links">Full record: <a href="provenance.json">provenance.json</a></p>
</section>
</body>
</html>
"""


def _provenance_rows(provenance: Mapping[str, Any]) -> list[tuple[str, str]]:
    git = provenance.get("git") or {}
    commit = str(git.get("commit", "unknown")) + (" (uncommitted changes)" if git.get("dirty") else "")
    hw = provenance.get("hardware") or {}
    rows = [
        ("duplus version", str(provenance.get("duplus_version"))),
        ("git commit", commit),
        ("config sha256", str(provenance.get("config_sha256"))),
        ("seed", str(provenance.get("seed"))),
        ("evaluation device", str(provenance.get("evaluation_device") or MISSING_TEXT)),
        ("report machine", f"{hw.get('platform')}, {hw.get('cpu_count')} CPUs, Python {hw.get('python')}"),
    ]
    for dataset, entry in sorted((provenance.get("data_manifests") or {}).items()):
        rows.append((f"manifest {dataset}", str(entry.get("sha256"))))
    packages = provenance.get("packages") or {}
    rows.append(("packages", ", ".join(f"{k} {v}" for k, v in packages.items() if v) or MISSING_TEXT))
    return rows


def render_index(sections: list[Section], provenance: Mapping[str, Any], missing_notes: list[str],
                 title: str = "DuPLUS report") -> str:
    """The page as a string (autoescaped: names from configs cannot inject markup)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(TEMPLATE)
    return template.render(
        title=title,
        subtitle="Segmentation, adaptation, prognosis and efficiency from this run's metrics. "
                 "Shaded, italic columns and rows are published reference values, not measured here.",
        sections=sections,
        missing_notes=missing_notes,
        missing_text=MISSING_TEXT,
        provenance_rows=_provenance_rows(provenance),
    )


def write_index(path: str | Path, sections: list[Section], provenance: Mapping[str, Any],
                missing_notes: list[str]) -> Path:
    """Render and write index.html atomically."""
    write_text(path, render_index(sections, provenance, missing_notes))
    return Path(path)
