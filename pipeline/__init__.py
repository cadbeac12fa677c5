"""Orchestration: one module per ``segevo`` verb. Reads the config, calls the ``segevo`` library.

Imported as ``segevo_pipeline`` (setup.py maps this folder to that name; ``segevo_pipeline/`` does the same in a
checkout), never as ``pipeline``: a name that generic collides with other packages.
"""
