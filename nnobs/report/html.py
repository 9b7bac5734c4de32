"""``nnobs report``: one self-contained HTML page from the result documents in a directory.

Works on a study directory (``study.json``), a run directory (``trajectory/trajectory.json``
and, if present, ``observe/observe.json``) or an observe directory (``observe.json``). The
page embeds its PNG plots as data URIs, so it is a single file that can be mailed or
archived; the PNGs are also written beside it. Everything drawn is read from the JSON
documents, which the page names: no statistic is recomputed here.

Verdicts, per variant or run, come from the collapse detection in the trajectories:
*retained* (the signal formed and is above the detection floor at the end), *erased* (it
formed and fell to the floor while the validation loss kept improving: observability
collapse), *never formed*, *fell with the loss* (it fell while the loss got worse: overfitting
or divergence, not a collapse), or *mixed* across training seeds.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.files import write_text
from nnobs.core.results import load_result
from nnobs.core.rundir import RunDir
from nnobs.core.version import __version__
from nnobs.report import plots

VERDICT_WORDS = {
    "retained": "retained",
    "erased": "erased (collapse)",
    "never_formed": "never formed",
    "fell_with_loss": "fell with the loss",
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
.verdict-retained { color: #11632b; font-weight: 600; }
.verdict-erased { color: #a3141a; font-weight: 600; }
.verdict-never_formed, .verdict-fell_with_loss, .verdict-mixed { color: #8a5a00; font-weight: 600; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #555; }
.answer { background: #f5f8ff; padding: 0.8em 1em; border-left: 4px solid #3060c0; }
.meta { color: #666; font-size: 0.88em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _f(value: float | None, digits: int = 3, sign: bool = True) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _ci(interval: list | None, digits: int = 3) -> str:
    return "—" if not interval else f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def _e(text: Any) -> str:
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
            f'<figure id="fig-{name}"><img alt="{_e(caption)}" src="data:image/png;base64,'
            f'{data}"><figcaption>{_e(caption)}</figcaption></figure>'
        )

    def table(self, header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()):
        head = "".join(f"<th>{_e(h)}</th>" for h in header)
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
            f"<title>{_e(self.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(self.title)}</h1>{''.join(self.parts)}"
            f'<p class="meta">nnobs {__version__}, rendered {stamp}.</p></body></html>'
        )
        path = self.out / "index.html"
        write_text(path, page)
        return path


def _verdict_span(verdict: str | None) -> str:
    verdict = verdict or "n/a"
    return f'<span class="verdict-{_e(verdict)}">{_e(VERDICT_WORDS.get(verdict, verdict))}</span>'


# ------------------------------------------------------------------------------ study


def variant_verdict_text(v: dict) -> str:
    """One sentence on what happened to the signal in this variant, with its numbers."""
    return _verdict_sentence(v) + _unlearned(v)


def _unlearned(v: dict) -> str:
    """A warning when the variant's models never got past token frequencies: whatever its
    probes read, it is not a trained model's signal."""
    loss, unigram = v["final_val_loss"]["mean"], v.get("unigram_loss")
    if loss is None or unigram is None or loss < unigram - 0.05:
        return ""
    return (
        f" Its models did not learn beyond token frequencies (validation loss {loss:.3f}, "
        f"unigram baseline {unigram:.3f})."
    )


def _verdict_sentence(v: dict) -> str:
    final, runs, verdict = v["final_pcorr"], v["runs"], v["verdict"]
    n, counts = len(runs), v["verdict_counts"]
    floor = f"floor {v['floor']:.3f}" if v.get("floor") is not None else "no floor"
    numbers = f"final pcorr {_f(final['mean'])} {_ci(final['ci95'])} ({floor})"
    if verdict == "retained":
        return f"Keeps the signal in {counts['retained']}/{n} seeds: {numbers}."
    if verdict == "erased":
        erased = [r for r in runs if r["collapse"]["verdict"] == "erased"]
        where = "; ".join(
            f"seed {r['seed']}: layer {r['collapse']['layer']}, peak at step "
            f"{r['collapse']['peak_step']}, at the floor from step {r['collapse']['collapse_step']}"
            for r in erased
        )
        return (
            f"Signal formed and was erased while the validation loss kept improving in "
            f"{counts['erased']}/{n} seeds ({where}); {numbers}."
        )
    if verdict == "never_formed":
        return (
            f"The signal never rose above the detection floor "
            f"({counts['never_formed']}/{n} seeds); {numbers}."
        )
    if verdict == "fell_with_loss":
        return f"The signal fell as the validation loss rose (not a collapse); {numbers}."
    spread = ", ".join(f"{k.replace('_', ' ')} {c}" for k, c in counts.items())
    return f"Seeds disagree ({spread}); {numbers}."


