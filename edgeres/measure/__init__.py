"""Judging artifacts: accuracy against the fp32 reference, per-layer error, benchmarks, reports, descriptions."""
