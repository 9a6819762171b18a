"""The notebook runner: profiles, parameter validation, papermill execution, provenance and the README table.

Kept apart from the library (``contrastive_repro`` never imports this package). Notebooks import
:mod:`reproduce.notebook` for their bookkeeping.
"""
PROFILES = ("smoke", "cpu", "paper")
