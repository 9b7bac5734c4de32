"""Human-readable summaries of result documents: tables for a terminal, not JSON dumps."""

from __future__ import annotations


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def observe_summary(result: dict) -> str:
    """The protocol's result as a few short tables."""
    sections = [
        _header(result),
        _headline(result),
        _controls(result),
        _baselines(result),
        _flagging(result),
        _cross_domain(result),
        _timings(result),
    ]
    return "\n".join(line for section in sections for line in section)


def _header(result: dict) -> list[str]:
    """Model, corpus and token counts, then the layer sweep."""
    prov, tokens = result["provenance"], result["tokens"]
    model = prov.get("path") or prov.get("name_or_path") or prov.get("architecture", "model")
    dims = f"{result['model']['n_layers']} layers, d_model {result['model']['d_model']}"
    return [
        f"model   {model}  ({dims})",
        f"corpus  {result['corpus']['name']}  tokens train/val/test "
        f"{tokens['train']['tokens']}/{tokens['validation']['tokens']}/{tokens['test']['tokens']}"
        f"  ({result['settings']['ex_per_dim']} ex/dim)",
        "",
        "layer sweep (validation, seed 42)",
        _sweep_table(result),
    ]


def _sweep_table(result: dict) -> str:
    multi = {r["layer"]: r for r in result["multiseed"]}
    rows = []
    for r in result["sweep"]:
        m = multi.get(r["layer"])
        rows.append(
            [
                str(r["layer"]),
                _f(r["pcorr"]),
                _f(r["spearman"]),
                f"{m['mean']:+.3f} ± {m['std']:.3f}" if m else "",
                f"{m['seed_agreement']:.3f}" if m else "",
                "◀ reported" if r["layer"] == result["layer"] else "",
            ]
        )
    return table(rows, ["layer", "pcorr", "spearman", "7-seed pcorr", "agreement", ""])


def _headline(result: dict) -> list[str]:
    """The verdict, the test pcorr at the reported layer and what it rests on."""
    head, oc = result["headline"], result["output_controlled"]
    lo, hi = head["ensemble_ci95"]
    olo, ohi = oc["ensemble_ci95"]
    lines = [
        "",
        f"test pcorr at layer {result['layer']}: ensemble {head['ensemble']:+.3f} "
        f"[95% CI {lo:+.3f}, {hi:+.3f}]; {len(head['seeds'])} seeds {head['mean']:+.3f} "
        f"± {head['std']:.3f}",
    ]
    if "verdict" in result:
        labels = head["by_label"]
        lines += [
            f"interval over: {head.get('interval', 'test documents')}",
            f"label {head['label']}; under the rank label {labels['rank']:+.3f}, under the "
            f"reference label {labels['reference']:+.3f}",
            f"verdict: {result['verdict']['statement']}",
        ]
    else:  # a result from before the calibrated null (schema 1)
        floor = result["floor"]["value"]
        verdict = "above" if lo > floor else "NOT above"
        lines.append(f"detection floor: {floor:.3f}  → the signal is {verdict} the floor")
    lines.append(
        f"output-controlled: {oc['ensemble']:+.3f} [{olo:+.3f}, {ohi:+.3f}] "
        f"(last-layer loss predictor R² {oc['predictor_r2_test']:.3f})"
    )
    return lines


def _controls(result: dict) -> list[str]:
    controls = result["controls"]
    lines = [
        "",
        "control sensitivity (test)",
        table(
            [[name, _f(v)] for name, v in controls["pcorr"].items()],
            ["covariates", "pcorr"],
        ),
    ]
    if controls["overstatement"] is not None:
        lines.append(
            f"a naive probe (no controls) overstates the signal by {controls['overstatement']:.0%}"
        )
    return lines


def _baselines(result: dict) -> list[str]:
    base = result["baselines"]
    rows = [
        [k, _f(v["pcorr"]) if v["pcorr"] is not None else v.get("note", "—")]
        for k, v in base.items()
        if k != "random_head"
    ]
    rh = base["random_head"]
    rows.append([f"random head (n={rh['n']})", f"{rh['mean']:+.3f} ± {rh['std']:.3f}"])
    return ["", "baselines (test, standard controls)", table(rows, ["statistic", "pcorr"])]


def _flagging(result: dict) -> list[str]:
    rows = [
        [
            f"{f['rate']:.0%}",
            f"{f['probe_precision']:.2f}",
            f"{f['confidence_precision']:.2f}",
            str(f["probe_exclusive"]),
            str(f["confidence_exclusive"]),
        ]
        for f in result["flagging"]
    ]
    return [
        "",
        "flagging high-loss tokens (test)",
        table(rows, ["rate", "probe prec", "conf prec", "probe-only", "conf-only"]),
    ]


def _cross_domain(result: dict) -> list[str]:
    cross = result.get("cross_domain")
    if not cross:
        return []
    return [
        "",
        f"cross-domain ({cross['domain_b']}, test): A→A {_f(cross['a_to_a'])}  "
        f"A→B {_f(cross['a_to_b'])}  B→B {_f(cross['b_to_b'])}",
    ]


def _timings(result: dict) -> list[str]:
    timings = result["timings_s"]
    total = sum(timings.values())
    return ["", f"{total:.1f}s in all; " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())]
