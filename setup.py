"""The one compiled part of flcore: ``flcore._fold``, the exact FedAvg fold in one pass.

Everything else is in ``pyproject.toml``. The extension is optional: where it cannot be
built (no C compiler), flcore installs without it and folds with torch, at about half the
speed for large models, with the same bits.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("flcore._fold", ["flcore/_fold.c"], optional=True)])
