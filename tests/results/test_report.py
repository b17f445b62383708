"""``harness report`` on synthetic RunRecords: layout, Avg rule, random-init separation, Δ, newest wins."""
from __future__ import annotations

import csv
import os
import re
from typing import Any, Dict, List, Optional

from harness.results.layouts import OVSS_DATASETS
from harness.results.published import COLUMNS
from harness.results.record import RunRecord, record_path, write_record
from harness.results.report import RANDOM_TITLE, write_report
from harness.results.selection import is_partial, select_records

W = "ab" * 32  # a fake sha256
COUNTS = {("voc21", "val"): 1449, ("ade20k", "val"): 2000, ("nyu", "test"): 654}
HDR_OVSS = "| Method | Backbone | Weights | VOC21 | PC60 | Object | VOC20 | PC59 | Stuff | City | ADE | Avg |"


def rec(task: str = "ovss", protocol: str = "p1", method: str = "naclip", backbone: str = "clip-b16-openai",
        dataset: str = "voc21", metrics: Optional[Dict[str, float]] = None, weights: str = W,
        created: str = "2025-01-01T00:00:00+00:00", num_images: int = 1449, limit: Optional[int] = None,
        version: int = 1, split: str = "val", params: Optional[Dict[str, Any]] = None) -> RunRecord:
    return RunRecord(task=task, protocol=protocol, protocol_version=version, backbone=backbone, weights=weights,
                     method=method, method_params=params or {}, dataset=dataset, split=split, data_root="/d",
                     num_images=num_images, metrics=metrics if metrics is not None else {"mIoU": 50.0},
                     settings={"limit": limit}, created=created, git_hash="cafe", harness_version="0.1.0",
                     environment={})


def save(results: str, records: List[RunRecord]) -> None:
    for i, r in enumerate(records):
        write_record(r, record_path(results, r.task, r.protocol, r.backbone, r.method, r.dataset, f"k{i:03d}"))


def published_dir(tmp_path, rows: List[str]) -> str:
    d = tmp_path / "published"
    d.mkdir(exist_ok=True)
    (d / "t.csv").write_text(",".join(COLUMNS) + "\n" + "".join(r + "\n" for r in rows))
    return str(d)


def report(tmp_path, records: List[RunRecord], pub_rows: Optional[List[str]] = None) -> Dict[str, Any]:
    results = str(tmp_path / "results")
    save(results, records)
    pub = published_dir(tmp_path, pub_rows or ["ovss,x,T,other,clip,clip-b16-openai,voc21,mIoU,1.0,cite,"])
    out_csv, out_md = write_report(results, published_dir=pub, official_counts=COUNTS)
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    with open(out_md) as f:
        md = f.read()
    return {"csv": rows, "md": md, "paths": (out_csv, out_md), "results": results}


def table_rows(md: str, heading_contains: str) -> List[List[str]]:
    """Body rows of the first table after the first heading containing ``heading_contains``."""
    lines = md.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("#") and heading_contains in ln)
    out, started = [], False
    for ln in lines[i + 1:]:
        if ln.startswith("|"):
            started = True
            out.append([c.strip() for c in ln.strip("|").split("|")])
        elif started:
            break
    return out[2:]  # drop header and rule


def header_of(md: str, heading_contains: str) -> str:
    lines = md.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("#") and heading_contains in ln)
    return next(ln for ln in lines[i + 1:] if ln.startswith("|"))


def full_ovss(values: List[float], **kw: Any) -> List[RunRecord]:
    return [rec(dataset=d, metrics={"mIoU": v}, num_images=COUNTS.get((d, "val"), 1449), **kw)
            for d, v in zip(OVSS_DATASETS, values)]


