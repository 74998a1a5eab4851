"""Waiting for the training data loader's next batch: given up after ``data.timeout_s`` without one (a stalled
stream: :class:`DataTimeout`), or ``STOP_GRACE_S`` after a stop signal."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from vlp.data.mixing import is_poll_timeout

if TYPE_CHECKING:
    from vlp.config import DataConfig

# after a stop signal, how long the trainer still waits for the batch in flight (so ranks can agree to checkpoint
# together) before it gives a stalled stream up
STOP_GRACE_S = 10.0


class DataTimeout(RuntimeError):
    """No batch came from the data loader within ``data.timeout_s`` (a stalled stream: a hung mount, ``pipe:curl``)."""


def next_batch(loader, data: DataConfig, stop_time: Callable[[], float | None]):
    """The loader's next ``(batch, meta)``. Raises :class:`DataTimeout` after ``data.timeout_s`` without one;
    None when a stop signal came and ``STOP_GRACE_S`` more passed without one (``stop_time()``, asked at every
    poll: when the signal came, ``time.monotonic``, or None). With ``data.workers: 0`` the main process reads the
    shards itself and waits as long as a read blocks."""
    if data.workers == 0:
        return next(loader)
    start = time.monotonic()
    while True:
        try:
            return next(loader)
        except RuntimeError as err:
            if not is_poll_timeout(err):
                raise
        now = time.monotonic()
        since = stop_time()
        if since is not None and now - since >= STOP_GRACE_S:
            return None
        if now - start >= data.timeout_s:
            raise DataTimeout(
                f"no batch from the data loader in {now - start:.0f} s (data.timeout_s: "
                f"{data.timeout_s:g}): a stream stalls (a hung mount, a pipe: command that sends "
                f"nothing); the latest checkpoint is kept: fix the source, then --resume auto")
