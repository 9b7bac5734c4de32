"""The observe page: the protocol's verdict in one sentence, then the evidence it rests on.

The verdict (``verdict.statement`` of an ``nnobs.observe`` result) is a one-sided test of the
headline against random-init models of the same architecture (:mod:`nnobs.observe.null`).
The figures and tables below it show that null with the headline and its interval, the layer
profile, how the number moves with the covariates controlled for, what the probe flags
against what low confidence flags, and how the probe's label relates to confidence. Results
written before the calibrated null (schema 1) still render, with their floor-based sentence
marked as such. Every number is read from the document; nothing is recomputed here.
"""

from __future__ import annotations

from nnobs.report import observe_plots, plots
from nnobs.report.page import Page, escape, interval, number

OLDER_RESULT = "from an older result without a calibrated null"


def render_observe_page(page: Page, result: dict) -> None:
    """The section for one observe result, verdict first."""
    page.add("<h2>Observability protocol (one checkpoint)</h2>")
    page.add(verdict_paragraph(result))
    _about(page, result)
    null = result.get("null")
    if null is not None:
        page.figure(
            "null_distribution",
            lambda p: observe_plots.null_distribution(result, p),
            "Where the headline would fall if the model carried no more than random-init models "
            "of its architecture: the null's predictive normal density (null.null_mean, "
            "null.predictive_sd), each random-init model's value (ticks, null.models), the floor "
            "the headline must exceed at the stated level (null.floor), and the headline with "
            "its 95% interval over test documents and probe training (headline.ensemble_ci95).",
        )
    page.figure(
        "layer_profile",
        lambda p: plots.layer_profile(result, p),
        "pcorr per layer (sweep), the multi-seed candidates, the test headline with its CI and "
        "the null's floor. Data: sweep, multiseed, headline, null.",
    )
    page.add("<h3>Headline</h3>")
    _headline_table(page, result)
    _null_section(page, null)
    _layer_table(page, result)
    _controls_section(page, result)
    if result["flagging"]:
        _flagging_section(page, result)
    if "label" in result:
        _label_section(page, result)
    _baselines_table(page, result["baselines"])
    _cross_domain_table(page, result.get("cross_domain"))
    _timings_table(page, result["timings_s"])


def verdict_paragraph(result: dict) -> str:
    """The verdict as one sentence (class ``answer``), its verdict words coloured."""
    verdict = result.get("verdict")
    if verdict is None:
        return _older_verdict(result)
    signal = verdict["signal"]
    words, kind = {
        True: ("is above", "signal"),
        False: ("is NOT above", "no_signal"),
        None: ("no verdict", "no_null"),
    }[signal]
    statement = verdict["statement"]
    statement = statement[:1].upper() + statement[1:]
    before, found, after = statement.partition(words)
    if not found:  # a wording this page does not know: colour nothing, drop nothing
        return f'<p class="answer">{escape(statement)}.</p>'
    span = f'<span class="verdict-{kind}">{escape(words)}</span>'
    return f'<p class="answer">{escape(before)}{span}{escape(after)}.</p>'


def _older_verdict(result: dict) -> str:
    """A schema-1 result's sentence: the interval's lower bound against the pooled floor."""
    head, floor = result["headline"], result["floor"]
    lo, _ = head["ensemble_ci95"]
    above = lo > floor["value"]
    words = "is above" if above else "is NOT above"
    kind = "signal" if above else "no_signal"
    return (
        f'<p class="answer">The signal <span class="verdict-{kind}">{words}</span> the '
        f"detection floor (layer {result['layer']}: pcorr {number(head['ensemble'])} "
        f"{interval(head['ensemble_ci95'])}; floor {number(floor['value'], sign=False)} from "
        f"{floor['n_null']} null values: {escape(floor.get('source', 'a random-init model'))})."
        f" <em>{OLDER_RESULT}: the interval's lower bound against a pooled floor, not a test "
        "at a stated level.</em></p>"
    )


