"""Offline shard tooling: write (the core: :mod:`.write`; one writer per kind of input: :mod:`.readers`), inspect
and verify (:mod:`.inspect`), ``vlp shards`` (:mod:`.cli`).

Training never imports this package; the sample format it writes and checks is :mod:`vlp.data.format`.
"""
from vlp.data.format import IMAGE_KEYS, KINDS, ClassnamesError
from vlp.shards.cli import register_cli
from vlp.shards.inspect import (check_sample, inspect_shards, iter_shard, judge_sample,
                                tar_structure_error, verify_shards)
from vlp.shards.readers import (IMAGE_EXTENSIONS, find_image_folder, load_hf_dataset, read_table, write_captions,
                                write_hf_dataset, write_image_folder)
from vlp.shards.write import (JPEG_QUALITY, KEY_WIDTH, image_to_jpeg_bytes, shard_pattern, write_class_files,
                              write_samples)

__all__ = ["ClassnamesError", "IMAGE_EXTENSIONS", "IMAGE_KEYS", "JPEG_QUALITY", "KEY_WIDTH", "KINDS", "check_sample",
           "find_image_folder", "image_to_jpeg_bytes", "inspect_shards", "iter_shard", "judge_sample",
           "load_hf_dataset", "read_table", "register_cli", "shard_pattern", "tar_structure_error", "verify_shards",
           "write_captions", "write_class_files", "write_hf_dataset", "write_image_folder", "write_samples"]