def test_default_paths_and_csv_schema(tmp_path) -> None:
    r = report(tmp_path, [rec()])
    assert r["paths"] == (os.path.join(r["results"], "leaderboard.csv"), os.path.join(r["results"], "LEADERBOARD.md"))
    ours = [x for x in r["csv"] if x["source"] == "ours"]
    assert len(ours) == 1
    row = ours[0]
    assert (row["task"], row["protocol"], row["protocol_version"], row["backbone"], row["weights"], row["method"],
            row["dataset"], row["metric"], row["value"]) == ("ovss", "p1", "1", "clip-b16-openai", W, "naclip",
                                                             "voc21", "mIoU", "50.0")
    assert row["num_images"] == "1449" and row["official_num_images"] == "1449" and row["partial"] == "False"
    assert row["git_hash"] == "cafe" and row["harness_version"] == "0.1.0"
    assert [x["source"] for x in r["csv"]].count("published") == 1


def test_ovss_layout_and_avg_rule(tmp_path) -> None:
    vals = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    records = full_ovss(vals, method="naclip") + full_ovss(vals[:7], method="sclip")  # sclip lacks ADE
    md = report(tmp_path, records)["md"]
    assert header_of(md, "`p1` v1, mIoU: real weights") == HDR_OVSS
    rows = {r[0]: r for r in table_rows(md, "`p1` v1, mIoU: real weights")}
    assert rows["naclip"][3:] == ["10.00", "20.00", "30.00", "40.00", "50.00", "60.00", "70.00", "80.00", "45.00"]
    assert rows["sclip"][-2:] == ["–", "–"]  # ADE missing -> no Avg


def test_partial_cell_marks_the_avg(tmp_path) -> None:
    records = full_ovss([10.0] * 8)
    records[-1] = rec(dataset="ade20k", metrics={"mIoU": 10.0}, num_images=5, limit=5)
    row = table_rows(report(tmp_path, records)["md"], "`p1` v1, mIoU: real weights")[0]
    assert row[-2:] == ["10.00†", "10.00†"]


def test_linear_seg_and_depth_layouts(tmp_path) -> None:
    records = [rec(task="linear-seg", protocol="p", method="clip", dataset="voc21",
                   metrics={"mIoU": 84.0, "mAcc": 92.0}),
               rec(task="linear-seg", protocol="p", method="clip", dataset="ade20k", num_images=2000,
                   metrics={"mIoU": 48.0, "mAcc": 61.0, "aAcc": 81.0}),
               rec(task="depth", protocol="p", method="clip", dataset="nyu", split="test", num_images=654,
                   metrics={"rmse": 0.43, "abs_rel": 0.12, "delta1": 86.35})]
    md = report(tmp_path, records)["md"]
    assert header_of(md, "Task `linear-seg`") == ("| Method | Backbone | Weights | VOC21 mIoU | VOC21 mAcc | ADE mIoU "
                                                  "| ADE mAcc | ADE aAcc |")
    seg = md.split("## Task `linear-seg`")[1].split("## Task `depth`")[0]
    assert table_rows(seg, "`p` v1")[0][3:] == ["84.00", "92.00", "48.00", "61.00", "81.00"]
    depth = md.split("## Task `depth`")[1]
    assert header_of(depth, "`p` v1") == ("| Method | Backbone | Weights | NYUd RMSE ↓ | NYUd AbsRel ↓ "
                                          "| NYUd δ1 ↑ |")
    assert table_rows(depth, "`p` v1")[0][3:] == ["0.4300", "0.1200", "86.35"]


def test_random_init_is_separate_and_never_compared(tmp_path) -> None:
    pub = ["ovss,x,T,p1,naclip,clip-b16-openai,voc21,mIoU,40.00,cite,"]
    records = [rec(metrics={"mIoU": 55.0}), rec(weights="random-init", metrics={"mIoU": 3.0})]
    md = report(tmp_path, records, pub)["md"]
    real = table_rows(md, "`p1` v1, mIoU: real weights")
    assert [r[2] for r in real if not r[0].startswith("↳")] == [W[:8]]
    assert "3.00" not in " ".join(c for r in real for c in r)
    rand = table_rows(md, RANDOM_TITLE)
    assert rand == [["naclip", "clip-b16-openai", "random-init", "3.00"] + ["–"] * 8]
    assert re.search(r"^#### .*random-init weights: numbers are not meaningful$", md, re.M)


