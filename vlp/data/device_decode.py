"""``data.decode: device``: JPEGs decoded and augmented on the trainer's device, not in the data workers.

The CPU path (``data.decode: cpu``, the default) decodes every record in a DataLoader worker with Pillow and runs
open_clip's train transform there: 211-274 images/s per core at 224 px, 8-16 cores for what one H200 computes. The
device path splits that work:

* **In the worker** (:class:`DevicePlanner`, called by :class:`vlp.data.mixing.MixedBatches`), only what is cheap:
  Pillow's lazy ``Image.open`` reads the JPEG header (size, mode), the end-of-image marker is checked, and the crop
  box and flip are drawn from torch's RNG exactly as the transform would draw them on a full decode
  (``RandomResizedCrop.get_params`` on the header's size, then ``RandomHorizontalFlip``'s ``torch.rand(1) < p``
  where the transform has one; open_clip's has none). The encoded bytes (one uint8 tensor per batch, with offsets)
  and the boxes travel through the loader as :class:`PendingImages` in ``Batch.image``.
* **On the device** (:class:`DeviceDecoder`, called by the trainer before the batch moves): ``torchvision.io
  .decode_jpeg(list, device=...)`` decodes the batch at once (nvJPEG on CUDA; libjpeg-turbo on CPU), then each
  image is cropped and resized with the transform's interpolation (``F.interpolate(antialias=True)``: bicubic for
  open_clip, the kernel Pillow uses), rounded to 8 bits as Pillow's resize is, flipped, scaled to [0, 1] and
  normalized with the model's mean and std: the same ``[B, 3, H, W]`` float32 tensor the CPU path gives.

Which records take which path, and what counts as a bad sample:

* A record goes to the device only when its bytes start with a JPEG marker, Pillow reads its header, its mode is RGB
  or L (CMYK / YCCK JPEGs stay on the CPU), it is not thinner than ``MAX_ASPECT_RATIO`` and it ends with the
  end-of-image marker (trailing zero padding allowed). Anything else (PNG, WebP, ..., a truncated or garbled JPEG,
  a too-thin image, a JPEG with data appended after its end) takes the CPU path for that record, in the worker:
  decoded by :func:`vlp.data.format.decode_image` and transformed as today, so corrupt images are found, counted
  (``corrupt image``, per source) and replaced by the next record of their kind exactly as with ``data.decode:
  cpu``, and exact resume (``StreamMeta.taken``) is unchanged.
* Rows of kinds for which an objective asks for extra views (:class:`vlp.data.batch.ViewGroup`: SimCLR, DINO,
  BYOL, ... augmentations) stay on the CPU path too: their views are cut from the worker's decode, and that decode
  makes the shared-pass image as well. Only rows of the other kinds are decoded on the device (the view recipes'
  colour jitter, blur, solarize and RandAugment have no device version yet).
* A JPEG that passed the worker's checks but that ``decode_jpeg`` cannot decode on the device is decoded again on
  its own, then by Pillow in the trainer's process (nvJPEG rejects some files libjpeg reads). One that no decoder
  reads (corrupt entropy-coded data with intact markers: rare) is counted as ``corrupt image`` of its source, added
  to the worker's cumulative ``StreamMeta.bad`` (so ``bad_samples/<source>``, the checkpoint's counts and resume
  add it as any other), logged, and its row takes the image, text and labels of the next row of its kind in the
  batch (cyclically; the mean colour, i.e. zeros, when no row of its kind decoded). The stream is not shifted:
  the replacement is decided by the data alone, so a resumed run makes the same one.

Transforms the device path knows (:meth:`DeviceRecipe.from_transform`): ``RandomResizedCrop`` (open_clip's
``is_train``) or ``Resize(int)`` + ``CenterCrop`` (open_clip's eval transform: ``data.augment: false``), an optional
``RandomHorizontalFlip``, RGB conversions, ``ToTensor``, ``Normalize``; bicubic or bilinear, antialiased. Any other
step is a :class:`vlp.config.ConfigError` naming it, never a silently different augmentation.

Agreement with the CPU path (``tests/test_device_decode.py``: real photos of several sizes, aspect ratios and JPEG
variants, the same crop boxes, 224 px): on CPU torchvision's libjpeg-turbo decode gives Pillow's pixels; Pillow
resizes in two 8-bit passes (rounded and clipped between them), the device in one float pass, so the normalized
pixels differ by 0.0018-0.0024 on average (0.12-0.16 of an 8-bit level), 99.9% of them by at most 2 levels and a
few sharp-edge pixels by up to 11 (the test's bounds: mean < 0.01, max < 16 levels). nvJPEG's IDCT and chroma
upsampling differ from libjpeg's by a few levels more: measured by that test's CUDA variant on a GPU
(it runs where CUDA is).
"""
from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from vlp.data.format import MAX_ASPECT_RATIO
from vlp.strict import ConfigError

