"""Human-readable summaries of result documents: tables for a terminal, not JSON dumps."""

from __future__ import annotations


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def observe_summary(doc: dict) -> str:
    """The protocol's result as a few short tables."""
    prov, head, floor = doc["provenance"], doc["headline"], doc["floor"]
    oc, controls = doc["output_controlled"], doc["controls"]
    model = prov.get("path") or prov.get("name_or_path") or prov.get("architecture", "model")
    tokens = doc["tokens"]
    lines = [
        f"model   {model}  ({doc['model']['n_layers']} layers, d_model {doc['model']['d_model']})",
        f"corpus  {doc['corpus']['name']}  tokens train/val/test "
        f"{tokens['train']['tokens']}/{tokens['validation']['tokens']}/{tokens['test']['tokens']}"
        f"  ({doc['settings']['ex_per_dim']} ex/dim)",
        "",
        "layer sweep (validation, seed 42)",
    ]
    multi = {r["layer"]: r for r in doc["multiseed"]}
    rows = []
    for r in doc["sweep"]:
        m = multi.get(r["layer"])
        rows.append(
            [
                str(r["layer"]),
                _f(r["pcorr"]),
                _f(r["spearman"]),
                f"{m['mean']:+.3f} ± {m['std']:.3f}" if m else "",
                f"{m['seed_agreement']:.3f}" if m else "",
                "◀ reported" if r["layer"] == doc["layer"] else "",
            ]
        )
    lines.append(table(rows, ["layer", "pcorr", "spearman", "7-seed pcorr", "agreement", ""]))
    lo, hi = head["ensemble_ci95"]
    olo, ohi = oc["ensemble_ci95"]
    verdict = "above" if lo > floor["value"] else "NOT above"
    lines += [
        "",
        f"test pcorr at layer {doc['layer']}: {head['mean']:+.3f} ± {head['std']:.3f} over "
        f"{len(head['seeds'])} seeds; ensemble {head['ensemble']:+.3f} "
        f"[95% CI {lo:+.3f}, {hi:+.3f}]",
        f"detection floor: {floor['value']:.3f}  → the signal is {verdict} the floor",
        f"output-controlled: {oc['ensemble']:+.3f} [{olo:+.3f}, {ohi:+.3f}] "
        f"(last-layer loss predictor R² {oc['predictor_r2_test']:.3f})",
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
    base = doc["baselines"]
    rows = [[k, _f(v["pcorr"])] for k, v in base.items() if k != "random_head"]
    rh = base["random_head"]
    rows.append([f"random head (n={rh['n']})", f"{rh['mean']:+.3f} ± {rh['std']:.3f}"])
    lines += ["", "baselines (test, standard controls)", table(rows, ["statistic", "pcorr"])]
    rows = [
        [
            f"{f['rate']:.0%}",
            f"{f['probe_precision']:.2f}",
            f"{f['confidence_precision']:.2f}",
            str(f["probe_exclusive"]),
            str(f["confidence_exclusive"]),
        ]
        for f in doc["flagging"]
    ]
    lines += [
        "",
        "flagging high-loss tokens (test)",
        table(rows, ["rate", "probe prec", "conf prec", "probe-only", "conf-only"]),
    ]
    cross = doc.get("cross_domain")
    if cross:
        lines += [
            "",
            f"cross-domain ({cross['domain_b']}, test): A→A {_f(cross['a_to_a'])}  "
            f"A→B {_f(cross['a_to_b'])}  B→B {_f(cross['b_to_b'])}",
        ]
    total = sum(doc["timings_s"].values())
    lines += [
        "",
        f"{total:.1f}s in all; " + ", ".join(f"{k} {v:.1f}s" for k, v in doc["timings_s"].items()),
    ]
    return "\n".join(lines)
