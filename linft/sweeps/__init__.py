"""Named grids of run configs (experiments/*.toml) and their launchers: local processes, Slurm arrays."""
