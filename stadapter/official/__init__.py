"""The authors' trained ST-Adapter checkpoints (linziyi96/st-adapter) as registered tasks.

    checkpoint.py   read an official checkpoint (weights_only), infer its layout, map every key exactly
    presets.py      the two released models (K400 12x384, SSv2 24x384), reported accuracy, built-in label maps
    importer.py     import_official: checkpoint -> bundle on CLIP ViT-B/16 (QuickGELU) -> registry
"""

from stadapter.official.checkpoint import OfficialLayout, infer_layout, read_checkpoint, to_adapter_set
from stadapter.official.importer import ImportOutcome, import_official
from stadapter.official.presets import OFFICIAL_BACKBONE, OFFICIAL_MODELS, builtin_labels, read_label_file

__all__ = ["OFFICIAL_BACKBONE", "OFFICIAL_MODELS", "ImportOutcome", "OfficialLayout", "builtin_labels",
           "import_official", "infer_layout", "read_checkpoint", "read_label_file", "to_adapter_set"]
