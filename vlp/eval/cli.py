"""``vlp zeroshot build|predict`` and ``vlp eval``, plus :func:`evaluate` for periodic evaluation in training."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from vlp.eval.data import (find_classnames, find_dataset_type, find_templates, labeled_loader,
                           retrieval_loader)
from vlp.eval.probe import extract_features, knn_eval, linear_probe, split_train_test
from vlp.eval.retrieval import retrieval_eval
from vlp.eval.zeroshot import (build_classifier, load_classifier, predict, save_classifier, unwrap,
                               zeroshot_eval)

TASKS = ("zeroshot", "retrieval", "linear-probe", "knn")
_ALIASES = {
    "zeroshot": "zeroshot", "zero-shot": "zeroshot", "zero_shot": "zeroshot",
    "zeroshot_classification": "zeroshot", "classification": "zeroshot",
    "retrieval": "retrieval", "zeroshot_retrieval": "retrieval",
    "linear-probe": "linear-probe", "linear_probe": "linear-probe", "linear": "linear-probe",
    "knn": "knn",
}


def normalize_task(task: str | None, data=None) -> str:
    if task is None or task == "auto":
        kind = find_dataset_type(data) if data is not None else None
        return "retrieval" if kind and "retrieval" in kind else "zeroshot"
    try:
        return _ALIASES[task.lower()]
    except KeyError:
        raise ValueError(f"unknown eval task {task!r}; one of {', '.join(TASKS)}") from None


def _model_device(model) -> torch.device:
    try:
        return next(unwrap(model).parameters()).device
    except StopIteration:
        return torch.device("cpu")


def evaluate(model, tokenizer, preprocess, task: str, data, *, classnames=None, templates=None, classifier=None,
             batch_size: int = 64, workers: int = 0, max_samples: int | None = None, device=None,
             train_data=None, test_fraction: float = 0.2, seed: int = 0, k: int = 20, T: float = 0.07,
             C: float = 1.0, ks=(1, 5, 10)) -> dict:
    """Evaluate ``model`` on shards ``data``; returns the metrics dict.

    - ``zeroshot``: ``classifier`` (a ``[D, C]`` tensor or a saved ``.safetensors``), else one built from
      ``classnames``/``templates`` (found beside the shards when not given) -> ``top1``, ``top5``, ``n``.
    - ``retrieval``: ``image_retrieval_recall@k`` / ``text_retrieval_recall@k`` for ``ks``.
    - ``knn`` / ``linear-probe``: features of ``train_data`` and ``data``, or a ``test_fraction`` split of
      ``data`` -> ``top1``, ``top5``, ``n`` (test samples), ``n_train``.

    The model is put in eval mode and its training mode restored afterwards.
    """
    task = normalize_task(task, data)
    device = torch.device(device) if device is not None else _model_device(model)
    module = unwrap(model)
    was_training = module.training
    module.eval()
    try:
        if task == "zeroshot":
            if classifier is None:
                names = find_classnames(data, classnames)
                temps = find_templates(data, templates)
                weights = build_classifier(module, tokenizer, names, temps, device)
            elif isinstance(classifier, (str, os.PathLike)):
                weights = load_classifier(classifier)[0]
            else:
                weights = classifier
            loader = labeled_loader(data, preprocess, batch_size, workers, max_samples)
            return zeroshot_eval(module, weights, loader, device)
        if task == "retrieval":
            loader = retrieval_loader(data, preprocess, batch_size, workers, max_samples)
            return retrieval_eval(module, tokenizer, loader, device, ks)
        # knn / linear-probe
        feats, labels = extract_features(module, labeled_loader(data, preprocess, batch_size, workers,
                                                                max_samples), device)
        if train_data:
            train_feats, train_labels = extract_features(
                module, labeled_loader(train_data, preprocess, batch_size, workers, max_samples), device)
            test_feats, test_labels = feats, labels
        else:
            train_feats, train_labels, test_feats, test_labels = split_train_test(feats, labels, test_fraction,
                                                                                  seed)
        if task == "knn":
            num_classes = int(max(train_labels.max(), test_labels.max())) + 1
            metrics = knn_eval(train_feats, train_labels, test_feats, test_labels, k=k, T=T,
                               num_classes=num_classes)
        else:
            metrics = linear_probe(train_feats, train_labels, test_feats, test_labels, C=C, seed=seed)
        metrics["n_train"] = int(train_feats.shape[0])
        return metrics
    finally:
        module.train(was_training)


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


def cmd_zeroshot_predict(args) -> int:
    from vlp.models.factory import load_clip

    device = args.device or _default_device()
    model, _, _, preprocess = load_clip(args.model, device=device)
    weights, classnames, _ = load_classifier(args.classifier)
    results = predict(model, preprocess, weights, classnames, args.images, k=args.topk, device=device,
                      logit_scale=args.logit_scale)
    for path, top in zip(args.images, results):
        print(path)
        width = max(len(name) for name, _ in top)
        for name, p in top:
            print(f"  {name.ljust(width)}  {p:.4f}")
    return 0


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
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_zeroshot_predict)

    e = subparsers.add_parser("eval", parents=[common], help="zero-shot, retrieval, linear-probe or kNN evaluation")
    e.add_argument("--task", default="zeroshot", choices=sorted(set(_ALIASES)) + ["auto"], metavar="TASK",
                   help="zeroshot, retrieval, linear-probe, knn, or auto (dataset_type.txt)")
    e.add_argument("--data", required=True, help="shards: folder, tar, brace pattern; several joined by ::")
    e.add_argument("--train-data", default=None, help="train shards for knn / linear-probe")
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
