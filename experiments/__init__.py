"""Experiments that are not part of the product: runnable, importing training/, never imported by it (an
import-linter contract in pyproject.toml). What they found is in docs/experiments.md."""
