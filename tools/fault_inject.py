#!/usr/bin/env python
"""Fault injection: the hostile shards, cluster signals and busy-user mistakes of issue #17, against the installed
``vlp`` command, each in a fresh process, as the world delivers them. Prints one table: case, expected, observed,
pass/fail; exit status 1 if any case fails.

    python tools/fault_inject.py                 # every case, ~5 minutes on 2 CPU cores
    python tools/fault_inject.py --only sigterm  # the cases whose name contains "sigterm"
    python tools/fault_inject.py --keep DIR      # keep the work folder (shards, runs, logs) for inspection

Data: the demo's real shards (scikit-learn digits, written by ``vlp.demo.write_demo_shards``), the tiny test model
(``configs/models/vlp-test-vit.json``). Every case gets its own run folder; the command lines it ran are in
``DIR/<case>.log`` with ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VLP = [shutil.which("vlp")] if shutil.which("vlp") else [sys.executable, "-m", "vlp.cli"]
TRAIN = [*VLP, "train"]
CASES: list[tuple[str, str, Callable]] = []


def case(name: str, expected: str):
    def register(fn):
        CASES.append((name, expected, fn))
        return fn
    return register


class Work:
    """The shared folder: demo shards, one trained run (and its export) that several cases read."""

    def __init__(self, root: Path):
        from vlp.demo import write_demo_shards

        self.root = root
        self.data = root / "digits"
        write_demo_shards(self.data, maxcount=100)
        self._trained: Path | None = None

    def config(self, name: str, **sections) -> Path:
        cfg = {
            "output_dir": str(self.root / name),
            "seed": 0,
            "model": {"name": "vlp-test-vit", "mask_ratio": 0.75},
            "data": {"sources": [
                {"name": "lab", "kind": "labeled", "shards": str(self.data / "labeled" / "*.tar")},
                {"name": "pairs", "kind": "paired", "shards": str(self.data / "paired" / "*.tar")},
                {"name": "unlab", "kind": "unlabeled", "shards": str(self.data / "unlabeled" / "*.tar")}],
                "batch": {"paired": 8, "labeled": 4, "unlabeled": 4}, "workers": 0, "shuffle_buffer": 50,
                "templates": ["a photo of the digit {c}.", "the number {c}."]},
            "objectives": {"contrastive": {"weight": 1.0, "labels_as_text": True},
                           "mae": {"weight": 0.5, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
                           "supervised": {"weight": 0.5}},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "train": {"steps": 4, "log_every": 1, "save_every": 2, "progress": False},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def trained(self) -> Path:
        """A finished 4-step run (checkpoints at 2 and 4), trained once."""
        if self._trained is None:
            proc = run([*TRAIN, "--config", str(self.config("base"))])
            if proc.returncode:
                raise RuntimeError(f"the base run failed: {tail(proc)}")
            self._trained = self.root / "base"
        return self._trained

    def export(self) -> Path:
        out = self.root / "base-export"
        if not out.exists():
            proc = run([*VLP, "export", "--checkpoint", str(self.trained()), "--out", str(out)])
            if proc.returncode:
                raise RuntimeError(f"export failed: {tail(proc)}")
        return out


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def tail(proc, n: int = 1) -> str:
    lines = (proc.stderr or "").strip().splitlines() or (proc.stdout or "").strip().splitlines() or [""]
    return " | ".join(lines[-n:])[:160]


def step_of(run_dir: Path) -> int | None:
    from vlp import checkpoint as ckpt_io

    try:
        return int(ckpt_io.read_run_info(run_dir)["step"])
    except Exception:
        return None


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len([line for line in path.read_text().splitlines() if "loss/total" in line]) if path.exists() else 0


def start_and_wait(cmd: list[str], run_dir: Path, steps: int, timeout: float = 240) -> subprocess.Popen:
    """Start a run in its own session (a process group, as a cluster launches it); return once it logged ``steps``."""
    proc = subprocess.Popen([str(c) for c in cmd], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and logged_steps(run_dir) < steps:
        time.sleep(0.05)
    return proc


def write_tar(path: Path, samples: list[dict]) -> Path:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def demo_images(w: Work, kind: str = "unlabeled", n: int = 10) -> list[tuple[str, dict]]:
    """(key, members) of the first ``n`` samples of a demo shard."""
    out: dict[str, dict] = {}
    with tarfile.open(sorted((w.data / kind).glob("*.tar"))[0]) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
            if len(out) > n:
                break
    return list(out.items())[:n]


class _Exploit:
    """A pickle that runs a shell command when loaded (what a hostile .pyd / .pkl / .pth member holds)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------ the cases
