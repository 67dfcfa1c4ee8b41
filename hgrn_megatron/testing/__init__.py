"""Test helpers shared by the test suite and benchmarks: the multi-rank harness."""
