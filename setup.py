"""The package list, discovered: every package under src/ (so a new subpackage cannot be left out of the wheel) plus
the Hydra config tree conf/, which pyproject.toml maps to ptv2.conf. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "ptv2.conf"])
