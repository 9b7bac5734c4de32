"""The observability protocol run the way the reference research code runs it.

Benchmark code, not part of the package: it is what :func:`nnobs.observe.protocol.observe` is
measured against. The *steps* and the *statistics* are nnobs's (the same splits, seeds,
candidate rule, covariate sets and :mod:`nnobs.measure.stats` functions, on the same token
windows from :func:`nnobs.observe.splits.token_windows`), so that only the *method* differs,
and the method is the reference's (``nn-observability``'s ``run_model.py``):

- activations are collected by a forward hook per requested layer into Python lists of float32
  tensors, concatenated with ``torch.cat`` and kept in RAM; the layer sweep runs one forward
  pass over each split **per layer**; later phases collect the candidate layers together, then
  the output layer, the reported layer on the test split, and the second domain's splits, each
  in further passes of their own;
- every probe is a ``Linear(d, 1)`` trained by Adam (:class:`reference_probe.ReferenceAdamProbe`:
  lr 1e-3, weight decay 1e-4, 20 epochs, batch 4096, BCE), retrained from scratch for each seed
  (seed = initialisation + batch order; every seed sees all training tokens) and again in every
  later step that needs a probe, as the reference's phases do;
- the output-control predictor is an MLP d→64→1 (ReLU) trained by Adam for 20 epochs, batch
  1024, MSE on raw activations and loss, one per seed; the ``nonlinear`` control is the same
  kind of MLP on (max softmax, norm); the random-head baseline is a single head (seed 99).

The later steps (output control, cross-domain, flagging) run on the first three evaluation
seeds, as the reference's do; the test split is scored by all evaluation seeds so that its
mean is comparable with nnobs's. The reference has no bootstrap intervals and no detection
floor, so neither is run here.

By default (``loader="slices"``) mini-batches are slices of a per-epoch permutation, the
sampling ``DataLoader(shuffle=True)`` performs, and probes are
:class:`~reference_probe.ReferenceAdamProbe`: the reference's method without its loader's cost.
``loader="dataloader"`` runs the reference's own loop, ``nn.Linear`` under the global seed and
a ``DataLoader`` over a ``TensorDataset``, which fetches and collates rows one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from reference_probe import ReferenceAdamProbe
from torch.utils.data import DataLoader, TensorDataset

from nnobs.core.errors import NnobsError
from nnobs.data.windows import Windows
from nnobs.measure import stats
from nnobs.measure.probes import RandomHead
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.capture import Capture
from nnobs.observe.protocol import Stopwatch
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import (
    CONTROLLED_AWAY,
    candidate_layers,
    ensemble_score,
    hand_statistics,
    residual_labels,
)
from nnobs.observe.splits import SplitData


def pcorr(score: np.ndarray, data: SplitData, site: str) -> float:
    """The reference's statistic, computed from scratch on every call as its code does."""
    return stats.partial_spearman(score, data.cap.loss, data.covariates(site))


def seed_ensemble(probes: list, X: np.ndarray) -> np.ndarray:
    return ensemble_score(np.column_stack([p.decision_function(X) for p in probes]))


# The reference runs output control, cross-domain and flagging on its first three eval seeds.
STEP_SEEDS = 3
RANDOM_HEAD_SEED = 99


