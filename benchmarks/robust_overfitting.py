#!/usr/bin/env python
"""Robust overfitting on real data: every label-refinement method on small Fashion-MNIST.

    python3 benchmarks/robust_overfitting.py --preset fmnist-small [--jobs 2] [--out DIR] ...

The code is the package beside this script, ``benchmarks/robust_overfitting/`` (``plan``, ``run``,
``records``, ``aggregate``, ``report``, ``main``; its docstring describes the benchmark and every
option); this script runs its ``main`` and re-exports its public names.
"""
import sys
from pathlib import Path

# the package beside this script: the folder of a script run directly is on sys.path already; a
# program that loads this file by its path (the tests) finds the package there too
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from robust_overfitting import *  # noqa: E402,F401,F403
from robust_overfitting import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
