"""Datasets built in code (`shapes`) and readers of local evaluation data."""
