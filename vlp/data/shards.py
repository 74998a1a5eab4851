"""Compatibility: the shard tooling moved to :mod:`vlp.shards` (write, inspect, cli); import from there."""
from vlp.shards import *  # noqa: F401,F403
from vlp.shards import __all__  # noqa: F401
