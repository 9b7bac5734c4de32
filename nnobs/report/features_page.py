"""The HTML page of a features result: one dashboard per feature, searchable by index.

Each context is drawn token by token, every token shaded by the feature's activation on it
(relative to the feature's maximum) and the token the example is about outlined. Everything
shown is read from the ``nnobs.features`` document; nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnobs.report.page import Page, escape, interval, number

STYLE = """<style>
.tok { white-space: pre; font-family: ui-monospace, Menlo, monospace; font-size: 0.85em;
       padding: 0 1px; border-radius: 2px; }
.tok.at { outline: 2px solid #b03000; }
.ctx { margin: 0.15em 0; line-height: 1.6; }
.ctx .act { color: #666; font-size: 0.8em; display: inline-block; width: 5em; }
.feature { border: 1px solid #ddd; border-radius: 6px; padding: 0.4em 1em; margin: 1em 0; }
.feature h3 { margin: 0.3em 0; }
.logits span { font-family: ui-monospace, Menlo, monospace; margin-right: 0.8em; }
#feature-search { font-size: 1em; padding: 0.3em; width: 12em; }
</style>"""

SEARCH_BOX = """<p><label>Feature index: <input id="feature-search" type="number" min="0"
placeholder="all features"></label> <span id="feature-count"></span></p>"""

# Shows only the card of the index typed (or the one named by #feature-N in the address).
SEARCH_SCRIPT = """<script>
(function () {
  var box = document.getElementById('feature-search');
  var cards = document.querySelectorAll('.feature');
  function show() {
    var want = box.value.trim(), shown = 0;
    cards.forEach(function (card) {
      var on = want === '' || card.dataset.index === want;
      card.style.display = on ? '' : 'none';
      shown += on ? 1 : 0;
    });
    document.getElementById('feature-count').textContent = shown + ' shown';
  }
  box.addEventListener('input', show);
  if (location.hash.indexOf('#feature-') === 0) { box.value = location.hash.slice(9); }
  show();
})();
</script>"""


def _token(text: str, act: float, peak: float, at: bool) -> str:
    shade = max(0.0, act) / peak if peak > 0 else 0.0
    shown = text.replace("\n", "↵").replace("\t", "→")
    cls = "tok at" if at else "tok"
    return (
        f'<span class="{cls}" title="{act:.3f}" '
        f'style="background: rgba(255,140,0,{shade:.2f})">{escape(shown)}</span>'
    )


def _context(example: dict[str, Any], peak: float) -> str:
    tokens = "".join(
        _token(t, a, peak, i == example["at"])
        for i, (t, a) in enumerate(zip(example["tokens"], example["acts"], strict=True))
    )
    return f'<div class="ctx"><span class="act">{example["act"]:.3f}</span>{tokens}</div>'


def _logits(logits: dict[str, Any] | None) -> str:
    if logits is None:
        return '<p class="meta">direct logit effect: not known for this model</p>'

    def row(pairs: list) -> str:
        return "".join(f"<span>{escape(repr(t))} {v:+.3f}</span>" for t, v in pairs)

    return (
        f'<p class="logits"><b>promotes</b> {row(logits["promoted"])}<br>'
        f"<b>suppresses</b> {row(logits['suppressed'])}</p>"
    )


def _ablation(effect: dict[str, Any] | None) -> str:
    if effect is None:
        return ""
    return (
        f"<p>mean ablation: loss {number(effect['delta'], 4)} "
        f"{interval(effect['ci95'], 4)} (95% CI over {effect['n_documents']} documents)</p>"
    )


def feature_card(feature: dict[str, Any]) -> str:
    peak = feature["max"] or 0.0
    label = f" ({escape(feature['label'])})" if feature["label"] else ""
    parts = [
        f'<div class="feature" id="feature-{feature["index"]}" data-index="{feature["index"]}">',
        f"<h3>feature {feature['index']}{label}</h3>",
        f'<p class="meta">density {feature["density"]:.4f} · mean {feature["mean"]:.4f} · '
        f"max {number(feature['max'], 3, sign=False)}</p>",
        _logits(feature["logits"]),
        _ablation(feature["ablation"]),
        "<h4>top activations</h4>",
        *(_context(e, peak) for e in feature["top"]),
    ]
    for b in feature["quantiles"]:
        parts.append(f"<h4>activation {b['lo']:.3f} – {b['hi']:.3f}</h4>")
        parts.extend(_context(e, peak) for e in b["examples"])
    parts.append("</div>")
    return "".join(parts)


def _link(index: int) -> str:
    return f'<a href="#feature-{index}">{index}</a>'


def _sae_metrics(page: Page, metrics: dict[str, Any]) -> None:
    loss = metrics["loss"]
    page.add("<h2>The dictionary</h2>")
    page.table(
        ["variance explained", "L0", "dead", "loss clean", "spliced in", "mean-ablated",
         "recovered"],
        [[number(metrics["variance_explained"], 3, sign=False), f"{metrics['l0']:.1f}",
          f"{metrics['dead_fraction']:.1%}", f"{loss['clean']:.4f}",
          f"{loss['spliced']:.4f} {interval(loss['delta_ci95'], 4)}",
          f"{loss['mean_ablated']:.4f}", number(loss["recovered"], 3, sign=False)]],
        numeric={0, 1, 2, 3, 5, 6},
    )  # fmt: skip


def _decision(page: Page, decision: dict[str, Any]) -> None:
    page.add(
        f"<h2>What the decision-quality probe is made of</h2><p>The probe direction of "
        f"{escape(decision['observe'])} (at {escape(decision['probe_site'])}), decomposed into "
        "these features: by cosine with what each writes into the stream, and by its mean "
        "contribution to the probe's score.</p>"
    )
    for key, title in (("by_cosine", "by cosine"), ("by_attribution", "by attribution")):
        page.add(f"<h3>{title}</h3>")
        page.table(
            ["feature", "cosine", "attribution"],
            [[_link(c["index"]), number(c["cosine"]), number(c["attribution"], 4)]
             for c in decision[key]],
            numeric={1, 2},
        )  # fmt: skip


def render_features(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for a features result; returns its path."""
    source = doc["source"]
    page = Page(Path(out), f"nnobs features: {doc['site']} ({source['kind']})")
    page.add(STYLE)
    prov = doc["provenance"]
    model = prov.get("path") or prov.get("source") or prov.get("architecture", "")
    page.add(
        f'<p class="meta">model {escape(model)} · {source["n_features"]} features · '
        f"{doc['n_tokens']} tokens of {escape(doc['corpus']['spec'])} "
        f"({escape(doc['corpus']['split'])}) · streamed at "
        f"{doc['stream']['tokens_per_second']:.0f} tokens/s</p>"
    )
    if doc.get("sae_metrics"):
        _sae_metrics(page, doc["sae_metrics"])
    if doc.get("decision"):
        _decision(page, doc["decision"])
    active = [f for f in doc["features"] if f["density"] > 0]
    densest = sorted(active, key=lambda f: -f["density"])[:20]
    page.add("<h2>Densest features</h2>")
    page.table(
        ["feature", "density", "max", "mean-ablation Δloss"],
        [[_link(f["index"]), f"{f['density']:.4f}", number(f["max"], 3, sign=False),
          number(f["ablation"]["delta"], 4) if f["ablation"] else "—"] for f in densest],
        numeric={1, 2, 3},
    )  # fmt: skip
    silent = len(doc["features"]) - len(active)
    page.add(f"<h2>Dashboards</h2><p>{len(active)} active features; {silent} never active.</p>")
    page.add(SEARCH_BOX)
    page.add("".join(feature_card(f) for f in active))
    page.add(SEARCH_SCRIPT)
    return page.write()