def _answer(study: dict) -> str:
    """The study's question answered in two sentences from its verdicts and effects."""
    keep = [v["name"] for v in study["variants"] if v["verdict"] == "retained"]
    lose = [v["name"] for v in study["variants"] if v["verdict"] != "retained"]
    ranked = sorted(study["variants"], key=lambda v: -(v["final_pcorr"]["mean"] or -1))
    order = " > ".join(f"{v['name']} ({_f(v['final_pcorr']['mean'])})" for v in ranked)
    sure = [e for e in study["effects"] if e["metric"] == "final_pcorr" and e["excludes_zero"]]
    parts = [
        f"Keep the signal at the end of training: {', '.join(keep) or 'none'}; "
        f"do not: {', '.join(lose) or 'none'}.",
        f"Final pcorr, highest first: {order}.",
    ]
    if sure:
        parts.append(
            "Differences from the baseline whose 95% interval excludes zero: "
            + "; ".join(f"{e['variant']} {_f(e['difference'])} {_ci(e['ci95'])}" for e in sure)
            + "."
        )
    else:
        parts.append(
            f"No variant's final pcorr differs from {study['baseline']} with a 95% interval "
            f"that excludes zero at {len(study['config']['seeds'])} seeds."
        )
    return " ".join(parts)


def render_study(study: dict, out: Path) -> Path:
    """The study page: the answer, the verdict table, the comparison, then one section per
    variant."""
    page = Page(out, f"nnobs study: {study['name']}")
    _study_answer(page, study)
    _study_verdicts(page, study)
    _study_comparison(page, study)
    for variant in study["variants"]:
        _variant_section(page, variant)
    return page.write()


def _study_answer(page: Page, study: dict) -> None:
    seeds = study["config"]["seeds"]
    page.add(
        f"<p>{_e(study.get('description', ''))}</p>"
        f'<div class="answer"><b>{_e(study.get("question") or "Which variants keep the signal?")}'
        f"</b><br>{_e(_answer(study))}</div>"
        f'<p class="meta">{len(study["variants"])} variants × {len(seeds)} training seeds '
        f"({', '.join(map(str, seeds))}); {_e(study['controls']['data_order'])}; training seeds "
        f"{_e(study['controls']['training_seeds'])}. Statistic: "
        f"{_e(study['controls']['statistic'])}. Numbers: <code>study.json</code>.</p>"
    )


def _study_verdicts(page: Page, study: dict) -> None:
    page.add("<h2>Verdicts</h2>")
    effects = {e["variant"]: e for e in study["effects"] if e["metric"] == "final_pcorr"}
    rows = []
    for v in study["variants"]:
        e = effects.get(v["name"])
        rows.append(
            [
                _e(v["name"]),
                f"{v['n_params']:,}",
                f"{_f(v['final_pcorr']['mean'])} {_ci(v['final_pcorr']['ci95'])}",
                "baseline" if e is None else f"{_f(e['difference'])} {_ci(e['ci95'])}",
                f"{_f(v['final_oc_pcorr']['mean'])}",
                f"{_f(v['peak_pcorr']['mean'])}",
                _f(v["final_val_loss"]["mean"], 3, sign=False),
                _verdict_span(v["verdict"]),
                _e(variant_verdict_text(v)),
            ]
        )
    page.table(
        [
            "variant",
            "params",
            "final pcorr [95% CI]",
            f"vs {study['baseline']} [Welch 95% CI]",
            "output-controlled",
            "peak pcorr",
            "val loss",
            "verdict",
            "what happened",
        ],
        rows,
        numeric={1, 4, 5, 6},
    )


def _study_comparison(page: Page, study: dict) -> None:
    page.add("<h2>Comparison</h2>")
    page.figure(
        "study_comparison",
        lambda p: plots.study_comparison(study, p),
        "Left: final pcorr per variant (grey dots: training seeds; diamond: mean with 95% "
        "t-interval; red bar: detection floor). Right: difference from the baseline with a "
        "Welch 95% interval. Data: study.json variants[].final_pcorr and effects[].",
    )
    page.figure(
        "study_curves",
        lambda p: plots.study_curves(study, p),
        "Best-layer pcorr over training (mean of seeds, 95% t-band) and validation loss. "
        "Data: variants[].aggregate.",
    )


