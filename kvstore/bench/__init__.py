"""Benchmarks: ``kvstore bench SUITE``. Each suite is a module ``kvstore.bench.<suite>``."""
