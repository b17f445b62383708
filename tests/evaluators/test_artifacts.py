"""`harness run artifacts` end to end: the planted artifact shows for vanilla and goes for ttr and tta, every
number equals an independent numpy re-computation, Pearson on generated VOC data sits beside PH-Reg Table S.4
in the leaderboard, and a second identical run recomputes nothing."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness.backbones.planted import CLIP_MEAN, CLIP_STD, PLANTED_LAYER, PLANTED_UNIT, low_information_images
from harness.cli import main
from harness.errors import DataError
from harness.results.record import load_records

PROTOCOL = os.path.join(os.path.dirname(__file__), "..", "..", "harness", "protocols", "artifacts", "phreg.yaml")
PLANTED = "test-planted-clip"
#: target views: fewer than the protocol's 10 keep the target of the tta method (itself 10 views) cheap on CPU
VIEWS = 4


def small_protocol(path: Path, **overrides) -> str:
    """The shipped artifacts protocol with a new id, 224 px inputs (the planted model's native grid), 4 views."""
    with open(PROTOCOL) as f:
        data = yaml.safe_load(f)
    data["id"] = "test-small"
    data.pop("default", None)
    data["defaults"].update({"size_for_patch": {16: 224}, "views": VIEWS, **overrides})
    path.write_text(yaml.safe_dump(data))
    return str(path)


def write_low_information_folder(folder: Path, n: int) -> Path:
    """Low-information PNGs in nested sub-folders (the folder dataset searches recursively)."""
    x = low_information_images(n, (224, 224), seed=5)
    rgb = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    for i, im in enumerate(rgb):
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(sub / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """One CLI pass of vanilla, ttr and tta (PH-Reg's 10 views) on 2 low-information images; records by method."""
    tmp = tmp_path_factory.mktemp("artifacts")
    images = write_low_information_folder(tmp / "images", 2)
    neurons = tmp / "neurons.json"
    neurons.write_text(json.dumps({"backbone": PLANTED, "neurons": [[PLANTED_LAYER, PLANTED_UNIT]]}))
    proto = small_protocol(tmp / "proto.yaml")
    args = ["run", "artifacts", "--backbone", PLANTED, "--method", "vanilla,ttr,tta", "--dataset", "folder",
            "--data-root", str(images), "--random-init", "--protocol", proto, "--method-weights", str(neurons),
            "--workers", "0", "--device", "cpu", "--results-dir", str(tmp / "results"),
            "--no-progress"]
    assert main(args) == 0
    recs = {r.method: r for r in load_records(str(tmp / "results"))}
    return {"args": args, "records": recs, "images": images, "results": tmp / "results", "neurons": neurons}


def test_planted_artifact_shows_for_vanilla_and_goes_for_ttr_and_tta(planted_run) -> None:
    recs = planted_run["records"]
    assert set(recs) == {"vanilla", "ttr", "tta"}
    m = {k: r.metrics for k, r in recs.items()}
    for name, metrics in m.items():
        print(name, {k: round(v, 3) for k, v in metrics.items()})
    names = ["outliers_high", "outliers_low", "norm_cv"] + [f"cos_p{p}" for p in (50, 70, 90, 95, 99)]
    assert all(list(x) == names for x in m.values())  # no pearson without labels
    # the plant: ~22% of the positions are gated, most of them on uniform patches
    assert m["vanilla"]["outliers_high"] > 10.0
    assert m["vanilla"]["outliers_high"] > 2.5 * m["ttr"]["outliers_high"]
    assert m["vanilla"]["outliers_high"] > 1.5 * m["tta"]["outliers_high"]
    assert m["vanilla"]["norm_cv"] > 3 * m["ttr"]["norm_cv"] and m["vanilla"]["norm_cv"] > m["tta"]["norm_cv"]
    # position-fixed artifacts stay put when the content shifts: vanilla's tail of tokens is inconsistent
    for p in (50, 70, 90, 95, 99):
        assert m["tta"][f"cos_p{p}"] > m["vanilla"][f"cos_p{p}"], p
    for p in (90, 95, 99):
        assert m["tta"][f"cos_p{p}"] > m["vanilla"][f"cos_p{p}"] + 0.25, p
    assert m["tta"]["cos_p70"] > 0.95 and m["vanilla"]["cos_p90"] < 0.5
    rec = recs["vanilla"]
    assert rec.task == "artifacts" and rec.dataset == "folder" and rec.num_images == 2
    assert rec.settings["methods_in_pass"] == ["vanilla", "ttr", "tta"] and rec.settings["input_size"] == 224


def _lower_median(x: np.ndarray) -> float:
    """The median as harness.metrics.artifacts takes it (torch's: the lower middle value of an even count)."""
    return float(np.sort(x)[(len(x) - 1) // 2])


def _numpy_modified_z(norms: np.ndarray) -> np.ndarray:
    """Iglewicz & Hoaglin's modified z-score, 0.6745 (x - median) / MAD."""
    med = _lower_median(norms)
    return 0.6745 * (norms - med) / _lower_median(np.abs(norms - med))


def test_vanilla_numbers_equal_a_numpy_recomputation(planted_run) -> None:
    """Reference: the images read with PIL, vanilla and vanilla+tta (same views and seed as the protocol) run
    as plain models, and the measures written out in numpy."""
    from harness.models import build_dense_model

    paths = sorted(Path(planted_run["images"]).rglob("*.png"))
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    x = torch.from_numpy(np.stack([((np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 - mean) / std)
                                   .transpose(2, 0, 1) for p in paths]).astype(np.float32))
    vanilla = build_dense_model(PLANTED, "vanilla", random_init=True)
    tta = build_dense_model(PLANTED, "tta", params={"views": VIEWS, "seed": 0}, random_init=True)
    with torch.no_grad():
        f = vanilla.forward_dense(x).patch.double().numpy()
        t = tta.forward_dense(x).patch.double().numpy()
    f, t = f.reshape(f.shape[0], f.shape[1], -1), t.reshape(t.shape[0], t.shape[1], -1)
    norms = np.linalg.norm(f, axis=1)
    z = np.stack([_numpy_modified_z(n) for n in norms])
    cv = np.mean([n.std() / n.mean() for n in norms])
    cos = ((f * t).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(t, axis=1))).reshape(-1)
    got = planted_run["records"]["vanilla"].metrics
    assert got["outliers_high"] == pytest.approx(100 * np.mean(z > 3.5), abs=1e-9)
    assert got["outliers_low"] == pytest.approx(100 * np.mean(z < -3.5), abs=1e-9)
    assert got["norm_cv"] == pytest.approx(cv, rel=1e-5)
    for p in (50, 70, 90, 95, 99):
        assert got[f"cos_p{p}"] == pytest.approx(np.percentile(cos, 100 - p), abs=1e-5), p


def test_second_identical_run_recomputes_nothing(planted_run, monkeypatch) -> None:
    from harness.evaluators import artifacts

    def boom(*a, **k):
        raise AssertionError("a finished run was measured again")

    monkeypatch.setattr(artifacts, "shared_trunk_features", boom)
    before = {m: r.created for m, r in planted_run["records"].items()}
    files = sorted(os.listdir(planted_run["results"] / "runs" / "artifacts" / "test-small"))
    assert main(planted_run["args"]) == 0
    again = {r.method: r for r in load_records(str(planted_run["results"]))}
    assert {m: r.created for m, r in again.items()} == before
    assert sorted(os.listdir(planted_run["results"] / "runs" / "artifacts" / "test-small")) == files


def test_interrupted_run_resumes_from_its_partial_state(planted_run, tmp_path, monkeypatch) -> None:
    """A Ctrl-C after the first loader step leaves a partial state; the rerun measures only the rest and
    ends with the numbers of the uninterrupted run."""
    from harness.evaluators import artifacts

    monkeypatch.setattr(artifacts, "IMAGES_PER_STEP", 1)
    real = artifacts.ArtifactStats.add_tokens
    calls = {"n": 0}

    def counted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # second step of the first method: nothing of that step is committed
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(artifacts.ArtifactStats, "add_tokens", counted)
    args = [a if a != "vanilla,ttr,tta" else "vanilla" for a in planted_run["args"]]
    args[args.index("--results-dir") + 1] = str(tmp_path / "results")
    drop = args.index("--method-weights")
    args = args[:drop] + args[drop + 2:]
    assert main(args) == 130  # the CLI's exit status after Ctrl-C
    partials = list((tmp_path / "results").rglob("*.partial.pt"))
    assert len(partials) == 1 and torch.load(partials[0], weights_only=True)["done"] == 1
    monkeypatch.setattr(artifacts.ArtifactStats, "add_tokens", real)
    assert main(args) == 0
    (rec,) = load_records(str(tmp_path / "results"))
    assert not list((tmp_path / "results").rglob("*.partial.pt"))
    assert rec.metrics == pytest.approx(planted_run["records"]["vanilla"].metrics, abs=1e-9)


def test_folder_errors_name_the_option(tmp_path) -> None:
    from harness.registry import DATASETS

    spec = DATASETS.get("folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"--data-root .*empty: no image files"):
        spec.image_paths(str(tmp_path / "empty"))
    assert "no such folder" in spec.verify(str(tmp_path / "missing"))[0]
    with pytest.raises(DataError, match="label-free tasks only"):
        spec.build(str(tmp_path / "empty"))


# -- Pearson on generated VOC data -------------------------------------------------------------------
OVSS_WHOLE = {
    "id": "test-whole", "version": 1, "task": "ovss", "description": "tiny CPU protocol for tests", "source": "tests",
    "defaults": {"mode": "whole", "crop": 64, "stride": 32, "max_long_side": 2048, "resize": 64, "logit_scale": 40,
                 "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip", "templates": "test_one"},
    "datasets": {"voc21": {}},
}


@pytest.fixture()
def one_template(monkeypatch):
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])


def _reference_pearson(model, img_path: str, seg_path: str, text: torch.Tensor, owner: np.ndarray) -> float:
    """Table S.4 for one image from scratch: cv2 rescale (mmcv's rule), whole-image cosine maps upsampled to the
    label, per class the max over its queries, Pearson with the one-hot mask per present class, mean."""
    import cv2

    bgr = cv2.imread(img_path)
    h, w = bgr.shape[:2]
    scale = min(2048 / max(h, w), 64 / min(h, w))
    nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)
    rgb = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)[..., ::-1].astype(np.float32)
    x = (rgb - 255 * np.array(CLIP_MEAN)) / (255 * np.array(CLIP_STD))
    with torch.no_grad():
        f = model.forward_dense(torch.from_numpy(x.transpose(2, 0, 1).copy()).float()[None]).patch
    f = f / f.norm(dim=1, keepdim=True)
    cos = torch.einsum("nchw,qc->nqhw", f, text.float().cpu())
    cos = torch.nn.functional.interpolate(cos, size=(h, w), mode="bilinear", align_corners=False)[0].double().numpy()
    label = np.array(Image.open(seg_path)).astype(np.int64)
    valid = label != 255
    vals = []
    for c in np.unique(label[valid]):
        s = cos[owner == c].max(0)[valid]
        t = (label[valid] == c).astype(np.float64)
        if s.std() > 0 and t.std() > 0:
            vals.append(np.corrcoef(s, t)[0, 1])
    return float(np.mean(vals))


