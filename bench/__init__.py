"""Benchmarks of imgbatch against baselines measured in the same run (`python -m bench`)."""