def test_delta_rows(tmp_path) -> None:
    pub = [f"ovss,x,Table 9,p1,naclip,clip-b16-openai,{d},mIoU,{v},cite,"
           for d, v in zip(OVSS_DATASETS, ["11.5", "20", "30", "40", "50", "60", "70", "79"])]
    pub.append("ovss,x,Table 9,p1,naclip,clip-b16-openai,avg,mIoU,99.99,cite,printed avg")
    pub.append("ovss,x,Table 9,p1,naclip,clip-b16-openai,voc21,mIoU,1.0,cite,".replace("naclip", "maskclip"))
    records = full_ovss([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0])
    md = report(tmp_path, records, pub)["md"]
    rows = table_rows(md, "`p1` v1, mIoU: real weights")
    assert [r[0] for r in rows] == ["naclip", "↳ published: x Table 9", "↳ Δ ours − x Table 9"]
    assert rows[1][3:] == ["11.50", "20.00", "30.00", "40.00", "50.00", "60.00", "70.00", "79.00", "45.06"]
    assert rows[2][3:] == ["-1.50", "+0.00", "+0.00", "+0.00", "+0.00", "+0.00", "+0.00", "+1.00", "-0.06"]
    # the published-only table shows both the recomputed and the printed average
    pub_rows = {r[0]: r for r in table_rows(md, "x Table 9 (mIoU)")}
    assert pub_rows["naclip"][-2:] == ["45.06", "99.99"]
    assert pub_rows["maskclip"][-2:] == ["–", "–"]


def test_published_matched_through_method_aliases(tmp_path) -> None:
    pub = ["ovss,x,T,p1,vanilla,clip-b16-openai,voc21,mIoU,18.60,cite,"]
    md = report(tmp_path, [rec(method="clip", metrics={"mIoU": 20.0})], pub)["md"]
    rows = table_rows(md, "`p1` v1, mIoU: real weights")
    assert rows[2][:4] == ["↳ Δ ours − x T", "", "", "+1.40"]


def test_published_needs_same_protocol_and_backbone(tmp_path) -> None:
    pub = ["ovss,x,T,p2,naclip,clip-b16-openai,voc21,mIoU,1.0,cite,",
           "ovss,x,T,p1,naclip,clip-b16-laion2b,voc21,mIoU,2.0,cite,"]
    md = report(tmp_path, [rec()], pub)["md"]
    assert [r[0] for r in table_rows(md, "`p1` v1, mIoU: real weights")] == ["naclip"]
    assert "### Protocol `p2`" in md and "No runs under this protocol yet." in md


def test_newest_record_wins(tmp_path) -> None:
    records = [rec(metrics={"mIoU": 40.0}, created="2025-01-01T00:00:00+00:00"),
               rec(metrics={"mIoU": 41.0}, created="2025-03-01T00:00:00+00:00"),
               rec(metrics={"mIoU": 39.0}, created="2025-02-01T00:00:00+00:00")]
    r = report(tmp_path, records)
    assert table_rows(r["md"], "`p1` v1, mIoU: real weights")[0][3] == "41.00"
    assert [x["value"] for x in r["csv"] if x["source"] == "ours"] == ["41.0"]


def test_full_run_beats_newer_partial_run(tmp_path) -> None:
    records = [rec(metrics={"mIoU": 40.0}, created="2025-01-01T00:00:00+00:00"),
               rec(metrics={"mIoU": 90.0}, created="2025-06-01T00:00:00+00:00", num_images=10, limit=10)]
    assert [x.metrics["mIoU"] for x in select_records(records, COUNTS)] == [40.0]
    r = report(tmp_path, records)
    assert table_rows(r["md"], "`p1` v1, mIoU: real weights")[0][3] == "40.00"


