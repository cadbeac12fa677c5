"""``segevo_pipeline``, the import name of the ``pipeline/`` folder beside this one.

An installed segevo maps the name to its own ``pipeline/`` (setup.py). This folder makes a checkout map it to
the checkout's: where the checkout is first on the path (a Ray job's ``--working-dir .``, ``python -m
segevo_pipeline.cli`` run from it), the verbs imported are the ones in this checkout, not an older install's.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent / "pipeline")]
