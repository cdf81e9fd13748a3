"""Evaluation commands: `python -m dalle_mini_impl.eval {judge,recon,clip,shapes,emoji} ...`, each printing JSON."""
