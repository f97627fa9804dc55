"""Accuracy: the recipe's `eval` section, its datasets, scoring and reports."""