@case("1 pickle member in an eval shard", "payload never runs: vlp eval and in-training eval")
def pickle_in_eval_shard(w: Work):
    marker = w.root / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    evil = w.root / "evil-test"
    shutil.copytree(w.data / "test", evil, ignore=shutil.ignore_patterns("*.tar"))
    samples = []
    with tarfile.open(sorted((w.data / "test").glob("*.tar"))[0]) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "pyd": payload, "pkl": payload, "pth": payload})
            samples[-1][ext] = tar.extractfile(m).read()
    write_tar(evil / "evil-000000.tar", samples[:40])
    ev = run([*VLP, "eval", "--model", w.export(), "--task", "zeroshot", "--data", evil, "--device", "cpu"])
    after_eval = marker.exists()
    tr = run([*TRAIN, "--config", w.config("pickle-run", train={"steps": 2, "save_every": 2, "progress": False},
                                            eval={"zeroshot": {"shards": str(evil)}})])
    observed = (f"eval exit {ev.returncode}, training exit {tr.returncode}; marker after eval: {after_eval}, "
                f"after training: {marker.exists()}")
    return not after_eval and not marker.exists() and ev.returncode == 0 and tr.returncode == 0, observed


@case("2 export into a folder holding other files", "only vlp's own files replaced; others kept")
def export_keeps_foreign_files(w: Work):
    out = w.root / "shared-folder"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "other-model").mkdir()
    (out / "other-model" / "weights.bin").write_bytes(b"x" * 10)
    first = run([*VLP, "export", "--checkpoint", w.trained(), "--out", out, "--overwrite"])
    second = run([*VLP, "export", "--checkpoint", w.trained(), "--out", out, "--overwrite"])
    run_copy = w.root / "run-as-out"
    shutil.copytree(w.trained(), run_copy)
    into_run = run([*VLP, "export", "--checkpoint", run_copy, "--out", run_copy, "--overwrite"])
    kept = (out / "notes.txt").exists() and (out / "other-model" / "weights.bin").exists()
    run_kept = (run_copy / "checkpoints").is_dir() and (run_copy / "metrics.jsonl").exists()
    observed = (f"exits {first.returncode}/{second.returncode}/{into_run.returncode}; foreign files kept: {kept}; "
                f"run folder kept: {run_kept}")
    return kept and run_kept and first.returncode == second.returncode == 0, observed


@case("3 fresh run into a used output_dir; two live runs", "exit 2 (use --resume), exit 4 (busy)")
def used_output_dir(w: Work):
    w.trained()
    again = run([*TRAIN, "--config", w.root / "base.yaml"])
    cfg = w.config("live", train={"steps": 100000, "save_every": 100000, "log_every": 1, "progress": False})
    first = start_and_wait([*TRAIN, "--config", cfg], w.root / "live", 1)
    second = run([*TRAIN, "--config", cfg])
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    observed = f"used: exit {again.returncode} ({tail(again)[:60]}); busy: exit {second.returncode}"
    return again.returncode == 2 and second.returncode == 4, observed


@case("4 source whose shards are all unreadable", "fails in bounded time naming the source; no orphan")
def unreadable_source(w: Work):
    bad = w.root / "unreadable"
    bad.mkdir()
    (bad / "a-000000.tar").write_bytes(b"this is not a tar archive" * 40)
    (bad / "a-000001.tar").write_bytes(b"")
    cfg = w.config("unreadable-run", data={"workers": 1, "sources": [
        {"name": "lab", "kind": "labeled", "shards": str(w.data / "labeled" / "*.tar")},
        {"name": "brokenpairs", "kind": "paired", "shards": str(bad / "*.tar")}],
        "batch": {"paired": 8, "labeled": 4}})
    t0 = time.time()
    proc = run([*TRAIN, "--config", cfg], timeout=180)
    took = time.time() - t0
    named = "brokenpairs" in proc.stderr
    return proc.returncode != 0 and named and took < 170, f"exit {proc.returncode} after {took:.0f} s; " \
        f"source named: {named}"