log = logging.getLogger(__name__)

SOI = b"\xff\xd8"  # JPEG start-of-image marker
EOI = b"\xff\xd9"  # end-of-image
DEVICE_MODES = ("RGB", "L")  # JPEG modes decode_jpeg(mode=RGB) reads as Pillow's convert("RGB") does


@dataclass(frozen=True)
class DeviceRecipe:
    """The geometry and normalization of a train (or eval) transform, as the device path replays it.

    ``kind``: ``crop`` (RandomResizedCrop: ``scale``, ``ratio``; the worker draws the box) or ``center`` (Resize of
    the short side to ``resize``, then CenterCrop). ``size``: output (height, width)."""

    kind: str
    size: tuple[int, int]
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = (1.0, 1.0)
    resize: int = 0
    flip_p: float | None = None  # RandomHorizontalFlip's p; None: the transform has no flip (open_clip's)

    @classmethod
    def from_transform(cls, transform) -> "DeviceRecipe":
        """The recipe of a torchvision ``Compose`` (open_clip's ``image_transform``); :class:`ConfigError` naming
        the first step the device path does not replay."""
        from torchvision import transforms as T

        steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
        where = "data.decode: device"
        if not steps:
            raise ConfigError(f"{where}: an empty transform")
        first, rest = steps[0], steps[1:]
        fields: dict = {}
        if isinstance(first, T.RandomResizedCrop):
            fields.update(kind="crop", size=_pair(first.size), scale=tuple(map(float, first.scale)),
                          ratio=tuple(map(float, first.ratio)), interpolation=_interpolation(first))
        elif isinstance(first, T.Resize) and first.max_size is None and _single(first.size) and rest \
                and isinstance(rest[0], T.CenterCrop):
            size = _pair(rest[0].size)
            if _single(first.size) < max(size):
                raise ConfigError(f"{where}: Resize({_single(first.size)}) before CenterCrop({size}) (a padded "
                                  f"crop) has no device version; use data.decode: cpu")
            fields.update(kind="center", size=size, resize=_single(first.size), interpolation=_interpolation(first))
            rest = rest[1:]
        else:
            raise ConfigError(f"{where}: the transform must start with RandomResizedCrop, or Resize(int) + "
                              f"CenterCrop; it starts with {first!r} (use data.decode: cpu)")
        normalize = None
        for step in rest:
            if isinstance(step, T.RandomHorizontalFlip) and normalize is None and "flip_p" not in fields:
                fields["flip_p"] = float(step.p)
            elif _is_rgb_conversion(step) or isinstance(step, T.ToTensor):
                continue
            elif isinstance(step, T.Normalize) and normalize is None:
                normalize = step
            else:
                raise ConfigError(f"{where}: no device version of the transform step {step!r} (supported: "
                                  f"RandomResizedCrop or Resize + CenterCrop, RandomHorizontalFlip, ToTensor, "
                                  f"Normalize); use data.decode: cpu")
        if normalize is None:
            raise ConfigError(f"{where}: the transform has no Normalize (the model's mean and std)")
        return cls(mean=tuple(map(float, normalize.mean)), std=tuple(map(float, normalize.std)), **fields)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _single(size) -> int:
    if isinstance(size, int):
        return size
    return int(size[0]) if len(size) == 1 else 0


def _interpolation(step) -> str:
    from torchvision.transforms import InterpolationMode

    mode = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}.get(step.interpolation)
    if mode is None or step.antialias is False:
        raise ConfigError(f"data.decode: device: {step!r}: only antialiased bicubic or bilinear resizing has a device "
                          f"version; use data.decode: cpu")
    return mode


