"""The Cityscapes label table (35 labels, 19 evaluated train ids) and the class metadata that
the Cityscapes readers derive from it.

The table is copied from ``cityscapesscripts`` (``helpers/labels.py``) rather than imported:
that package (2.3.0) pulls matplotlib, pyquaternion, coloredlogs, requests and the obsolete
``typing`` backport (which drops a ``typing.py`` into site-packages) only for a 35-row table.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.meta import ClassInfo

__all__ = [
    "CITYSCAPES_LABELS",
    "CityscapesLabel",
    "cityscapes_instance_class_info",
    "cityscapes_panoptic_categories",
    "cityscapes_semantic_class_info",
]


class CityscapesLabel(NamedTuple):
    """One row of the Cityscapes label table (fields as in ``cityscapesscripts.helpers.labels.Label``)."""

    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# Verbatim from cityscapesscripts 2.3.0, cityscapesscripts/helpers/labels.py (`labels`), the
# table the official evaluation and the createTrainIdLabelImgs / createPanopticImgs tools use.
# fmt: off
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(CityscapesLabel(*row) for row in (
    # name                   id  trainId category      catId hasInst ignoreInEval color
    ("unlabeled",             0, 255, "void",          0, False, True,  (0, 0, 0)),
    ("ego vehicle",           1, 255, "void",          0, False, True,  (0, 0, 0)),
    ("rectification border",  2, 255, "void",          0, False, True,  (0, 0, 0)),
    ("out of roi",            3, 255, "void",          0, False, True,  (0, 0, 0)),
    ("static",                4, 255, "void",          0, False, True,  (0, 0, 0)),
    ("dynamic",               5, 255, "void",          0, False, True,  (111, 74, 0)),
    ("ground",                6, 255, "void",          0, False, True,  (81, 0, 81)),
    ("road",                  7,   0, "flat",          1, False, False, (128, 64, 128)),
    ("sidewalk",              8,   1, "flat",          1, False, False, (244, 35, 232)),
    ("parking",               9, 255, "flat",          1, False, True,  (250, 170, 160)),
    ("rail track",           10, 255, "flat",          1, False, True,  (230, 150, 140)),
    ("building",             11,   2, "construction",  2, False, False, (70, 70, 70)),
    ("wall",                 12,   3, "construction",  2, False, False, (102, 102, 156)),
    ("fence",                13,   4, "construction",  2, False, False, (190, 153, 153)),
    ("guard rail",           14, 255, "construction",  2, False, True,  (180, 165, 180)),
    ("bridge",               15, 255, "construction",  2, False, True,  (150, 100, 100)),
    ("tunnel",               16, 255, "construction",  2, False, True,  (150, 120, 90)),
    ("pole",                 17,   5, "object",        3, False, False, (153, 153, 153)),
    ("polegroup",            18, 255, "object",        3, False, True,  (153, 153, 153)),
    ("traffic light",        19,   6, "object",        3, False, False, (250, 170, 30)),
    ("traffic sign",         20,   7, "object",        3, False, False, (220, 220, 0)),
    ("vegetation",           21,   8, "nature",        4, False, False, (107, 142, 35)),
    ("terrain",              22,   9, "nature",        4, False, False, (152, 251, 152)),
    ("sky",                  23,  10, "sky",           5, False, False, (70, 130, 180)),
    ("person",               24,  11, "human",         6, True,  False, (220, 20, 60)),
    ("rider",                25,  12, "human",         6, True,  False, (255, 0, 0)),
    ("car",                  26,  13, "vehicle",       7, True,  False, (0, 0, 142)),
    ("truck",                27,  14, "vehicle",       7, True,  False, (0, 0, 70)),
    ("bus",                  28,  15, "vehicle",       7, True,  False, (0, 60, 100)),
    ("caravan",              29, 255, "vehicle",       7, True,  True,  (0, 0, 90)),
    ("trailer",              30, 255, "vehicle",       7, True,  True,  (0, 0, 110)),
    ("train",                31,  16, "vehicle",       7, True,  False, (0, 80, 100)),
    ("motorcycle",           32,  17, "vehicle",       7, True,  False, (0, 0, 230)),
    ("bicycle",              33,  18, "vehicle",       7, True,  False, (119, 11, 32)),
    ("license plate",        -1,  -1, "vehicle",       7, False, True,  (0, 0, 142)),
))
# fmt: on

# Label ids that can appear in a labelIds / instanceIds PNG (license plate, id -1, cannot).
_MAX_LABEL_ID = max(lab.id for lab in CITYSCAPES_LABELS)
_LABEL_BY_ID: dict[int, CityscapesLabel] = {lab.id: lab for lab in CITYSCAPES_LABELS if lab.id >= 0}
# instanceIds: value = labelId * 1000 + instance index for instances.
_INSTANCE_OFFSET = 1000
_EVALUATED = tuple(lab for lab in CITYSCAPES_LABELS if not lab.ignore_in_eval)
_NUM_TRAIN_IDS = 19


def cityscapes_semantic_class_info() -> ClassInfo:
    """The 19 evaluated classes in trainId order (class ``k`` = trainId ``k``), all ``isthing=False``.

    ``dataset_ids`` are the Cityscapes labelIds, which the official evaluation expects.
    """
    rows = sorted((lab for lab in _EVALUATED), key=lambda lab: lab.train_id)
    return ClassInfo(
        names=tuple(lab.name for lab in rows),
        isthing=(False,) * len(rows),
        colors=tuple(lab.color for lab in rows),
        dataset_ids=tuple(lab.id for lab in rows),
    )


def cityscapes_instance_class_info() -> ClassInfo:
    """The 8 instance classes (``hasInstances`` and evaluated), in labelId order; ``dataset_ids`` = labelIds."""
    rows = [lab for lab in _EVALUATED if lab.has_instances]
    return ClassInfo(
        names=tuple(lab.name for lab in rows),
        isthing=(True,) * len(rows),
        colors=tuple(lab.color for lab in rows),
        dataset_ids=tuple(lab.id for lab in rows),
    )


def cityscapes_panoptic_categories(use_train_id: bool = False) -> list[dict[str, Any]]:
    """The ``categories`` list that ``createPanopticImgs`` writes (ids: labelIds, or trainIds)."""
    return [
        {
            "id": lab.train_id if use_train_id else lab.id,
            "name": lab.name,
            "color": list(lab.color),
            "supercategory": lab.category,
            "isthing": int(lab.has_instances),
        }
        for lab in _EVALUATED
    ]


# Lookup tables indexed by a PNG value.
def _train_id_lut() -> np.ndarray:
    """labelId → trainId (255 for ignored labels), 256 entries: uint8 labelIds PNG values."""
    lut = np.full(256, -1, dtype=np.int64)  # -1: not a Cityscapes labelId
    for lab in _LABEL_BY_ID.values():
        lut[lab.id] = lab.train_id if 0 <= lab.train_id < _NUM_TRAIN_IDS else IGNORE_INDEX
    return lut
