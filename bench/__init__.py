"""Benchmarks: quality (prequential), and the streaming baselines they compare against."""
