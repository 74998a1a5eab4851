"""Image transforms (open_clip's, with the model's size, mean and std) and text prompts for labels."""
from __future__ import annotations

import io

import open_clip
from open_clip.transform import AugmentationCfg
from PIL import Image

from vlp.data.sources import read_lines

TEMPLATE_PRESETS = {
    "photo": ["a photo of a {c}."],
    "simple": list(open_clip.SIMPLE_IMAGENET_TEMPLATES),
    "openai_imagenet": list(open_clip.OPENAI_IMAGENET_TEMPLATES),
}


def _as_format(t) -> str:
    """open_clip's template lists hold callables; vlp keeps '{c}' format strings."""
    return t if isinstance(t, str) else t("{c}")


def resolve_templates(spec: list[str] | str | None, default: str = "photo") -> list[str]:
    """A list of '{c}' templates, a file with one per line, or a preset name (photo, simple, openai_imagenet)."""
    if spec is None:
        spec = default
    if isinstance(spec, list):
        templates = spec
    elif spec in TEMPLATE_PRESETS:
        templates = TEMPLATE_PRESETS[spec]
    elif "{c}" in spec:
        templates = [spec]
    else:
        templates = read_lines(spec)
    templates = [_as_format(t) for t in templates]
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"template without a {{c}} placeholder: {bad[0]!r}")
    return templates


def image_size_of(model) -> int:
    s = model.visual.image_size
    return s if isinstance(s, int) else s[0]


def train_transform(model, scale=(0.5, 1.0), augment: bool = True):
    """open_clip's training transform (RandomResizedCrop with ``scale``, model mean/std)."""
    v = model.visual
    if not augment:
        return eval_transform(model)
    return open_clip.image_transform(image_size_of(model), is_train=True, mean=v.image_mean, std=v.image_std,
                                     aug_cfg=AugmentationCfg(scale=tuple(scale)))


def eval_transform(model):
    v = model.visual
    return open_clip.image_transform(image_size_of(model), is_train=False, mean=v.image_mean, std=v.image_std)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (raises on corrupt or truncated data)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")
