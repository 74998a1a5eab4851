"""Export a trained CLIP to the open_clip / Hugging Face Hub layout, write its model card, push it to the Hub.

- ``clip``: the full model (``export_model``, ``relocate_export``), loadable with ``open_clip`` ``local-dir:`` /
  ``hf-hub:``.
- ``vision``: the image tower alone, as open_clip and timm weights (``export_vision_tower``, ``load_vision_tower``,
  ``timm_config``, ``create_timm_vision_tower``, ``load_timm_vision_tower``).
- ``card``: the README.md model card (``render_model_card``, ``card_from_run``).
- ``hub``: ``push_to_hub``.
- ``cli``: ``vlp export`` (``register_cli``, ``export_checkpoint``).
"""
from vlp.export.card import card_from_run, render_model_card
from vlp.export.clip import export_model, relocate_export
from vlp.export.cli import export_checkpoint, export_cli, register_cli
from vlp.export.common import (CONFIG_NAME, PICKLE_SUFFIXES, VISION_ARCHITECTURE, VISION_CONFIG_NAME,
                               VISION_WEIGHTS_NAME, WEIGHTS_NAME, hf_source_name)
from vlp.export.hub import DEFAULT_COMMIT_MESSAGE, push_to_hub
from vlp.export.vision import (TIMM_ARCHITECTURE, TIMM_SUBDIR, create_timm_vision_tower, export_vision_tower,
                               load_timm_vision_tower, load_vision_tower, timm_config, timm_state_dict)

__all__ = [
    "export_model", "relocate_export", "export_vision_tower", "load_vision_tower", "timm_config", "timm_state_dict",
    "create_timm_vision_tower", "load_timm_vision_tower", "render_model_card", "card_from_run", "push_to_hub",
    "export_checkpoint", "export_cli", "register_cli", "hf_source_name",
    "CONFIG_NAME", "WEIGHTS_NAME", "VISION_WEIGHTS_NAME", "VISION_CONFIG_NAME", "VISION_ARCHITECTURE", "TIMM_SUBDIR",
    "TIMM_ARCHITECTURE", "PICKLE_SUFFIXES", "DEFAULT_COMMIT_MESSAGE",
]
