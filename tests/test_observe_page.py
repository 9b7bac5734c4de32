"""The observe page: the verdict first, then its evidence, every number read from the result;
a result written before the calibrated null (schema 1) still renders."""

import copy
import json
import re
import sysconfig
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_report import CHROMIUM, parse_text, render_in_chromium

from nnobs.core.results import validate
from nnobs.observe.protocol import verdict_statement
from nnobs.report.html import render_report
from nnobs.report.observe_page import OLDER_RESULT, verdict_paragraph
from nnobs.report.page import interval, number

FIGURES = {
    "fig-null_distribution", "fig-layer_profile", "fig-control_sensitivity",
    "fig-flagging_precision", "fig-label_rates",
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


@pytest.fixture(scope="module")
def observed(python_run, python_corpus, tmp_path_factory) -> dict:
    """A real schema-2 result of the tiny run, with two random-init null models and a second
    domain (other stdlib modules than the corpus's)."""
    from nnobs.observe.protocol import ObserveSettings, observe_model

    root = Path(sysconfig.get_paths()["stdlib"])
    other = tmp_path_factory.mktemp("second-domain")
    for i, path in enumerate(sorted(root.glob("*.py"))[-120:]):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[:40]
        (other / f"b{i:03d}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = ObserveSettings(
        ex_per_dim=10, seeds=[43, 44], n_boot=50, random_heads=20, null_models=2
    )
    return observe_model(
        python_run, str(python_corpus), domain2=str(other), settings=settings, progress=False
    )


def rendered(doc: dict, directory: Path) -> str:
    """The report page of ``doc`` written as ``directory/observe.json``."""
    directory.mkdir()
    (directory / "observe.json").write_text(json.dumps(doc))
    return render_report(directory).read_text(encoding="utf-8")


class Tables(HTMLParser):
    """Every table's rows as lists of cell texts, in page order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def find(self, first_header: str) -> list[list[str]]:
        """The table whose first header cell is ``first_header``."""
        return next(t for t in self.tables if t[0][0] == first_header)


def answer(text: str) -> str:
    """The page's first ``answer`` paragraph, without its markup."""
    found = re.search(r'<p class="answer">(.*?)</p>', text)
    assert found, "the page has no answer paragraph"
    return re.sub(r"<[^>]+>", "", found.group(1))


def as_version_1(doc: dict, floor: float) -> dict:
    """``doc`` in the shape nnobs wrote before the calibrated null: a pooled floor instead of
    the null and the verdict, no label record, a headline with one interval."""
    old = copy.deepcopy(doc)
    for key in ("label", "null", "verdict"):
        del old[key]
    for key in ("ensemble_sd", "ensemble_ci95_test_docs", "label", "by_label", "interval",
                "undefined_resamples"):  # fmt: skip
        old["headline"].pop(key, None)
    old["schema_version"] = 1
    old["floor"] = {
        "value": floor, "quantile": 0.95, "n_null": 32, "random_init": None,
        "source": "probes (all seeds) and 20 random heads per layer on a random-init model",
    }  # fmt: skip
    validate(old)  # against the version-1 schema
    return old


def test_the_verdict_comes_first_and_the_evidence_matches_the_json(observed, tmp_path):
    text = rendered(observed, tmp_path / "v2")
    # The verdict sentence is the first thing under the page's title, before any figure.
    body = text.split("</h1>", 1)[1]
    assert body.startswith('<h2>Observability protocol (one checkpoint)</h2><p class="answer">')
    statement = observed["verdict"]["statement"]
    assert answer(text) == statement[0].upper() + statement[1:] + "."
    signal = observed["verdict"]["signal"]
    word, kind = ("is above", "signal") if signal else ("is NOT above", "no_signal")
    assert f'<span class="verdict-{kind}">{word}</span>' in body.split("</p>", 1)[0]
    assert text.index('class="answer"') < text.index("<figure")
    ids = re.findall(r'<figure id="([^"]+)"', text)
    assert set(ids) == FIGURES and ids[0] == "fig-null_distribution"
    assert {p.name for p in (tmp_path / "v2" / "report").glob("*.png")} == {
        i.removeprefix("fig-") + ".png" for i in FIGURES
    }
    assert "<pre>" not in text  # tables, not a pasted text summary
    _tables_match(observed, Tables(text))


def _tables_match(doc: dict, tables: Tables) -> None:
    head, oc, null = doc["headline"], doc["output_controlled"], doc["null"]
    rows = tables.find(f"layer {doc['layer']}")[1:]
    assert rows[0][1:3] == [number(head["ensemble"]), interval(head["ensemble_ci95"])]
    assert rows[1][1:3] == [number(head["ensemble"]), interval(head["ensemble_ci95_test_docs"])]
    assert rows[2][1] == f"{number(head['mean'])} ± {number(head['std'], sign=False)}"
    assert {r[0]: r[1] for r in rows[3:5]} == {
        f"under the {k} label": number(v) for k, v in head["by_label"].items()
    }
    assert rows[5][:3] == [
        "output-controlled",
        number(oc["ensemble"]),
        interval(oc["ensemble_ci95"]),
    ]
    models = tables.find("init seed")[1:]
    assert [r[:3] for r in models] == [
        [str(m["init_seed"]), number(m["ensemble"]), number(m["ensemble_sd"], sign=False)]
        for m in null["models"]
    ]
    test_row = tables.find("null mean")[1]
    assert test_row[0] == number(null["null_mean"]) and test_row[3] == number(null["floor"])
    assert test_row[5] == f"{null['p_value']:.3g}" and test_row[7] == str(null["n_null"])
    flags = tables.find("rate")[1:]
    assert [r[2:4] for r in flags] == [
        [f"{f['probe_precision']:.3f}", f"{f['confidence_precision']:.3f}"] for f in doc["flagging"]
    ]
    labels = {r[0]: r[1:] for r in tables.find("label")[1:]}
    assert labels == {
        name: [number(v, 2, sign=False) for v in doc["label"][name]]
        for name in ("rank", "reference")
    }
    base = {r[0]: r[1:] for r in tables.find("statistic")[1:]}
    assert base["norm"] == ["—", "a function of the norm covariate: controlled away"]
    assert base["active_ratio"] == [
        number(doc["baselines"]["active_ratio"]["pcorr"]),
        doc["baselines"]["active_ratio"]["definition"],
    ]
    cross = doc["cross_domain"]
    assert tables.find("A → A")[1][:3] == [
        number(cross["a_to_a"]), number(cross["a_to_b"]), number(cross["b_to_b"])
    ]  # fmt: skip
    times = {r[0]: r[1] for r in tables.find("stage")[1:]}
    assert times == {
        **{k: f"{v:.1f}" for k, v in doc["timings_s"].items()},
        "all": f"{sum(doc['timings_s'].values()):.1f}",
    }


def test_a_result_without_a_null_says_it_has_no_verdict(observed, tmp_path):
    doc = copy.deepcopy(observed)
    doc["null"] = None  # observed with null_models = 0
    doc["verdict"] = verdict_statement(doc["headline"], None)
    doc["flagging"] = []  # and no flag rates
    validate(doc)
    text = rendered(doc, tmp_path / "no-null")
    assert answer(text).endswith("no null measured, so no verdict.")
    assert '<span class="verdict-no_null">no verdict</span>' in text
    assert set(re.findall(r'<figure id="([^"]+)"', text)) == FIGURES - {
        "fig-null_distribution", "fig-flagging_precision"
    }  # fmt: skip
    assert "init seed" not in text and "Flagging" not in text


def test_a_version_1_result_renders_with_its_floor_sentence_marked_as_older(observed, tmp_path):
    head = observed["headline"]
    low = head["ensemble_ci95"][0]
    below = as_version_1(observed, floor=round(low - 0.01, 3))
    sentence = answer(verdict_paragraph(below))
    assert sentence.startswith(
        f"The signal is above the detection floor (layer {observed['layer']}: pcorr "
        f"{number(head['ensemble'])} {interval(head['ensemble_ci95'])}; floor "
        f"{low - 0.01:.3f} from 32 null values"
    )
    assert OLDER_RESULT in sentence
    above = as_version_1(observed, floor=round(low + 0.01, 3))
    assert answer(verdict_paragraph(above)).startswith("The signal is NOT above the detection")
    text = rendered(above, tmp_path / "v1")
    assert answer(text).startswith("The signal is NOT above the detection floor")
    assert OLDER_RESULT in answer(text)
    assert set(re.findall(r'<figure id="([^"]+)"', text)) == FIGURES - {
        "fig-null_distribution", "fig-label_rates"
    }  # fmt: skip
    tables = Tables(text)
    rows = tables.find(f"layer {observed['layer']}")[1:]
    assert rows[0][1:3] == [number(head["ensemble"]), interval(head["ensemble_ci95"])]
    assert [r[0] for r in rows] == [
        "seed ensemble (test)", f"per-seed mean ± sd ({len(head['per_seed'])} seeds)",
        "output-controlled",
    ]  # fmt: skip


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)
def test_the_observe_page_renders_in_headless_chromium(observed, tmp_path):
    text = rendered(observed, tmp_path / "v2")
    dom = render_in_chromium(tmp_path / "v2" / "report" / "index.html", tmp_path)
    _, parsed = parse_text(dom)
    assert set(parsed.ids) >= FIGURES and len(parsed.srcs) == len(FIGURES)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.srcs)
    assert answer(dom) == answer(verdict_paragraph(observed))
    assert len(Tables(dom).tables) == len(Tables(text).tables) == 9
