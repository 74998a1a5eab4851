"""Image transforms (open_clip's, with the model's size, mean and std) and text prompts for labels."""
from __future__ import annotations

import os

import open_clip
from open_clip.transform import AugmentationCfg

from vlp.data.format import read_lines

TEMPLATE_PRESETS = {
    "photo": ["a photo of a {c}."],
    "simple": list(open_clip.SIMPLE_IMAGENET_TEMPLATES),
    "openai_imagenet": list(open_clip.OPENAI_IMAGENET_TEMPLATES),
}


def _as_format(t) -> str:
    """open_clip's template lists hold callables; vlp keeps '{c}' format strings."""
    return t("{c}") if callable(t) else str(t)


def template_presets() -> dict[str, list[str]]:
    """The presets as '{c}' format strings."""
    return {name: [_as_format(t) for t in ts] for name, ts in TEMPLATE_PRESETS.items()}


def load_templates(spec) -> list[str]:
    """Templates from a list (strings or open_clip's callables), a preset name, a file with one per line, or one
    template string holding ``{c}`` (or a positional ``{}``); not checked for a placeholder."""
    if not isinstance(spec, (str, os.PathLike)):
        return [_as_format(t) for t in spec]
    s = str(spec)
    if s in TEMPLATE_PRESETS:
        return [_as_format(t) for t in TEMPLATE_PRESETS[s]]
    if os.path.isfile(s):
        return read_lines(s)
    if "{c}" in s or "{}" in s:
        return [s]
    raise FileNotFoundError(f"templates {s!r}: not a file, not a preset ({', '.join(TEMPLATE_PRESETS)})")


def resolve_templates(spec: list[str] | str | None, default: str = "photo") -> list[str]:
    """A list of '{c}' templates, a file with one per line, or a preset name (photo, simple, openai_imagenet)."""
    templates = load_templates(default if spec is None else spec)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"template without a {{c}} placeholder: {bad[0]!r}")
    return templates


def image_size_of(model) -> int:
    s = model.visual.image_size
    return s if isinstance(s, int) else s[0]


def decode_side(transforms) -> int | None:
    """The short side an image may be decoded at (:func:`vlp.data.format.decode_image`'s ``min_side``) without any
    of ``transforms`` seeing fewer pixels than it outputs: for ``RandomResizedCrop(size, scale, ratio)`` the
    smallest crop (area ``scale[0]``, the most elongated ``ratio``) still spans ``size`` pixels,
    ``size / sqrt(scale[0] * r)`` with ``r = min(ratio[0], 1 / ratio[1])``; for ``Resize(size)``, ``size``. The largest
    over ``transforms``; None (decode whole) when one starts with any other geometry or none is known."""
    import math

    from torchvision import transforms as T

    need = 0
    for t in transforms:
        steps = t.transforms if isinstance(t, T.Compose) else [t]
        first = next((s for s in steps if not callable(s) or hasattr(s, "forward") or hasattr(s, "size")), None)
        if isinstance(first, T.RandomResizedCrop):
            r = min(first.ratio[0], 1 / first.ratio[1])
            need = max(need, math.ceil(max(first.size) / math.sqrt(first.scale[0] * r)))
        elif isinstance(first, T.Resize) and first.max_size is None and (
                isinstance(first.size, int) or len(first.size) == 1):
            need = max(need, first.size if isinstance(first.size, int) else first.size[0])
        else:
            return None
    return need or None


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