def _about(page: Page, result: dict) -> None:
    """What was measured: model, corpus, tokens, label and seeds."""
    prov, tokens, settings = result["provenance"], result["tokens"], result["settings"]
    model = prov.get("path") or prov.get("name_or_path") or prov.get("architecture", "model")
    counts = ", ".join(
        f"{split} {t['tokens']} tokens / {t['documents']} documents" for split, t in tokens.items()
    )
    label = result["headline"].get("label")
    page.add(
        f'<p class="meta">Model {escape(model)} ({result["model"]["n_layers"]} layers, d_model '
        f"{result['model']['d_model']}); corpus {escape(result['corpus']['name'])}; {counts}; "
        f"{escape(result.get('split_policy', ''))}. Probe label "
        f"{escape(label or 'reference (older result)')}; probe seeds "
        f"{', '.join(map(str, settings['seeds']))}. Numbers: <code>observe.json</code>.</p>"
    )


def _headline_table(page: Page, result: dict) -> None:
    """The headline, its intervals, seeds, labels and the output-controlled residual."""
    head, oc = result["headline"], result["output_controlled"]
    rows = [
        [
            "seed ensemble (test)",
            number(head["ensemble"]),
            interval(head["ensemble_ci95"]),
            escape(head.get("interval", _interval_sources(head))),
        ]
    ]
    if "ensemble_ci95_test_docs" in head:
        rows.append(
            [
                "the same, test documents only",
                number(head["ensemble"]),
                interval(head["ensemble_ci95_test_docs"]),
                "narrower: leaves out the probe's training",
            ]
        )
    rows.append(
        [
            f"per-seed mean ± sd ({len(head['per_seed'])} seeds)",
            f"{number(head['mean'])} ± {number(head['std'], sign=False)}",
            "—",
            "each seed a resample of the probe's training documents (the reference "
            "method's seeds change the probe's initialisation instead)",
        ]
    )
    for label, value in (head.get("by_label") or {}).items():
        used = "the label used" if label == head.get("label") else "probes trained on it"
        rows.append([f"under the {escape(label)} label", number(value), "—", used])
    rows.append(
        [
            "output-controlled",
            number(oc["ensemble"]),
            interval(oc["ensemble_ci95"]),
            "last-layer loss predictor as a covariate "
            f"(R² {number(oc['predictor_r2_test'], sign=False)} on test)",
        ]
    )
    page.table(["layer " + str(result["layer"]), "pcorr", "95% interval", "note"], rows, {1, 2})


def _interval_sources(head: dict) -> str:
    """What the headline's interval resamples, for results that do not say."""
    if "ensemble_ci95_test_docs" in head:
        return "test documents and the probe's training documents"
    return "test documents"


def _null_section(page: Page, null: dict | None) -> None:
    """Each random-init model's value, then the test built from them."""
    if null is None:
        return
    page.add(
        f"<h3>Null: {escape(null['source'])}</h3>"
        f'<p class="meta">Measured at layer {null["layer"]} ({escape(null["site"])}) on the '
        f"{escape(null['split'])} split, exactly as the headline.</p>"
    )
    page.table(
        ["init seed", "ensemble pcorr", "sd (sampling)", "per seed"],
        [
            [
                str(m["init_seed"]),
                number(m["ensemble"]),
                number(m["ensemble_sd"], sign=False),
                ", ".join(number(v) for v in m.get("per_seed", [])) or "—",
            ]
            for m in null["models"]
        ],
        {0, 1, 2},
    )
    page.table(
        ["null mean", "between-model sd", "predictive sd", "floor", "z", "p-value", "level", "n"],
        [
            [
                number(null["null_mean"]),
                number(null.get("between_model_sd"), sign=False),
                number(null["predictive_sd"], sign=False),
                number(null["floor"]),
                number(null["z"], 2),
                f"{null['p_value']:.3g}",
                f"{null['level']:g}",
                str(null["n_null"]),
            ]
        ],
        set(range(8)),
    )


def _layer_table(page: Page, result: dict) -> None:
    """The sweep at every layer, and the multi-seed candidates."""
    multi = {r["layer"]: r for r in result["multiseed"]}
    rows = []
    for r in result["sweep"]:
        m = multi.get(r["layer"])
        rows.append(
            [
                str(r["layer"]),
                number(r["pcorr"]),
                number(r["spearman"]),
                f"{number(m['mean'])} ± {number(m['std'], sign=False)}" if m else "—",
                number(m["seed_agreement"], sign=False) if m else "—",
                "reported" if r["layer"] == result["layer"] else "",
            ]
        )
    page.add("<h3>Layers (validation split)</h3>")
    page.table(
        ["layer", "pcorr (seed 42)", "uncontrolled", "seeds mean ± sd", "seed agreement", ""],
        rows,
        {0, 1, 2, 3, 4},
    )


