"""Backbones: one registry name -> architecture, weights file, normalisation, resolution, split layout."""
