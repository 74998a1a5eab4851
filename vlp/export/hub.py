"""Uploading an export to the Hugging Face Hub."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from vlp.export.clip import _check_no_pickles, relocate_export
from vlp.export.common import CONFIG_NAME, MANIFEST_NAME, _files_under

DEFAULT_COMMIT_MESSAGE = "Upload vlp export"


def _stage_for_hub(out_dir: Path, repo_id: str, stage: Path) -> None:
    """Copy (hard-link where possible) the export with its HF text tower references set to ``repo_id``."""
    for src in out_dir.rglob("*"):
        dst = stage / src.relative_to(out_dir)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.name == CONFIG_NAME and src.parent == out_dir:
            shutil.copyfile(src, dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    relocate_export(stage, ref=repo_id)


def _needs_hub_refs(out_dir: Path, repo_id: str) -> bool:
    path = out_dir / CONFIG_NAME
    if not path.is_file():
        return False
    text_cfg = json.loads(path.read_text()).get("model_cfg", {}).get("text_cfg", {})
    refs = [text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")]
    return any(r and r != repo_id and (os.path.isabs(r) or os.path.isdir(r)) for r in refs)


def push_to_hub(out_dir, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE, endpoint: str | None = None,
                revision: str | None = None) -> str:
    """Create ``repo_id`` if needed (``private`` applies on creation) and upload the export folder as one commit.

    The token defaults to ``$HF_TOKEN`` (then huggingface_hub's own login). An export with a Hugging Face text
    tower is uploaded from a staging copy whose ``hf_model_name`` / ``hf_tokenizer_name`` are ``repo_id``, so
    ``hf-hub:REPO`` loads on any machine. Returns the commit URL.
    """
    from huggingface_hub import HfApi

    out = Path(out_dir)
    if not (out / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{out}: no {CONFIG_NAME}; not an export folder")
    token = token or os.environ.get("HF_TOKEN") or None
    manifest = out / MANIFEST_NAME  # push what the export wrote, never files beside it (a run's checkpoints)
    allow = json.loads(manifest.read_text())["files"] if manifest.is_file() else None
    _check_no_pickles(out, _files_under(out) - set(allow) if allow is not None else frozenset())
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if _needs_hub_refs(out, repo_id):
        with tempfile.TemporaryDirectory(prefix="vlp-export-") as tmp:
            stage = Path(tmp) / out.name
            stage.mkdir()
            _stage_for_hub(out, repo_id, stage)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(stage), commit_message=commit_message,
                                     token=token, revision=revision, repo_type="model", allow_patterns=allow)
    else:
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message=commit_message,
                                 token=token, revision=revision, repo_type="model", allow_patterns=allow)
    return getattr(info, "commit_url", None) or str(info)