def test_pearson_on_voc_equals_a_reference_and_sits_beside_table_s4(tmp_path, one_template, monkeypatch) -> None:
    from harness.models import build_dense_model
    from harness.registry import DATASETS
    from harness.results.record import write_record
    from harness.results.report import write_report
    from harness.synthetic.segmentation import write_synthetic_dataset
    from harness.text.encoder import class_queries
    from harness.text.names import load_name_set

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=2, size=(60, 80), seed=2)
    ovss = tmp_path / "ovss.yaml"
    ovss.write_text(yaml.safe_dump(OVSS_WHOLE))
    proto = small_protocol(tmp_path / "proto.yaml", size_for_patch={16: 64}, ovss_protocol=str(ovss))
    results = tmp_path / "results"
    # a random-init CLIP with a text tower: the planted test CLIP (a ViT-B/16 would only be slower)
    args = ["run", "artifacts", "--backbone", PLANTED, "--method", "vanilla", "--dataset", "voc21",
            "--data-root", root, "--random-init", "--protocol", proto, "--workers", "0", "--device", "cpu",
            "--results-dir", str(results), "--limit", "1", "--no-progress"]
    assert main(args) == 0
    (rec,) = load_records(str(results))
    assert "pearson" in rec.metrics and rec.settings["pearson_images"] == 1
    assert rec.settings["ovss_settings"]["mode"] == "whole"

    # the reference, for the one image of the run
    spec = DATASETS.get("voc21")
    img_id = spec.image_ids(root)[0]
    model = build_dense_model(PLANTED, "vanilla", random_init=True)
    names = load_name_set("sclip", "voc21")
    text = class_queries(model, names, "test_one", torch.device("cpu"), str(tmp_path / "cache2"))
    ref = _reference_pearson(model, os.path.join(root, "JPEGImages", img_id + ".jpg"),
                             os.path.join(root, "SegmentationClass", img_id + ".png"), text.embeddings,
                             text.query_class.numpy())
    assert rec.metrics["pearson"] == pytest.approx(ref, abs=1e-5)

    # the leaderboard: our pearson in the artifacts task, beside the published Table S.4 rows
    csv_path, md_path = write_report(str(results))
    rows = list(csv.DictReader(open(csv_path)))
    ours = [r for r in rows if r["source"] == "ours" and r["metric"] == "pearson"]
    pub = [r for r in rows if r["source"] == "published" and r["metric"] == "pearson"]
    assert [(r["task"], r["dataset"]) for r in ours] == [("artifacts", "voc21")]
    assert {r["task"] for r in pub} == {"artifacts"} and len(pub) == 5 * 7
    md = open(md_path).read()
    section = md.split("## Task `artifacts`")[1]
    assert "#### `test-small` v1, pearson: random-init weights" in section
    assert "##### PH-Reg Table S.4 (pearson)" in section and "label-free, VOC21" in section

    # the same record with real weights and a published method gets the published and delta rows
    real = tmp_path / "real"
    rec.protocol, rec.weights, rec.method, rec.settings["limit"] = "phreg", "ab" * 32, "naclip", None
    rec.backbone = "clip-b16-openai"
    rec.num_images = 1449
    write_record(rec, str(real / "runs" / "artifacts" / "phreg" / "r.json"))
    _, md_path = write_report(str(real))
    md = open(md_path).read()
    table = md.split("#### `phreg` v1, pearson: real weights")[1].split("####")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[1].startswith("| naclip |")
    assert lines[2].startswith("| ↳ published: PH-Reg Table S.4 |") and "| 0.011 |" in lines[2]
    assert f"| {rec.metrics['pearson'] - 0.011:+.3f} |" in lines[3]


