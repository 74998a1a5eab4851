"""``vlp zeroshot build|predict`` and ``vlp eval`` (any task of :data:`vlp.eval.tasks.EVAL_TASKS`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlp.eval.data import find_classnames, find_templates
from vlp.eval.tasks import EVAL_TASKS, evaluate, get_eval_task
from vlp.eval.zeroshot import build_classifier, load_classifier, predict, save_classifier


def normalize_task(task: str | None, data=None) -> str:
    """The registered name of ``task`` (an alias, any case, or ``auto``/``None``: by ``dataset_type.txt``)."""
    return get_eval_task(task, data).name


# ---------------------------------------------------------------------------------------------- commands


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def cmd_eval(args) -> int:
    from vlp.models.factory import load_clip

    device = args.device or _default_device()
    model, _, tokenizer, preprocess = load_clip(args.model, device=device)
    task = normalize_task(args.task, args.data)
    metrics = evaluate(
        model, tokenizer, preprocess, task, args.data, classnames=args.classnames, templates=args.templates,
        classifier=args.classifier, batch_size=args.batch_size, workers=args.workers,
        max_samples=args.max_samples, device=device, train_data=args.train_data,
        test_fraction=args.test_fraction, seed=args.seed, k=args.k, T=args.temperature, C=args.C)
    print(format_table([("task", task), ("model", str(args.model)), ("data", str(args.data))]
                       + [(name, _fmt(v)) for name, v in metrics.items()]))
    if args.output:
        out = Path(args.output)
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
        result = {"task": task, "model": str(args.model), "data": str(args.data), "metrics": metrics}
        if args.train_data:
            result["train_data"] = str(args.train_data)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def cmd_zeroshot_build(args) -> int:
    from vlp.models.factory import load_clip

    device = args.device or _default_device()
    model, _, tokenizer, _ = load_clip(args.model, device=device)
    classnames = find_classnames(args.data, args.classnames)
    templates = find_templates(args.data, args.templates)
    weights = build_classifier(model, tokenizer, classnames, templates, device)
    save_classifier(args.output, weights, classnames, templates)
    print(f"wrote {args.output}: {len(classnames)} classes x {len(templates)} templates, "
          f"embed_dim {weights.shape[0]}")
    return 0


def image_files(paths) -> list[str]:
    """``paths`` with each folder replaced by the image files under it (any depth, sorted; by extension)."""
    from vlp.data.format import IMAGE_KEYS

    out = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower()[1:] in IMAGE_KEYS)
            if not found:
                raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_KEYS)}) in this folder")
            out += found
        else:
            out.append(str(path))
    return out


def cmd_zeroshot_predict(args) -> int:
    from vlp.models.factory import load_clip

    try:
        images = image_files(args.images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    device = args.device or _default_device()
    model, _, _, preprocess = load_clip(args.model, device=device)
    weights, classnames, _ = load_classifier(args.classifier)
    errors: dict[str, str] = {}
    results = predict(model, preprocess, weights, classnames, images, k=args.topk, device=device,
                      logit_scale=args.logit_scale, errors=errors)
    if args.json:
        print(json.dumps([{"image": path, **({"error": errors[path]} if top is None else
                                             {"top": [{"class": name, "prob": p} for name, p in top]})}
                          for path, top in zip(images, results)], indent=1))
    else:
        for path, top in zip(images, results):
            print(path)
            if top is None:
                print(f"  unreadable image: {errors[str(path)]}")
                continue
            width = max(len(name) for name, _ in top)
            for name, p in top:
                print(f"  {name.ljust(width)}  {p:.4f}")
    if errors:
        print(f"error: {len(errors)} of {len(results)} images could not be read", file=sys.stderr)
    return 1 if errors else 0


def _task_arg(value: str) -> str:
    """``--task``: the registered name of an alias; an unknown name fails with one line listing the known."""
    if value.lower() == "auto":
        return "auto"
    try:
        return get_eval_task(value).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register_cli(subparsers) -> None:
    """Add ``zeroshot build``, ``zeroshot predict`` and ``eval`` to the ``vlp`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="export folder, run directory or checkpoint folder")
    common.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")

    zs = subparsers.add_parser("zeroshot", help="zero-shot classifiers: build from prompts, predict images")
    zs_sub = zs.add_subparsers(dest="zeroshot_command")
    zs.set_defaults(func=lambda args: (zs.print_help(), 2)[1])

    b = zs_sub.add_parser("build", parents=[common], help="build a classifier from class names and templates")
    b.add_argument("--classnames", default=None, help="file with one class name per line")
    b.add_argument("--templates", default=None,
                   help="file with one template per line ({c} placeholder) or preset: openai_imagenet, simple, "
                        "photo")
    b.add_argument("--data", default=None, help="shards whose classnames.txt / templates file to use")
    b.add_argument("-o", "--output", required=True, help="classifier .safetensors")
    b.set_defaults(func=cmd_zeroshot_build)

    p = zs_sub.add_parser("predict", parents=[common], help="top-k classes of image files")
    p.add_argument("--classifier", required=True, help=".safetensors from `vlp zeroshot build`")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--logit-scale", type=float, default=None,
                   help="softmax temperature multiplier (default: the model's logit_scale, else 100)")
    p.add_argument("--json", action="store_true",
                   help='print a JSON list: {"image", "top": [{"class", "prob"}]} or {"image", "error"} per image')
    p.add_argument("images", nargs="+", help="image files and folders (their images, any depth)")
    p.set_defaults(func=cmd_zeroshot_predict)

    names = ", ".join(EVAL_TASKS)
    e = subparsers.add_parser("eval", parents=[common], help=f"evaluate: {names}")
    e.add_argument("--task", default="auto", type=_task_arg, choices=[*EVAL_TASKS, "auto"], metavar="TASK",
                   help="; ".join(f"{t.name}: {t.help}" if t.help else t.name for t in EVAL_TASKS.values())
                   + "; auto (default): from the shards, dataset_type.txt else the first sample: labels -> zeroshot, "
                        "captions -> retrieval (aliases accepted, e.g. linear-probe)")
    e.add_argument("--data", required=True, help="shards: folder, tar, brace pattern; several joined by ::")
    e.add_argument("--train-data", default=None,
                   help="train shards for " + ", ".join(t.name for t in EVAL_TASKS.values() if t.uses_train_data))
    e.add_argument("--classnames", default=None)
    e.add_argument("--templates", default=None)
    e.add_argument("--classifier", default=None, help="a saved zero-shot classifier instead of prompts")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--max-samples", type=int, default=None)
    e.add_argument("--test-fraction", type=float, default=0.2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--k", type=int, default=20, help="kNN neighbours")
    e.add_argument("--temperature", type=float, default=0.07, help="kNN temperature")
    e.add_argument("--C", type=float, default=1.0, help="linear-probe inverse regularization")
    e.add_argument("--output", "-o", default=None, help="results JSON")
    e.set_defaults(func=cmd_eval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlp")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
