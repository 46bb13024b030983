"""Training one run: per-mode pipelines, the trainer, evaluation, per-run selection rows,
distributed ranks, the launch dispatch, and vectorised multi-runs."""