def collect(
    adapter: ModelAdapter, windows: Windows, sites: list[str], batch_size: int, name: str
) -> SplitData:
    """Forward passes over ``windows`` with a hook on each of ``sites``; valid positions only.

    Everything is appended to Python lists per batch and concatenated at the end, float32.
    """
    kept: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    norms: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    losses, max_softmax, entropy = [], [], []
    device = adapter.device
    for first in range(0, len(windows.input_ids), batch_size):
        batch = slice(first, first + batch_size)
        ids = torch.from_numpy(windows.input_ids[batch]).to(device)
        targets = torch.from_numpy(windows.targets[batch]).to(device)
        valid = torch.from_numpy(windows.valid[batch]).to(device)
        with torch.inference_mode(), adapter.hooks(capture=sites) as cache:
            logits = adapter.forward(ids, valid.long()).float()
            vocab = logits.shape[-1]
            loss = F.cross_entropy(logits.view(-1, vocab), targets.view(-1), reduction="none")
            p = logits.softmax(dim=-1)
            losses.append(loss.view(valid.shape)[valid].cpu())
            max_softmax.append(p.max(dim=-1).values[valid].cpu())
            entropy.append((-(p * (p + 1e-10).log()).sum(dim=-1))[valid].cpu())
            for site in sites:
                h = cache[site].float()
                kept[site].append(h[valid].cpu())
                norms[site].append(h.norm(dim=-1)[valid].cpu())
    cap = Capture(
        loss=torch.cat(losses).numpy(),
        max_softmax=torch.cat(max_softmax).numpy(),
        entropy=torch.cat(entropy).numpy(),
        doc_ids=np.repeat(windows.doc_ids, windows.valid.sum(1)),
        acts={site: torch.cat(kept[site]).numpy() for site in sites},
        norms={site: torch.cat(norms[site]).numpy() for site in sites},
        stats={"tokens": windows.n_tokens, "dtype": "float32"},
    )
    return SplitData(name, cap)


LOADERS = ("slices", "dataloader")


