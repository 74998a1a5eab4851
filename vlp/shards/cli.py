"""``vlp shards {folder,captions,tags,hf,inspect,verify}``: the offline shard tooling's command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from vlp.data.format import KINDS
from vlp.shards.inspect import inspect_shards, verify_shards
from vlp.shards.readers import write_captions, write_hf_dataset, write_image_folder, write_tags


def _print_written(result: dict) -> None:
    print(f"wrote {result['num_samples']} {result['kind']} samples in {len(result['shards'])} shard(s) to {result['out_dir']}")
    if result.get("classnames") is not None:
        print(f"{len(result['classnames'])} classes -> classnames.txt, class_counts.json")
    if result["num_skipped"]:
        print(f"skipped {result['num_skipped']}:")
        for source, reason in result["skipped"][:20]:
            print(f"  {source}: {reason}")
        if result["num_skipped"] > 20:
            print(f"  ... and {result['num_skipped'] - 20} more")


def _write_options(args: argparse.Namespace) -> dict[str, Any]:
    """The writers' shared keywords, from :func:`_add_write_options`' flags."""
    return dict(prefix=args.prefix, maxcount=args.maxcount, shuffle_seed=args.seed, image_size=args.image_size,
                resize_mode=args.resize_mode)


def _cmd_folder(args: argparse.Namespace) -> int:
    _print_written(write_image_folder(args.root, args.out, kind=args.kind, **_write_options(args)))
    return 0


def _cmd_captions(args: argparse.Namespace) -> int:
    _print_written(write_captions(args.table, args.out, image_col=args.image_col, caption_col=args.caption_col,
                                  image_root=args.image_root, **_write_options(args)))
    return 0


def _cmd_tags(args: argparse.Namespace) -> int:
    _print_written(write_tags(args.list, args.out, classnames=args.classnames, image_root=args.image_root,
                              **_write_options(args)))
    return 0


def _cmd_hf(args: argparse.Namespace) -> int:
    _print_written(write_hf_dataset(args.dataset, args.out, image_col=args.image_col, label_col=args.label_col,
                                    caption_col=args.caption_col, split=args.split, **_write_options(args)))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_shards(args.spec, n_preview=args.preview)  # FileNotFoundError (-> exit 2) for missing shards
    if args.json:
        print(json.dumps(info, indent=1))
        return 0 if info["num_shards"] else 1
    print(f"shards:  {info['num_shards']}")
    print(f"samples: {info['num_samples']}" + (
        f" (sizes.json: {info['sizes_json_total']})" if info["sizes_json_total"] is not None else " (no sizes.json)"))
    if info["num_classes"] is not None:
        print(f"classes: {info['num_classes']} (classnames.txt)")
    print("keys:    " + ", ".join(f"{k}={n}" for k, n in info["keys"].items()))
    for item in info["preview"]:
        extra = "".join(f" {k}={item[k]!r}" for k in ("cls", "caption", "image_size") if k in item)
        print(f"  {item['shard']} {item['key']} [{','.join(item['keys'])}]{extra}")
    for shard, error in info["errors"]:
        print(f"error: {shard}: {error}")
    return 0 if info["num_shards"] and not info["errors"] else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    result = verify_shards(args.spec, kind=args.kind, classnames=args.classnames)
    print(
        f"shards: {result['num_shards']}  samples: {result['total']}  ok: {result['ok']}  "
        f"bad: {result['bad']}  shard errors: {result['shard_errors']}  "
        f"kind: {result['kind']}{' (guessed; set --kind)' if result['kind_guessed'] else ''}"
    )
    if result["reasons"]:
        print("bad by reason: " + ", ".join(f"{r}={n}" for r, n in result["reasons"].items()))
    for shard, key, reason in result["bad_samples"]:
        print(f"  {shard} {key if key is not None else '-'}: {reason}")
    return 0 if result["clean"] else 1


def _add_write_options(p: argparse.ArgumentParser, seed_default: int | None) -> None:
    p.add_argument("--prefix", default="shard", help="shard names PREFIX-000000.tar (default: shard)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--seed", type=int, default=seed_default,
                   help=f"shuffle seed before writing (default: {seed_default}; -1 keeps order)")
    p.add_argument("--image-size", type=int, default=None, help="resize images (with --resize-mode) to this size")
    p.add_argument("--resize-mode", choices=("no", "border", "keep_ratio", "center_crop"), default=None,
                   help="img2dataset's modes: keep_ratio (smaller side = size), center_crop (then the centre "
                        "square), border (larger side = size, white padding to a square), no (default; "
                        "with --image-size alone: keep_ratio)")


def _seed(value: int | None) -> int | None:
    return None if value is None or value < 0 else value


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``shards {folder,captions,tags,hf,inspect,verify}`` to a CLI's subparsers; each sets ``func(args) -> int``."""
    shards = subparsers.add_parser("shards", help="write, inspect and verify WebDataset shards",
                                   description="Write, inspect and verify WebDataset tar shards.")
    sub = shards.add_subparsers(dest="shards_command", metavar="{folder,captions,tags,hf,inspect,verify}")
    sub.required = True

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            if hasattr(args, "seed"):
                args.seed = _seed(args.seed)
            if getattr(args, "resize_mode", "") is None:
                args.resize_mode = "keep_ratio" if args.image_size else "no"
            try:
                return fn(args)
            except (ValueError, KeyError, TypeError, OSError) as exn:
                message = exn.args[0] if isinstance(exn, KeyError) and exn.args else exn
                print(f"error: {message}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:  # the writers swap a dataset in whole or not at all
                print("interrupted", file=sys.stderr)
                return 130
        return run

    p = sub.add_parser("folder", help="ImageFolder ROOT/<class>/<image> -> shards")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--kind", choices=("labeled", "unlabeled"), default="labeled")
    _add_write_options(p, 0)
    p.set_defaults(func=wrap(_cmd_folder))

    p = sub.add_parser("captions", help="CSV/TSV/parquet of (image path, caption) -> paired shards")
    p.add_argument("table")
    p.add_argument("out")
    p.add_argument("--image-col", default="image")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--image-root", default=None, help="base for relative image paths (default: the table's folder)")
    _add_write_options(p, None)
    p.set_defaults(func=wrap(_cmd_captions))

    p = sub.add_parser("tags", help="IMAGE<TAB>tag1,tag2 list -> multi-label labeled shards (weak supervision)")
    p.add_argument("--list", required=True, help="lines IMAGE<TAB>tag1,tag2,... (# comments, blank lines skipped)")
    p.add_argument("out")
    p.add_argument("--classnames", default=None,
                   help="class names file, one per line (default: the sorted union of the tags); lines with "
                        "other tags are skipped and listed")
    p.add_argument("--image-root", default=None, help="base for relative image paths (default: the list's folder)")
    _add_write_options(p, 0)
    p.set_defaults(func=wrap(_cmd_tags))

    p = sub.add_parser("hf", help="datasets.save_to_disk folder -> labeled / paired / unlabeled shards")
    p.add_argument("dataset")
    p.add_argument("out")
    p.add_argument("--split", default=None)
    p.add_argument("--image-col", default="image")
    p.add_argument("--label-col", default=None, help="-> labeled shards")
    p.add_argument("--caption-col", default=None, help="-> paired shards")
    _add_write_options(p, 0)
    p.set_defaults(func=wrap(_cmd_hf))

    p = sub.add_parser("inspect", help="summarize shards (SPEC: braces, '::' between specs, or a folder)")
    p.add_argument("spec")
    p.add_argument("--preview", type=int, default=3, help="samples to preview (default: 3)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=wrap(_cmd_inspect))

    p = sub.add_parser("verify", help="judge every sample as training would; exit 1 if any is bad or a shard is damaged")
    p.add_argument("spec")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="judge as a training source of this kind (default: guessed for the dataset from its first samples)")
    p.add_argument("--classnames", default=None,
                   help="class names file (default: classnames.txt beside the shards or one folder up)")
    p.set_defaults(func=wrap(_cmd_verify))
    return shards
