"""The one packaging rule pyproject.toml cannot state: the ``pipeline/`` folder (the project's layout) is installed
under the import name ``segevo_pipeline``, since a top-level ``pipeline`` module would collide with other
packages of that generic name in a user's environment. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["segevo", "segevo.*"]), "segevo_pipeline"],
    package_dir={"segevo_pipeline": "pipeline"},
)
