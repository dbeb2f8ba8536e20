"""Benchmarks for swaglora (issue "Fast on a laptop CPU"): `python -m benchmarks [--quick] [--only NAME]`."""
