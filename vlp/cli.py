"""The ``vlp`` command: train, demo, config, shards, eval, zeroshot, export, plot."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from vlp.models.factory import REPO_ROOT


def _cmd_train(args) -> int:
    from vlp.train import run

    return run(args)


def _demo_config() -> Path:
    for base in (Path.cwd(), REPO_ROOT):
        if (base / "configs" / "demo.yaml").is_file():
            return base / "configs" / "demo.yaml"
    raise FileNotFoundError("configs/demo.yaml not found (run from the vlp checkout)")


def _cmd_demo(args) -> int:
    """Write the digits shards, train configs/demo.yaml, print held-out zero-shot top-1, export."""
    import logging

    from vlp.config import load_config
    from vlp.demo import write_demo_shards
    from vlp.train import Trainer

    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    out = Path(args.output_dir)
    if not args.resume and (out / "checkpoints").is_dir():  # the demo's own earlier run: start it afresh
        import shutil

        print(f"demo: replacing the previous demo run in {out} (pass --resume auto to continue it instead)")
        for name in ("checkpoints", "tb"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    counts = write_demo_shards(out / "data")
    print(f"demo data: {counts} images written to {out / 'data'}")
    overrides = [f"output_dir={out}", *(f"{k}" for k in args.overrides)]
    cfg = load_config(_demo_config(), overrides, check_files=False)
    for src in cfg.data.sources:
        src.shards = src.shards.replace("runs/demo", str(out))
    cfg.eval.zeroshot.shards = cfg.eval.zeroshot.shards.replace("runs/demo", str(out))
    trainer = Trainer(cfg, resume=args.resume)
    result = trainer.fit()
    if trainer._stop_signal:
        print(f"demo stopped by signal {trainer._stop_signal} at step {trainer.step} (checkpointed; "
              f"vlp demo --resume auto continues)")
        return 128 + int(trainer._stop_signal)
    top1 = result.get("zeroshot/top1")
    print(f"zero-shot top-1 on {counts['test']} held-out digits: {100 * top1:.1f}% (chance 10%)")
    export_dir = out / "export"
    from vlp.export import export_checkpoint

    export_checkpoint(out, export_dir)
    print(f"export written to {export_dir} (load with open_clip.create_model_and_transforms('local-dir:{export_dir}'))")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


def _cmd_plot(args) -> int:
    from vlp.plot import plot_run

    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def _cmd_config(args) -> int:
    """``vlp config --schema`` (the key reference, Markdown; ``--json``: JSON Schema) or ``vlp config FILE
    [key=value ...]`` (the validated config, every default filled in)."""
    import json
    import yaml

    if args.schema or args.json:
        from vlp.schema import config_reference, json_schema

        print(json.dumps(json_schema(), indent=1) if args.json else config_reference(), end="")
        return 0
    if not args.config:
        raise ValueError("vlp config: give a config file to check, or --schema")
    from vlp.config import load_config

    cfg = load_config(args.config, args.overrides, check_files=not args.no_files)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def paper_of(module_doc: str) -> str:
    """The citation an objective's module docstring opens with: its first parenthesis naming a year
    (``SimCLR (Chen et al. 2020, "A Simple Framework ...")``), else the docstring's first sentence."""
    import re

    doc = " ".join((module_doc or "").split())
    found = re.search(r"\(([^()]*\b(?:19|20)\d\d\b[^()]*)\)", doc)
    return found.group(1) if found else doc.split(". ")[0].rstrip(".")


def _cmd_objectives(args) -> int:
    """``vlp objectives``: every registered objective (``objectives.<name>`` in a run config), its module, the rows it
    trains on by default (``any``: every row of the step), whether it uses the momentum teacher, and its paper."""
    import importlib

    from vlp.objectives import OBJECTIVES

    rows = []
    for name, cls in sorted(OBJECTIVES.items()):
        module = importlib.import_module(cls.__module__)
        field = cls.Config.model_fields.get("kinds")  # rows the user picks (this default), or the class's fixed ones
        kinds = field.get_default(call_default_factory=True) if field else getattr(cls, "kinds", ())
        rows.append((name, cls.__module__, ",".join(kinds) or "any",
                     "yes" if getattr(cls, "uses_teacher", False) else "no", paper_of(module.__doc__)))
    head = ("objective", "module", "rows", "teacher", "paper")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for row in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="Vision-language pretraining on mixed data.")
    sub = parser.add_subparsers(dest="command", required=True)

    from vlp.train import build_parser as train_parser

    p = sub.add_parser("train", help="train from a YAML config (same as accelerate launch -m vlp.train)")
    train_parser(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="embedded demo: digits shards -> mixed training -> zero-shot -> export")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--resume", default=None)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plot", help="write a run's loss curves as a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/losses.png)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("config", help="the run-config key reference (--schema), or check a config file")
    p.add_argument("config", nargs="?", help="a YAML run config to validate and print with every default")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--schema", action="store_true", help="print every key, its type, default and meaning (Markdown)")
    p.add_argument("--json", action="store_true", help="print the JSON Schema of the run config")
    p.add_argument("--no-files", action="store_true", help="do not check that the shards exist")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("objectives", help="every training objective, its default rows and its paper")
    p.set_defaults(func=_cmd_objectives)

    from vlp.shards import register_cli as shards_cli
    from vlp.eval.cli import register_cli as eval_cli

    shards_cli(sub)
    eval_cli(sub)
    try:
        from vlp.export import register_cli as export_cli
    except ImportError:  # pragma: no cover - during development only
        export_cli = None
    if export_cli:
        export_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlp.train import parse_args

    args = parse_args(build_parser(), argv)
    from vlp.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
