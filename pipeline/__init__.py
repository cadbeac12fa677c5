"""Orchestration: one module per ``segevo`` verb. Reads the config, calls the ``segevo`` library."""