def _variant_section(page: Page, v: dict) -> None:
    """A variant's verdict, its per-layer figures (mean of seeds) and its runs."""
    agg = v["aggregate"]
    layers = list(range(v["model_config"]["n_layers"]))
    page.add(
        f"<h2>{_e(v['name'])}</h2><p>{_verdict_span(v['verdict'])}: "
        f"{_e(variant_verdict_text(v))} {_e(v.get('description', ''))}</p>"
    )
    slug = "".join(c if c.isalnum() else "_" for c in v["name"])
    page.figure(
        f"heatmap_{slug}",
        lambda p: plots.pcorr_heatmap(
            agg["steps"],
            layers,
            agg["layer_pcorr_mean"],
            p,
            f"{v['name']}: pcorr by layer and step (mean of seeds)",
        ),
        f"{v['name']}: validation pcorr per layer × checkpoint, mean over seeds. "
        "Data: aggregate.layer_pcorr_mean.",
    )
    if any(agg.get("cka_to_final_mean") or []):
        page.figure(
            f"cka_{slug}",
            lambda p: plots.cka_over_training(
                agg["steps"],
                layers,
                agg["cka_to_final_mean"],
                p,
                f"{v['name']}: CKA to the final checkpoint",
            ),
            f"{v['name']}: linear CKA of each layer to the same layer at the last "
            "checkpoint (mean of seeds): where the representation settles. Data: "
            "aggregate.cka_to_final_mean.",
        )
    if agg.get("attributes_mean"):
        page.figure(
            f"attributes_{slug}",
            lambda p: plots.attribute_curves(
                agg["steps"],
                layers,
                agg["attributes_mean"],
                p,
                f"{v['name']}: attribute probes",
            ),
            f"{v['name']}: attribute-probe selectivity per layer over training (mean of "
            "seeds). Data: aggregate.attributes_mean.",
        )
    _variant_runs(page, v)


def _variant_runs(page: Page, v: dict) -> None:
    """One row per training seed of a variant."""
    page.table(
        [
            "seed",
            "run",
            "final pcorr [CI, one run]",
            "layer",
            "peak",
            "val loss",
            "verdict",
            "reason",
        ],
        [
            [
                str(r["seed"]),
                f"<code>{_e(r['run_dir'])}</code>",
                f"{_f(r['final']['pcorr'])} {_ci(r['final']['ci95'])}",
                str(r["final"]["layer"]),
                _f(r["peak_pcorr"]),
                _f(r["final"]["val_loss"], 3, sign=False),
                _verdict_span(r["collapse"]["verdict"]),
                _e(r["collapse"].get("reason") or ""),
            ]
            for r in v["runs"]
        ],
        numeric={3, 4, 5},
    )


# ------------------------------------------------------------------------- trajectory


def render_trajectory(page: Page, traj: dict) -> None:
    """The "over training" section of a run's page: verdict, figures, checkpoints, cost."""
    rows = [r for r in traj["checkpoints"] if r["status"] in ("observed", "shrunk")]
    _trajectory_verdict(page, traj)
    if rows:
        _trajectory_figures(page, traj, rows)
    _checkpoint_table(page, traj)
    _budget_note(page, traj.get("budget"))


def _trajectory_verdict(page: Page, traj: dict) -> None:
    collapse = traj.get("collapse") or {}
    floor = traj.get("floor") or {}
    run = traj.get("run") or {}
    mode = traj["mode"].replace("_", " ")
    page.add(
        f"<h2>Over training</h2><p>Verdict: {_verdict_span(collapse.get('verdict'))} — "
        f"{_e(collapse.get('reason', 'fewer than two measured checkpoints'))}.</p>"
        f'<p class="meta">{len(traj["checkpoints"])} checkpoints ({mode}); '
        f"detection floor {_f(floor.get('value'), 3, sign=False)} from the "
        f"{_e(floor.get('source', 'n/a'))}; corpus {_e(traj['corpus']['name'])}; "
        f"{_e(traj.get('split_policy', ''))}. Parameters: {run.get('n_params') or '—'}. "
        "Numbers: <code>trajectory.json</code>.</p>"
    )


def _trajectory_figures(page: Page, traj: dict, rows: list[dict]) -> None:
    """Figures over the measured checkpoints ``rows``."""
    page.figure(
        "trajectory_heatmap",
        lambda p: plots.trajectory_heatmap(traj, p),
        "Validation pcorr per layer × checkpoint (sweep probe, seed 42); outlined: the "
        "layer reported at that checkpoint. Data: checkpoints[].layers[].pcorr.",
    )
    page.figure(
        "trajectory_signal",
        lambda p: plots.trajectory_signal(traj, p),
        "Top: best-layer pcorr on the test split (ensemble of the probe seeds) with its "
        "95% CI, the output-controlled residual, random heads and the detection floor. "
        "Bottom: training and validation loss. Data: checkpoints[].best, "
        ".output_controlled, .random_head, floor, loss_curve.",
    )
    layers = [x["layer"] for x in rows[0]["layers"]]
    if any("cka_to_final" in r for r in rows):
        steps = [r["step"] for r in rows]
        page.figure(
            "trajectory_cka",
            lambda p: plots.cka_over_training(
                steps,
                layers,
                [r.get("cka_to_final") for r in rows],
                p,
                "CKA to the final checkpoint",
            ),
            "Linear CKA of each layer to the same layer at the last checkpoint. Data: "
            "checkpoints[].cka_to_final.",
        )
    if traj.get("cka"):
        page.figure(
            "cka_layers",
            lambda p: plots.cka_layers(
                traj["cka"], p, f"Layer × layer CKA at step {traj['cka']['reference_step']}"
            ),
            "Linear CKA between layers at the last checkpoint. Data: cka.matrix.",
        )
    if any(r.get("attributes") for r in rows):
        _attributes_figure(page, rows, layers)