def test_labelled_dataset_without_text_tower_has_no_pearson(tmp_path) -> None:
    """A vision-only backbone (patch 14: its own input size) on VOC: the label-free numbers, no pearson."""
    from harness.synthetic.segmentation import write_synthetic_dataset

    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=2, size=(60, 80), seed=4)
    proto = small_protocol(tmp_path / "proto.yaml", size_for_patch={14: 56, 16: 64})
    results = tmp_path / "results"
    assert main(["run", "artifacts", "--backbone", "test-vit-tiny", "--dataset", "voc21", "--data-root", root,
                 "--random-init", "--protocol", proto, "--workers", "0", "--device", "cpu", "--results-dir",
                 str(results), "--no-progress"]) == 0
    (rec,) = load_records(str(results))
    assert "pearson" not in rec.metrics and "cos_p99" in rec.metrics and rec.num_images == 2
    assert rec.settings["input_size"] == 56 and rec.settings["grid"] == [4, 4]
    assert any("no text tower" in n for n in rec.notes)


def test_protocol_without_a_size_for_the_patch_is_refused() -> None:
    from harness.errors import ConfigError
    from harness.evaluators.artifacts import input_size

    assert input_size({"size_for_patch": {14: 518, 16: 448}}, 14, "p") == 518
    with pytest.raises(ConfigError, match="no entry for patch size 8"):
        input_size({"size_for_patch": {14: 518, 16: 448}}, 8, "p")
    with pytest.raises(ConfigError, match="not a multiple of the patch size"):
        input_size({"size_for_patch": {16: 450}}, 16, "p")


