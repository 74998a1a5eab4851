"""The quality bench (``tools/bench_quality.py``) in three parts: ``plan`` (what it trains: runs, ablations, the
jobs of sweep, seeds and ablations), ``run`` (one budget: data, FLOPs, budget, training, evaluation, results JSON)
and ``report`` (the tables of a results JSON)."""
