"""gmkernels benchmarks.

* ``python -m gmkernels_bench`` (``__main__``): the timed suites ``ops``, ``train``, ``solvers``;
  ``cases`` defines them and their minimal-traffic bytes, ``timing`` how they are timed,
  ``runner`` turns timings into records, ``report`` writes JSON / markdown / PNG,
  ``distributed`` is the ``torchrun`` data-parallel solver throughput.
* ``python -m gmkernels_bench.compile_report``: the static AOT report (no GPU needed).
* ``python -m gmkernels_bench.host_cost``: the Python-side cost of each public op call in µs,
  kernel launches stubbed (runs on a CPU).
* ``pytest gmkernels_bench --benchmark-only``: the same cases under pytest-benchmark.
* ``results/``: committed GPU runs.
"""