def test_a_changed_ovss_protocol_version_is_refused(tmp_path, one_template, capsys) -> None:
    """The Pearson settings come from another protocol file; its version is pinned so that a changed file can
    never be read back under an old record's identity."""
    from harness.synthetic.segmentation import write_synthetic_dataset

    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=1, size=(60, 80))
    ovss = tmp_path / "ovss.yaml"
    ovss.write_text(yaml.safe_dump({**OVSS_WHOLE, "version": 2}))
    proto = small_protocol(tmp_path / "proto.yaml", size_for_patch={16: 64}, ovss_protocol=str(ovss))
    assert yaml.safe_load(open(PROTOCOL))["defaults"]["ovss_protocol_version"] == 1
    rc = main(["run", "artifacts", "--backbone", PLANTED, "--dataset", "voc21", "--data-root", root, "--random-init",
               "--protocol", proto, "--workers", "0", "--device", "cpu", "--results-dir", str(tmp_path / "r"),
               "--no-progress"])
    assert rc == 2 and not load_records(str(tmp_path / "r"))  # the folder may exist (checked writable), no record
    assert "pins ovss protocol ovss/test-whole at v1" in capsys.readouterr().err


def test_bad_image_in_a_folder_fails_in_one_line_or_is_skipped(tmp_path, capsys) -> None:
    """A truncated JPEG among the images: `fail` names it and exits non-zero before any work; `skip` measures
    the rest and marks the record partial, listing the file."""
    images = write_low_information_folder(tmp_path / "images", 2)
    good = next(images.rglob("*.png"))
    bad = images / "part0" / "cut.jpg"
    Image.open(good).convert("RGB").save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:-200])  # cut before the end-of-image marker
    proto = small_protocol(tmp_path / "proto.yaml", views=1)
    base = ["run", "artifacts", "--backbone", PLANTED, "--method", "vanilla", "--dataset", "folder",
            "--data-root", str(images), "--random-init", "--protocol", proto, "--workers", "0", "--device", "cpu",
            "--results-dir", str(tmp_path / "results"), "--no-progress"]
    assert main(base) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if "cut.jpg" in ln]) == 1 and "truncated JPEG" in err[-1]
    assert not (tmp_path / "results").exists() or not load_records(str(tmp_path / "results"))
    assert main(base + ["--on-bad-image", "skip"]) == 0
    (rec,) = load_records(str(tmp_path / "results"))
    assert rec.partial and rec.num_images == 2
    assert [s["image"] for s in rec.skipped_images] == [str(bad)]
