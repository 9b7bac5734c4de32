"""Weight-sparse transformers and their task circuits (Gao et al. 2025).

Sparse training itself is a set of train settings (:mod:`nnobs.training.sparsity`, presets
``sparse`` and ``dense``), and the twenty Python tasks are prompt-pair generators
(:mod:`nnobs.data.python_tasks`); :mod:`~nnobs.circuits.task_loss` scores a model on a task
the way circuit pruning does: binary cross-entropy over the (correct, incorrect) logits at
the last position.
"""
