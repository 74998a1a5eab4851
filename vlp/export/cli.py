"""``vlp export``: a run directory or checkpoint -> export folder (-> Hub)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlp.export.card import card_from_run
from vlp.export.clip import export_model
from vlp.export.hub import DEFAULT_COMMIT_MESSAGE, push_to_hub
from vlp.export.vision import export_vision_tower

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint, out_dir, *, repo_id: str | None = None, push: bool = False, private: bool = False,
                      vision_only: bool = False, license: str | None = None, weights: str = "student",
                      ema: bool = False, timm_format: bool | None = None, overwrite: bool = False,
                      commit_message: str = DEFAULT_COMMIT_MESSAGE) -> Path:
    """Export a run directory (its latest checkpoint) or a checkpoint folder; returns the folder.

    ``repo_id``: the Hub repo named in the card's how-to-load snippet; ``push``: also upload there. ``weights``:
    ``"student"`` (the trained weights) or ``"teacher"`` (the momentum teacher, see
    ``vlp.checkpoint.clip_state_dict``); ``ema=True`` is ``weights="teacher"``."""
    if push and not repo_id:
        raise ValueError("push=True needs a repo_id")
    from vlp.checkpoint import clip_state_dict, read_run_config, read_run_info, readable_checkpoint, teacher_file
    from vlp.models.factory import create_clip, run_clip_options

    ckpt = readable_checkpoint(checkpoint)  # a run whose latest checkpoint is corrupt: the newest readable one
    cfg = read_run_config(ckpt)
    info = read_run_info(ckpt)
    model, model_cfg, _ = create_clip(cfg.model.name, pretrained_text=False, **run_clip_options(cfg))
    weights = "teacher" if ema else weights
    model.load_state_dict(clip_state_dict(ckpt, weights=weights), strict=True)
    model.eval()
    card = card_from_run(cfg, info, license=license, repo_id=repo_id)
    card["training"]["checkpoint"] = ckpt.name
    card["training"]["exported weights"] = "student" if weights == "student" else (
        f"momentum teacher ({teacher_file(ckpt).name}: EMA of the student; evaluation metrics are the student's)")
    if vision_only:
        from vlp.checkpoint import model_state_dict

        head = model_state_dict(ckpt).get("classifier.fc.weight", model_state_dict(ckpt).get("classifier.weight"))
        if head is not None:
            log.info("vision export: the supervised head (classifier, %d classes) is not exported; the exported "
                     "tower's head is the CLIP projection (%d outputs)", head.shape[0], model_cfg["embed_dim"])
        out = export_vision_tower(model, model_cfg, out_dir, card=card, timm_format=timm_format, overwrite=overwrite)
    else:
        out = export_model(model, model_cfg, out_dir, card=card, overwrite=overwrite)
    if push:
        url = push_to_hub(out, repo_id, private=private, commit_message=commit_message)
        log.info("pushed %s to %s: %s", out, repo_id, url)
    return out


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a run or checkpoint to open_clip / Hugging Face Hub format",
        description="Write a trained model as an open_clip export (safetensors, open_clip_config.json, README.md "
                    "model card), optionally push it to the Hugging Face Hub.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|CKPT", help="a run directory or checkpoint")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="export folder (created; a previous export there is replaced; other files need --overwrite)")
    p.add_argument("--push", metavar="REPO_ID", help="also upload to this Hub repo (token: $HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--vision-only", action="store_true", help="export the image tower alone (open_clip + timm)")
    p.add_argument("--no-timm", action="store_true", help="with --vision-only: skip the timm copy")
    p.add_argument("--weights", choices=("student", "teacher"), default="student",
                   help="student: the trained weights (default); teacher: the momentum teacher (EMA) of runs with one")
    p.add_argument("--ema", dest="weights", action="store_const", const="teacher", help=argparse.SUPPRESS)
    p.add_argument("--license", default=None, help="license in the model card (default: other)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    p.set_defaults(func=export_cli)


def export_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_checkpoint(args.checkpoint, args.out, repo_id=args.push, vision_only=args.vision_only,
                                license=args.license, weights=args.weights,
                                timm_format=False if args.no_timm else None, overwrite=args.overwrite)
        print(f"exported {args.checkpoint} -> {out}")
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 1
    if args.push:
        try:
            url = push_to_hub(out, args.push, private=args.private, commit_message=args.commit_message)
        except Exception as err:  # offline, no token, refused, network: huggingface_hub and httpx raise many types
            reason = " ".join(str(err).split()) or type(err).__name__
            print(f"export error: push to {args.push} failed ({reason}); the export is written in {out}",
                  file=sys.stderr)
            return 1
        print(f"pushed to https://huggingface.co/{args.push}: {url}")
    return 0
