"""``nnobs report``: one self-contained HTML page from the result documents in a directory.

Works on a study directory (``study.json``), a run directory (``trajectory/trajectory.json``
and, if present, ``observe/observe.json``), an observe directory (``observe.json``) or a
routing directory (``routing.json``, :mod:`nnobs.report.routing_page`), a circuits
directory (``circuits.json``, :mod:`nnobs.report.circuits_page`) or a bridge directory
(``bridge.json``, or an edit's ``edit.json``: :mod:`nnobs.report.bridge_page`). The
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

from pathlib import Path

from nnobs.core.errors import NnobsError
from nnobs.core.files import check_output_dir
from nnobs.core.results import load_result
from nnobs.core.rundir import RunDir
from nnobs.report import plots
from nnobs.report.bridge_page import render_bridge, render_bridge_edit
from nnobs.report.circuits_compare_page import render_circuits_compare
from nnobs.report.circuits_page import render_circuits
from nnobs.report.frontier_page import render_frontier
from nnobs.report.observe_page import render_observe_page
from nnobs.report.page import Page, escape, interval, number, verdict_span
from nnobs.report.routing_page import render_routing
from nnobs.report.seeding_page import render_seeding
from nnobs.report.study_page import render_study

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
        f"<h2>Over training</h2><p>Verdict: {verdict_span(collapse.get('verdict'))} — "
        f"{escape(collapse.get('reason', 'fewer than two measured checkpoints'))}.</p>"
        f'<p class="meta">{len(traj["checkpoints"])} checkpoints ({mode}); '
        f"detection floor {number(floor.get('value'), 3, sign=False)} from the "
        f"{escape(floor.get('source', 'n/a'))}; corpus {escape(traj['corpus']['name'])}; "
        f"{escape(traj.get('split_policy', ''))}. Parameters: {run.get('n_params') or '—'}. "
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
                escape(r["status"])
                + (f" ({r['fraction']:.0%})" if r["status"] == "shrunk" else ""),
                number(r.get("val_loss"), 3, sign=False),
                str(best.get("layer", "—")),
                f"{number(best.get('ensemble'))} {interval(best.get('ensemble_ci95'))}"
                if measured
                else "—",
                number((r.get("output_controlled") or {}).get("ensemble")) if measured else "—",
                escape(r.get("note") or ""),
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
            f"{number(budget['overhead'] and 100 * budget['overhead'], 1, sign=False)}%, budget "
            f"{budget['fraction']:.0%}); skipped steps {budget['skipped'] or 'none'}, shrunk "
            f"{budget['shrunk'] or 'none'}.</p>"
        )


def render_observe(page: Page, result: dict) -> None:
    """The section for one observe result: its verdict, then the evidence
    (:mod:`nnobs.report.observe_page`)."""
    render_observe_page(page, result)


# ----------------------------------------------------------------------------- entry


# A directory holding one of these documents gets that kind's page (first match wins).
RESULT_PAGES = [
    ("study.json", "nnobs.study", render_study),
    ("routing.json", "nnobs.routing", render_routing),
    ("seeding.json", "nnobs.seeding", render_seeding),
    ("compare.json", "nnobs.circuits_compare", render_circuits_compare),
    ("frontier.json", "nnobs.frontier", render_frontier),
    ("circuits.json", "nnobs.circuits", render_circuits),
    ("bridge.json", "nnobs.bridge", render_bridge),
    ("edit.json", "nnobs.bridge_edit", render_bridge_edit),
]


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def render_report(directory: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render ``DIR/report/index.html`` (or ``out_dir/index.html``) for a study, run or
    observe directory; returns the page's path. Every document is read and validated before
    anything is written."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NnobsError(f"{str(directory)!r} is not a directory: give a study, run or observe dir")
    if out_dir is None:
        out = check_output_dir(directory / "report", "the report directory")
    else:
        out = check_output_dir(out_dir)
    for filename, kind, render in RESULT_PAGES:
        if (directory / filename).is_file():
            return render(load_result(directory / filename, kind), out)
    run = RunDir(directory)  # a run directory's results, or results side by side
    traj = _first(run.trajectory_file, directory / "trajectory.json")
    obs = _first(run.observe_dir / "observe.json", directory / "observe.json")
    if traj is None and obs is None:
        raise NnobsError(
            f"{str(directory)!r} holds no study.json, trajectory.json or observe.json: run "
            "nnobs study, nnobs observe --all-checkpoints or nnobs observe first"
        )
    traj_doc = load_result(traj, "nnobs.trajectory") if traj is not None else None
    obs_doc = load_result(obs, "nnobs.observe") if obs is not None else None
    page = Page(out, f"nnobs report: {directory.resolve().name}")
    if traj_doc is not None:
        render_trajectory(page, traj_doc)
    if obs_doc is not None:
        render_observe(page, obs_doc)
    return page.write()