def _is_rgb_conversion(step) -> bool:
    """open_clip's ``MaybeConvertMode("RGB")`` / ``_convert_to_rgb``: no-ops on the decoded RGB tensor."""
    name = getattr(step, "__name__", type(step).__name__)
    return name == "_convert_to_rgb" or (name == "MaybeConvertMode" and getattr(step, "mode", "RGB") == "RGB") \
        or name == "MaybeToTensor"


# ---------------------------------------------------------------------------------------------------- worker


class DeviceRow(NamedTuple):
    """A record the device decodes: its encoded bytes, the crop box (in full-decode pixels) and the flip."""

    data: bytes
    top: int
    left: int
    height: int
    width: int
    flip: bool


def jpeg_ends(data: bytes) -> bool:
    """Whether ``data`` ends with the end-of-image marker, zero bytes after it allowed (some writers pad)."""
    if data.endswith(EOI):
        return True
    tail = data[-64:].rstrip(b"\x00")
    return tail.endswith(EOI)


class DevicePlanner:
    """The worker's half: which records the device decodes, and their crop boxes and flips (drawn from torch's RNG
    as the transform would draw them). ``cpu_kinds``: kinds whose rows stay on the CPU path (view groups)."""

    def __init__(self, recipe: DeviceRecipe, cpu_kinds: Sequence[str] = ()):
        self.recipe = recipe
        self.cpu_kinds = frozenset(cpu_kinds)

    @classmethod
    def for_mixer(cls, transform, view_groups: Sequence = ()) -> "DevicePlanner":
        cpu_kinds = sorted({k for g in view_groups for k in g.kinds})
        if cpu_kinds:
            log.info("data.decode: device: rows of %s stay on the CPU path (view groups %s are cut from their "
                     "decode in the workers); the other rows decode on the device", ", ".join(cpu_kinds),
                     ", ".join(g.name for g in view_groups))
        return cls(DeviceRecipe.from_transform(transform), cpu_kinds)

    def plan(self, data: bytes) -> DeviceRow | None:
        """The record's :class:`DeviceRow`, or None: the CPU path takes it (not a JPEG, CMYK, too thin, no end
        marker, a header Pillow cannot read: judged and counted there exactly as with ``data.decode: cpu``).
        Draws from torch's RNG only when it returns a row."""
        from PIL import Image

        if not data.startswith(SOI) or not jpeg_ends(data):
            return None
        try:
            img = Image.open(io.BytesIO(data), formats=("JPEG",))  # lazy: the header only
        except Exception:  # noqa: BLE001  (the CPU path reports it)
            return None
        with img:
            w, h = img.size
            if img.mode not in DEVICE_MODES or min(w, h) < 1 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                return None
            top, left, height, width = self.draw(img)
            # RandomHorizontalFlip draws even when p is 0 or 1: the same draws keep the CPU path's RNG stream
            flip = bool(torch.rand(1) < self.recipe.flip_p) if self.recipe.flip_p is not None else False
        return DeviceRow(data, top, left, height, width, flip)

    def draw(self, img) -> tuple[int, int, int, int]:
        """The crop box ``(top, left, height, width)`` of an image of ``img.size`` (a lazily opened PIL image or
        anything torchvision's ``get_dimensions`` reads): RandomResizedCrop's own ``get_params``, so the same RNG
        state gives the CPU path's box on a full decode. ``center``: the whole image (the device resizes, then
        crops)."""
        from torchvision import transforms as T

        r = self.recipe
        if r.kind == "crop":
            return tuple(int(v) for v in T.RandomResizedCrop.get_params(img, list(r.scale), list(r.ratio)))
        w, h = img.size
        return 0, 0, h, w


