"""Weight-sparse transformers and their task circuits (Gao et al. 2025).

Sparse training itself is a set of train settings (:mod:`nnobs.training.sparsity`, presets
``sparse`` and ``dense``), and the twenty Python tasks are prompt-pair generators
(:mod:`nnobs.data.python_tasks`); :mod:`~nnobs.circuits.task_loss` scores a model on a task
the way circuit pruning does: binary cross-entropy over the (correct, incorrect) logits at
the last position.

Learned circuit pruning, as a library: :mod:`~nnobs.circuits.nodes` (the node locations —
residual reads and writes, MLP neurons, q/k/v channels — as hook sites),
:mod:`~nnobs.circuits.masks` (one learned gate per node, pruned nodes mean- or zero-ablated),
:mod:`~nnobs.circuits.prune` (``CircuitPruner``: train the gates, then bisect the number of
kept nodes to the target task loss) and :mod:`~nnobs.circuits.edges` (circuit size: nonzero
weights between kept nodes).

Bridges between a dense and a sparse model's residual streams:
:mod:`~nnobs.circuits.bridge_model` (an encoder, linear + AbsTopK, and a decoder per
sublayer site), :mod:`~nnobs.circuits.bridge_loss` (NMSE both ways and the hybrid passes: each
model continued from a site on the other's stream), :mod:`~nnobs.circuits.bridge_train`
(training, resumable exactly), :mod:`~nnobs.circuits.bridge_eval` (per-site report on held-out
documents), and :mod:`~nnobs.circuits.edit_transfer` with :mod:`~nnobs.circuits.bridge_edit`
(an edit of a sparse-circuit channel carried into the dense model, tested against random
channels of the same size).

Across tasks and models: :mod:`~nnobs.circuits.sizes` (one model's circuit sizes over many
tasks, resumable), :mod:`~nnobs.circuits.compare` (dense vs sparse at matched validation
loss: geometric-mean edge ratio with a test over tasks) and the frontier study
(:mod:`~nnobs.circuits.frontier` with its config, measurements and claim statistics: loss
against circuit size over a width × L0 grid).
"""
