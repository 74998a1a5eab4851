"""The quality bench (``tools/bench_quality.py``) in three parts: ``plan`` (what it trains: the runs, their ablations
and FLOPs, learning rates, the jobs), ``run`` (one budget: data, reference steps, training, evaluation, the results
JSON) and ``report`` (the tables of a results JSON)."""
