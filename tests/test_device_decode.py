"""data.decode: device (vlp.data.device_decode): the device recipe against the CPU recipe on real JPEGs and the same
crop boxes, the worker's crop draws against RandomResizedCrop's, the CPU fallback of PNGs and corrupt images with
the same bad-sample counts, exact resume, and real training runs. The device here is the CPU (torchvision's
``decode_jpeg(device="cpu")``); on CUDA the same code runs nvJPEG."""
import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from conftest import run_config, step_metrics
from vlp.config import ConfigError, DataConfig, config_from_dict
from vlp.data.batch import Batch, StreamMeta, ViewGroup, flatten
from vlp.data.device_decode import (DeviceDecoder, DevicePlanner, DeviceRecipe, DeviceRow, PendingImages,
                                    decode_pending, jpeg_ends)
from vlp.data.format import decode_image
from vlp.data.mixing import MixedBatches, make_loader
from vlp.data.transforms import train_transform
from vlp.data.views import view_transform
from vlp.models.factory import create_clip
from vlp.shards import write_samples

SKLEARN_IMAGES = Path(__import__("sklearn.datasets", fromlist=["x"]).__file__).parent / "images"
MODEL_SIZE = 224  # ViT-B/16's input: the size the issue measures
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's (open_clip's default)
STD = (0.26862954, 0.26130258, 0.27577711)
LEVEL = 1 / 255 / min(STD)  # one 8-bit level on normalized pixels (0.0150)


def assert_close(device: torch.Tensor, cpu: torch.Tensor, what="", q999_levels: float | None = None):
    """The tolerance of the device recipe against the CPU recipe (normalized pixels): a mean difference under 0.01
    (measured 0.0018-0.0026), none over 16 levels (Pillow's two rounded 8-bit passes against one float pass differ
    by several levels on a few sharp-edge pixels); ``q999_levels``: 99.9% of the pixels within that many levels."""
    assert device.shape == cpu.shape and device.dtype == cpu.dtype
    diff = (device - cpu).abs().flatten()
    q999 = float(torch.quantile(diff[:2 ** 24], 0.999)) / LEVEL
    assert diff.mean() < 0.01 and diff.max() < 16 * LEVEL, (what, float(diff.mean()), q999, float(diff.max()) / LEVEL)
    assert q999_levels is None or q999 <= q999_levels + 1e-4, (what, q999)


