"""jlora benchmarks (python benchmarks/run.py)."""
