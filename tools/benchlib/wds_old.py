"""webdataset 0.2.86 in its own folder, first on the PYTHONPATH of open_clip_train's subprocess only:
open_clip_train 3.3's loader breaks on webdataset 1.x (``KeyError: 'fname'``); vlp stays on 1.x."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchlib.cli import log

OLD_WDS = "0.2.86"


def ensure_old_webdataset(target: Path) -> Path | None:
    """``target`` holding webdataset 0.2.86 (``pip install --no-deps --target``, once: numpy etc. stay the
    machine's); None, the reason logged, when it cannot be installed or imports as another version."""
    if not (target / "webdataset" / "__init__.py").is_file():
        log(f"installing webdataset=={OLD_WDS} into {target} (open_clip_train 3.3 needs it)")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                            f"webdataset=={OLD_WDS}"], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"pip install webdataset=={OLD_WDS} failed: {r.stderr.strip()[-500:]}")
            return None
        target.mkdir(parents=True, exist_ok=True)
        for entry in tmp.iterdir():  # a --wds-dir may hold other things: only what pip wrote is replaced
            shutil.rmtree(target / entry.name, ignore_errors=True)
            os.replace(entry, target / entry.name)
        tmp.rmdir()
    env = dict(os.environ, PYTHONPATH=pythonpath(target))
    r = subprocess.run([sys.executable, "-c", "import webdataset; print(webdataset.__version__)"], env=env,
                       capture_output=True, text=True)
    if r.stdout.strip() != OLD_WDS:
        log(f"webdataset in {target} is {r.stdout.strip() or r.stderr.strip()[-300:]!r}, not {OLD_WDS}")
        return None
    return target


def pythonpath(first: Path) -> str:
    """This process's PYTHONPATH with ``first`` in front."""
    rest = os.environ.get("PYTHONPATH", "")
    return str(first) + (os.pathsep + rest if rest else "")

