"""Benchmarks: figures measured side by side in one run; the last line is one JSON object."""
