"""nnobs report: pages for a study, a run and an observe result, built from small fixture
results; and the page as a browser renders it (headless Chromium, when installed)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from nnobs.cli import main
from nnobs.core.errors import NnobsError
from nnobs.core.results import load_result, validate
from nnobs.observe.study_config import parse_study, variant_configs
from nnobs.observe.study_summary import assemble
from nnobs.observe.trajectory import TrajectorySettings, observe_run
from nnobs.report.html import render_report
from nnobs.report.study_page import variant_verdict_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TINY = TrajectorySettings(ex_per_dim=10, doc_tokens=64, seeds=[43, 44], n_boot=50, random_heads=20)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


@pytest.fixture(scope="module")
def trajectory(python_run):
    return observe_run(python_run, settings=TINY, progress=False)


@pytest.fixture(scope="module")
def study_dir(trajectory, python_corpus, tmp_path_factory):
    """A study assembled from copies of one real trajectory; the "post" variant's copies are
    edited so that its signal is erased (the report only reads what the JSON says)."""
    out = tmp_path_factory.mktemp("study")
    tables = {
        "study": {"name": "fixture", "baseline": "pre", "seeds": [0, 1],
                  "question": "Which variant keeps the signal?"},
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "max_seq_len": 64},
        "train": {"corpus": str(python_corpus), "tokenizer": "byte", "seq_len": 64},
        "variants": [{"name": "pre"}, {"name": "post", "model": {"norm_placement": "post"}}],
    }  # fmt: skip
    cfg = parse_study(tables)
    for variant in ("pre", "post"):
        for seed in (0, 1):
            result = json.loads(json.dumps(trajectory))
            shift = 0.01 * seed
            for r in result["checkpoints"]:
                r["best"]["ensemble"] += shift
            if variant == "post":
                result["checkpoints"][-1]["best"]["ensemble"] = 0.0
                result["collapse"].update(
                    verdict="erased", layer=0, peak_step=8, collapse_step=24,
                    reason="peak 0.2 at step 8 fell to the floor by step 24",
                )  # fmt: skip
            else:
                result["collapse"].update(verdict="retained", reason="layer 0 keeps it")
            validate(result)
            path = out / "runs" / variant / f"seed_{seed}" / "trajectory" / "trajectory.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(result))
    outcomes = {
        (v, s): {"status": "trained", "train_seconds": 1.0, "observe_seconds": 1.0}
        for v in ("pre", "post")
        for s in (0, 1)
    }
    study = assemble(cfg, out, variant_configs(cfg), outcomes, 2.0)
    validate(study)
    (out / "study.json").write_text(json.dumps(study))
    return out


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.ids = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        if "id" in attrs:
            self.ids.append(attrs["id"])


def parse(page: Path) -> tuple[str, _Images]:
    text = page.read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(text)
    return text, parser


def test_study_page_answers_the_question_from_the_json(study_dir):
    page = render_report(study_dir)
    assert page == study_dir / "report" / "index.html"
    text, parsed = parse(page)
    # Self-contained: every image is embedded, nothing is fetched.
    assert parsed.srcs and all(s.startswith("data:image/png;base64,") for s in parsed.srcs)
    assert not re.search(r'(src|href)="https?:', text)
    assert set(parsed.ids) == {
        "fig-study_comparison", "fig-study_curves", "fig-heatmap_pre", "fig-cka_pre",
        "fig-heatmap_post", "fig-cka_post",
    }  # fmt: skip
    assert {p.name for p in (study_dir / "report").glob("*.png")} == {
        i.removeprefix("fig-") + ".png" for i in parsed.ids
    }
    study = json.loads((study_dir / "study.json").read_text())
    pre, post = study["variants"]
    assert pre["verdict"] == "retained" and post["verdict"] == "erased"
    assert "Keep the signal at the end of training: pre; do not: post." in text
    assert f"{pre['final_pcorr']['mean']:+.3f}" in text  # numbers come from the JSON
    assert "at the floor from step 24" in text and "Which variant keeps the signal?" in text


def test_run_page_with_trajectory_and_observe(python_run, trajectory, tmp_path):
    from nnobs.observe.protocol import ObserveSettings, observe_model

    observe_model(
        python_run,
        trajectory["corpus"]["name"],
        domain2=None,
        out_dir=python_run / "observe",
        settings=ObserveSettings(ex_per_dim=10, seeds=[43, 44], n_boot=50, random_heads=20),
        progress=False,
    )
    assert main(["report", str(python_run), "--out", str(tmp_path / "page")]) == 0
    text, parsed = parse(tmp_path / "page" / "index.html")
    assert set(parsed.ids) == {
        "fig-trajectory_heatmap", "fig-trajectory_signal", "fig-trajectory_cka",
        "fig-cka_layers", "fig-null_distribution", "fig-layer_profile",
        "fig-control_sensitivity", "fig-flagging_precision", "fig-label_rates",
    }  # fmt: skip
    assert "Over training" in text and "Observability protocol" in text
    for r in trajectory["checkpoints"]:
        assert f'<td class="num">{r["step"]}</td>' in text
    # An observe directory on its own.
    page = render_report(python_run / "observe", tmp_path / "observe-page")
    assert set(parse(page)[1].ids) == {
        "fig-null_distribution", "fig-layer_profile", "fig-control_sensitivity",
        "fig-flagging_precision", "fig-label_rates",
    }  # fmt: skip


def test_nothing_to_report_is_one_clear_error(tmp_path):
    with pytest.raises(NnobsError, match="no study.json, trajectory.json or observe.json"):
        render_report(tmp_path)
    with pytest.raises(NnobsError, match="not a directory"):
        render_report(tmp_path / "missing")


def test_verdict_sentences():
    def variant(verdict, counts, runs=()):
        return {
            "verdict": verdict, "verdict_counts": counts, "runs": list(runs), "floor": 0.05,
            "final_pcorr": {"mean": 0.2, "ci95": [0.1, 0.3]},
            "final_val_loss": {"mean": 4.5, "ci95": None}, "unigram_loss": 6.0,
        }  # fmt: skip

    assert variant_verdict_text(variant("retained", {"retained": 3}, [{}] * 3)).startswith(
        "Keeps the signal in 3/3 seeds: final pcorr +0.200 [+0.100, +0.300] (floor 0.050)"
    )
    erased = {"seed": 1, "collapse": {"verdict": "erased", "layer": 2, "peak_step": 64,
                                      "collapse_step": 512}}  # fmt: skip
    text = variant_verdict_text(variant("erased", {"erased": 1, "retained": 0}, [erased]))
    assert "seed 1: layer 2, peak at step 64, at the floor from step 512" in text
    assert "never rose above" in variant_verdict_text(variant("never_formed", {"never_formed": 2}))
    mixed = variant("mixed", {"retained": 1, "erased": 1}, [{}, {}])
    assert variant_verdict_text(mixed).startswith("Seeds disagree (retained 1, erased 1)")
    assert "token frequencies" not in variant_verdict_text(mixed)
    mixed["final_val_loss"]["mean"] = 5.98  # no better than the unigram baseline
    assert variant_verdict_text(mixed).endswith(
        "Its models did not learn beyond token frequencies (validation loss 5.980, unigram "
        "baseline 6.000)."
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)
def test_the_page_renders_in_headless_chromium(study_dir, tmp_path):
    page = render_report(study_dir)
    dom = render_in_chromium(page, tmp_path)
    _, parsed = parse_text(dom)
    assert "fig-study_comparison" in parsed.ids and len(parsed.srcs) == 6
    assert "Keep the signal at the end of training" in dom


def render_in_chromium(page: Path, tmp_path: Path) -> str:
    """Screenshot ``page`` in headless Chromium, check that it drew text and figures, and
    return the DOM after its scripts ran."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    shot = tmp_path / "page.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert np.std(pixels[..., :3]) > 0.05  # text and plots, not a blank page
    assert (pixels[..., :3] < 0.5).mean() > 0.01  # dark pixels: text and lines drawn
    return subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip


def parse_text(text: str) -> tuple[str, _Images]:
    parser = _Images()
    parser.feed(text)
    return text, parser


def test_results_written_before_the_calibrated_null_still_render(tmp_path):
    """Schema-1 observe and trajectory results of the default run (from before the
    random-init null and the test-based collapse) still validate and render."""
    fixtures = Path(__file__).parent / "fixtures" / "schema1"
    for name in ("observe.json", "trajectory.json"):
        assert load_result(fixtures / name)["schema_version"] == 1
        (tmp_path / name).write_bytes((fixtures / name).read_bytes())
    page = render_report(tmp_path, tmp_path / "report").read_text()
    assert "older result without a calibrated null" in page
    assert "Over training" in page and "verdict-retained" in page  # its old verdict, as written
