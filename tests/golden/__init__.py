"""Golden outputs of `scan` and `analyze`, made with the code of before issue 14 (see
generate.py)."""
