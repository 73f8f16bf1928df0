"""The benchmark: the bench API (api.py), the measuring child process (child.py) and its runner (runner.py)."""
