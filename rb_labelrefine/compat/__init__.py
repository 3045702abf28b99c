"""Compatibility shims for the ecosystem packages (see robustbench.py)."""
