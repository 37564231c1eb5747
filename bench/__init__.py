"""Side-by-side benchmarks: run a script as `python -m bench.<name>` or `python bench/<name>.py`."""
