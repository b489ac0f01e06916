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

from transfuse import metrics as tm
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


def reliability_figure(page: Page, curves: list, filename: str, how: str) -> None:
    """A reliability diagram on the test split and its table (accuracy, NLL, ECE, n) for ``curves``
    [(label, probs, labels)]: the last curve (the served model) as bars with its counts, earlier ones as lines."""
    plt = pyplot()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    rows = []
    for i, (label, probs, labels) in enumerate(curves):
        rel = tm.reliability(probs, labels)
        edges = np.asarray(rel["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        count = np.asarray(rel["count"])
        has = count > 0
        ece, nll = tm.ece(probs, labels), tm.nll(probs, labels)
        rows.append((label, tm.accuracy(probs, labels), nll, ece, len(labels)))
        last = i == len(curves) - 1
        if last:  # the served model's bins as bars, an earlier curve as a line over them
            ax.bar(centers[has], np.asarray(rel["accuracy"])[has], width[has], edgecolor="black", alpha=0.6,
                   label="accuracy per confidence bin")
            axc.bar(centers, count, width, color="tab:grey", edgecolor="black")
        ax.plot(np.asarray(rel["confidence"])[has], np.asarray(rel["accuracy"])[has], "o" if last else "o-",
                color="tab:red" if last else "tab:orange", ms=4, label=f"{label}: ECE {ece:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.45)  # room above 1.0 for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(f"Reliability on the test split (n={rows[-1][4]})")
    ax.legend(fontsize=6.5, loc="upper left")
    axc.set_xlabel("confidence (max probability)")
    axc.set_ylabel("examples")
    axc.set_xlim(0, 1)
    page.figure(fig, filename, "reliability diagram", f"Reliability diagram of {esc(how)}.")
    page.add(table(["model", "test accuracy", "NLL", "ECE", "n"],
                    [(esc(label), num(a), num(n), num(e), num(k)) for label, a, n, e, k in rows]))


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
