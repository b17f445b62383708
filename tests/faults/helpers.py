"""Shared by the fault tests: a tiny OVSS protocol, generated VOC data, CLI calls with one-line error checks."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Tuple

import yaml

from harness.cli import main

#: a CPU-sized OVSS protocol: one template, whole-image inference at 64 px (the planted CLIP's patch is 16)
OVSS_PROTOCOL = {"id": "faults-ovss", "version": 1, "task": "ovss", "description": "tiny CPU protocol (fault tests)",
                 "source": "tests", "defaults": {"mode": "whole", "crop": 64, "stride": 64, "max_long_side": 2048,
                                                 "resize": 64, "logit_scale": 40, "prob_thd": 0.0, "area_thd": None,
                                                 "pamr": None, "name_set": "sclip", "templates": "gem_single"},
                 "datasets": {"voc21": {}}}


def write_protocol(folder: Path) -> str:
    path = folder / "faults-ovss.yaml"
    path.write_text(yaml.safe_dump(OVSS_PROTOCOL))
    return str(path)


def voc(folder: Path, n: int = 4) -> Path:
    """``n`` generated VOC21 val images of about 48 x 64 px."""
    from harness.synthetic.segmentation import write_synthetic_dataset

    return Path(write_synthetic_dataset("voc21", str(folder), num_images=n, size=(48, 64)))


def sample_paths(root: Path, k: int) -> Tuple[Path, Path]:
    """(image, label map) of the k-th val sample."""
    first = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[k]
    return root / "JPEGImages" / f"{first}.jpg", root / "SegmentationClass" / f"{first}.png"


def copy_without(root: Path, dest: Path, drop: List[int]) -> Path:
    """A copy of the VOC root without the val samples at positions ``drop`` (an independent reference)."""
    shutil.copytree(root, dest)
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    keep = [i for k, i in enumerate(ids) if k not in drop]
    (dest / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(keep) + "\n")
    return dest


def ovss_args(root: Path, results: Path, cache: Path, protocol: str, *extra: str) -> List[str]:
    return ["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--dataset", "voc21",
            "--data-root", str(root), "--protocol", protocol, "--results-dir", str(results), "--cache-dir",
            str(cache), "--device", "cpu", "--workers", "0", "--no-progress", *extra]


def run_cli(capsys, args: List[str]) -> Tuple[int, str, str]:
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error(rc: int, err: str) -> str:
    """Exit 2 and exactly one single-line ``harness: error:`` message without traceback; returns that line."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("harness: error:")]
    assert len(lines) == 1, err
    assert "harness: unexpected" not in err, err
    return lines[0]


def records(results: Path) -> List[str]:
    return sorted(str(p) for p in results.rglob("*.json") if ".partial-" not in p.name)


def leftovers(folder: Path) -> List[str]:
    """Temporary files a writer left behind (there must be none)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or ".tmp" in p.suffixes)]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt_bytes(path: Path) -> None:
    path.write_bytes(b"this is not an image" * 10)


def linear_protocol(path: Path) -> str:
    """The shipped ``linear-seg/fast`` protocol at CPU size: 12 iterations, no periodic checkpoint."""
    here = Path(__file__).resolve().parents[2] / "harness" / "protocols" / "linear-seg" / "fast.yaml"
    data = yaml.safe_load(here.read_text())
    data["id"] = "faults-linear"
    data.pop("default", None)
    data["defaults"].update(test_scale=[448, 112], crop_size=[112, 112], slide_crop=[112, 112],
                            slide_stride=[75, 75], batch_size=4, holdout_fraction=0.25, max_iters=12,
                            eval_interval=12, log_interval=2,
                            checkpoint_interval=100,  # no periodic checkpoint: the signal's is the only one
                            schedule={"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 2,
                                      "warmup_ratio": 1e-6})
    path.write_text(yaml.safe_dump(data))
    return str(path)
