"""What the benchmarks in ``tools/`` share; a tool run as a script has ``tools/`` first on ``sys.path`` and imports
``benchlib`` as a package.

=============== ==================================================================================================
``cli``         log lines, comma-separated lists, the results JSON
``shards``      shards written once (one marker-file scheme), class files
``cifar``       CIFAR-10: extracted once, split, written as shards (the quality split, its validation slice, a subset)
``images``      synthetic JPEGs
``wds_old``     webdataset 0.2.86 in its own folder, for open_clip_train's subprocess
``process``     a subprocess measured: wall time, peak RSS, peak PSS of its tree
``openclip``    open_clip_train run side by side, its timing windows
``train``       a bench's run configs, one ``python -m vlp.train`` subprocess each, their FLOPs
``evaluate``    frozen features of a run through ``vlp.eval``: kNN, linear probe, zero-shot
=============== ==================================================================================================
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
