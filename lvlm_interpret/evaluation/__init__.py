"""Explanation-quality metrics and benchmarks against ground-truth masks."""
