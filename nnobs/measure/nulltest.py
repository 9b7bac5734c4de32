"""The verdict's test: is a measured value above what a null model of the same kind gives?

The null is a handful of values measured by the same pipeline where no learned signal can
exist (e.g. random-init models of the same architecture, one value per init seed), each with
its own sampling standard deviation. A value of one such model varies by its sampling noise
plus a between-model spread (estimated from the null values when there are two or more);
the null mean is itself estimated from ``K`` models. Under the null, the observed value minus
the null mean is then normal with variance

    observed_sd² + between² + (within² + between²) / K,

where ``within²`` is the null models' mean sampling variance. The between-model part is
estimated from only ``K`` values, so the reference distribution is Student's t with
Welch–Satterthwaite degrees of freedom (the sample variance of the null values has ``K - 1``;
the bootstrap variances are treated as known): normal when the null models agree within
their sampling noise, close to t with ``K - 1`` degrees of freedom when they do not. The
p-value is one-sided (a signal is a value *above* the null), and the floor is the value the
observed one must exceed to be significant at ``level``: the (1 − level) quantile of that
predictive distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from nnobs.core.errors import NnobsError
from nnobs.measure.stats import as_vector


def replicate_sd(replicates: np.ndarray) -> float:
    """Standard deviation of bootstrap replicates, ignoring undefined (NaN) ones."""
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) < 2:
        raise NnobsError("a standard deviation needs at least 2 defined replicates")
    return float(finite.std(ddof=1))


def compare_to_null(
    observed: float,
    observed_sd: float,
    null_values: Sequence[float],
    null_sds: Sequence[float],
    level: float = 0.05,
) -> dict[str, Any]:
    """One-sided test of ``observed`` against the null values (module docstring)."""
    values = as_vector("null_values", null_values)
    sds = as_vector("null_sds", null_sds, len(values))
    if len(values) < 1:
        raise NnobsError("the null needs at least one value")
    if not 0 < level < 0.5:
        raise NnobsError(f"level must be in (0, 0.5), got {level}")
    if observed_sd < 0 or np.any(sds < 0):
        raise NnobsError("standard deviations must be >= 0")
    k = len(values)
    within = float(np.mean(sds**2))
    spread = float(values.var(ddof=1)) if k >= 2 else 0.0
    if spread > within:  # the models differ beyond their sampling noise
        between = spread - within
        estimated = spread * (1 + 1 / k)  # the part that rests on the K null values
        variance = observed_sd**2 + estimated - within
        dof = variance**2 * (k - 1) / estimated**2
    else:
        between, variance, dof = 0.0, observed_sd**2 + within / k, np.inf
    predictive_sd = float(np.sqrt(variance))
    mean = float(values.mean())
    if predictive_sd == 0:
        raise NnobsError("the null and the observed value have no spread; the test is undefined")
    z = (observed - mean) / predictive_sd
    p_value = float(student_t.sf(z, dof))
    return {
        "null_mean": mean,
        "null_values": values.tolist(),
        "null_sampling_sd": sds.tolist(),
        "between_model_sd": float(np.sqrt(between)),
        "predictive_sd": predictive_sd,
        "n_null": k,
        "level": level,
        "degrees_of_freedom": None if np.isinf(dof) else float(dof),
        "floor": float(mean + student_t.isf(level, dof) * predictive_sd),
        "z": float(z),
        "p_value": p_value,
        "significant": bool(p_value < level),
    }
