"""The report's HTML page: one self-contained file (inline CSS, SVG and a few lines of JavaScript; a Content
Security Policy forbids every network request), readable from disk in any browser.

Each section is a `<section id=... data-section>`. The script records page errors (script errors, blocked
requests, console.error) in a visible list, and once the page is laid out marks `<body data-rendered="ok">`
when every section listed in `data-sections` is shown and nothing failed ("error" otherwise), which a headless
browser can read back (tests/test_report.py).
"""

from __future__ import annotations

import time
from html import escape

from lorakit import __version__

CSS = """
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #f6f7f9; --good: #067647; --bad: #b42318;
        --loss: #d1fadf; --loss-line: #32d583; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); }
header, section { max-width: 1180px; margin: 0 auto; padding: 16px 24px; }
header h1 { margin: 8px 0 2px; font-size: 22px; }
.meta, .note { color: var(--muted); }
nav a { margin-right: 14px; color: #175cd3; text-decoration: none; }
section { background: white; border: 1px solid var(--line); border-radius: 8px; margin-top: 16px; }
h2 { margin: 4px 0 12px; font-size: 18px; }
h3 { margin: 18px 0 8px; font-size: 15px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f9fafb; font-weight: 600; }
td.num, th.num { text-align: right; }
.better { color: var(--good); font-weight: 600; }
.worse { color: var(--bad); font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.charts svg { flex: 1 1 460px; min-width: 0; max-width: 720px; height: auto; border: 1px solid var(--line);
              border-radius: 6px; }
.tokens { font: 13px/1.9 ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap;
          word-break: break-word; border: 1px solid var(--line); border-radius: 6px; padding: 8px;
          max-height: 420px; overflow: auto; }
.tokens span { border-radius: 3px; box-shadow: inset -1px 0 0 #fff; color: #98a2b3; }
.tokens span.loss { background: var(--loss); color: var(--fg); box-shadow: inset 0 -2px 0 var(--loss-line); }
.tokens span.special { font-style: italic; background: #f2f4f7; }
.tokens span.loss.special { background: #a6f4c5; }
.swatch { display: inline-block; padding: 0 6px; border-radius: 3px; }
.samples td { max-width: 330px; white-space: pre-wrap; word-break: break-word; font-size: 13px; }
.samples td div { max-height: 220px; overflow: auto; }
.tag { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px; margin-left: 4px; }
.tag.ok { background: #d1fadf; color: var(--good); }
.tag.no { background: #fee4e2; color: var(--bad); }
.heat td.num { min-width: 48px; }
#page-errors { max-width: 1180px; margin: 12px auto; padding: 8px 24px; background: #fee4e2; color: var(--bad);
               border-radius: 8px; }
details summary { cursor: pointer; color: #175cd3; }
"""

SCRIPT = """
(function () {
  var errors = [];
  function note(message) {
    errors.push(String(message));
    var box = document.getElementById('page-errors');
    if (box) {
      var item = document.createElement('li');
      item.textContent = String(message);
      box.querySelector('ol').appendChild(item);
      box.hidden = false;
    }
    if (document.body) document.body.setAttribute('data-rendered', 'error');
  }
  window.addEventListener('error', function (e) {
    note(e.message || ('could not load ' + ((e.target && (e.target.src || e.target.href)) || 'a resource')));
  }, true);
  window.addEventListener('securitypolicyviolation', function (e) { note('blocked: ' + e.blockedURI); });
  var consoleError = console.error;
  console.error = function () { note(Array.prototype.join.call(arguments, ' ')); consoleError.apply(console, arguments); };
  window.addEventListener('load', function () {
    var wanted = (document.body.getAttribute('data-sections') || '').split(',').filter(Boolean);
    var missing = wanted.filter(function (id) {
      var el = document.getElementById(id);
      return !el || el.offsetHeight === 0;
    });
    if (missing.length) note('sections not shown: ' + missing.join(', '));
    document.body.setAttribute('data-rendered', errors.length ? 'error' : 'ok');
  });
})();
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def num(value: object, digits: int = 4) -> str:
    """A number for a table cell: ints with thousands separators, floats to `digits` significant digits."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return escape(str(value))


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), cls: str = "") -> str:
    """An HTML table; the cells are HTML already; columns in `numeric` are right-aligned."""
    def cell(tag: str, i: int, text: str) -> str:
        return f'<{tag} class="num">{text}</{tag}>' if i in numeric else f"<{tag}>{text}</{tag}>"

    head = "".join(cell("th", i, escape(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}" data-section="{section_id}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def page(title: str, sources: list[str], sections: list[tuple[str, str, str]]) -> str:
    """The whole document; `sections` are (id, nav title, section HTML)."""
    ids = ",".join(s[0] for s in sections)
    nav = "".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name, _ in sections)
    when = time.strftime("%Y-%m-%d %H:%M")
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>", f"<style>{CSS}</style>", f"<script>{SCRIPT}</script>",
        f'</head><body data-sections="{ids}">',
        f"<header><h1>{escape(title)}</h1>",
        f'<p class="meta">lorakit {escape(__version__)}, {when}; from {escape(", ".join(sources))}</p>',
        f"<nav>{nav}</nav></header>",
        '<div id="page-errors" hidden><strong>This page hit errors:</strong><ol></ol></div>',
        *(html for _, _, html in sections),
        "</body></html>", ""])


def change_cell(key: str, value: float | None) -> str:
    """A change with its sign, green when it is an improvement (lower loss, perplexity and position bias;
    higher everything else)."""
    if value is None:
        return "\u2013"
    lower_is_better = key.split(".")[-1] in ("loss", "perplexity", "unparseable", "unparseable_swapped")
    if key.endswith("position_bias"):
        return f"{value:+.4g}"
    good = value < 0 if lower_is_better else value > 0
    cls = "better" if good else "worse" if value else ""
    return f'<span class="{cls}">{value:+.4g}</span>'


def bars(counts: dict[str, int], color: str = "#84caff") -> str:
    """Counts as a small table with proportional bars."""
    total = max(sum(counts.values()), 1)
    rows = [[escape(str(k)), num(v), (f'<span class="swatch" style="background:{color};width:'
                                      f'{max(2, int(160 * v / total))}px">&nbsp;</span> {100 * v / total:.1f}%')]
            for k, v in counts.items()]
    return table(["value", "count", "share"], rows, {1})

