"""VAE experiments of CP-Flow (Huang et al. 2021, section 5.4): data, model, posteriors, run
configuration, training and evaluation. The command line is ``python -m experiments.vae``
(:mod:`experiments.vae.cli`), the results table ``python -m experiments.vae.report``; results
are in ``experiments/RESULTS.md`` (section "VAE on Frey Faces") and ``experiments/vae/results/``."""
