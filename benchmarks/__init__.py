"""Benchmarks of bpseval: synthetic shards, timings and the modes `run.py` dispatches (see README.md)."""
