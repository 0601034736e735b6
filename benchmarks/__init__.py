"""`lsvcr benchmark NAME`: one module per benchmark (harness.py writes results/NAME.json and BENCHMARKS.md),
with the baselines they measure against (pandas_features.py, minimal_server.py). Not part of the runtime."""
