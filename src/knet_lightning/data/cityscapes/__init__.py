"""Cityscapes (gtFine) readers for the semantic, panoptic and instance tasks, and their data modules.

On-disk layout (the official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
unpacked into one folder, plus the files that ``cityscapesscripts`` generates)::

    root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       (official)
    root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png    (official)
    root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (createTrainIdLabelImgs)
    root/gtFine/cityscapes_panoptic_{split}.json                              (createPanopticImgs)
    root/gtFine/cityscapes_panoptic_{split}/<stem>_gtFine_panoptic.png        (createPanopticImgs)

Readers and their classes (contiguous ids, things first: the README's Architecture, "Contracts"):

- :class:`CityscapesSemanticDataset`: the 19 evaluated classes in trainId order, all treated as
  "stuff" (``isthing=False``): the semantic task has no instances, so thing/stuff does not
  matter and the model's class ``k`` is trainId ``k``. Reads ``labelTrainIds`` (or, with
  ``label_type="labelIds"``, the official ``labelIds`` mapped through the label table).
- :class:`CityscapesPanopticDataset`: the COCO-format panoptic files of ``createPanopticImgs``;
  categories (ids = Cityscapes labelIds, ``isthing`` from the JSON) → 8 things then 11 stuff.
  Note that this contiguous order differs from the trainId order of the semantic reader.
- :class:`CityscapesInstanceDataset`: ``instanceIds`` maps (``labelId * 1000 + k`` for an
  instance, the plain ``labelId`` for stuff and for crowd "group" regions) → the 8 classes
  with ``hasInstances`` and not ``ignoreInEval``.

Every reader's ``image_id`` is the Cityscapes image stem ``<city>_<seq>_<frame>`` (a string:
that is the ``image_id`` of ``createPanopticImgs``' JSON, which the official panoptic
evaluation matches on) and its ``file_name`` is ``<city>/<stem>_leftImg8bit.png``, relative to
``leftImg8bit/{split}``.

Modules: :mod:`~knet_lightning.data.cityscapes.semantic`, :mod:`~knet_lightning.data.cityscapes.panoptic`
and :mod:`~knet_lightning.data.cityscapes.instance` (each reader with its data module),
:mod:`~knet_lightning.data.cityscapes.folder` (the layout checks, the folder scan and the base data
module they share) and :mod:`~knet_lightning.data.cityscapes.labels` (the label table and the
class metadata).
"""

from knet_lightning.data.cityscapes.instance import CityscapesInstanceDataModule, CityscapesInstanceDataset
from knet_lightning.data.cityscapes.labels import (
    CITYSCAPES_LABELS,
    CityscapesLabel,
    cityscapes_instance_class_info,
    cityscapes_panoptic_categories,
    cityscapes_semantic_class_info,
)
from knet_lightning.data.cityscapes.panoptic import CityscapesPanopticDataModule, CityscapesPanopticDataset
from knet_lightning.data.cityscapes.semantic import CityscapesSemanticDataModule, CityscapesSemanticDataset

__all__ = [
    "CITYSCAPES_LABELS",
    "CityscapesInstanceDataModule",
    "CityscapesInstanceDataset",
    "CityscapesLabel",
    "CityscapesPanopticDataModule",
    "CityscapesPanopticDataset",
    "CityscapesSemanticDataModule",
    "CityscapesSemanticDataset",
    "cityscapes_instance_class_info",
    "cityscapes_panoptic_categories",
    "cityscapes_semantic_class_info",
]