@case("5 SIGTERM to the process group (2 DataLoader workers)", "checkpoint saved, exit 143, resume finishes")
def sigterm_group(w: Work):
    run_dir = w.root / "sigterm"
    cfg = w.config("sigterm", data={"workers": 2}, train={"steps": 100000, "save_every": 100000, "log_every": 1,
                                                           "progress": False})
    proc = start_and_wait([*TRAIN, "--config", cfg], run_dir, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=120)
    step = step_of(run_dir)
    leftovers = list((run_dir / "checkpoints").glob("*.tmp*"))
    resumed = run([*TRAIN, "--config", cfg, f"train.steps={(step or 0) + 2}", "--resume", "auto"])
    final = step_of(run_dir)
    observed = f"exit {code}, checkpoint at step {step}, .tmp left: {len(leftovers)}; resume exit " \
               f"{resumed.returncode} at step {final}"
    return code == 143 and step and not leftovers and resumed.returncode == 0 and final == step + 2, observed


@case("6 label '²' (isdigit, not int)", "skipped and counted; the run finishes")
def superscript_label(w: Work):
    images = demo_images(w, "labeled", 6)
    samples = [{"__key__": k, "jpg": m["jpg"], "cls": str(i % 3).encode()} for i, (k, m) in enumerate(images[:5])]
    samples.append({"__key__": "sup", "jpg": images[5][1]["jpg"], "cls": "²".encode()})
    write_tar(w.root / "sup" / "s-000000.tar", samples)
    (w.root / "sup" / "classnames.txt").write_text("zero\none\ntwo\n")
    cfg = w.config("sup-run", data={"sources": [
        {"name": "lab", "kind": "labeled", "shards": str(w.root / "sup" / "*.tar")},
        {"name": "pairs", "kind": "paired", "shards": str(w.data / "paired" / "*.tar")}],
        "batch": {"paired": 8, "labeled": 4}})
    proc = run([*TRAIN, "--config", cfg])
    from vlp import checkpoint as ckpt_io

    bad = ckpt_io.read_run_info(w.root / "sup-run").get("bad_samples", {}) if proc.returncode == 0 else {}
    return proc.returncode == 0 and bad.get("lab", 0) >= 1, f"exit {proc.returncode}; bad_samples {bad}"


@case("6 credentials in a shard spec", "model card carries no secret")
def credentials_in_card(w: Work):
    secret = "hf_SeCrEtToKeN123"
    shard = sorted((w.data / "paired").glob("*.tar"))[0]
    spec = f"pipe:curl -s -H 'Authorization: Bearer {secret}' file://{shard}"
    cfg = w.config("cred-run", data={"sources": [
        {"name": "lab", "kind": "labeled", "shards": str(w.data / "labeled" / "*.tar")},
        {"name": "pairs", "kind": "paired", "shards": spec}], "batch": {"paired": 8, "labeled": 4}})
    tr = run([*TRAIN, "--config", cfg])
    ex = run([*VLP, "export", "--checkpoint", w.root / "cred-run", "--out", w.root / "cred-export"])
    card = (w.root / "cred-export" / "README.md").read_text() if ex.returncode == 0 else ""
    leaked = secret in card
    return tr.returncode == ex.returncode == 0 and card and not leaked, \
        f"train exit {tr.returncode}, export exit {ex.returncode}; secret in card: {leaked}; " \
        f"spec shown: {'***' in card}"


@case("6 model.num_classes below the class count", "config error before any work")
def too_few_classes(w: Work):
    proc = run([*TRAIN, "--config", w.config("ncls"), "model.num_classes=4"])
    return proc.returncode == 2 and "model.num_classes" in tail(proc) and not (w.root / "ncls").exists(), \
        f"exit {proc.returncode}: {tail(proc)[:90]}"


@case("6 eval with fewer class names than labels", "error naming the class count; non-zero exit")
def eval_fewer_classnames(w: Work):
    few = w.root / "few.txt"
    few.write_text("zero\none\n")
    proc = run([*VLP, "eval", "--model", w.export(), "--task", "zeroshot", "--data", w.data / "test",
                "--classnames", few, "--device", "cpu"])
    return proc.returncode != 0 and "2 classes" in tail(proc), f"exit {proc.returncode}: {tail(proc)[:90]}"


