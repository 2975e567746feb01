"""`fpo features --html FILE`: the feature report as one self-contained page (no network, no external script or
font): the listed features x runs table, sortable by any column, and a card per feature with its contexts, each
token shaded by the feature's activation under the reference and under each run side by side, its change per side
with the bootstrap interval, and its Neuronpedia page where the SAE names one.

Every number on the page is the report's own (the JSON `--json` writes), formatted with `fmt`; the tests read the
page back and compare.
"""

from __future__ import annotations

import html

__all__ = ["render_page", "fmt"]


def fmt(x: float | None) -> str:
    """A number as the page shows it: 4 significant digits, '-' for none."""
    return "-" if x is None else f"{x:.4g}"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d2330;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}p.meta{color:#566;margin:2px 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:4px 8px;border-bottom:1px solid #e3e6ea;text-align:right;white-space:nowrap}
th{background:#f4f6f8;cursor:pointer;position:sticky;top:0}th:first-child,td:first-child{text-align:left}
tr:hover td{background:#f9fafb}.card{border:1px solid #dde1e6;border-radius:8px;padding:12px 14px;margin:14px 0}
.card h3{margin:0 0 6px;font-size:15px}.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;
margin:4px 0;white-space:pre-wrap}.tok{border-radius:3px;padding:0 1px}.hit{outline:1.5px solid #1d2330}
.row{display:grid;grid-template-columns:110px 1fr;gap:6px;align-items:baseline}.lab{color:#566;font-size:12px}
.wrap{overflow-x:auto}.neg{color:#b0303a}.pos{color:#1f6f43}
.summary{background:#f4f6f8;border-radius:6px;padding:8px 12px}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach((th,col)=>{th.addEventListener('click',()=>{
const body=th.closest('table').tBodies[0];const rows=[...body.rows];const dir=th.dataset.dir==='d'?1:-1;
th.dataset.dir=dir===1?'a':'d';rows.sort((a,b)=>{const x=a.cells[col].dataset.v,y=b.cells[col].dataset.v;
const nx=parseFloat(x),ny=parseFloat(y);if(!isNaN(nx)&&!isNaN(ny))return dir*(nx-ny);return dir*x.localeCompare(y)});
rows.forEach(r=>body.appendChild(r))})});
"""


def _cell(value, text=None) -> str:
    v = "" if value is None else str(value)
    return f'<td data-v="{html.escape(v)}">{html.escape(text if text is not None else fmt(value))}</td>'


def _shade(activation, top) -> str:
    a = 0.0 if not top or activation is None else max(0.0, min(1.0, activation / top))
    return f"background:rgba(230,120,30,{a:.3f})"


def _context_html(ctx, runs) -> str:
    """One context: its tokens under the reference and each run, shaded by the feature's activation on a scale
    shared by the rows (the reference's strongest activation in this window)."""
    acts = ctx.get("token_acts") or {}
    ref = acts.get("reference")
    rows = [("reference", ref)] + [(name, (acts.get("runs") or [None] * len(runs))[r]) for r, name in enumerate(runs)]
    top = max([a for _, xs in rows if xs for a in xs if a is not None] + [1e-12])
    out = [f'<div class="lab">pair {ctx["pair"]}, {ctx["response"]}: {html.escape(ctx["text"])}</div>']
    for name, xs in rows:
        spans = []
        for k, tok in enumerate(ctx.get("tokens", [])):
            a = xs[k] if xs and k < len(xs) else None
            hit = " hit" if k == ctx.get("window_index") else ""
            title = html.escape(f"{name}: {fmt(a)}")
            style = _shade(a, top)
            spans.append(f'<span class="tok{hit}" style="{style}" title="{title}">{html.escape(tok)}</span>')
        label = f'<span class="lab">{html.escape(name)}</span>'
        out.append(f'<div class="row">{label}<div class="ctx">{"".join(spans)}</div></div>')
    return "\n".join(out)


def _short(path: str) -> str:
    """A path as the page names it: its last part (the JSON keeps the whole path)."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def render_page(report: dict) -> str:
    runs = report["runs"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>fpo features: {html.escape(', '.join(runs))}</title><style>{_CSS}</style></head><body>",
        "<h1>What alignment changed, feature by feature</h1>",
        f'<p class="meta">reference {html.escape(_short(report["reference"]))}; runs {html.escape(", ".join(runs))}; '
        f"{report['pairs']} held-out pairs of {html.escape(_short(report['dataset']))}: features ranked on "
        f"{report['ranked_on_pairs']} pairs, every number judged on {report['judged_on_pairs']}"
        + (" other pairs" if report["ranked_on_pairs"] != report["pairs"] else " (the same pairs)")
        + ".</p>",
    ]
    for sae in report["saes"]:
        parts.append(f'<p class="summary">{html.escape(sae["summary"])}</p>')
    parts.append(
        "<p class=meta>drift: the mean over responses of (p - p_ref)^2 of a feature's response-pooled activation. "
        "change: the mean of p - p_ref, with its 95% bootstrap interval over the judged responses. Click a column "
        "to sort.</p>"
    )
    head = ["SAE", "feature", "ref act"]
    for name in runs:
        head += [f"drift {name}", f"chosen {name}", f"rejected {name}"]
    parts.append('<div class="wrap"><table class="sortable" id="features"><thead><tr>')
    parts += [f"<th>{html.escape(h)}</th>" for h in head]
    parts.append("</tr></thead><tbody>")
    for f in report["features"]:
        ref = (f["ref_chosen"] + f["ref_rejected"]) / 2
        cells = [_cell(f["sae"], f["sae"]), _cell(f["id"], f"#{f['id']}"), _cell(ref)]
        for r in range(len(runs)):
            cells += [_cell(f["drift"][r]), _cell(f["change_chosen"][r]), _cell(f["change_rejected"][r])]
        parts.append(f'<tr id="row-{html.escape(f["sae"])}-{f["id"]}">' + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div><h2>The features, one by one</h2>")
    links = {s["label"]: s.get("neuronpedia") for s in report["saes"]}
    for f in report["features"]:
        link = links.get(f["sae"])
        title = f"{html.escape(f['sae'])} feature #{f['id']}"
        if link:
            title += f' <a href="{html.escape(link)}{f["id"]}">Neuronpedia</a>'
        rows = []
        for r, name in enumerate(runs):
            for side in ("chosen", "rejected"):
                lo, hi = f[f"change_ci_{side}"][r]
                c = f[f"change_{side}"][r]
                cls = "pos" if c is not None and c > 0 else "neg"
                rows.append(
                    f'<tr><td>{html.escape(name)}</td><td>{side}</td><td class="{cls}" data-v="{c}">{fmt(c)}</td>'
                    f'<td data-v="{lo}">[{fmt(lo)}, {fmt(hi)}]</td><td data-v="{f[f"rel_change_{side}"][r]}">'
                    f"{fmt(f[f'rel_change_{side}'][r])}</td></tr>"
                )
        parts.append(
            f'<div class="card" id="card-{html.escape(f["sae"])}-{f["id"]}"><h3>{title}</h3>'
            f'<p class="meta">reference: mean activation {fmt(f["ref_chosen"])} (chosen), {fmt(f["ref_rejected"])} '
            f"(rejected); fires on {fmt(f['ref_freq'][0])} / {fmt(f['ref_freq'][1])} of responses</p>"
            "<table><thead><tr><th>run</th><th>side</th><th>change</th><th>95% interval</th><th>relative</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>"
            + "".join(_context_html(c, runs) for c in f["contexts"])
            + "</div>"
        )
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)
