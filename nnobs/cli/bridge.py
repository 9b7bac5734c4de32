"""``nnobs bridge``: bridges between a dense and a sparse model, and edits carried across them.

``nnobs bridge --dense RUN --sparse RUN --out DIR`` trains (or resumes) the bridges and writes
``DIR/bridge.json`` (schema ``nnobs/core/schemas/bridge.schema.json``) and
``DIR/report/index.html``. ``nnobs bridge edit --bridge DIR --task NAME`` carries an edit of a
sparse-circuit channel into the dense model and writes ``edit.json`` (schema
``bridge_edit.schema.json``) and ``index.html`` into ``DIR/edit/NAME`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnobs.cli.common import output_dir, require_tokenizer, subcommand
from nnobs.core.errors import NnobsError

EPILOG = """\
examples:
  nnobs bridge --dense runs/dense --sparse runs/sparse --out runs/bridge
  nnobs bridge --dense runs/dense --sparse runs/sparse --out runs/bridge --steps 300 --k 32
  nnobs bridge edit --bridge runs/bridge --task single_double_quote
  nnobs bridge edit --bridge runs/bridge --task for_while --channel blocks.2.attn_in:17

One encoder (linear + AbsTopK k, dense -> sparse stream) and decoder (linear, sparse -> dense)
per sublayer: the residual stream entering each attention (blocks.L.resid_pre) and each MLP
(blocks.L.resid_mid). Both models stay frozen; the loss is the hybrid passes' next-token loss +
NMSE both ways at every site + KL(dense output || sparse model continued from the encoded
stream) + KL(dense output || dense model continued from the decoded stream) at every site,
each with coefficient 1 unless set. Re-running the same command resumes an interrupted
training exactly; a finished directory is left alone. The report: per site, NMSE both ways and
each hybrid pass's loss and KL against each model alone on held-out documents, with intervals
over documents.

`edit` takes a channel of the sparse model's residual read (a sublayer input after its norm;
default: prune the sparse model on the task and take the circuit's read channel with the
largest mean |delta|), carries delta = (value on the counterfactual prompt - value on the
presented prompt) into the dense model through the decoder (rescaled by the ratio of the
models' residual RMS) with strength alpha, and tests the edit at alpha = 1 against random
channels of the same size."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "bridge",
        help="bridges between a dense and a sparse model; edits carried across them",
        description="Train bridges between a dense and a sparse model's residual streams and "
        "report how well they join them; `nnobs bridge edit` carries a sparse-circuit edit "
        "into the dense model.",
        epilog=EPILOG,
    )
    parser.add_argument("--dense", help="the dense model's nnobs run or checkpoint")
    parser.add_argument("--sparse", help="the sparse model's nnobs run or checkpoint")
    parser.add_argument("--out", metavar="DIR", help="the bridge directory")
    parser.add_argument("--k", type=int, default=0, help="AbsTopK's kept entries (0: d/4)")
    parser.add_argument("--steps", type=int, default=500, help="training steps (default: 500)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument(
        "--seq-len", type=int, help="tokens per window (default: 128, or the models' context)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument(
        "--init", choices=("lstsq", "random"), default="lstsq",
        help="start from the least-squares linear maps (default) or at random",
    )  # fmt: skip
    for name, term in (("lm", "the hybrid passes' next-token loss"),
                       ("nmse", "the NMSE (both ways, every site)"),
                       ("kl", "the KL of the hybrid passes (every site)")):  # fmt: skip
        parser.add_argument(
            f"--{name}-coef", type=float, default=1.0, help=f"coefficient of {term} (default: 1)"
        )
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps per checkpoint")
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=64,
        help="held-out token budget, in windows of --seq-len tokens (default: 64)",
    )
    parser.add_argument("--corpus", default="stdlib", help="corpus (default: stdlib)")
    _common(parser)
    parser.set_defaults(func=run_train)
    actions = parser.add_subparsers(title="actions", metavar="<action>", dest="action")
    edit = subcommand(
        actions,
        "edit",
        help="carry an edit of a sparse-circuit channel into the dense model",
        description="Carry an edit of a sparse model's channel into the dense model through "
        "a trained bridge; the counterfactual answer's probability against the strength, "
        "against random-channel controls, with a test at alpha = 1.",
        epilog=EPILOG,
    )
    edit.add_argument("--bridge", required=True, metavar="DIR", help="a trained bridge directory")
    edit.add_argument("--task", required=True, help="a Python task, e.g. single_double_quote")
    edit.add_argument("--channel", metavar="SITE:INDEX", help="e.g. blocks.1.attn_in:17")
    edit.add_argument("--dense", help="the dense model (default: the one the bridge names)")
    edit.add_argument("--sparse", help="the sparse model (default: the one the bridge names)")
    edit.add_argument("--out", metavar="DIR", help="default: BRIDGE/edit/TASK")
    edit.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="strengths in [0, 1]")
    edit.add_argument("--n-controls", type=int, default=8, help="random control channels")
    edit.add_argument("--n-items", type=int, default=64, help="task items per split")
    edit.add_argument("--level", type=float, default=0.05, help="the test's level")
    edit.add_argument(
        "--align", choices=("right",),
        help="also use items whose two prompts differ in length, lined up at the last token",
    )  # fmt: skip
    edit.add_argument("--prune-steps", type=int, default=300, help="circuit pruning steps")
    edit.add_argument("--target-loss", type=float, default=0.15, help="circuit's task loss")
    edit.add_argument("--corpus", default="stdlib", help="reference windows' corpus")
    _common(edit)
    edit.set_defaults(func=run_edit)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed (batches, init, controls)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_pair(dense_spec: str, sparse_spec: str, device: str):
    from nnobs.circuits.bridge_model import check_pair
    from nnobs.models.load import load_model

    dense = require_tokenizer(load_model(dense_spec, device=device), dense_spec)
    sparse = require_tokenizer(load_model(sparse_spec, device=device), sparse_spec)
    check_pair(dense, sparse, dense_spec, sparse_spec)
    return dense, sparse