@case("6 resume after changing batch, workers, mask ratio", "one warning naming each change")
def resume_changed(w: Work):
    run_dir = w.root / "changed"
    shutil.copytree(w.trained(), run_dir)
    cfg = w.config("changed")
    proc = run([*TRAIN, "--config", cfg, "train.steps=5", "data.batch.paired=6", "data.workers=1",
                "model.mask_ratio=0.5", "--resume", "auto"])
    named = [k for k in ("data.batch.paired: 8 -> 6", "data.workers: 0 -> 1", "model.mask_ratio: 0.75 -> 0.5")
             if k in proc.stderr]
    return proc.returncode == 0 and len(named) == 3, f"exit {proc.returncode}; changes named: {len(named)}/3"


@case("6 corrupt latest checkpoint", "resume falls back to the previous one")
def corrupt_latest(w: Work):
    from vlp import checkpoint as ckpt_io

    run_dir = w.root / "corrupt"
    shutil.copytree(w.trained(), run_dir)
    latest = ckpt_io.list_checkpoints(run_dir)[-1]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = run([*TRAIN, "--config", w.config("corrupt"), "train.steps=5", "--resume", "auto"])
    fell_back = "falling back" in proc.stderr
    return proc.returncode == 0 and fell_back and step_of(run_dir) == 5, \
        f"exit {proc.returncode}; fell back: {fell_back}; finished at step {step_of(run_dir)}"


@case("7 shards verify vs training", "verify flags what training skips")
def verify_parity(w: Work):
    images = demo_images(w, "unlabeled", 4)
    write_tar(w.root / "v-paired" / "p-000000.tar", [
        {"__key__": "ok", "jpg": images[0][1]["jpg"], "txt": b"a caption"},
        {"__key__": "nocaption", "jpg": images[1][1]["jpg"]},
        {"__key__": "empty", "jpg": images[2][1]["jpg"], "txt": b"   "}])
    write_tar(w.root / "v-lab" / "l-000000.tar", [
        {"__key__": "ok", "jpg": images[0][1]["jpg"], "cls": b"1"},
        {"__key__": "big", "jpg": images[1][1]["jpg"], "cls": b"7"},
        {"__key__": "neg", "jpg": images[2][1]["jpg"], "cls": b"-1"}])
    (w.root / "v-lab" / "classnames.txt").write_text("a\nb\nc\n")
    paired = run([*VLP, "shards", "verify", w.root / "v-paired"])
    labeled = run([*VLP, "shards", "verify", w.root / "v-lab"])
    found = [s for s in ("no caption", "empty caption") if s in paired.stdout]
    found += ["label out of range"] * labeled.stdout.count("label out of range: ")
    return paired.returncode == labeled.returncode == 1 and len(found) == 4, f"exits {paired.returncode}/" \
        f"{labeled.returncode}; flagged {len(found)}/4"


@case("7 bad config values", "exit 2, one line naming the key, nothing written")
def bad_config_values(w: Work):
    blocker = w.root / "a-file"
    blocker.write_text("")
    cases = {"data.scale=[1.5,0.2]": "data.scale", "optim.betas=[2,3]": "optim.betas",
             "data.templates=['a photo']": "data.templates", "model.mask_ratio=0": "mask_ratio",
             "data.templates=['unclosed": "data.templates",  # not YAML: one line, not a traceback
             "data.batch.paired=1|objectives.contrastive.labels_as_text=false": "objectives.contrastive",
             f"output_dir={blocker}/run": "output_dir",
             f"data.sources.1.shards={w.data}/paired/*.tar::{w.root}/typo/*.tar": "data.sources"}
    bad = []
    for override, key in cases.items():
        shutil.rmtree(w.root / "badcfg", ignore_errors=True)
        proc = run([*TRAIN, "--config", w.config("badcfg"), *override.split("|")])
        line = tail(proc)
        if proc.returncode != 2 or key not in line or (w.root / "badcfg").exists():
            bad.append(f"{override} -> exit {proc.returncode}: {line[:60]}")
    return not bad, f"{len(cases) - len(bad)}/{len(cases)} one-line errors" + (f"; {bad[0]}" if bad else "")


@case("7 zeroshot predict with one bad image", "others classified; exit 1 naming the bad one")
def predict_bad_image(w: Work):
    clf = w.root / "clf.safetensors"
    build = run([*VLP, "zeroshot", "build", "--model", w.export(), "--classnames", w.data / "test" / "classnames.txt",
                 "--templates", "simple", "-o", clf, "--device", "cpu"])
    good = w.root / "good.jpg"
    good.write_bytes(demo_images(w, "unlabeled", 1)[0][1]["jpg"])
    broken = w.root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    proc = run([*VLP, "zeroshot", "predict", "--model", w.export(), "--classifier", clf, "--device", "cpu",
                "--topk", "1", broken, good])
    classified = str(good) in proc.stdout and "unreadable image" in proc.stdout
    return build.returncode == 0 and proc.returncode == 1 and classified, \
        f"exit {proc.returncode}; good image classified, bad one reported: {classified}"


