"""Data a user already has (nnU-Net raw, image/label pairs), and per-source options: class merges, channel per
source, M3D-Seg data sets published in parts, pinned checksums."""

from __future__ import annotations

import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
from test_data_helpers import FileServer, labelled_pair, m3d_case
from test_data_sources import m3d_zip

from segevo.config import ConfigError, parse_config
from segevo.data.cases import CaseError
from segevo.data.preprocess.case import prepare_arrays
from segevo.data.raw import download_sources, prepare_source
from segevo.errors import DownloadError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGEVO_CACHE", str(tmp_path / "cache"))


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def nnunet_folder(root, cases=("pros_01", "pros_02", "pros_03")):
    """Prostate in nnU-Net v2 raw layout: two channel files per case (T2, ADC), zones PZ=1 and TZ=2, one
    labelled and one unlabelled test case."""
    for i, case in enumerate(cases):
        t2, label = labelled_pair(values=(1, 2), seed=i)
        adc, _ = labelled_pair(values=(1, 2), seed=100 + i)
        write(root / "imagesTr" / f"{case}_0000.nii.gz", t2)
        write(root / "imagesTr" / f"{case}_0001.nii.gz", adc)
        write(root / "labelsTr" / f"{case}.nii.gz", label)
    t2, label = labelled_pair(values=(1,), seed=50)
    write(root / "imagesTs" / "pros_90_0000.nii.gz", t2)
    write(root / "imagesTs" / "pros_90_0001.nii.gz", t2)
    write(root / "labelsTs" / "pros_90.nii.gz", label)
    write(root / "imagesTs" / "pros_91_0000.nii.gz", t2)
    write(root / "imagesTs" / "pros_91_0001.nii.gz", t2)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))


def local_config(tmp_path, sets, **extra):
    return parse_config({"data": {"root": str(tmp_path / "data"), "sources": ["local"],
                                  "local": {"sets": sets}, **extra}})


def test_nnunet_raw_set_comes_in_linked_with_its_own_test_list(tmp_path):
    folder = tmp_path / "Dataset501_Prostate"
    nnunet_folder(folder)
    cfg = local_config(tmp_path, [{"name": "prostate", "path": str(folder), "channel": "t2",
                                   "patient_pattern": r"^(pros_\d)"}])
    result = prepare_source("local", cfg.data)
    cases = {c.case_id: c for c in result.cases}
    assert sorted(cases) == ["prostate_pros_01", "prostate_pros_02", "prostate_pros_03", "prostate_pros_90"]
    one = cases["prostate_pros_01"]
    assert one.modality == "MRI" and one.subset == "train" and cases["prostate_pros_90"].subset == "test"
    assert one.label_map == {1: "prostate peripheral zone", 2: "prostate transition zone"}
    assert one.patient_id == cases["prostate_pros_02"].patient_id == "local-prostate-pros_0"
    source_file = folder / "imagesTr" / "pros_01_0000.nii.gz"
    assert os.stat(one.image).st_ino == os.stat(source_file).st_ino, "hard link, not a second copy"
    assert one.image_sha256 == hashlib.sha256(source_file.read_bytes()).hexdigest()


def test_pairs_layout_with_a_class_map(tmp_path):
    folder = tmp_path / "saml"
    for i in range(2):
        image, label = labelled_pair(values=(1, 3), seed=i)
        write(folder / "images" / f"s{i}.nii.gz", image)
        write(folder / "labels" / f"s{i}.nii.gz", label)
    cfg = local_config(tmp_path, [{"name": "saml", "path": str(folder), "layout": "pairs", "modality": "MRI-T2",
                                   "classes": {1: "Prostate", 3: "Bladder"}, "subset": "test"}])
    result = prepare_source("local", cfg.data)
    assert [c.case_id for c in result.cases] == ["saml_s0", "saml_s1"]
    assert result.cases[0].label_map == {1: "prostate", 3: "bladder"} and result.cases[0].subset == "test"
    with pytest.raises(ConfigError, match="pairs layout needs classes and modality"):
        local_config(tmp_path, [{"name": "x", "path": str(folder), "layout": "pairs"}])