def encode(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Real photographs (scikit-learn's china.jpg and flower.jpg, 640x427 camera JPEGs) as they are, and re-encoded
    at several sizes, aspect ratios, qualities and JPEG variants (grayscale, progressive, 4:4:4, restart markers)."""
    china, flower = (Image.open(SKLEARN_IMAGES / n).convert("RGB") for n in ("china.jpg", "flower.jpg"))
    out = {"china 640x427 (camera file)": (SKLEARN_IMAGES / "china.jpg").read_bytes(),
           "flower 640x427 (camera file)": (SKLEARN_IMAGES / "flower.jpg").read_bytes()}
    out["china 1024x683 q90"] = encode(china.resize((1024, 683), Image.BICUBIC), quality=90)
    out["flower 427x427 square q85"] = encode(flower.crop((100, 0, 527, 427)), quality=85)
    out["china 640x240 wide q95"] = encode(china.crop((0, 100, 640, 340)), quality=95)
    out["flower 200x427 tall q75"] = encode(flower.crop((300, 0, 500, 427)), quality=75)
    out["china 160x107 small q90"] = encode(china.resize((160, 107), Image.LANCZOS), quality=90)
    out["flower 640x427 grayscale"] = encode(flower.convert("L"), quality=90)
    out["china 640x427 progressive"] = encode(china, quality=90, progressive=True)
    out["flower 640x427 4:4:4"] = encode(flower, quality=90, subsampling=0)
    return out


def cpu_recipe(data: bytes, box, flip: bool, transform) -> torch.Tensor:
    """The CPU path on a given box: Pillow's full decode, the crop resized as RandomResizedCrop resizes it, then the
    rest of open_clip's transform (RGB, ToTensor, Normalize)."""
    crop = transform.transforms[0]
    img = TF.resized_crop(decode_image(data), *box, list(crop.size), crop.interpolation, antialias=True)
    if flip:
        img = TF.hflip(img)
    return T.Compose(transform.transforms[1:])(img)


def device_recipe(rows: list[DeviceRow], recipe: DeviceRecipe) -> torch.Tensor:
    pending = PendingImages.pack(recipe, [(r, 0, f"k{i}") for i, r in enumerate(rows)])
    images, failed = decode_pending(pending, "cpu")
    assert failed == []
    return images


def oc_transform(size=MODEL_SIZE, is_train=True, scale=(0.5, 1.0)):
    import open_clip
    from open_clip.transform import AugmentationCfg

    return open_clip.image_transform(size, is_train=is_train, mean=MEAN, std=STD,
                                     aug_cfg=AugmentationCfg(scale=scale))


# ------------------------------------------------------------------------------ (1) device recipe == CPU recipe


def test_device_recipe_equals_the_cpu_recipe_on_the_same_boxes(photos):
    """Every photo, 24 boxes each drawn by RandomResizedCrop.get_params (scale 0.08-1: down- and upscaling), half
    of them flipped: the device recipe (decode_jpeg + crop + antialiased bicubic + round + flip + normalize) against
    Pillow + open_clip's transform pieces. On CPU both decoders are libjpeg-turbo (the same pixels); the resizes
    differ by Pillow's rounding between its two passes."""
    transform = oc_transform(scale=(0.08, 1.0))
    recipe = DeviceRecipe.from_transform(transform)
    torch.manual_seed(0)
    report, worst_mean, worst_max, worst_q = [], 0.0, 0.0, 0.0
    for name, data in photos.items():
        w, h = Image.open(io.BytesIO(data)).size
        rows, expected = [], []
        for k in range(24):
            box = T.RandomResizedCrop.get_params(Image.open(io.BytesIO(data)), [0.08, 1.0], [3 / 4, 4 / 3])
            rows.append(DeviceRow(data, *box, flip=bool(k % 2)))
            expected.append(cpu_recipe(data, box, bool(k % 2), transform))
        got = device_recipe(rows, recipe)
        expected = torch.stack(expected)
        assert got.shape == expected.shape == (24, 3, MODEL_SIZE, MODEL_SIZE) and got.dtype == expected.dtype
        diff = (got - expected).abs()
        q999 = float(torch.quantile(diff.flatten(), 0.999))
        report.append(f"{name:30s} {w:4d}x{h:<4d} mean {diff.mean():.5f} ({diff.mean() / LEVEL:.2f} levels)  "
                      f"99.9% {q999 / LEVEL:.1f}  max {diff.max() / LEVEL:.1f} levels")
        worst_mean, worst_max = max(worst_mean, float(diff.mean())), max(worst_max, float(diff.max()))
        worst_q = max(worst_q, q999)
    print("\n" + "\n".join(report) + f"\nworst: mean {worst_mean:.5f}, 99.9% {worst_q:.4f}, max {worst_max:.4f}")
    # Pillow resizes in two 8-bit passes (rounded and clipped in between, horizontal or vertical first), the device
    # in one float pass: most pixels agree to the level, a few on sharp edges differ by several levels
    assert worst_mean < 0.01, report
    assert worst_q <= 2 * LEVEL + 1e-6, report
    assert worst_max < 16 * LEVEL, report


def test_center_recipe_equals_the_eval_transform(photos):
    """data.augment: false is open_clip's eval transform (Resize short side + CenterCrop): replayed on the device."""
    transform = oc_transform(is_train=False)
    recipe = DeviceRecipe.from_transform(transform)
    assert recipe.kind == "center" and recipe.resize == MODEL_SIZE
    planner = DevicePlanner(recipe)
    for name, data in photos.items():
        row = planner.plan(data)
        got = device_recipe([row], recipe)[0]
        assert_close(got, transform(decode_image(data)), name, q999_levels=2)


def test_mixer_images_on_the_device_match_the_cpu_path_and_views_stay_exact(tmp_path, photos):
    """The whole mixer: data.decode device (then DeviceDecoder on "cpu") against data.decode cpu with full decodes
    (draft_decode false): the same RNG draws give the same crops, so images agree within the recipe tolerance and
    every other field is equal. Rows of a kind with views (unlabeled) stay on the CPU path: bit-identical, views too."""
    photo_list = list(photos.values())
    write_samples(({"__key__": f"p{i}", "jpg": photo_list[i % len(photo_list)], "txt": f"photo {i}"}
                   for i in range(20)), tmp_path / "paired")
    write_samples(({"__key__": f"u{i}", "jpg": photo_list[(i + 3) % len(photo_list)]} for i in range(20)),
                  tmp_path / "unlabeled")
    model, _, tokenizer = create_clip("vlp-test-vit")
    transform = train_transform(model)
    views = [ViewGroup("weak", ("unlabeled",), (view_transform("weak", 32, MEAN, STD),), "weak")]

    def batches(decode: str, n: int = 3) -> list[dict]:
        cfg = DataConfig.model_validate({
            "sources": [{"name": "p", "kind": "paired", "shards": f"{tmp_path}/paired/*.tar"},
                        {"name": "u", "kind": "unlabeled", "shards": f"{tmp_path}/unlabeled/*.tar"}],
            "batch": {"paired": 4, "unlabeled": 2}, "draft_decode": False, "decode": decode, "shuffle_buffer": 5})
        ds = MixedBatches(cfg, transform, tokenizer, seed=3, view_groups=views)
        it, decoder, out = iter(make_loader(ds, 1)), DeviceDecoder(), []
        for _ in range(n):
            batch, meta = next(it)
            if decode == "device":
                assert isinstance(batch.image, PendingImages)
                assert batch.image.device_rows.tolist() == [0, 1, 2, 3]  # paired rows; unlabeled (views) stay
            out.append(flatten(decoder(batch, meta, "cpu"), meta))
        return out

    for cpu, dev in zip(batches("cpu"), batches("device")):
        assert cpu.keys() == dev.keys()
        for k in cpu:
            if k != "image":
                assert torch.equal(cpu[k], dev[k]), k
        assert torch.equal(cpu["image"][4:], dev["image"][4:])  # the CPU-path rows
        assert_close(dev["image"][:4], cpu["image"][:4])


# ------------------------------------------------------------------------------ (2) the worker's crop draws


def test_worker_draws_random_resized_crops_box(photos):
    """Given the same RNG state, the worker's box is RandomResizedCrop.get_params's on the full image (the CPU path's
    own draw with data.draft_decode false), and the flip is RandomHorizontalFlip's next draw."""
    transform = T.Compose([T.RandomResizedCrop(MODEL_SIZE, scale=(0.3, 0.9), ratio=(0.5, 2.0)),
                           T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(MEAN, STD)])
    planner = DevicePlanner(DeviceRecipe.from_transform(transform))
    assert planner.recipe.flip_p == 0.5 and planner.recipe.ratio == (0.5, 2.0)
    data = photos["china 1024x683 q90"]
    flips = []
    for seed in range(200):
        torch.manual_seed(seed)
        row = planner.plan(data)
        torch.manual_seed(seed)
        box = T.RandomResizedCrop.get_params(Image.open(io.BytesIO(data)), [0.3, 0.9], [0.5, 2.0])
        flip = bool(torch.rand(1) < 0.5)
        assert (row.top, row.left, row.height, row.width) == tuple(box) and row.flip == flip
        flips.append(flip)
    assert 70 < sum(flips) < 130


def test_worker_crops_follow_random_resized_crops_distribution(photos):
    """2,000 draws on a 1024x683 image: every box inside the image, its area fraction within scale and its aspect
    ratio within ratio (up to the rounding of its sides), both spread over their ranges."""
    planner = DevicePlanner(DeviceRecipe.from_transform(oc_transform(scale=(0.5, 1.0))))
    data = photos["china 1024x683 q90"]
    W, H = 1024, 683
    torch.manual_seed(1)
    areas, ratios = [], []
    for _ in range(2000):
        r = planner.plan(data)
        assert 0 <= r.top and r.top + r.height <= H and 0 <= r.left and r.left + r.width <= W
        areas.append(r.width * r.height / (W * H))
        ratios.append(r.width / r.height)
    areas, ratios = np.array(areas), np.array(ratios)
    tol = 2 / min(H, W) * 3
    assert areas.min() >= 0.5 - tol and areas.max() <= 1.0 + 1e-9
    assert ratios.min() >= 0.75 * (1 - tol) and ratios.max() <= 4 / 3 * (1 + tol)
    # spread over the range (large areas only come with wide ratios on a 3:2 image: 0.89 at most at 4:3)
    assert areas.min() < 0.55 and areas.max() > 0.85 and 0.6 < np.median(areas) < 0.8
    assert np.log(ratios).min() < math.log(0.8) and np.log(ratios).max() > math.log(1.25)


def test_unsupported_transform_steps_are_config_errors():
    for recipe in ("strong", "randaugment"):
        with pytest.raises(ConfigError, match="data.decode: device: no device version"):
            DeviceRecipe.from_transform(view_transform(recipe, 32, MEAN, STD))
    with pytest.raises(ConfigError, match="only antialiased bicubic or bilinear"):
        DeviceRecipe.from_transform(T.Compose([T.RandomResizedCrop(32, interpolation=T.InterpolationMode.NEAREST),
                                               T.ToTensor(), T.Normalize(MEAN, STD)]))
    with pytest.raises(ConfigError, match="must start with"):
        DeviceRecipe.from_transform(T.Compose([T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)]))


# ------------------------------------------------------------------------------ (3) fallback and bad samples


def test_planner_sends_the_device_only_whole_rgb_jpegs(photos):
    planner = DevicePlanner(DeviceRecipe.from_transform(oc_transform()))
    china = Image.open(io.BytesIO(photos["china 640x427 progressive"])).convert("RGB")
    jpeg = photos["china 640x427 progressive"]
    assert planner.plan(jpeg) is not None
    assert planner.plan(photos["flower 640x427 grayscale"]) is not None  # L: decode_jpeg(mode=RGB) as convert
    assert planner.plan(encode(china, format="PNG")) is None
    assert planner.plan(encode(china, format="WEBP")) is None
    assert planner.plan(encode(china.convert("CMYK"))) is None  # CMYK JPEG: Pillow on the CPU
    assert planner.plan(jpeg[:len(jpeg) // 2]) is None  # truncated: the CPU path counts it
    assert planner.plan(b"\xff\xd8 not a jpeg at all \xff\xd9") is None
    assert planner.plan(jpeg + b"trailer after the end marker") is None  # e.g. a motion photo: Pillow reads it
    assert planner.plan(jpeg + b"\x00" * 10) is not None and jpeg_ends(jpeg + b"\x00" * 10)
    assert planner.plan(encode(china.resize((2000, 30)))) is None  # too thin: the CPU path's ImageShapeError
    state = torch.get_rng_state()
    planner.plan(encode(china, format="PNG"))
    assert torch.equal(state, torch.get_rng_state())  # no draw for a record the CPU path takes


@pytest.fixture
def dirty(tmp_path, photos) -> Path:
    """Paired shards mixing good JPEGs, PNGs, a CMYK JPEG, a truncated and a garbage JPEG, a too-thin image."""
    good = list(photos.values())
    china = Image.open(io.BytesIO(good[0])).convert("RGB").resize((96, 64))
    samples = []
    for i in range(24):
        if i % 6 == 1:
            image = {"png": encode(china.rotate(i), format="PNG")}
        elif i == 4:
            image = {"jpg": good[2][:300]}  # truncated
        elif i == 9:
            image = {"jpg": b"\xff\xd8 garbage, not a jpeg"}
        elif i == 14:
            image = {"jpg": encode(china.convert("CMYK"))}
        elif i == 20:
            image = {"jpg": encode(china.resize((3000, 40)))}  # too thin
        else:
            image = {"jpg": encode(china.rotate(i * 7), quality=80 + i % 15)}
        samples.append({"__key__": f"s{i:02d}", **image, "txt": f"caption {i}"})
    write_samples(samples, tmp_path / "paired", maxcount=8)
    return tmp_path


def take_decoded(root: Path, decode: str, n: int, workers: int, start: int = 0, start_taken=None):
    model, _, tokenizer = create_clip("vlp-test-vit")
    cfg = DataConfig.model_validate({"sources": [{"name": "p", "kind": "paired", "shards": f"{root}/paired/*.tar"}],
                                     "batch": {"paired": 4}, "shuffle_buffer": 0, "resampled": False,
                                     "draft_decode": False, "decode": decode})
    ds = MixedBatches(cfg, train_transform(model), tokenizer, seed=0)
    ds.start_batch, ds.start_taken = start, start_taken or {}
    it, decoder, out = iter(make_loader(ds, workers)), DeviceDecoder(["p"]), []
    for _ in range(n):
        batch, meta = next(it)
        kinds = "pending" if isinstance(batch.image, PendingImages) else "tensor"
        out.append({**flatten(decoder(batch, meta, "cpu"), meta), "_image_type": kinds,
                    "_cpu_rows": batch.image.cpu_rows.tolist() if kinds == "pending" else None})
    return out, ds


@pytest.mark.parametrize("workers", [0, 2])
def test_pngs_and_corrupt_images_fall_back_and_count_as_on_the_cpu_path(dirty, workers):
    """PNG, CMYK, truncated, garbage and too-thin records take the CPU path in the worker: the same bad-sample
    counts and replacements, the same records in the same rows, the same stream positions (taken) as data.decode
    cpu; PNG rows are decoded in the worker, JPEG rows on the device."""
    cpu, _ = take_decoded(dirty, "cpu", 5, workers)
    dev, _ = take_decoded(dirty, "device", 5, workers)
    for run in (cpu, dev):  # truncated, garbage, too thin: the latest count of each worker, summed
        assert sum({int(b["worker"]): int(b["bad"][0]) for b in run}.values()) == 3
    for c, d in zip(cpu, dev):
        for k in ("text", "has_text", "label", "kind", "bad", "taken", "stream"):
            assert torch.equal(c[k], d[k]), k
        assert_close(d["image"], c["image"])
    assert {d["_image_type"] for d in dev} == {"pending"}
    assert any(d["_cpu_rows"] for d in dev)  # PNG / CMYK rows: the worker's CPU path


def test_bad_counts_reasons_match_the_cpu_path(dirty):
    """The per-source reasons the workers count (Source.bad) are the CPU path's, detail included."""
    _, cpu = take_decoded(dirty, "cpu", 5, 0)
    _, dev = take_decoded(dirty, "device", 5, 0)
    assert cpu.sources[0].bad.counts == dev.sources[0].bad.counts == Counter({"corrupt image": 3})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_on_the_device_path(dirty, workers):
    """As test_data's exact-resume test, on the device path: the taken counts resume every stream where it was."""
    start = 3
    fresh, _ = take_decoded(dirty, "device", start + 3, workers)
    taken = {int(b["stream"]): b["taken"].tolist() for b in fresh[:start]}
    assert sum(t[0] for t in taken.values()) > 4 * start  # corrupt images were replaced before the resume point
    resumed, _ = take_decoded(dirty, "device", 3, workers, start=start, start_taken=taken)
    for g, got in enumerate(resumed, start=start):
        for k in ("image", "text", "has_text", "label", "kind", "taken", "stream"):
            assert torch.equal(got[k], fresh[g][k]), (g, k)


def test_a_row_no_decoder_reads_is_counted_and_takes_the_next_row_of_its_kind(photos):
    """A JPEG whose markers pass the worker's checks but whose data no decoder reads: counted as its source's bad
    sample in the worker's cumulative meta.bad (every later batch of that worker carries it), logged, and its row
    repeats the next good row of its kind; a kind with no good row keeps its text with a zero (mean-colour) image."""
    recipe = DeviceRecipe.from_transform(oc_transform(size=32))
    planner = DevicePlanner(recipe)
    good = [planner.plan(photos[k]) for k in ("china 640x427 (camera file)", "flower 427x427 square q85")]
    broken = DeviceRow(b"\xff\xd8\xff\xdb" + b"\x00" * 60 + b"\xff\xd9", 0, 0, 10, 10, False)
    assert jpeg_ends(broken.data)
    rows = [(good[0], 0, "a"), (broken, 1, "b"), (good[1], 1, "c"), (broken, 0, "d")]
    image = PendingImages.pack(recipe, rows)
    batch = Batch(image=image, text=torch.arange(4).view(4, 1), has_text=torch.ones(4, dtype=torch.bool),
                  label=torch.tensor([-1, -1, -1, 5]), kind=torch.tensor([0, 0, 0, 1]),
                  hidden_label=torch.full((4,), -1))
    decoder = DeviceDecoder(["s0", "s1"])
    meta = StreamMeta(bad=torch.tensor([2, 0]), worker=1, stream=1, taken=[3, 1, 0])
    out = decoder(batch, meta, "cpu")
    assert meta.bad.tolist() == [3, 1]  # the worker's 2 + one per source
    assert out.text.view(-1).tolist() == [0, 2, 2, 3]  # row 1 repeats row 2 (next paired row)
    assert torch.equal(out.image[1], out.image[2]) and out.image[0].abs().sum() > 0
    assert out.image[3].abs().sum() == 0 and out.label[3] == 5  # no other labeled row
    later = StreamMeta(bad=torch.tensor([2, 0]), worker=1, stream=1, taken=[4, 1, 0])
    decoder(Batch(image=torch.zeros(1, 3, 32, 32), text=torch.zeros(1, 1), has_text=torch.ones(1, dtype=torch.bool),
                  label=torch.tensor([-1]), kind=torch.tensor([0])), later, "cpu")
    assert later.bad.tolist() == [2, 0]  # a plain tensor batch passes unchanged...
    decoder(dataclass_batch(PendingImages.pack(recipe, [(good[0], 0, "e")])), later, "cpu")
    assert later.bad.tolist() == [3, 1]  # ...a device batch of that worker carries its cumulative count
    other = StreamMeta(bad=torch.tensor([0, 0]), worker=0, stream=0, taken=[1, 0, 0])
    decoder(dataclass_batch(PendingImages.pack(recipe, [(good[0], 0, "f")])), other, "cpu")
    assert other.bad.tolist() == [0, 0]  # another worker's count is its own


def dataclass_batch(image) -> Batch:
    n = len(image)
    return Batch(image=image, text=torch.zeros(n, 1, dtype=torch.long), has_text=torch.ones(n, dtype=torch.bool),
                 label=torch.full((n,), -1), kind=torch.zeros(n, dtype=torch.long))


def test_pending_images_move_and_pin_like_a_tensor(photos):
    recipe = DeviceRecipe.from_transform(oc_transform(size=32))
    row = DevicePlanner(recipe).plan(photos["china 160x107 small q90"])
    pending = PendingImages.pack(recipe, [(row, 0, "a"), torch.ones(3, 32, 32)])
    batch = dataclass_batch(pending)
    assert len(batch) == 2 and pending.shape == (2, 3, 32, 32)
    moved = batch.to("cpu")
    assert isinstance(moved.image, PendingImages) and moved.image.cpu_rows.tolist() == [1]
    out = DeviceDecoder()(moved, StreamMeta(bad=torch.zeros(1), worker=0, stream=0, taken=[2, 0, 0]), "cpu")
    assert out.image.shape == (2, 3, 32, 32) and torch.equal(out.image[1], torch.ones(3, 32, 32))
    assert PendingImages.pack(recipe, [torch.ones(3, 32, 32)]).shape == (1, 3, 32, 32)  # no device row: a tensor


# ------------------------------------------------------------------------------ (4) training runs


def test_training_with_device_decode_resumes_exactly(demo_data, tmp_path):
    """A real mixed run (CLIP + MAE + supervised, 2 workers) with data.decode: device trains; a run resumed from its
    step-3 checkpoint logs the uninterrupted run's losses at steps 4-6. Its images equal the CPU path's within the
    recipe tolerance (the first step's loss is close to the data.decode: cpu run's, draft_decode off in both)."""
    from vlp import checkpoint as ckpt_io
    from vlp.train import Trainer

    data = {"decode": "device", "draft_decode": False, "workers": 2}
    ref_cfg = run_config(demo_data, tmp_path / "ref", data=data)
    trainer = Trainer(config_from_dict(ref_cfg))
    result = trainer.fit()
    assert result["step"] == 6
    assert trainer.device_decoder.rows == 6 * 16  # every row of every step: the demo's images are RGB JPEGs
    reference = step_metrics(tmp_path / "ref")
    assert all(math.isfinite(reference[s]["loss/total"]) for s in range(1, 7))

    ckpt = ckpt_io.checkpoint_dir(tmp_path / "ref", 3)
    assert ckpt in ckpt_io.list_checkpoints(tmp_path / "ref")
    run_dir = tmp_path / "resumed"
    Trainer(config_from_dict(run_config(demo_data, run_dir, data=data)), resume=str(ckpt)).fit()
    resumed = step_metrics(run_dir)
    for step in (4, 5, 6):
        for key in ("loss/total", "loss/contrastive", "loss/mae", "loss/supervised"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)

    cpu = Trainer(config_from_dict(run_config(demo_data, tmp_path / "cpu", data={**data, "decode": "cpu"},
                                              train={"steps": 1}))).fit()
    assert cpu["loss/total"] == pytest.approx(reference[1]["loss/total"], rel=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nvJPEG)")
def test_cuda_recipe_against_the_cpu_recipe(photos):
    """The GPU check: nvJPEG + the device recipe on CUDA against Pillow + open_clip's transform, the same boxes as the
    CPU test; prints the figures the README quotes. nvJPEG's IDCT and chroma upsampling are not libjpeg's."""
    transform = oc_transform(scale=(0.08, 1.0))
    recipe = DeviceRecipe.from_transform(transform)
    torch.manual_seed(0)
    worst_mean = worst_max = 0.0
    for name, data in photos.items():
        rows, expected = [], []
        for k in range(24):
            box = T.RandomResizedCrop.get_params(Image.open(io.BytesIO(data)), [0.08, 1.0], [3 / 4, 4 / 3])
            rows.append(DeviceRow(data, *box, flip=bool(k % 2)))
            expected.append(cpu_recipe(data, box, bool(k % 2), transform))
        pending = PendingImages.pack(recipe, [(r, 0, "k") for r in rows])
        got, failed = decode_pending(pending, "cuda")
        assert failed == [] and got.is_cuda
        diff = (got.cpu() - torch.stack(expected)).abs()
        q999 = float(torch.quantile(diff.flatten(), 0.999))
        print(f"cuda {name:30s} mean {diff.mean():.5f} ({diff.mean() / LEVEL:.2f} levels)  99.9% {q999 / LEVEL:.1f}  "
              f"max {diff.max() / LEVEL:.1f} levels")
        worst_mean, worst_max = max(worst_mean, float(diff.mean())), max(worst_max, float(diff.max()))
    print(f"cuda worst: mean {worst_mean:.5f}, max {worst_max:.4f} ({worst_max / LEVEL:.1f} levels)")
    assert worst_mean < 0.02
