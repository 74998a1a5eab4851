"""A benchmark's subprocess measured: wall seconds, its peak RSS, and the peak summed PSS of it and its children."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


class TreeMemory(threading.Thread):
    """Polls the peak summed PSS (RSS where PSS is unavailable) of a process and its descendants."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    mem = p.memory_full_info()
                    total += getattr(mem, "pss", 0) or mem.rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.every)


def run_subprocess(cmd: list[str], log_path: Path, env: dict, cwd: Path) -> dict:
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        mon = TreeMemory(proc.pid)
        mon.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        mon.stop.set()
        mon.join()
    return {"rc": proc.returncode, "wall_s": time.time() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_tree_pss_mb": mon.peak / 2**20}