@case("7 retrieval on an empty shard", "error, non-zero exit (no NaN)")
def retrieval_empty(w: Work):
    empty = w.root / "empty-ret"
    empty.mkdir()
    tarfile.open(empty / "e-000000.tar", "w").close()
    proc = run([*VLP, "eval", "--model", w.export(), "--task", "retrieval", "--data", empty, "--device", "cpu"])
    nan = "nan" in proc.stdout.lower()
    return proc.returncode != 0 and not nan, f"exit {proc.returncode}; NaN printed: {nan}; {tail(proc)[:60]}"


@case("7 disk full while checkpointing", "exit 5, one line, no partial checkpoint left")
def disk_full(w: Work):
    run_dir = w.root / "full"

    def limit_file_size():  # writes past 64 KiB fail with EFBIG, as they fail with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = run([*TRAIN, "--config", w.config("full")], preexec_fn=limit_file_size)
    leftovers = list((run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").exists() else []
    return proc.returncode == 5 and not leftovers and "could not write checkpoint" in tail(proc), \
        f"exit {proc.returncode}; left in checkpoints/: {len(leftovers)}; {tail(proc)[:60]}"


@case("30 export into a folder whose manifest lists files outside it", "refused naming them; nothing removed")
def export_manifest_outside(w: Work):
    victim = w.root / "victim.txt"
    victim.write_text("keep me")
    (w.root / "victim-dir").mkdir(exist_ok=True)
    (w.root / "victim-dir" / "v.txt").write_text("keep me")
    out = w.root / "manifest-out"
    out.mkdir()
    (out / "link").symlink_to(w.root / "victim-dir")
    (out / ".vlp-export.json").write_text(json.dumps({"files": [str(victim), "../victim.txt", "link/v.txt"]}))
    proc = run([*VLP, "export", "--checkpoint", w.trained(), "--out", out])
    kept = victim.exists() and (w.root / "victim-dir" / "v.txt").exists()
    named = "lists paths vlp never writes" in proc.stderr
    return proc.returncode == 1 and kept and named, f"exit {proc.returncode}; files outside kept: {kept}; " \
        f"named: {named}"


@case("30 1x1,000,000 PNG in an eval shard", "skipped before any resize; eval under 2 GB, exit 0")
def thin_image_eval(w: Work):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1_000_000)).save(buf, format="PNG", optimize=True)
    thin = w.root / "thin-test"
    shutil.copytree(w.data / "test", thin, ignore=shutil.ignore_patterns("*.tar", "sizes.json"))
    images = demo_images(w, "labeled", 8)
    samples = [{"__key__": k, "jpg": m["jpg"], "cls": m["cls"]} for k, m in images]
    samples.insert(3, {"__key__": "thin", "png": buf.getvalue(), "cls": b"0"})
    write_tar(thin / "thin-000000.tar", samples)
    export = w.export()
    peak = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(code)")  # the eval's own peak memory, apart from the other cases' processes
    t0 = time.time()
    proc = run([sys.executable, "-c", peak, *VLP, "eval", "--model", export, "--task", "zeroshot", "--data", thin,
                "--device", "cpu"])
    took = time.time() - t0
    said = "too thin" in proc.stderr
    rss = int(proc.stderr.split("peak_rss_kb")[-1].split()[0]) / 2**20 if "peak_rss_kb" in proc.stderr else -1
    return proc.returncode == 0 and said and 0 < rss < 2, f"exit {proc.returncode} in {took:.0f} s, peak " \
        f"{rss:.2f} GB (tar {len(buf.getvalue()) // 1024} KB); reason shown: {said}"