def test_class_merge_makes_one_class_and_one_label(tmp_path):
    folder = tmp_path / "nn"
    nnunet_folder(folder)
    merge = {"local": {"prostate": ["prostate peripheral zone", "prostate transition zone"]}}
    cfg = local_config(tmp_path, [{"name": "p", "path": str(folder)}], merge=merge)
    case = next(c for c in prepare_source("local", cfg.data).cases if c.case_id == "p_pros_01")
    assert case.label_map == {1: "prostate", 2: "prostate"} and case.labels_present == ("prostate",)
    arrays, fields = prepare_arrays(case, (4, 8, 8))
    raw = np.asarray(nib.load(case.label).dataobj)
    assert fields["classes"] == ("prostate",)
    assert fields["voxels"] == {"prostate": int(np.count_nonzero(raw))}
    assert set(np.unique(arrays["label"])) <= {0, 1}
    typo = {"local": {"prostate": ["prostate peripheral zone", "prostate transitional zone"]}}
    with pytest.raises(CaseError, match="not classes of local"):
        prepare_source("local", local_config(tmp_path, [{"name": "p", "path": str(folder)}], merge=typo).data,
                       force=True)


def test_channel_per_source_or_case_pattern():
    cfg = parse_config({"preprocess": {"channel": 1, "channels": {"msd/BRATS_*": "t1gd", "local": "T2"}}})
    assert cfg.preprocess.channel_for("msd/BRATS_001") == "t1gd"
    assert cfg.preprocess.channel_for("msd/prostate_00") == 1
    assert cfg.preprocess.channel_for("local/p_pros_01") == "T2"
    with pytest.raises(ConfigError, match="channels.x -1 must be a non-negative"):
        parse_config({"preprocess": {"channels": {"x": -1}}})


def test_m3d_seg_parts_and_pinned_checksums(tmp_path):
    part1 = m3d_zip("0024", {"c1": m3d_case(channels=1, filled=(0,)), "c2": m3d_case(channels=1, filled=(0,))},
                    {"1": "lung nodule"})
    part2 = m3d_zip("0024", {"c1": m3d_case(channels=1, filled=(0,)), "c3": m3d_case(channels=1, filled=(0,))},
                    {"1": "lung nodule"})
    files = {"0024_part1.zip": part1, "0024_part2.zip": part2}
    base = {"root": str(tmp_path / "data"), "sources": ["m3d_seg"]}
    with pytest.raises(CaseError, match="0024 is published in parts"):
        download_sources(parse_config({"data": {**base, "m3d_seg": {"datasets": ["0024"]}}}).data)
    with FileServer(files) as server:
        data = {**base, "mirrors": {"m3d_seg": server.url},
                "m3d_seg": {"datasets": ["0024"], "parts": {"0024": ["0024_part1.zip", "0024_part2.zip"]}}}
        wrong = {"m3d_seg/0024_part1.zip": "sha256:" + "0" * 64}
        with pytest.raises(DownloadError, match="sha256 mismatch"):
            prepare_source("m3d_seg", parse_config({"data": {**data, "checksums": wrong}}).data)
        right = {"m3d_seg/0024_part1.zip": "sha256:" + hashlib.sha256(part1).hexdigest()}
        result = prepare_source("m3d_seg", parse_config({"data": {**data, "checksums": right}}).data)
    assert [r[0] for r in server.requests].count("GET") >= 2
    assert sorted(c.case_id for c in result.cases) == ["0024_c1", "0024_c2", "0024_c3"]
    with pytest.raises(ConfigError, match="checksums"):
        parse_config({"data": {"checksums": {"m3d_seg/0024.zip": "crc:1234"}}})