def epochs_of_batches(
    X: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, gen, loader: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches for ``epochs`` passes over ``(X, y)``, each pass in a fresh random order.

    ``slices``: slices of a per-epoch permutation. ``dataloader``: the reference's own
    ``DataLoader(TensorDataset(X, y), shuffle=True)``, which fetches and collates rows one at a
    time (same sampling, much slower).
    """
    if loader == "dataloader":
        batches = DataLoader(
            TensorDataset(X, y), batch_size=batch_size, shuffle=True, generator=gen
        )
        for _ in range(epochs):
            yield from batches
        return
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen).to(X.device)
        for a in range(0, len(X), batch_size):
            idx = perm[a : a + batch_size]
            yield X[idx], y[idx]


def train_probe(
    train: SplitData, site: str, seed: int, device: str, loader: str = "slices"
) -> ReferenceAdamProbe:
    """A fresh Adam probe on all training tokens, labelled by the loss residual's sign."""
    X, y = train.acts(site), residual_labels(train, site, "reference")
    probe = ReferenceAdamProbe(seed=seed, device=device)
    if loader == "slices":
        return probe.fit(X, y)
    # The reference's own loop: nn.Linear's initialisation under the seed, a DataLoader.
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(X.shape[1], 1).to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=probe.lr, weight_decay=probe.weight_decay)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float32)
    for bx, by in epochs_of_batches(Xt, yt, probe.batch_size, probe.epochs, gen, loader):
        loss = F.binary_cross_entropy_with_logits(head(bx.to(dev)).squeeze(-1), by.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    probe.coef_ = head.weight.detach()[0].double().cpu().numpy()
    probe.intercept_ = float(head.bias.detach())
    return probe


def train_mlp(
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    device: str,
    loader: str = "slices",
    epochs: int = 20,
    batch_size: int = 1024,
) -> Callable[[np.ndarray], np.ndarray]:
    """MLP in→64→1 (ReLU) regressing ``y`` on raw ``X``: Adam lr 1e-3, weight decay 1e-4, MSE,
    a fixed number of epochs. Returns its prediction function."""
    dev = torch.device(device)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.float32))
    if loader == "slices":  # the whole set on the device once; a DataLoader moves batches
        Xt, yt = Xt.to(dev), yt.to(dev)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(Xt.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        ).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for bx, by in epochs_of_batches(Xt, yt, batch_size, epochs, gen, loader):
        loss = F.mse_loss(net(bx.to(dev)).squeeze(-1), by.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()

    def predict(Z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            z = torch.as_tensor(np.asarray(Z, dtype=np.float32), device=dev)
            return net(z).squeeze(-1).double().cpu().numpy()

    return predict


def reference_observe(
    adapter: ModelAdapter,
    windows: dict[str, Windows],
    settings: ObserveSettings | None = None,
    domain2_windows: dict[str, Windows] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    loader: str = "slices",
) -> dict:
    """Run the protocol the reference's way on ``windows`` (train/validation/test).

    ``domain2_windows`` (train/test of a second corpus) adds the cross-domain step. ``loader``
    picks how probes and MLPs draw mini-batches (see :func:`epochs_of_batches`). Returns
    plain numbers shaped like the matching parts of :func:`nnobs.observe.protocol.observe`'s result,
    plus ``timings_s`` (stage → seconds; ``capture`` sums every forward pass),
    ``forward_passes`` and the seed-``sweep_seed`` probe of every layer (``sweep_probes``).
    """
    settings = settings or ObserveSettings()
    if loader not in LOADERS:
        raise NnobsError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if set(windows) != {"train", "validation", "test"}:
        raise NnobsError("reference_observe needs windows for train, validation and test")
    clock = Stopwatch()
    device = str(adapter.device)
    adapter.model.eval()
    layers = settings.layers if settings.layers is not None else list(range(adapter.n_layers))
    sites = {layer: adapter.site_name(layer, settings.site_kind) for layer in layers}
    last_site = adapter.site_name(adapter.n_layers - 1, "resid_post")
    step_seeds = settings.seeds[:STEP_SEEDS]
    passes = 0

    def gather(split: str, wanted: list[str], source: dict[str, Windows] = windows) -> SplitData:
        nonlocal passes
        with clock.stage("capture"):
            passes += 1
            return collect(adapter, source[split], wanted, settings.batch_size, split)

    # 1. Layer sweep: one forward pass per layer and split.
    sweep, sweep_probes = [], {}
    for layer, site in sites.items():
        log(f"sweep: layer {layer}")
        train, val = gather("train", [site]), gather("validation", [site])
        with clock.stage("sweep"):
            probe = train_probe(train, site, settings.sweep_seed, device, loader)
            score = probe.decision_function(val.acts(site))
            sweep.append({"layer": layer, "site": site, "pcorr": pcorr(score, val, site)})
            sweep_probes[layer] = probe
        del train, val
    candidates = candidate_layers(sweep, adapter.n_layers, settings)

    # 2. Candidates collected together; the output layer on its own.
    log(f"multi-seed at {candidates}")
    wanted = [sites[layer] for layer in candidates]
    train, val = gather("train", wanted), gather("validation", wanted)
    train_out = gather("train", [last_site])

    # 3. Multi-seed evaluation: a fresh probe per seed.
    with clock.stage("multiseed"):
        multiseed = []
        for layer in candidates:
            site = sites[layer]
            scores = [
                train_probe(train, site, s, device, loader).decision_function(val.acts(site))
                for s in settings.seeds
            ]
            values = [pcorr(score, val, site) for score in scores]
            multiseed.append(
                {
                    "layer": layer,
                    "pcorr": values,
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)),
                    "seed_agreement": stats.seed_agreement(scores),
                }
            )
    best = max(multiseed, key=lambda r: r["mean"])
    layer, site = best["layer"], sites[best["layer"]]

    # 4. Test split at the reported layer: the probes are retrained.
    log(f"test, output control, controls, baselines, flagging at layer {layer}")
    test, test_out = gather("test", [site]), gather("test", [last_site])
    X_test, loss = test.acts(site), test.cap.loss
    with clock.stage("test"):
        probes = [train_probe(train, site, s, device, loader) for s in settings.seeds]
        per_seed = [pcorr(p.decision_function(X_test), test, site) for p in probes]
        score = seed_ensemble(probes, X_test)
        headline = {
            "layer": layer,
            "per_seed": per_seed,
            "mean": float(np.mean(per_seed)),
            "std": float(np.std(per_seed, ddof=1)),
            "ensemble": pcorr(score, test, site),
        }

    # 5. Output control: one loss MLP and one retrained probe per seed.
    with clock.stage("output_control"):
        oc = []
        for s in step_seeds:
            predict = train_mlp(train_out.acts(last_site), train_out.cap.loss, s, device, loader)
            covariates = test.covariates(site, predict(test_out.acts(last_site)))
            probe_score = train_probe(train, site, s, device, loader).decision_function(X_test)
            oc.append(stats.partial_spearman(probe_score, loss, covariates))
        output_controlled = {"per_seed": oc, "mean": float(np.mean(oc))}

    # 6. Control sensitivity of one probe; the nonlinear control is an MLP of (softmax, norm).
    with clock.stage("controls"):
        nonlinear = train_mlp(
            train.covariates(site), train.cap.loss, settings.sweep_seed, device, loader
        )
        first_seed = train_probe(train, site, settings.seeds[0], device, loader)
        probe_score = first_seed.decision_function(X_test)
        softmax, norm = test.cap.max_softmax, test.cap.norms[site]
        sets = {
            "none": None,
            "softmax_only": softmax,
            "norm_only": norm,
            "standard": test.covariates(site),
            "plus_entropy": test.covariates(site, test.cap.entropy),
            "nonlinear": test.covariates(site, nonlinear(test.covariates(site))),
        }
        controls = {n: stats.partial_spearman(probe_score, loss, c) for n, c in sets.items()}

    # 7. Baselines: hand-designed statistics and one random head.
    with clock.stage("baselines"):
        # norm and mean_square are functions of the norm covariate: 0 by construction
        baselines: dict[str, float | None] = dict.fromkeys(CONTROLLED_AWAY)
        for name, value in hand_statistics(X_test).items():
            try:
                baselines[name] = pcorr(value, test, site)
            except NnobsError:  # the norm is a covariate itself
                baselines[name] = None
        head = RandomHead(seed=RANDOM_HEAD_SEED).fit(X_test).decision_function(X_test)
        baselines["random_head"] = pcorr(head, test, site)

    # 8. Flagging, per retrained probe.
    with clock.stage("flagging"):
        flagging = [
            stats.flag_catches(
                train_probe(train, site, s, device, loader).decision_function(X_test),
                test.cap.max_softmax,
                loss,
                settings.flag_rates,
            )
            for s in step_seeds
        ]

    # 9. Cross-domain: the second domain's splits at the reported layer, probes retrained.
    cross = None
    if domain2_windows is not None:
        log("cross-domain")
        b_train = gather("train", [site], domain2_windows)
        b_test = gather("test", [site], domain2_windows)
        with clock.stage("cross_domain"):

            def mean_pcorr(fit_on: SplitData, evaluate_on: SplitData) -> float:
                return float(
                    np.mean(
                        [
                            pcorr(
                                train_probe(fit_on, site, s, device, loader).decision_function(
                                    evaluate_on.acts(site)
                                ),
                                evaluate_on,
                                site,
                            )
                            for s in step_seeds
                        ]
                    )
                )

            cross = {
                "a_to_a": mean_pcorr(train, test),
                "a_to_b": mean_pcorr(train, b_test),
                "b_to_b": mean_pcorr(b_train, b_test),
            }

    return {
        "tokens": {name: w.n_tokens for name, w in windows.items()},
        "sweep": sweep,
        "candidates": candidates,
        "multiseed": multiseed,
        "layer": layer,
        "headline": headline,
        "output_controlled": output_controlled,
        "controls": controls,
        "baselines": baselines,
        "flagging": flagging,
        "cross_domain": cross,
        "sweep_probes": {
            layer: {"coef": p.coef_, "intercept": p.intercept_} for layer, p in sweep_probes.items()
        },
        "forward_passes": passes,
        "timings_s": clock.seconds,
    }