@case("30 classnames.txt with a duplicate or a blank line", "verify and the writer fail naming the lines")
def bad_classnames(w: Work):
    lab = w.root / "dup-lab"
    shutil.copytree(w.data / "labeled", lab)
    names = (lab / "classnames.txt").read_text().splitlines()
    exits, named = [], 0
    for text, expected in (("\n".join(names[:-1] + [names[0]]) + "\n", "repeats line 1"),
                           ("\n".join(names[:2] + [""] + names[2:-1]) + "\n", "line 3 is blank")):
        (lab / "classnames.txt").write_text(text)
        proc = run([*VLP, "shards", "verify", lab])
        exits.append(proc.returncode)
        named += expected in proc.stderr
    folder = w.root / "dup-folder"
    for cls in ("cat", "cat "):
        (folder / cls).mkdir(parents=True)
        (folder / cls / "a.jpg").write_bytes(demo_images(w, "unlabeled", 1)[0][1]["jpg"])
    written = run([*VLP, "shards", "folder", folder, w.root / "dup-out"])
    exits.append(written.returncode)
    named += "repeats line 1" in written.stderr
    nothing = not list((w.root / "dup-out").glob("*.tar")) if (w.root / "dup-out").exists() else True
    return all(exits) and named == 3 and nothing, f"exits {'/'.join(map(str, exits))}; lines named " \
        f"{named}/3; shards written: {not nothing}"


