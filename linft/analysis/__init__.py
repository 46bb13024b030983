"""Analyses of finished runs, each a hashed child folder of the runs it reads; one module per analysis,
registered in :mod:`linft.analysis.registry`."""