def _controls_section(page: Page, result: dict) -> None:
    controls = result["controls"]
    page.add("<h3>Control sensitivity</h3>")
    page.figure(
        "control_sensitivity",
        lambda p: observe_plots.control_sensitivity(result, p),
        "The ensemble score's pcorr with loss under each set of covariates (test split). "
        "Data: controls.pcorr.",
    )
    if controls.get("overstatement") is not None:
        page.add(
            f"<p>Without controls the signal reads {controls['overstatement']:.0%} higher than "
            "under the standard covariates (max softmax and the layer's norm).</p>"
        )


def _flagging_section(page: Page, result: dict) -> None:
    page.add("<h3>Flagging high-loss tokens</h3>")
    page.figure(
        "flagging_precision",
        lambda p: observe_plots.flagging_precision(result, p),
        "Precision of flagging the top tokens by probe score and the lowest by max softmax, "
        "per flag rate (test split). Data: flagging.",
    )
    page.table(
        [
            "rate",
            "flagged",
            "probe precision",
            "confidence precision",
            "high-loss caught by probe only",
            "by confidence only",
            "by both",
        ],
        [
            [
                f"{f['rate']:.0%}",
                str(f["n_flagged"]),
                number(f["probe_precision"], sign=False),
                number(f["confidence_precision"], sign=False),
                str(f["probe_exclusive"]),
                str(f["confidence_exclusive"]),
                str(f["overlap"]),
            ]
            for f in result["flagging"]
        ],
        set(range(7)),
    )


def _label_section(page: Page, result: dict) -> None:
    label = result["label"]
    page.add("<h3>The probe's label against confidence</h3>")
    page.figure(
        "label_rates",
        lambda p: observe_plots.label_rates(result, p),
        "Share of probe-training tokens each label calls worse than predicted, per max-softmax "
        "decile. A label aligned with the controlled statistic stays near 0.5 in every decile; "
        "one that calls most confident tokens worse than predicted is partly a confidence "
        "label, which the controls then remove. Data: label.",
    )
    edges = label["max_softmax_edges"]
    page.table(
        ["label", *(f"≤ {e:.2f}" for e in edges[1:])],
        [
            [escape(name), *(number(v, 2, sign=False) for v in label[name])]
            for name in observe_plots.label_names(label)
        ],
        set(range(1, len(edges))),
    )


def _baselines_table(page: Page, baselines: dict) -> None:
    rows = [
        [
            escape(name),
            number(b.get("pcorr")),
            escape(b.get("definition") or b.get("note") or ""),
        ]
        for name, b in baselines.items()
        if name != "random_head"
    ]
    head = baselines["random_head"]
    rows.append(
        [
            f"random heads (n = {head['n']})",
            f"{number(head['mean'])} ± {number(head['std'], sign=False)}",
            "random unit directions read through the same statistic: mean ± sd",
        ]
    )
    page.add("<h3>Baselines (test split, standard covariates)</h3>")
    page.table(["statistic", "pcorr", "definition or note"], rows, {1})


def _cross_domain_table(page: Page, cross: dict | None) -> None:
    if not cross:
        return
    page.add(f"<h3>Across domains: {escape(cross['domain_b'])}</h3>")
    page.table(
        ["A → A", "A → B", "B → B", "B tokens (train / test)"],
        [
            [
                number(cross["a_to_a"]),
                number(cross["a_to_b"]),
                number(cross["b_to_b"]),
                f"{cross['tokens']['train']} / {cross['tokens']['test']}",
            ]
        ],
        {0, 1, 2, 3},
    )
    page.add(
        '<p class="meta">A is the corpus, B the second domain; X → Y: probes trained on X, '
        "scored on Y's test split.</p>"
    )


def _timings_table(page: Page, timings: dict) -> None:
    total = sum(timings.values())
    rows = [
        [escape(stage), f"{s:.1f}", f"{s / total:.0%}" if total else "—"]
        for stage, s in timings.items()
    ]
    rows.append(["all", f"{total:.1f}", "100%"])
    page.add("<h3>Time per stage</h3>")
    page.table(["stage", "seconds", "share"], rows, {1, 2})
