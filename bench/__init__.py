"""alignd's benchmarks: ``python -m bench.run`` (speed, issue #4's table) and ``python -m bench.quality``
(what the embedded default recipes write). Both start real servers on this machine and write JSON under
``bench/results/``.
"""