def test_partial_runs_are_flagged(tmp_path) -> None:
    by_limit = rec(metrics={"mIoU": 12.0}, num_images=10, limit=10)
    by_count = rec(method="sclip", metrics={"mIoU": 13.0}, num_images=1000)
    assert is_partial(by_limit, COUNTS) and is_partial(by_count, COUNTS)
    assert not is_partial(rec(), COUNTS)
    assert not is_partial(rec(dataset="unknown", num_images=1), COUNTS)  # no official count known
    r = report(tmp_path, [by_limit, by_count])
    rows = {x[0]: x for x in table_rows(r["md"], "`p1` v1, mIoU: real weights")}
    assert rows["naclip"][3] == "12.00†" and rows["sclip"][3] == "13.00†"
    assert "† naclip / clip-b16-openai / voc21: 10 images (--limit 10), not the full split" in r["md"]
    assert "† sclip / clip-b16-openai / voc21: 1000 images, not the full split" in r["md"]
    flags = {(x["method"], x["partial"], x["limit"]) for x in r["csv"] if x["source"] == "ours"}
    assert flags == {("naclip", "True", "10"), ("sclip", "True", "")}


def test_versions_params_and_weights_are_kept_apart(tmp_path) -> None:
    records = [rec(metrics={"mIoU": 1.0}), rec(version=2, metrics={"mIoU": 2.0}),
               rec(params={"pamr_steps": 10}, metrics={"mIoU": 3.0}),
               rec(weights="cd" * 32, metrics={"mIoU": 4.0})]
    md = report(tmp_path, records)["md"]
    v1 = table_rows(md, "`p1` v1, mIoU: real weights")
    assert sorted((r[0], r[2], r[3]) for r in v1) == [("naclip", "abababab", "1.00"),
                                                      ("naclip", "cdcdcdcd", "4.00"),
                                                      ("naclip (pamr_steps=10)", "abababab", "3.00")]
    assert table_rows(md, "`p1` v2, mIoU: real weights")[0][3] == "2.00"


def test_real_published_tables_are_listed(tmp_path) -> None:
    results = str(tmp_path / "results")
    save(results, [rec(protocol="phreg", metrics={"mIoU": 60.0})])
    _, out_md = write_report(results, official_counts=COUNTS)
    md = open(out_md).read()
    rows = table_rows(md, "`phreg` v1, mIoU: real weights")
    assert rows[1][0] == "↳ published: PH-Reg Table 1" and rows[1][3] == "58.88"
    assert rows[2][3] == "+1.12"
    for heading in ("##### PH-Reg Table S.4 (pearson)", "### Protocol `sclip`", "### Protocol `dvt`",
                    "##### DVT README Legacy results"):
        assert heading in md


def test_no_records_still_writes_published_tables(tmp_path) -> None:
    r = report(tmp_path, [])
    assert r["csv"] and all(x["source"] == "published" for x in r["csv"])
    assert "No runs under this protocol yet." in r["md"]


def test_method_weights_make_their_own_cells(tmp_path) -> None:
    """Two method-weights files are two leaderboard rows, each naming its file's hash."""
    a, b = rec(method="ttr"), rec(method="ttr", metrics={"mIoU": 40.0})
    a.method_weights, b.method_weights = {"ttr": "11" * 32}, {"ttr": "22" * 32}
    out = report(tmp_path, [a, b])
    assert "ttr [ttr 11111111]" in out["md"] and "ttr [ttr 22222222]" in out["md"]
    ours = [r for r in out["csv"] if r["source"] == "ours"]
    assert sorted(r["method_weights"] for r in ours) == [f'{{"ttr": "{"11" * 32}"}}', f'{{"ttr": "{"22" * 32}"}}']
