"""Benchmarks: ``kvstore bench SUITE``. Each suite is a module ``kvstore.bench.<suite>``;
``report`` formats results and the ``*_client`` modules are the processes a suite starts.

On top of everything: may import any part of the project, ``clients`` included. Every
figure is reported beside the limit of the same link measured in the same run.
"""