@case("30 Ctrl-C during vlp shards folder over a dataset", "old dataset whole, exit 130")
def ctrl_c_shards_folder(w: Work):
    folder = w.root / "sigint-folder"
    for i, (key, members) in enumerate(demo_images(w, "labeled", 12)):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 3}" / f"{key}.jpg").write_bytes(members["jpg"])
    out = w.root / "sigint-out"
    first = run([*VLP, "shards", "folder", folder, out, "--maxcount", "2"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    os.mkfifo(folder / "c2" / "zz-last.jpg")  # holds the rewrite before its swap until signalled
    proc = subprocess.Popen([str(c) for c in [*VLP, "shards", "folder", folder, out, "--maxcount", "1"]], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    staged = out / ".shard.writing" / "shard-000000.tar"
    deadline = time.time() + 120
    while not staged.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    whole = {p.name: p.read_bytes() for p in out.iterdir()} == before
    return first.returncode == 0 and code == 130 and whole and len(before) > 3, \
        f"exit {code}; old dataset ({len(before)} files) unchanged: {whole}"


@case("30 zero-shot classifier of 2,500 classes", "a progress line per 1,000 classes")
def zeroshot_progress(w: Work):
    names = w.root / "many-classes.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(2500)))
    proc = run([*VLP, "zeroshot", "build", "--model", w.export(), "--classnames", names, "--templates", "simple",
                "-o", w.root / "many.safetensors", "--device", "cpu"])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("zero-shot classifier: ")]
    return proc.returncode == 0 and len(lines) == 3, f"exit {proc.returncode}; progress lines: {len(lines)}" + \
        (f" (last: {lines[-1][22:].split(', ~')[0]})" if lines else "")


@case("30 kill -9 of the trainer (2 DataLoader workers), --resume auto at once", "resume not refused; finishes")
def sigkill_resume_at_once(w: Work):
    run_dir = w.root / "killed"
    cfg = w.config("killed", data={"workers": 2}, train={"steps": 12, "save_every": 4, "progress": False})
    proc = subprocess.Popen([str(c) for c in [*TRAIN, "--config", cfg]], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: step_of(run_dir), proc)
    os.kill(proc.pid, signal.SIGKILL)  # the main pid only: its workers are left to the OS
    proc.wait()
    killed_at = step_of(run_dir)
    resumed = run([*TRAIN, "--config", cfg, "--resume", "auto"])
    final = step_of(run_dir)
    return resumed.returncode == 0 and killed_at and final == 12, \
        f"killed after step {killed_at}; resume exit {resumed.returncode} at step {final}: {tail(resumed)[:50]}"


@case("30 a stream that sends nothing (2 DataLoader workers)",
      "exit 7 naming data.timeout_s; SIGTERM: exit 143; kill -9: workers gone, folder free")
def stalled_stream(w: Work):
    from vlp.data.mixing import live_children

    timed = run([*TRAIN, "--config", stalled_config(w, "stall-timeout", timeout_s=5)], timeout=240)
    proc = start_stalled(w, "stall-term")
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.time()
    code = proc.wait(timeout=120)
    took = time.time() - t0
    kill_group(proc)
    proc = start_stalled(w, "stall-kill")
    workers = live_children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # the workers get SIGKILL the moment the trainer dies; the second is for this report's check
    alive = [p for p in workers if running(p)]
    again = run([*TRAIN, "--config", w.root / "stall-kill.yaml", "data.timeout_s=2", "--resume", "auto"])
    kill_group(proc)
    ok = timed.returncode == 7 and "data.timeout_s" in tail(timed) and code == 143 and workers and not alive
    return ok and again.returncode == 7, f"timeout: exit {timed.returncode}; SIGTERM: exit {code} after " \
        f"{took:.0f} s; kill -9: {len(alive)}/{len(workers)} workers left, resume exit {again.returncode} (4: busy)"


@case("30 corrupt latest checkpoint: export, eval, keep_last=1 resume",
      "export and eval use the previous one; pruning keeps the good one")
def corrupt_latest_readers(w: Work):
    from vlp import checkpoint as ckpt_io

    run_dir = w.root / "corrupt-readers"
    shutil.copytree(w.trained(), run_dir)
    weights = ckpt_io.list_checkpoints(run_dir)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    ex = run([*VLP, "export", "--checkpoint", run_dir, "--out", w.root / "corrupt-export"])
    ev = run([*VLP, "eval", "--model", run_dir, "--task", "zeroshot", "--data", w.data / "test", "--device", "cpu",
              "--max-samples", "20"])
    tr = run([*TRAIN, "--config", w.config("corrupt-readers"), "train.steps=3", "train.save_every=1",
              "train.keep_last=1", "--resume", "auto"])
    kept = [p.name for p in ckpt_io.list_checkpoints(run_dir)]
    return ex.returncode == ev.returncode == tr.returncode == 0 and kept == ["step_00000003"], \
        f"export exit {ex.returncode}, eval exit {ev.returncode}, resume exit {tr.returncode}; checkpoints kept: {kept}"


@case("30 resume with another model", "exit 2, one line naming both models")
def resume_other_model(w: Work):
    run_dir = w.root / "other-model"
    shutil.copytree(w.trained(), run_dir)
    proc = run([*TRAIN, "--config", w.config("other-model"), "model.name=vlp-tiny-vit", "train.steps=5",
                "--resume", "auto"])
    return proc.returncode == 2 and "another model" in tail(proc) and "falling back" not in proc.stderr, \
        f"exit {proc.returncode}: {tail(proc)[:90]}"


def stalled_config(w: Work, name: str, **data) -> Path:
    """A run whose unlabeled stream is a `pipe:` command that sends nothing and ignores SIGTERM (a hung mount, a
    stalled curl); each worker that starts it leaves a file in ROOT/NAME-started/."""
    started = w.root / f"{name}-started"
    started.mkdir(exist_ok=True)
    return w.config(name, data={"workers": 2, **data, "sources": [
        {"name": "lab", "kind": "labeled", "shards": str(w.data / "labeled" / "*.tar")},
        {"name": "pairs", "kind": "paired", "shards": str(w.data / "paired" / "*.tar")},
        {"name": "unlab", "kind": "unlabeled", "shards": f"pipe:trap '' TERM; touch {started}/$$; exec sleep 300"}]})


def start_stalled(w: Work, name: str) -> subprocess.Popen:
    """Start a stalled run in its own process group; return once both workers are in the stalled command."""
    cfg = stalled_config(w, name)
    proc = subprocess.Popen([str(c) for c in [*TRAIN, "--config", cfg]], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: len(list((w.root / f"{name}-started").iterdir())) >= 2, proc)
    return proc


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(ready: Callable, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen) -> None:
    try:  # the stalled commands, orphaned in the run's process group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run the cases whose name contains this text")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vlp-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"vlp: {' '.join(VLP)}; work folder {root}", flush=True)
    w = Work(root)
    rows = []
    for name, expected, fn in CASES:
        if args.only and args.only not in name:
            continue
        t0 = time.time()
        try:
            ok, observed = fn(w)
        except Exception as err:  # a case that crashes is a failed case, reported like the others
            ok, observed = False, f"{type(err).__name__}: {err}"[:160]
        rows.append({"case": name, "expected": expected, "observed": observed, "pass": bool(ok),
                     "seconds": round(time.time() - t0, 1)})
        print(f"  {'PASS' if ok else 'FAIL'}  {name}  ({rows[-1]['seconds']} s)", flush=True)
    print("\n| case | expected | observed | result |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['expected']} | {r['observed']} | {'pass' if r['pass'] else '**FAIL**'} |")
    print(f"\n{sum(r['pass'] for r in rows)}/{len(rows)} pass")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
