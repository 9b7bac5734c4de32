"""The pieces every report page is made of: the page itself, its style, number formats and
verdict words."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nnobs.core.files import write_text
from nnobs.core.version import __version__

VERDICT_WORDS = {
    "retained": "retained",
    "erased": "erased (collapse)",
    "never_formed": "never formed",
    "fell_with_loss": "fell with the loss",
    "inconclusive": "inconclusive (formed; its fall is within the noise)",
    "mixed": "mixed across seeds",
}

CSS = """
body { font-family: system-ui, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict-retained, .verdict-signal { color: #11632b; font-weight: 600; }
.verdict-erased, .verdict-no_signal { color: #a3141a; font-weight: 600; }
.verdict-never_formed, .verdict-fell_with_loss, .verdict-mixed,
.verdict-inconclusive, .verdict-no_null { color: #8a5a00; font-weight: 600; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #555; }
.answer { background: #f5f8ff; padding: 0.8em 1em; border-left: 4px solid #3060c0; }
.meta { color: #666; font-size: 0.88em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def number(value: float | None, digits: int = 3, sign: bool = True) -> str:
    """``value`` to ``digits`` decimals (signed unless ``sign`` is false); a dash for None."""
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def interval(bounds: list | None, digits: int = 3) -> str:
    """A confidence interval as ``[lo, hi]``, signed; a dash for None."""
    return "—" if not bounds else f"[{bounds[0]:+.{digits}f}, {bounds[1]:+.{digits}f}]"


def escape(text: Any) -> str:
    """``text`` as HTML-safe text."""
    return html.escape(str(text))


class Page:
    """Sections of HTML and the figures they embed, written to ``out`` at the end."""

    def __init__(self, out: Path, title: str) -> None:
        self.out, self.title = out, title
        self.parts: list[str] = []
        self.figures: list[Path] = []

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, name: str, draw: Callable[[Path], Path], caption: str) -> None:
        path = draw(self.out / f"{name}.png")
        self.figures.append(path)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.add(
            f'<figure id="fig-{name}"><img alt="{escape(caption)}" src="data:image/png;base64,'
            f'{data}"><figcaption>{escape(caption)}</figcaption></figure>'
        )

    def table(
        self, header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()
    ) -> None:
        head = "".join(f"<th>{escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                for i, c in enumerate(row)
            )
            + "</tr>"
            for row in rows
        )
        self.add(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def write(self) -> Path:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        page = (
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(self.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(self.title)}</h1>{''.join(self.parts)}"
            f'<p class="meta">nnobs {__version__}, rendered {stamp}.</p></body></html>'
        )
        path = self.out / "index.html"
        write_text(path, page)
        return path


def verdict_span(verdict: str | None) -> str:
    """A verdict in words, coloured by its class."""
    verdict = verdict or "n/a"
    words = VERDICT_WORDS.get(verdict, verdict)
    return f'<span class="verdict-{escape(verdict)}">{escape(words)}</span>'
