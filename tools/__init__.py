"""Maintainer tools: train, bench, eval, promote; run as ``python -m tools.<name>``."""
