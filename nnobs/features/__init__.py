"""Features: what a unit or direction of a site responds to and what it does.

sources.py (one interface over MLP neurons, residual directions and SAE features), sae.py
(sparse autoencoders in SAELens's format), train_sae.py and sae_eval.py (training a TopK SAE on
streamed activations; variance explained, L0, spliced-in loss), stream.py (a site's activations
one batch at a time), dashboard.py (top contexts, quantile samples, density, logit effects,
mean-ablation effects in one streamed pass), decision.py (the probe direction's make-up),
finetune.py and drift.py (a run fine-tuned on; what changed), signal_change.py (the paired
test of the decision-quality signal's change).
"""
