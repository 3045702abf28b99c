"""Config presets (YAML, package data).  ``generate.py`` writes the paper presets."""
