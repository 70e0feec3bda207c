"""Annotation interchange formats, one module per tool: masks out to and back from the tools
annotation teams and trainers use, without those tools installed.

- :mod:`.labelstudio`: Label Studio task JSON, brush RLE (lossless) or polygons, as annotations or
  as predictions carrying the model version (pre-annotation);
- :mod:`.cvat`: "CVAT for images 1.1" XML with RLE masks (lossless), and CVAT's "COCO 1.0"
  layout (``annotations/instances_default.json`` + ``images/``, RLE, lossless);
- :mod:`.yolo`: Ultralytics YOLO-seg (``data.yaml``, ``images/``, ``labels/*.txt`` polygons);
- :mod:`.fiftyone`: a directory FiftyOne imports as ``fo.types.COCODetectionDataset``
  (``data/`` + ``labels.json``, RLE, lossless).

Every module converts between :class:`.common.FormatImage` lists and files; the corpus side
(which rounds, image bytes, matching images back to keys, writing a round) is
:mod:`dataengine.pipeline.annotate.interchange`. Polygon geometry (both ways) is
:mod:`.polygons`.
"""

FORMATS = ("coco", "sa1b", "labelstudio", "cvat", "cvat-coco", "yolo", "fiftyone")
