"""What keys a cache and a checkpoint: the data files and, for random init, the actual random tensors."""
from __future__ import annotations

import os
import time

import torch

from harness.models import build_dense_model
from harness.probes.common import dataset_fingerprint, weights_identity
from harness.registry import DATASETS
from harness.synthetic.segmentation import write_synthetic_dataset


def test_dataset_fingerprint_follows_the_files(tmp_path) -> None:
    root = write_synthetic_dataset("voc21", str(tmp_path), num_images=3, size=(40, 56), split="val")
    spec = DATASETS.get("voc21")
    before = dataset_fingerprint(spec.build(root, "val"))
    assert before == dataset_fingerprint(spec.build(root, "val"))
    time.sleep(0.01)
    ann = os.path.join(root, "SegmentationClass", sorted(os.listdir(os.path.join(root, "SegmentationClass")))[0])
    with open(ann, "ab") as f:
        f.write(b"\0")  # a re-prepared label map
    assert dataset_fingerprint(spec.build(root, "val")) != before


def test_weights_identity_of_random_models_is_their_content() -> None:
    a = build_dense_model("test-vit-tiny", "vanilla", random_init=True)
    b = build_dense_model("test-vit-tiny", "vanilla", random_init=True)
    assert weights_identity(a) == weights_identity(b) and weights_identity(a).startswith("random-init:")
    with torch.no_grad():
        b.backbone.model.norm.weight.add_(1.0)
    assert weights_identity(a) != weights_identity(b)
    a.backbone.weights_id = "0" * 64  # a real weights file: its hash is the identity
    assert weights_identity(a) == "0" * 64