@dataclass
class PendingImages:
    """``Batch.image`` of a ``data.decode: device`` batch until :class:`DeviceDecoder` decodes it: the encoded
    JPEGs of ``device_rows`` (one uint8 tensor, row k's bytes at ``offsets[k]:offsets[k+1]``), their boxes
    ``[n, 4]`` (top, left, height, width), flips, source indices (into the mixer's sources) and keys; the rows the
    CPU path made (``cpu_rows``, ``cpu_images``). ``shape`` and ``len`` are those of the decoded image tensor."""

    recipe: DeviceRecipe
    rows: int
    encoded: torch.Tensor
    offsets: torch.Tensor
    device_rows: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    sources: torch.Tensor
    keys: list[str]
    cpu_rows: torch.Tensor
    cpu_images: torch.Tensor

    @classmethod
    def pack(cls, recipe: DeviceRecipe, images: list) -> "PendingImages | torch.Tensor":
        """From one entry per row: an image tensor (CPU path) or ``(DeviceRow, source index, key)``. A batch with no
        device row is the plain stacked tensor."""
        dev = [(i, x) for i, x in enumerate(images) if not isinstance(x, torch.Tensor)]
        if not dev:
            return torch.stack(images)
        cpu = [(i, x) for i, x in enumerate(images) if isinstance(x, torch.Tensor)]
        blobs = [row.data for _, (row, _, _) in dev]
        offsets = [0]
        for b in blobs:
            offsets.append(offsets[-1] + len(b))
        encoded = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        h, w = recipe.size
        return cls(
            recipe=recipe, rows=len(images), encoded=encoded, offsets=torch.tensor(offsets, dtype=torch.long),
            device_rows=torch.tensor([i for i, _ in dev], dtype=torch.long),
            boxes=torch.tensor([[r.top, r.left, r.height, r.width] for _, (r, _, _) in dev], dtype=torch.long),
            flips=torch.tensor([r.flip for _, (r, _, _) in dev], dtype=torch.bool),
            sources=torch.tensor([s for _, (_, s, _) in dev], dtype=torch.long),
            keys=[k for _, (_, _, k) in dev],
            cpu_rows=torch.tensor([i for i, _ in cpu], dtype=torch.long),
            cpu_images=torch.stack([x for _, x in cpu]) if cpu else torch.empty(0, 3, h, w))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, 3, *self.recipe.size))

    def __len__(self) -> int:
        return self.rows

    def to(self, device, non_blocking: bool = False) -> "PendingImages":
        """Moves the CPU path's rows; the encoded bytes stay in host memory (``decode_jpeg`` reads them there)."""
        return dataclasses.replace(self, cpu_images=self.cpu_images.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PendingImages":
        return dataclasses.replace(self, cpu_images=self.cpu_images.pin_memory())

    def encoded_rows(self) -> list[torch.Tensor]:
        o = self.offsets.tolist()
        return [self.encoded[o[k]:o[k + 1]] for k in range(len(o) - 1)]


# ---------------------------------------------------------------------------------------------------- device


def decode_jpegs(data: list[torch.Tensor], device) -> list[torch.Tensor | None]:
    """uint8 ``[3, h, w]`` images on ``device``: one batched ``decode_jpeg``; when it fails, each on its own, then
    by Pillow; None for an image no decoder reads."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001  (one bad image fails the whole batch: find it)
        pass
    out: list[torch.Tensor | None] = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            continue
        except Exception:  # noqa: BLE001
            pass
        out.append(pil_decode(d, device))
    return out


def pil_decode(data: torch.Tensor, device) -> torch.Tensor | None:
    """:func:`vlp.data.format.decode_image` (the CPU path's decoder, full size) as a uint8 ``[3, h, w]`` tensor on
    ``device``; None when it raises."""
    import numpy as np

    from vlp.data.format import decode_image

    try:
        img = decode_image(bytes(data.numpy()))
    except Exception:  # noqa: BLE001  (PIL raises many types for bad data)
        return None
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(device)


def resized_crop(img: torch.Tensor, box: Sequence[int], recipe: DeviceRecipe) -> torch.Tensor:
    """One decoded uint8 ``[3, h, w]`` image -> float ``[3, H, W]`` in 0..255 (not rounded): the recipe's crop and
    antialiased resize (``crop``: the box, then the output size; ``center``: the short side to ``resize``, as
    torchvision's Resize sizes it, then the centre crop)."""
    import torch.nn.functional as F

    mode = recipe.interpolation
    if recipe.kind == "crop":
        top, left, height, width = (int(v) for v in box)
        x = img[:, top:top + height, left:left + width].unsqueeze(0).float()
        return F.interpolate(x, size=recipe.size, mode=mode, antialias=True, align_corners=False)[0]
    h, w = img.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(recipe.resize * long / short)
    new_h, new_w = (recipe.resize, new_long) if h <= w else (new_long, recipe.resize)
    x = img.unsqueeze(0).float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    ch, cw = recipe.size  # <= resize (DeviceRecipe.from_transform), so the crop never pads
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    return x[0, :, top:top + ch, left:left + cw]


def finish(pixels: torch.Tensor, flips: torch.Tensor, recipe: DeviceRecipe) -> torch.Tensor:
    """``[n, 3, H, W]`` float 0..255 -> the model's input: rounded and clamped to 8 bits (Pillow resizes to uint8),
    flipped where ``flips``, scaled to [0, 1], normalized."""
    x = pixels.round().clamp_(0, 255)
    if flips.any():
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    mean = torch.tensor(recipe.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(recipe.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x / 255.0 - mean) / std


def decode_pending(p: PendingImages, device) -> tuple[torch.Tensor, list[int]]:
    """The batch's ``[B, 3, H, W]`` float32 images on ``device``, and the positions (in ``device_rows``) of the
    images no decoder read (their rows are zeros here)."""
    device = torch.device(device)
    out = torch.zeros(p.shape, dtype=torch.float32, device=device)
    if len(p.cpu_rows):
        out[p.cpu_rows.to(device)] = p.cpu_images.to(device, dtype=torch.float32)
    decoded = decode_jpegs(p.encoded_rows(), device)
    failed = [k for k, img in enumerate(decoded) if img is None]
    good = [k for k, img in enumerate(decoded) if img is not None]
    if good:
        boxes = p.boxes.tolist()
        pixels = torch.stack([resized_crop(decoded[k], boxes[k], p.recipe) for k in good])
        keep = torch.tensor(good, dtype=torch.long)
        out[p.device_rows[keep].to(device)] = finish(pixels, p.flips[keep].to(device), p.recipe)
    return out, failed


class DeviceDecoder:
    """The trainer's half: ``batch = decoder(batch, meta, device)`` turns a :class:`PendingImages` batch image into
    the image tensor on ``device`` (other batches pass unchanged), replaces rows whose image no decoder reads (see the
    module docstring) and adds them to ``meta.bad`` (cumulative per worker, as the workers count)."""

    def __init__(self, source_names: Sequence[str] = ()):
        self.source_names = list(source_names)
        self.failed: dict[int, torch.Tensor] = {}  # worker -> cumulative count per source
        self.logged = 0
        self.rows = 0  # rows decoded on the device so far
        self._warned_cpu = False

    def __call__(self, batch, meta, device):
        p = batch.image
        if not isinstance(p, PendingImages):
            return batch
        if torch.device(device).type == "cpu" and not self._warned_cpu:
            self._warned_cpu = True
            log.warning("data.decode: device on a CPU: the trainer's process decodes and augments the JPEGs the "
                        "workers no longer do (data.decode: cpu is faster without an accelerator)")
        image, failed = decode_pending(p, device)
        self.rows += len(p.device_rows) - len(failed)
        batch = dataclasses.replace(batch, image=image)
        if failed:
            counts = self.failed.setdefault(meta.worker, torch.zeros(len(meta.bad), dtype=torch.long))
            for k in failed:
                counts[int(p.sources[k])] += 1
                self._log(p, k)
            batch = replace_rows(batch, [int(p.device_rows[k]) for k in failed])
        if meta.worker in self.failed:
            meta.bad = meta.bad + self.failed[meta.worker]
        return batch

    def _log(self, p: PendingImages, k: int) -> None:
        self.logged += 1
        if self.logged <= 3:
            s = int(p.sources[k])
            name = self.source_names[s] if s < len(self.source_names) else str(s)
            log.warning("skipped sample (corrupt image) %s/%s: no decoder on the device or Pillow reads it; its row "
                        "repeats the next row of its kind", name, p.keys[k])


def replace_rows(batch, bad: list[int]):
    """Each row of ``bad`` takes the image, text and labels of the next good row of its kind (cyclically); with none,
    its image is zeros (the mean colour) and the rest stays."""
    kind = batch.kind.tolist()
    bad_set = set(bad)
    fields = ["image", "text", "has_text", "label", "hidden_label", "labels"]
    values = {f: getattr(batch, f) for f in fields if getattr(batch, f) is not None}
    values = {f: v.clone() for f, v in values.items()}
    n = len(kind)
    for r in bad:
        donor = next((d % n for d in range(r + 1, r + n) if kind[d % n] == kind[r] and d % n not in bad_set), None)
        if donor is None:
            values["image"][r] = 0
            continue
        for v in values.values():
            v[r] = v[donor]
    return dataclasses.replace(batch, **values)
