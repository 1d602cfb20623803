"""Runnable experiments: tasks, Flower apps, sweeps, benchmarks and plots."""
