"""setuptools entry point.

Metadata lives in pyproject.toml. This file exists for the optional CUDA
extension (csrc/), which is built only where CUDA is usable; on a machine
without CUDA `pip install .` installs the pure-Python package.
"""
from setuptools import setup

setup()
