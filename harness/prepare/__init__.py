"""Dataset preparation: derived label maps and layouts built from the official downloads.

Why a package of its own (not under ``harness/datasets``): the dataset registry imports every public
module of ``harness/datasets`` on the first lookup (``harness/registry.py``), and preparation code is
only needed by ``harness data prepare``. It sits one layer above the dataset specs: modules here may
import ``harness.datasets`` (the layouts and constants they write), never the reverse.

* :mod:`harness.prepare.labels`: COCO-Object, COCO-Stuff and PASCAL Context label maps.
* :mod:`harness.prepare.nyu`: NYU Depth v2 from the official ``.mat`` files (and optionally BTS).
"""
