"""Each real source, end to end through its real code path (download from a mirror, checksum, extraction,
conversion, listing), against small synthetic archives with the source's real folder layout served locally."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from test_data_helpers import (
    FileServer,
    dicom_bytes,
    labelled_pair,
    m3d_case,
    metaimage,
    png_bytes,
    tar_bytes,
    zip_bytes,
)

from segevo.config import parse_config
from segevo.data.cases import CaseError
from segevo.data.raw import download_sources, prepare_source
from segevo.data.sources import SOURCES, chaos, get_source, msd, promise12


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGEVO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def config(tmp_path, source: str, url: str, **extra):
    return parse_config({"data": {"root": str(tmp_path / "data"), "sources": [source], "mirrors": {source: url},
                                  **extra}}).data


def test_registry_matches_the_config_schema():
    from typing import get_args

    from segevo.config import MsdTask, SourceName

    assert set(get_args(SourceName)) == set(SOURCES)
    assert set(get_args(MsdTask)) == set(msd.TASKS)
    for name in SOURCES:
        module = get_source(name)
        assert {"licence", "annotation"} <= set(module.META) and isinstance(module.VERSION, int)


@pytest.mark.parametrize(("data", "message"), [
    ({"sources": ["msd", "nope"]}, "data.sources.1: Input should be 'demo', 'msd'"),
    ({"sources": ["msd", "msd"]}, "sources lists a source twice"),
    ({"msd": {"tasks": ["Task11_Knee"]}}, "data.msd.tasks.0: Input should be 'Task01_BrainTumour'"),
    ({"mirrors": {"msd": "ftp://x"}}, "mirrors.msd: 'ftp://x' is not an http"),
    ({"m3d_seg": {"datasets": ["0025"]}}, "dataset code '0025' is not one of 0000-0024"),
    ({"skip_bad_case": True}, "data.skip_bad_case: Extra inputs are not permitted"),
])
def test_data_config_errors_name_the_key(data, message):
    from segevo.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config({"data": data})


# --- MSD -----------------------------------------------------------------------------------------------------

def msd_tar(bad_label_case: str | None = None) -> dict[str, bytes]:
    """Task04_Hippocampus (1 channel, 3 labelled + 1 test case) and Task05_Prostate (2 channels, 4D images)."""
    hip = "Task04_Hippocampus/"
    members = {}
    training = []
    for i in (1, 2, 3):
        name = f"hippocampus_{i:03d}.nii.gz"
        values = (1, 2, 3) if name.startswith(bad_label_case or "-") else (1, 2)
        image, label = labelled_pair(values=values, seed=i)
        members |= {f"{hip}imagesTr/{name}": image, f"{hip}labelsTr/{name}": label,
                    f"{hip}imagesTr/._{name}": b"\x00\x05\x16\x07AppleDouble"}
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    members[f"{hip}imagesTs/hippocampus_267.nii.gz"] = labelled_pair()[0]
    members[f"{hip}dataset.json"] = json.dumps({
        "name": "Hippocampus", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior",
                                                                     "2": "Posterior"},
        "numTraining": 3, "numTest": 1, "training": training, "test": ["./imagesTs/hippocampus_267.nii.gz"],
    }).encode()
    pro = "Task05_Prostate/"
    image4d = nib.Nifti1Image(np.ones((8, 7, 5, 2), np.float32), np.eye(4))
    members[f"{pro}imagesTr/prostate_00.nii.gz"] = __import__("gzip").compress(image4d.to_bytes())
    members[f"{pro}labelsTr/prostate_00.nii.gz"] = labelled_pair()[1]
    members[f"{pro}dataset.json"] = json.dumps({
        "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "training": [{"image": "./imagesTr/prostate_00.nii.gz", "label": "./labelsTr/prostate_00.nii.gz"}],
        "test": [],
    }).encode()
    return {
        "Task04_Hippocampus.tar": tar_bytes({k: v for k, v in members.items() if k.startswith(hip)}, "w"),
        "Task05_Prostate.tar": tar_bytes({k: v for k, v in members.items() if k.startswith(pro)}, "w"),
    }


def pin_md5(monkeypatch, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        task = name.removesuffix(".tar")
        monkeypatch.setitem(msd.TASKS, task, (hashlib.md5(data).hexdigest(), msd.TASKS[task][1]))


def test_msd_lists_tasks_with_channels_subsets_and_unified_labels(tmp_path, monkeypatch):
    files = msd_tar()
    pin_md5(monkeypatch, files)
    with FileServer(files) as server:
        cfg = config(tmp_path, "msd", server.url, msd={"tasks": ["Task04_Hippocampus", "Task05_Prostate"]})
        result = prepare_source("msd", cfg)
    cases = {c.case_id: c for c in result.cases}
    assert sorted(cases) == ["hippocampus_001", "hippocampus_002", "hippocampus_003", "hippocampus_267",
                             "prostate_00"]
    hip = cases["hippocampus_001"]
    assert (hip.modality, hip.subset, hip.channels) == ("MRI", "train", ())
    assert hip.label_map == {1: "anterior hippocampus", 2: "posterior hippocampus"}
    assert hip.labels_present == ("anterior hippocampus", "posterior hippocampus")
    assert hip.patient_id == "msd-Task04_Hippocampus-hippocampus_001"
    test = cases["hippocampus_267"]
    assert test.label is None and test.subset == "test" and test.labels_present == ()
    pro = cases["prostate_00"]
    assert pro.channels == ("T2", "ADC") and pro.label_map == {1: "prostate peripheral zone",
                                                             2: "prostate transition zone"}
    assert hip.image_sha256 == hashlib.sha256(hip.image.read_bytes()).hexdigest()

    hip.image.unlink()  # a finished source whose files went missing is redone, from the cached archive
    with FileServer(files) as server:
        cfg = config(tmp_path, "msd", server.url, msd={"tasks": ["Task04_Hippocampus", "Task05_Prostate"]})
        again = prepare_source("msd", cfg)
        assert not again.cached and hip.image.is_file()
        assert prepare_source("msd", cfg).cached
        assert not prepare_source("msd", cfg, force=True).cached
        assert server.requests == [], "archives come from the cache; --force re-verifies, it does not re-download"


def test_label_outside_the_class_map_names_the_case(tmp_path, monkeypatch):
    files = msd_tar(bad_label_case="hippocampus_002")
    pin_md5(monkeypatch, files)
    with FileServer(files) as server:
        cfg = config(tmp_path, "msd", server.url)
        with pytest.raises(CaseError, match=r"msd/hippocampus_002: .*label values 3 are not in the source's class"):
            download_sources(cfg)
        assert not (tmp_path / "data" / "raw" / "cases.json").exists()

        lenient = config(tmp_path, "msd", server.url, skip_bad_cases=True)
        path, results, _ = download_sources(lenient)
    assert [c.case_id for c in results[0].cases] == ["hippocampus_001", "hippocampus_003", "hippocampus_267"]
    table = json.loads(path.read_text())
    assert [s["case_id"] for s in table["skipped"]] == ["hippocampus_002"]
    assert "label values 3" in table["skipped"][0]["reason"]
    assert server.gets("Task04_Hippocampus.tar") == [None], "the archive was downloaded once"


# --- AMOS22 --------------------------------------------------------------------------------------------------

def test_amos22_modality_by_id_and_by_intensity_at_the_boundary(tmp_path, caplog):
    members = {}
    for number, ct, tag in ((1, True, "Tr"), (500, True, "Tr"), (507, False, "Tr"), (420, True, "Va")):
        image, label = labelled_pair(values=(1, 8, 9), ct=ct, seed=number)
        members |= {f"amos22/images{tag}/amos_{number:04d}.nii.gz": image,
                    f"amos22/labels{tag}/amos_{number:04d}.nii.gz": label}
    members["amos22/imagesTs/amos_0600.nii.gz"] = labelled_pair()[0]
    files = {"amos22.zip": zip_bytes(members), "labeled_data_meta_0000_0599.csv": b"amos_id,Manufacturer\n1,X\n"}
    with FileServer(files) as server:
        result = prepare_source("amos22", config(tmp_path, "amos22", server.url))
    cases = {c.case_id: c for c in result.cases}
    assert {k: (c.modality, c.subset) for k, c in cases.items()} == {
        "amos_0001": ("CT", "train"), "amos_0500": ("CT", "train"), "amos_0507": ("MRI", "train"),
        "amos_0420": ("CT", "val"), "amos_0600": ("MRI", "test")}
    assert cases["amos_0507"].labels_present == ("spleen", "aorta", "inferior vena cava")
    assert cases["amos_0600"].label is None
    assert "publishes no checksum" in caplog.text
    assert (tmp_path / "data" / "raw" / "amos22" / "labeled_data_meta_0000_0599.csv").is_file()


# --- CHAOS ---------------------------------------------------------------------------------------------------

def chaos_series(prefix: str, names: list[str], masks: list[str], grey: int, depths: list[float]) -> dict:
    """Slices whose file order is not their spatial order; slice i has its value and one marked mask pixel."""
    members = {}
    for i, (name, z) in enumerate(zip(names, depths, strict=True)):
        pixels = np.full((6, 5), 10 * (i + 1), np.int16)
        members[f"{prefix}/{name}"] = dicom_bytes(pixels, (100.0, 50.0, z), instance=i + 1)
        mask = np.zeros((6, 5), np.uint8)
        mask[i, 1] = grey
        members[f"{prefix.rsplit('/DICOM_anon', 1)[0]}/Ground/{masks[i]}"] = png_bytes(mask)
    return members


def chaos_zip() -> bytes:
    root = "CHAOS_Train_Sets/Train_Sets"
    members = chaos_series(f"{root}/CT/1/DICOM_anon", ["i0000,0000b.dcm", "i0001,0000b.dcm", "i0002,0000b.dcm"],
                           ["liver_GT_000.png", "liver_GT_001.png", "liver_GT_002.png"], 255, [30.0, 20.0, 25.0])
    mr = [f"IMG-0002-0000{i}" for i in (1, 2, 3)]
    for phase in ("InPhase", "OutPhase"):
        members |= chaos_series(f"{root}/MR/2/T1DUAL/DICOM_anon/{phase}", [f"{n}.dcm" for n in mr],
                                [f"{n}.png" for n in mr], 63, [0.0, 7.0, 14.0])
    members |= chaos_series(f"{root}/MR/2/T2SPIR/DICOM_anon", [f"{n}.dcm" for n in mr], [f"{n}.png" for n in mr],
                            126, [0.0, 7.0, 14.0])
    return zip_bytes(members)


def test_chaos_converts_dicom_series_and_png_masks(tmp_path, monkeypatch):
    data = chaos_zip()
    monkeypatch.setattr(chaos, "CHECKSUM", "sha256:" + hashlib.sha256(data).hexdigest())
    with FileServer({"CHAOS_Train_Sets.zip": data}) as server:
        result = prepare_source("chaos", config(tmp_path, "chaos", server.url))
    cases = {c.case_id: c for c in result.cases}
    assert sorted(cases) == ["ct_1", "mr_2_t1_inphase", "mr_2_t1_outphase", "mr_2_t2"]
    assert [cases[k].modality for k in sorted(cases)] == ["CT", "MRI-T1", "MRI-T1", "MRI-T2"]
    assert cases["ct_1"].patient_id == "chaos-ct-1" and cases["mr_2_t2"].patient_id == "chaos-mr-2"
    assert cases["ct_1"].labels_present == ("liver",) and cases["mr_2_t2"].labels_present == ("right kidney",)

    ct = cases["ct_1"]
    image, label = nib.load(ct.image), nib.load(ct.label)
    assert image.shape == (5, 6, 3) and np.allclose(image.affine, label.affine)
    # slices stacked by position (z 20, 25, 30 = files 2, 3, 1); each mask stays with its own slice
    assert np.asarray(image.dataobj)[0, 0, :].tolist() == [20, 30, 10]
    marks = np.argwhere(np.asarray(label.dataobj) == 1)
    assert sorted(map(tuple, marks)) == [(1, 0, 2), (1, 1, 0), (1, 2, 1)]
    assert np.allclose(image.affine[:3, 3], [-100.0, -50.0, 20.0]) and np.isclose(image.affine[2, 2], 5.0)
    assert ct.origin.name == "DICOM_anon" and len(ct.image_sha256) == 64


def test_chaos_unknown_mask_grey_level_is_a_case_error(tmp_path, monkeypatch):
    root = "Train_Sets/MR/5"
    members = chaos_series(f"{root}/T2SPIR/DICOM_anon", ["IMG-1.dcm"], ["IMG-1.png"], 90, [0.0])
    for phase in ("InPhase", "OutPhase"):
        members |= chaos_series(f"{root}/T1DUAL/DICOM_anon/{phase}", ["IMG-1.dcm"], ["IMG-1.png"], 189, [0.0])
    data = zip_bytes(members)
    monkeypatch.setattr(chaos, "CHECKSUM", "sha256:" + hashlib.sha256(data).hexdigest())
    with FileServer({"CHAOS_Train_Sets.zip": data}) as server, \
            pytest.raises(CaseError, match=r"chaos/mr_5_t2: .*IMG-1\.png: mask grey levels \[90\] match no organ"):
        prepare_source("chaos", config(tmp_path, "chaos", server.url))


def test_dicom_reader_handles_both_vr_encodings_and_refuses_compressed(tmp_path):
    from segevo.data.formats import FormatError, read_dicom_slice

    pixels = np.arange(30, dtype=np.int16).reshape(6, 5) - 7
    for implicit in (False, True):
        path = tmp_path / f"implicit{implicit}.dcm"
        path.write_bytes(dicom_bytes(pixels, (1.5, -2.0, 3.25), spacing=(0.9, 0.6), intercept=-1024,
                                     implicit=implicit))
        array, tags = read_dicom_slice(path)
        assert np.array_equal(array, pixels.astype(np.int32) - 1024)
        assert tags["ImagePositionPatient"] == (1.5, -2.0, 3.25) and tags["PixelSpacing"] == (0.9, 0.6)
    path.write_bytes(dicom_bytes(pixels, (0, 0, 0), syntax=b"1.2.840.10008.1.2.4.90"))  # JPEG 2000
    with pytest.raises(FormatError, match=r"transfer syntax 1\.2\.840\.10008\.1\.2\.4\.90 is not supported"):
        read_dicom_slice(path)


# --- PROMISE12 -----------------------------------------------------------------------------------------------

def test_promise12_converts_metaimage_to_ras_nifti(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    members = {}
    for i, compressed in ((0, False), (1, True)):
        image = rng.integers(0, 800, size=(6, 5, 4)).astype(np.int16)
        seg = np.zeros((6, 5, 4), np.uint8)
        seg[2:4, 1:3, 1:3] = 1
        members |= metaimage(f"training_data/Case{i:02d}", image, compressed=compressed)
        members |= metaimage(f"training_data/Case{i:02d}_segmentation", seg, compressed=compressed)
    data = zip_bytes(members)
    monkeypatch.setattr(promise12, "CHECKSUM", "md5:" + hashlib.md5(data).hexdigest())
    with FileServer({"training_data.zip": data}) as server:
        result = prepare_source("promise12", config(tmp_path, "promise12", server.url))
    assert [c.case_id for c in result.cases] == ["Case00", "Case01"]
    case = result.cases[1]
    assert (case.modality, case.patient_id, case.labels_present) == ("MRI-T2", "promise12-Case01", ("prostate",))
    img = nib.load(case.image)
    assert img.shape == (6, 5, 4)
    # ITK's LPS offset (-10, -20, 30) and spacing (0.6, 0.7, 3) seen in RAS
    assert np.allclose(img.affine, [[-0.6, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 3, 30], [0, 0, 0, 1]])
    assert case.origin.name == "Case01.mhd"


# --- M3D-Seg -------------------------------------------------------------------------------------------------

def m3d_zip(code: str, cases: dict[str, dict], labels: dict[str, str]) -> bytes:
    members = {}
    entries = []
    for case, files in cases.items():
        for name, data in files.items():
            members[f"{code}/{case}/{name}"] = data
        mask = next(n for n in files if n.startswith("mask_"))
        entries.append({"image": f"{code}/{case}/image.npy", "label": f"{code}/{case}/{mask}"})
    members[f"{code}/{code}.json"] = json.dumps({
        "name": f"{code} Dataset", "modality": {"0": "CT"}, "labels": {"0": "background", **labels},
        "train": entries[:-1], "test": entries[-1:]}).encode()
    return zip_bytes(members)


def test_m3d_seg_lists_sparse_masks_and_links_patients_to_direct_sources(tmp_path):
    files = {
        "0023.zip": m3d_zip("0023", {"spleen_2": m3d_case(channels=1, filled=(0,)),
                                     "case_x": m3d_case(channels=1, filled=(0,), seed=1)}, {"1": "spleen"}),
        "0002.zip": m3d_zip("0002", {"amos_0001": m3d_case(), "amos_0507": m3d_case(seed=2)},
                            {"1": "arota", "2": "postcava"}),
    }
    with FileServer(files) as server:
        result = prepare_source("m3d_seg", config(tmp_path, "m3d_seg", server.url,
                                                   m3d_seg={"datasets": ["0023", "0002"]}))
    cases = {c.case_id: c for c in result.cases}
    assert sorted(cases) == ["0002_amos_0001", "0002_amos_0507", "0023_case_x", "0023_spleen_2"]
    assert cases["0023_spleen_2"].patient_id == msd.patient_id("Task09_Spleen", "spleen_2")
    assert cases["0023_case_x"].patient_id == "m3d-0023-case_x"
    assert cases["0023_case_x"].subset == "test" and cases["0023_spleen_2"].subset == "train"
    amos_mr = cases["0002_amos_0507"]
    assert (amos_mr.modality, amos_mr.patient_id, amos_mr.format) == ("MRI", "amos-0507", "m3d")
    assert amos_mr.notes and cases["0002_amos_0001"].modality == "CT"
    assert amos_mr.label_map == {1: "aorta", 2: "inferior vena cava"}
    assert amos_mr.labels_present == ("aorta", "inferior vena cava")


def test_m3d_seg_mask_channel_outside_the_map_is_refused(tmp_path):
    files = {"0023.zip": m3d_zip("0023", {"spleen_2": m3d_case(channels=2, filled=(0, 1)),
                                          "spleen_3": m3d_case(channels=1, filled=(0,))}, {"1": "spleen"})}
    with FileServer(files) as server, pytest.raises(CaseError, match=r"m3d_seg/0023_spleen_2: .*label values 2"):
        prepare_source("m3d_seg", config(tmp_path, "m3d_seg", server.url))
