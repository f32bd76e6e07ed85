"""Reproducible experiments over lego_core (not tests): `make reproduce` runs
`python -m experiments.reproduce`, which trains the source models from the shared
data with fixed seeds, measures the disassembly, assembly and sensitivity tables
with the library's own code paths, and writes docs/RESULTS.md and
docs/sensitivity.png."""
