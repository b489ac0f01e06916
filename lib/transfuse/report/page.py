"""The report's HTML page machinery: escaping and number cells, tables, the "stage X not run" line, the
:class:`Page` that collects the sections and writes each figure as a PNG beside index.html, the page's CSS, the
matplotlib import (files only: the Agg backend) and the wrapper that draws one section without letting it fail
the report. No JavaScript, no network: the images are files next to the page."""

from __future__ import annotations

import html
import io
import logging
import math
from typing import Any, Callable, Sequence

import numpy as np

from transfuse import storage

log = logging.getLogger(__package__)  # "transfuse.report": one logger for the package's modules

DPI = 110  # ~550-800 px wide figures: readable in a browser without zooming


def esc(v: Any) -> str:
    return html.escape(str(v))


def num(v: Any, fmt: str = "{:.4f}") -> str:
    """A table cell: numbers formatted, None/NaN as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return "-" if math.isnan(v) else fmt.format(v)
    return esc(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def not_run(*stages: str) -> str:
    return "".join(f'<p class="missing">stage {esc(s)} not run</p>' for s in stages)


class Page:
    """Collects HTML sections and writes each figure as a PNG beside index.html."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.images: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig: Any, name: str, alt: str, caption: str = "") -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
        plt.close(fig)
        self.image_bytes(buf.getvalue(), name, alt, caption)

    def image_bytes(self, data: bytes, name: str, alt: str, caption: str = "") -> None:
        storage.write_bytes(storage.join(self.out_dir, name), data)
        self.images.append(name)
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        self.add(f'<figure><img src="{esc(name)}" alt="{esc(alt)}">{cap}</figure>')


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ style, sections
CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555;max-width:800px}
.missing{color:#a33;font-style:italic}.error{color:#a00}code{font-size:.9em}h1{margin:.2em 0 .4em}
.verdict-lines p{margin:.2em 0}td.met{color:#161;font-weight:bold}td.missed{color:#a00;font-weight:bold}
td.not-run{color:#777}.note{font-size:.85em;color:#555}"""


def section(page: Page, title: str, fn: Callable[[], None]) -> None:
    """Run one section; a stage output that exists but cannot be read is named on the page, not raised."""
    start = len(page.parts)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the report must not fail a finished run; the error is shown + logged
        log.warning("report section %r failed: %s: %s", title, type(e).__name__, e, exc_info=True)
        del page.parts[start + 1:]  # keep the heading, drop a half-written section
        page.add(f'<p class="error">section {esc(title)} could not be drawn: {esc(type(e).__name__)}: '
                 f"{esc(e)}</p>")
