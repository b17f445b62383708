"""Generated data in the real on-disk layouts, for tests, CI smoke runs and ``harness demo``.

Why a package of its own (not under ``harness/datasets``): the dataset registry imports every public
module of ``harness/datasets`` on the first lookup (``harness/registry.py``), and the writers are never
needed to look a dataset up. This is the top data layer: it may import ``harness.datasets`` and
``harness.prepare`` (to write already-prepared label maps), never the reverse.

* :mod:`harness.synthetic.segmentation`: the 8 OVSS datasets, the demo VOC set and the raw inputs of
  the label-map preparation (Context json, COCO instances).
* :mod:`harness.synthetic.nyu`: a small NYU Depth v2 ``.mat`` + ``splits.mat`` pair.
"""
