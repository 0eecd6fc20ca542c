"""The package list, discovered: every package under src/ (so a new subpackage cannot be left out of the wheel), the
Hydra plugins under src/hydra_plugins/ (a namespace package Hydra scans for launchers: no __init__.py there, so
find_packages alone would miss them) and the Hydra config tree conf/, which pyproject.toml maps to ptv2.conf.
Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

setup(packages=[*find_packages("src"), *find_namespace_packages("src", include=["hydra_plugins.*"]), "ptv2.conf"])