def _settings(args: argparse.Namespace, context: int):
    from nnobs.circuits.bridge_train import BridgeSettings

    seq_len = min(128, context) if args.seq_len is None else args.seq_len
    if seq_len > context:
        raise NnobsError(f"--seq-len {seq_len} is longer than the models' context {context}")
    if args.eval_windows < 2 or args.n_boot < 2:
        raise NnobsError("--eval-windows and --n-boot must be at least 2")
    return BridgeSettings(
        k=args.k, init=args.init, lm_coef=args.lm_coef, nmse_coef=args.nmse_coef,
        kl_coef=args.kl_coef, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
        seq_len=seq_len, corpus=args.corpus, seed=args.seed, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    from nnobs.circuits.bridge_eval import bridge_document, evaluate_bridges
    from nnobs.circuits.bridge_train import (
        CONFIG_FILE,
        METRICS_FILE,
        bridge_config,
        check_same_models,
        read_config,
        train_bridges,
    )  # fmt: skip
    from nnobs.core.files import check_output_dir
    from nnobs.core.lock import lock_directory
    from nnobs.core.results import load_result, write_result
    from nnobs.data.corpus import load_corpus
    from nnobs.data.windows import document_windows
    from nnobs.report.bridge_page import render_bridge

    missing = [f"--{n}" for n in ("dense", "sparse", "out") if not getattr(args, n)]
    if missing:
        raise NnobsError(f"{', '.join(missing)} required (or use `nnobs bridge edit`)")
    out = output_dir(args.out)
    dense, sparse = _load_pair(args.dense, args.sparse, args.device)
    context = min(dense.context_length or 1 << 30, sparse.context_length or 1 << 30)
    settings = _settings(args, context)
    config = bridge_config(dense, sparse, settings)
    if (out / CONFIG_FILE).exists():  # refused before anything is touched
        check_same_models(out, read_config(out), config)
    result_path = out / "bridge.json"
    if result_path.is_file():
        print(f"{out} is finished (bridge.json exists): left alone")
        return 0
    with lock_directory(out, "bridge directory"):
        bridges = train_bridges(dense, sparse, out, settings, progress=not args.no_progress)
        docs = load_corpus(settings.corpus).split("validation")
        budget = args.eval_windows * settings.seq_len
        windows = document_windows(
            docs, dense.tokenizer, settings.seq_len, budget, seed=settings.seed, split="validation"
        )
        evaluation = evaluate_bridges(
            bridges, dense, sparse, windows, settings.batch_size, args.n_boot, settings.seed,
            progress=not args.no_progress,
        )  # fmt: skip
        curve = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
        heldout = {"corpus": settings.corpus, "split": "validation",
                   "n_windows": len(windows.input_ids), "seq_len": settings.seq_len}  # fmt: skip
        path = write_result(result_path, bridge_document(config, evaluation, heldout, curve))
        report = check_output_dir(out / "report", "the report directory")
        page = render_bridge(load_result(path, "nnobs.bridge"), report)
    print(_bridge_summary(evaluation))
    print(f"wrote {path} and {page}")
    return 0


def _bridge_summary(evaluation: dict) -> str:
    lines = ["site                 NMSE enc  NMSE dec  Δloss sh  Δloss dh  KL(d‖sh)  KL(d‖dh)"]
    for s in evaluation["sites"]:
        sh, dh = s["sparse_hybrid"], s["dense_hybrid"]
        lines.append(
            f"{s['site']:<20} {s['nmse_encode']['value']:8.3f}  {s['nmse_decode']['value']:8.3f}  "
            f"{sh['loss_gap_dense']['value']:+8.4f}  {dh['loss_gap_dense']['value']:+8.4f}  "
            f"{sh['kl_dense']['value']:8.4f}  {dh['kl_dense']['value']:8.4f}"
        )
    models = evaluation["models"]
    lines.append(
        f"loss: dense alone {models['dense']['loss']['value']:.3f}, sparse alone "
        f"{models['sparse']['loss']['value']:.3f} nats; Δloss = a hybrid pass's loss minus the "
        f"dense model's ({evaluation['n_documents']} held-out documents)"
    )
    return "\n".join(lines)


def _alphas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise NnobsError(f"--alphas must be numbers like 0,0.5,1, got {text!r}") from None


def run_edit(args: argparse.Namespace) -> int:
    from nnobs.circuits.bridge_edit import (
        EditSettings,
        circuit_channel,
        edit_document,
        transfer_edit,
    )
    from nnobs.circuits.bridge_model import WEIGHTS_FILE, Bridges
    from nnobs.circuits.bridge_train import model_record, read_config
    from nnobs.circuits.edit_transfer import parse_channel
    from nnobs.circuits.prune import CircuitPruner
    from nnobs.core.results import load_result, write_result
    from nnobs.data.python_tasks import load_python_task
    from nnobs.data.windows import stream_windows
    from nnobs.report.bridge_page import render_bridge_edit

    directory = Path(args.bridge)
    config = read_config(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise NnobsError(f"bridge {str(directory)!r} is not trained to the end: run nnobs bridge")
    out = output_dir(args.out, directory / "edit" / args.task)
    n_layers, width = config["sparse"]["n_layers"], config["shape"]["d_sparse"]
    channel = parse_channel(args.channel, n_layers, width) if args.channel else None
    settings = EditSettings(alphas=_alphas(args.alphas), n_controls=args.n_controls,
                            level=args.level, n_boot=args.n_boot, seed=args.seed,
                            align_right=args.align == "right")  # fmt: skip
    dense_spec = args.dense or config["dense"]["path"]
    sparse_spec = args.sparse or config["sparse"]["path"]
    dense, sparse = _load_pair(dense_spec, sparse_spec, args.device)
    for role, adapter in (("dense", dense), ("sparse", sparse)):
        if model_record(adapter)["weights"] != config[role]["weights"]:
            raise NnobsError(
                f"bridge directory {str(directory)!r} was made from other models (its {role} "
                f"model has weights {config[role]['weights']}, {adapter.provenance.get('path')} "
                "does not): give the models it was trained on"
            )
    if args.n_items < 2:
        raise NnobsError(f"--n-items must be at least 2, got {args.n_items}")
    train = load_python_task(args.task, sparse.tokenizer, "train", args.n_items, args.seed)
    heldout = load_python_task(args.task, sparse.tokenizer, "heldout", args.n_items, args.seed)
    bridges = Bridges.load(directory / WEIGHTS_FILE, config["shape"]).to(dense.device)
    reference, _ = stream_windows(sparse.tokenizer, args.corpus, "train", 32, 64)
    if channel is None:
        pruner = CircuitPruner(steps=args.prune_steps, target_loss=args.target_loss, seed=args.seed)
        site, index, info = circuit_channel(
            sparse, train, heldout, reference, pruner, settings.align_right
        )
        chosen = {"method": "circuit", **info}
    else:
        (site, index), chosen = channel, {"method": "given"}
    result = transfer_edit(bridges, dense, sparse, heldout, site, index, reference, settings)
    task = {"name": args.task, "split": "heldout", "n_items": len(heldout)}
    doc = edit_document(config, task, chosen, result, settings)
    path = write_result(out / "edit.json", doc)
    page = render_bridge_edit(load_result(path, "nnobs.bridge_edit"), out)
    test = result["test"]
    print(
        f"{args.task}: edit {site}:{index} at alpha=1 moves P(counterfactual) "
        f"{test['effect']['value']:+.3f} [{test['effect']['ci95'][0]:+.3f}, "
        f"{test['effect']['ci95'][1]:+.3f}] beyond the random-channel control; p = "
        f"{test['p_value']:.4f} (level {test['level']}): {test['verdict']}"
    )
    print(f"wrote {path} and {page}")
    return 0