def _attributes_figure(page: Page, rows: list[dict], layers: list[int]) -> None:
    """Attribute-probe selectivity per layer over the checkpoints ``rows``."""
    names = next(r["attributes"] for r in rows if r.get("attributes"))
    attributes = {
        a: {
            "selectivity": [(r.get("attributes") or {}).get(a, {}).get("selectivity") for r in rows]
        }
        for a in names
    }
    page.figure(
        "trajectory_attributes",
        lambda p: plots.attribute_curves(
            [r["step"] for r in rows], layers, attributes, p, "Attribute probes"
        ),
        "Selectivity (probe accuracy minus control-task accuracy) per layer over "
        "training. Data: checkpoints[].attributes.",
    )


def _checkpoint_table(page: Page, traj: dict) -> None:
    """One row per checkpoint, measured or not."""
    table = []
    for r in traj["checkpoints"]:
        measured = r["status"] in ("observed", "shrunk")
        best = r.get("best") or {}
        table.append(
            [
                str(r["step"]),
                _e(r["status"]) + (f" ({r['fraction']:.0%})" if r["status"] == "shrunk" else ""),
                _f(r.get("val_loss"), 3, sign=False),
                str(best.get("layer", "—")),
                f"{_f(best.get('ensemble'))} {_ci(best.get('ensemble_ci95'))}" if measured else "—",
                _f((r.get("output_controlled") or {}).get("ensemble")) if measured else "—",
                _e(r.get("note") or ""),
            ]
        )
    page.table(
        ["step", "status", "val loss", "best layer", "pcorr [95% CI]", "output-controlled", "note"],
        table,
        numeric={0, 2, 3},
    )


def _budget_note(page: Page, budget: dict | None) -> None:
    """What live observation cost against training, when the run was observed live."""
    if budget:
        page.add(
            f'<p class="meta">Live observation cost {budget["observe_seconds"]:.1f} s against '
            f"{budget['train_seconds']:.1f} s of training (overhead "
            f"{_f(budget['overhead'] and 100 * budget['overhead'], 1, sign=False)}%, budget "
            f"{budget['fraction']:.0%}); skipped steps {budget['skipped'] or 'none'}, shrunk "
            f"{budget['shrunk'] or 'none'}.</p>"
        )


def render_observe(page: Page, result: dict) -> None:
    """The section for one observe result: its layer profile and summary tables."""
    from nnobs.report.summary import observe_summary

    page.add("<h2>Observability protocol (one checkpoint)</h2>")
    page.figure(
        "layer_profile",
        lambda p: plots.layer_profile(result, p),
        "pcorr per layer (sweep), the multi-seed candidates, the test headline with its CI and "
        "the detection floor. Data: observe.json.",
    )
    page.add(f"<pre>{_e(observe_summary(result))}</pre>")


# ----------------------------------------------------------------------------- entry


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def render_report(directory: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render ``DIR/report/index.html`` (or ``out_dir/index.html``) for a study, run or
    observe directory; returns the page's path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NnobsError(f"{str(directory)!r} is not a directory: give a study, run or observe dir")
    out = Path(out_dir) if out_dir is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    study = _first(directory / "study.json")
    if study is not None:
        return render_study(load_result(study), out)
    run = RunDir(directory)  # a run directory's results, or results side by side
    traj = _first(run.trajectory_file, directory / "trajectory.json")
    obs = _first(run.observe_dir / "observe.json", directory / "observe.json")
    if traj is None and obs is None:
        raise NnobsError(
            f"{str(directory)!r} holds no study.json, trajectory.json or observe.json: run "
            "nnobs study, nnobs observe --all-checkpoints or nnobs observe first"
        )
    page = Page(out, f"nnobs report: {directory.resolve().name}")
    if traj is not None:
        render_trajectory(page, load_result(traj))
    if obs is not None:
        render_observe(page, load_result(obs))
    return page.write()
