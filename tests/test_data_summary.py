"""The data summary: per-class raw intensity statistics against numpy on the masked voxels, pooled across cases,
and the split stage writing split report, table, counts and plot."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from prep_helpers import write_prep

from segevo.data.manifest import read_manifest, write_manifest
from segevo.data.summary import BINS, case_intensity, data_summary, intensity_stats


def volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 30, size=(30, 20, 16)).astype(np.float32)
    image[:5] = -1000  # air
    label = np.zeros(image.shape, np.uint8)
    label[8:20, 4:12, 3:9] = 1
    label[22:28, 10:18, 5:15] = 3
    image[label == 3] += 200
    return image, np.asfortranarray(label)


def test_intensity_stats_match_numpy_on_the_masked_voxels():
    image, label = volume()
    stats = intensity_stats(image, label, [1, 3, 7])
    assert set(stats) == {1, 3}  # value 7 is declared but absent
    width = (image.max() - image.min()) / BINS
    for value in (1, 3):
        voxels = image[label == value].astype(np.float64)
        count, total, squares, *pct = stats[value]
        assert count == voxels.size
        assert total == pytest.approx(voxels.sum(), rel=1e-9) and squares == pytest.approx((voxels ** 2).sum())
        # the histogram finds the bin of the sample at the quantile rank (the inverted CDF): half a bin away
        expected = np.percentile(voxels, [0.5, 50, 99.5], method="inverted_cdf")
        assert np.all(np.abs(np.array(pct) - expected) <= width / 2 + 1e-3), (pct, expected)


def test_merged_values_pool_into_one_class():
    image, label = volume()
    stats = intensity_stats(image, label, [1, 3])
    merged = case_intensity(stats, {1: "prostate", 3: "prostate"})
    assert list(merged) == ["prostate"]
    both = image[(label == 1) | (label == 3)].astype(np.float64)
    assert merged["prostate"][0] == both.size and merged["prostate"][1] == pytest.approx(both.sum())


def test_summary_pools_cases_and_splits(tmp_path):
    cases = write_prep(tmp_path)
    rng = np.random.default_rng(1)
    samples = {c.key: rng.normal(10 * i, 1 + i, size=50 + 10 * i) for i, c in enumerate(cases)}
    cases = [dataclasses.replace(c, intensity={name: [len(v), float(v.sum()), float((v ** 2).sum()), 1.0, 2.0, 3.0]
                                                for name in c.classes for v in [samples[c.key]]})
             for c in cases]
    rows = data_summary(cases, {"train": [cases[0].key, cases[1].key], "test": [cases[2].key]})
    liver_ct = next(r for r in rows if r["split"] == "all" and r["class"] == "liver" and r["modality"] == "CT"
                    and r["source"] == "demo")
    pooled = np.concatenate([samples[cases[0].key], samples[cases[1].key]])
    assert liver_ct["cases"] == 2 and liver_ct["voxels"] == cases[0].voxels["liver"] + cases[1].voxels["liver"]
    assert liver_ct["mean"] == pytest.approx(pooled.mean(), abs=1e-3)
    assert liver_ct["std"] == pytest.approx(pooled.std(), abs=1e-3)
    assert liver_ct["shape_d"] == int(np.median([12, 10])) and liver_ct["p50"] == 2.0
    assert {r["split"] for r in rows} == {"all", "train", "test"}


def test_split_stage_writes_report_summary_and_plot(tmp_path, capsys):
    cases = write_prep(tmp_path)
    image, label = volume()
    stats = case_intensity(intensity_stats(image, label, [1, 3]), {1: "liver", 3: "spleen"})
    cases = [dataclasses.replace(c, intensity={k: v for k, v in stats.items() if k in c.classes},
                                 subset="test" if c.case_id == "demo_mr1" else None) for c in cases]
    write_manifest(tmp_path / "prep" / "manifest.json", cases, {})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(tmp_path)}, "split": {"subsets": [2]}}))
    from segevo_pipeline.cli import main

    assert main(["--config", str(config), "split", "--summary", str(tmp_path / "summary")]) == 0
    printed = capsys.readouterr().out
    assert "test" in printed and "summary.csv" in printed
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["rules"]["segvol_seen"] == "not_test" and "moved" in split and "moved_by_rule" in split
    counts = json.loads((tmp_path / "summary.json").read_text())
    assert sum(v["cases"] for v in counts.values()) == len(read_manifest(tmp_path / "prep" / "manifest.json")[0])
    table = (tmp_path / "summary.csv").read_text().splitlines()
    assert table[0].startswith("split,source,modality,class,cases,voxels")
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

