"""Published-number files: schema, names that match the harness, and values that match their sources."""
from __future__ import annotations

import os
import re

import pandas as pd
import pytest

from harness.errors import ConfigError
from harness.results.published import COLUMNS, DEFAULT_PUBLISHED_DIR, load_published

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: plain text of the PH-Reg paper (arXiv:2505.21501, e.g. extracted from its PDF), not shipped with the repository:
#: point HARNESS_PHREG_TEXT at it to check the PH-Reg rows against the printed tables; skipped otherwise
SEED = os.environ.get("HARNESS_PHREG_TEXT", "")
DATASETS = {"voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff164k", "cityscapes", "ade20k",
            "nyu", "avg"}
METRICS = {"mIoU", "mAcc", "aAcc", "pearson", "rmse", "abs_rel", "delta1"}
#: suffixes documented in results/README.md ("Method names")
CLEANERS = {"dvt", "dvt-distilled", "dvt-imgnet", "dvt-imgnet-distilled", "pamr"}


def test_default_dir_is_the_checkout_results_published() -> None:
    assert os.path.samefile(DEFAULT_PUBLISHED_DIR, os.path.join(REPO, "results", "published"))


def test_loads_and_validates() -> None:
    df = load_published()
    assert list(df.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert set(df["task"]) == {"ovss", "linear-seg", "depth", "artifacts"}
    assert set(df["dataset"]) <= DATASETS
    assert set(df["metric"]) <= METRICS
    assert df["value"].dtype == float
    assert (df["citation"].str.len() > 10).all()
    for task in ("ovss", "linear-seg", "depth", "artifacts"):
        sub = load_published(task)
        assert len(sub) and set(sub["task"]) == {task}


def test_table_row_counts() -> None:
    df = load_published()
    phreg = df[df["paper"] == "phreg"]
    assert len(phreg[phreg["table"] == "Table 1"]) == 8 * 9  # 8 methods x (8 datasets + Avg)
    assert len(phreg[phreg["table"] == "Table S.4"]) == 5 * 8  # 5 methods x (7 datasets + Avg)
    assert set(phreg[phreg["table"] == "Table S.4"]["task"]) == {"artifacts"}  # beside `harness run artifacts`
    t2 = phreg[phreg["table"] == "Table 2"]
    assert len(t2) == 16 * 7 and len(t2.groupby(["method", "backbone"])) == 16
    expected = (("sclip", {"sclip"}), ("clearclip", {"clearclip"}), ("naclip", {"naclip", "naclip-paper"}))
    for paper, protocols in expected:
        assert set(df[df["paper"] == paper]["protocol"]) == protocols
    naclip = df[df["paper"] == "naclip"]  # README numbers have PAMR on (protocol naclip), the paper's have not
    assert set(naclip[naclip["protocol"] == "naclip"]["table"]) == {"repo README"}
    assert set(df[df["paper"] == "dvt"]["protocol"]) == {"dvt", "dvt-legacy"}


def test_method_names_are_registry_names_or_documented_compounds() -> None:
    from harness.registry import METHODS

    known = set(METHODS.names()) | {a for n in METHODS.names() for a in METHODS.aliases_of(n)}
    for method in set(load_published()["method"]):
        base, *rest = method.split("+")
        assert base in known or base == "phreg", method
        assert set(rest) <= CLEANERS, method


@pytest.mark.skipif(not os.path.isfile(SEED), reason="HARNESS_PHREG_TEXT (PH-Reg paper text) not set")
def test_phreg_values_match_the_paper_text() -> None:
    with open(SEED) as f:
        lines = f.read().replace("\xa0", " ").splitlines()
    df = load_published()
    phreg = df[df["paper"] == "phreg"]
    for table, start in (("Table 1", "Table 1: Open-vocabulary"), ("Table S.4", "Table S.4:"),
                         ("Table 2", "Table 2: Linear probing")):
        i = next(k for k, ln in enumerate(lines) if ln.startswith(start))
        block = lines[i:i + 20]
        for (method, backbone), grp in phreg[phreg["table"] == table].groupby(["method", "backbone"]):
            label = grp["notes"].iloc[0].split("'")[1]
            row = [ln for ln in block if ln.startswith(label + " ") and re.match(r"^.* -?\d", ln)]
            assert len(row) == 1, (table, label)
            printed = row[0][len(label):].split()
            assert sorted(grp["value_printed"]) == sorted(printed), (table, label)


def _write(tmp_path, text: str) -> str:
    d = tmp_path / "pub"
    d.mkdir()
    (d / "x.csv").write_text(text)
    return str(d)


HEADER = ",".join(COLUMNS) + "\n"
GOOD = "ovss,p,T1,proto,naclip,clip-b16-openai,voc21,mIoU,58.88,cite,\n"


def test_rejects_bad_columns(tmp_path) -> None:
    with pytest.raises(ConfigError, match="columns must be exactly"):
        load_published(published_dir=_write(tmp_path, "task,value\novss,1\n"))


def test_rejects_non_numeric_value(tmp_path) -> None:
    with pytest.raises(ConfigError, match="non-numeric value 'n/a' on line 2"):
        load_published(published_dir=_write(tmp_path, HEADER + GOOD.replace("58.88", "n/a")))


def test_rejects_empty_citation_and_unknown_task(tmp_path) -> None:
    with pytest.raises(ConfigError, match="empty 'citation'"):
        load_published(published_dir=_write(tmp_path, HEADER + GOOD.replace(",cite,", ",,")))
    with pytest.raises(ConfigError, match="unknown task"):
        load_published(published_dir=str(tmp_path / "nope"), task="segmentation")


def test_rejects_duplicates(tmp_path) -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        load_published(published_dir=_write(tmp_path, HEADER + GOOD + GOOD.replace("58.88", "1.0")))


def test_keeps_printed_string(tmp_path) -> None:
    df = load_published(published_dir=_write(tmp_path, HEADER + GOOD.replace("58.88", "47.30")))
    assert df.loc[0, "value_printed"] == "47.30" and df.loc[0, "value"] == pytest.approx(47.3)
    assert isinstance(df, pd.DataFrame)
