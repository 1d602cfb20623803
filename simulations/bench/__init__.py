"""Benchmarks of osd-fl: one package, shared workloads, every figure in docs/performance.md printed by one of them."""
