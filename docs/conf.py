# Sphinx configuration for the slurm-charlie documentation.
project = "slurm-charlie"
author = "the slurm-charlie developers"
copyright = "2026, the slurm-charlie developers"
release = "0.1.0"
extensions = []
exclude_patterns = ["_build", "examples", "root-operations.rst"]
html_theme = "alabaster"
highlight_language = "console"
