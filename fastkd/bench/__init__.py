"""The benchmark suite behind ``fastkd bench`` and ``benchmarks/``.

- ``fastkd.bench.cases``: what is measured (``Case``, the loss cases, and through ``extra_cases``
  those of ``divergence_cases``, ``fused_linear_cases``, ``sparse_cases`` and ``runner_cases``),
- ``fastkd.bench.harness``: how (correctness check, time, peak memory, floor),
- ``fastkd.bench.report``: the table, ``results.json``, ``results.md`` and the chart.
"""
