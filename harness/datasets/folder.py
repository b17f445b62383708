"""``folder``: any folder of images, searched recursively, without labels (label-free evaluators only).

Why a dataset entry: the label-free artifact evaluator (``harness run artifacts``) measures a backbone on
whatever images a user has (a photo folder, a crawl, the COCO images without annotations); registering the
folder like every other dataset keeps ``--dataset folder --data-root DIR`` and the run's identity (record
name, run key, leaderboard cell) the same as for the labelled datasets. Listing and reading go through
:mod:`harness.image_folder`, the one reader of unlabelled folders.
"""
from __future__ import annotations

import os
from typing import List, Optional

from ..errors import DataError
from ..image_folder import IMAGE_EXTENSIONS, list_images
from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout


@DATASETS.register("folder")
class ImageFolder(DatasetSpec):
    """Any folder of images (recursive, no labels): for label-free evaluators such as ``artifacts``."""

    labelled = False
    key = "folder"
    root_hint = f"any folder holding images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively"
    how_to_get = "pass any folder of images as --data-root"
    # a folder has no official split: the one split is named like the CLI's default; count 0 = unknown
    splits = {"val": SplitLayout(img_dir="", ann_dir="", count=0)}

    def image_paths(self, root: str, limit: Optional[int] = None) -> List[str]:
        """The image files under ``root`` (sorted, recursive); a :class:`DataError` naming ``--data-root``."""
        if not os.path.isdir(root):
            raise DataError(f"--data-root {root}: no such folder (dataset 'folder' expects {self.root_hint})")
        try:
            return list_images(root, limit)
        except DataError as e:
            raise DataError(f"--data-root {root}: no image files found (dataset 'folder' expects "
                            f"{self.root_hint})") from e

    def verify(self, root: str, split: str = "val", check_count: bool = True) -> List[str]:
        self.split(split)
        try:
            self.image_paths(root)
        except DataError as e:
            return [str(e)]
        return []

    def image_ids(self, root: str, split: str = "val") -> List[str]:
        return [os.path.relpath(p, root) for p in self.image_paths(root)]

    def build(self, root: str, split: str = "val", pipeline=(), limit: Optional[int] = None):
        raise DataError("dataset 'folder' has no labels: it works with label-free tasks only "
                        "(harness run artifacts), not with ovss, linear-seg or depth")

    @property
    def class_names(self) -> List[str]:
        return []
