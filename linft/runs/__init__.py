"""Runs: the frozen RunConfig, a run's canonical identity, and the one store (atomic files, tidy rows,
done-marked folders) every layer above writes through."""
