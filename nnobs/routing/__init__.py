"""Routed residuals: edit, wrap and analyse the routing of Block Attention Residuals.

:mod:`~nnobs.routing.edits` masks or fixes routing weights at the ``route_*`` hook sites,
:mod:`~nnobs.routing.wrap` runs a vanilla (additive, pre-norm) model as a routed one under a
fixed recency-bias schedule, :mod:`~nnobs.routing.analysis` measures routing mass against
causal importance per source family, and :mod:`~nnobs.routing.verdicts` turns those
measurements into stated results with intervals.
"""
