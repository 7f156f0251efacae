"""The benchmark suite behind ``fastkd bench`` and ``benchmarks/``.

- ``fastkd.bench.cases``: what is measured (``Case``, the loss cases, and the cases of optional
  modules),
- ``fastkd.bench.harness``: how (correctness check, time, peak memory, floor),
- ``fastkd.bench.report``: the table, ``results.json``, ``results.md`` and the chart.
"""
