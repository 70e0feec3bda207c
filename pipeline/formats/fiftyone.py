"""A directory FiftyOne imports, written without FiftyOne: its COCO detection layout.

``data/<file name>`` (the images) + ``labels.json`` (COCO instances with RLE segmentations, the
``score`` of each mask and its provenance under ``attributes``; written by the corpus side,
:mod:`dataengine.pipeline.annotate.export`). FiftyOne loads it with::

    import fiftyone as fo
    ds = fo.Dataset.from_dir(dataset_dir=DIR, dataset_type=fo.types.COCODetectionDataset,
                             label_types=["segmentations"])

(instance masks on ``ground_truth`` detections, ``score`` as their confidence). FiftyOne's COCO
exporter writes the same layout back, so the round trip is the COCO import. Lossless.
"""

from __future__ import annotations

from dataengine.pipeline.core import storage

DATA_DIR = "data"
LABELS_FILE = "labels.json"
README = "README.fiftyone.md"


def readme() -> str:
    """How to load the directory in FiftyOne (written next to ``labels.json``)."""
    return (__doc__ or "").split("\n", 1)[1].strip() + "\n"


def write_readme(out_dir: str) -> None:
    storage.write_bytes(storage.join(out_dir, README), readme().encode())
