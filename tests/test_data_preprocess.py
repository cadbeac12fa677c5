"""``segevo preprocess``: SegVol-faithful arrays (against a numpy transcription of SegVol's transforms and MONAI's),
the inverse mapping, every kind of bad input, skipping up-to-date cases, M3D-Seg and multi-channel rows, the
loader reading the result."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.sparse

from segevo.config import LoaderConfig, SegevoConfig, parse_config
from segevo.data.cases import Case, CaseError, CaseTable, write_case_table
from segevo.data.manifest import read_manifest
from segevo.data.preprocess.case import prepare_arrays
from segevo.data.preprocess.geometry import from_raw_grid, to_raw_grid
from segevo.data.preprocess.stages import run_preprocess, run_pseudomask
from segevo.data.preprocess.transforms import foreground_normalize, resize_nearest
from segevo.data.readers import read_case

AFFINE = np.array([[-1.5, 0, 0, 10], [0, 1.2, 0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]])
ROI = (8, 32, 32)
LABELS = {1: "liver", 2: "spleen"}


# ----------------------------------------------------------------------------------------------------------------
# synthetic raw cases, shared with test_data_pseudomask_stage.py


def body_case(shape=(24, 20, 12), seed=0, dtype=np.int16) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume: air around a noisy body box, two organs inside; label values 1 and 2."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.float64)
    x, y, z = shape
    body = (slice(3, x - 3), slice(2, y - 3), slice(1, z - 1))
    image[body] = rng.normal(40, 30, size=image[body].shape)
    label = np.zeros(shape, np.uint8)
    label[6:12, 5:10, 3:8] = 1
    label[x - 10:x - 5, y - 12:y - 6, 4:z - 3] = 2
    image[label == 1] += 120
    image[label == 2] -= 80
    return image.astype(dtype), label


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def nifti_case(root: Path, case_id: str, image: np.ndarray, label: np.ndarray | None, *,
               label_affine: np.ndarray = AFFINE, label_map: dict[int, str] = LABELS, patient: str | None = None,
               modality: str = "CT", channels: tuple[str, ...] = ()) -> Case:
    folder = root / "raw" / "syn"
    img = save_nifti(folder / f"{case_id}.nii.gz", image)
    lab = None if label is None else save_nifti(folder / f"{case_id}_seg.nii.gz", label, label_affine)
    return Case.from_source("syn", case_id, patient or case_id, modality, img, lab, label_map, channels=channels)


def m3d_case(root: Path, case_id: str, image: np.ndarray, channels: list[np.ndarray],
             label_map: dict[int, str] | None = None) -> Case:
    """An M3D-Seg row: image.npy (1, X, Y, Z) and a sparse (K, X*Y*Z) mask named after its dense shape."""
    folder = root / "raw" / "m3d" / case_id
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "image.npy", image[None].astype(np.float32))
    mask = np.stack(channels).reshape(len(channels), -1).astype(np.int32)
    path = folder / f"mask_{(len(channels), *image.shape)}.npz"
    scipy.sparse.save_npz(path, scipy.sparse.csr_matrix(mask))
    names = label_map or {k + 1: n for k, n in enumerate(["liver", "spleen", "kidney"][:len(channels)])}
    return Case.from_source("m3d", case_id, case_id, "CT", folder / "image.npy", path, names, format="m3d")


def write_table(root: Path, cases: list[Case]) -> Path:
    return write_case_table(root / "raw" / "cases.json", CaseTable(cases, {"syn": {}}, []))


def config(root: Path, **sections) -> SegevoConfig:
    data = {"data": {"root": str(root)}, "model": {"roi_size": list(ROI)},
            "pseudomask": {"grid": [16, 16, 8], "min_size": 20}, "preprocess": {"workers": 1}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


def run_both(cfg: SegevoConfig):
    return run_pseudomask(cfg), run_preprocess(cfg)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------------------------------
# SegVol's transforms, transcribed from its code (data_process/demo_data_process.py, utils)


def segvol_foreground_normalization(ct_narray: np.ndarray) -> np.ndarray:
    ct_voxel_ndarray = ct_narray.copy()
    ct_voxel_ndarray = ct_voxel_ndarray.flatten()
    thred = np.mean(ct_voxel_ndarray)
    voxel_filtered = ct_voxel_ndarray[(ct_voxel_ndarray > thred)]
    upper_bound = np.percentile(voxel_filtered, 99.95)
    lower_bound = np.percentile(voxel_filtered, 00.05)
    mean = np.mean(voxel_filtered)
    std = np.std(voxel_filtered)
    ct_narray = np.clip(ct_narray, lower_bound, upper_bound)
    ct_narray = (ct_narray - mean) / max(std, 1e-8)
    return ct_narray


def segvol_minmax(image: np.ndarray) -> np.ndarray:
    image = image - image.min()
    return image / np.clip(image.max(), a_min=1e-8, a_max=None)


def segvol_pipeline(raw: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """LoadImage (float32) -> ForegroundNormalization -> DimTranspose -> MinMax -> CropForeground (MONAI)."""
    from monai.transforms.utils import generate_spatial_bounding_box

    image = segvol_minmax(np.swapaxes(segvol_foreground_normalization(raw.astype(np.float32)), -1, -3))
    start, end = generate_spatial_bounding_box(image[None], select_fn=lambda x: x > 0)
    box = tuple(slice(s, e) for s, e in zip(start, end, strict=True))
    return image, box


@pytest.mark.parametrize("seed", range(4))
def test_foreground_normalization_equals_segvol(seed):
    rng = np.random.default_rng(seed)
    shapes = [(30, 20, 10), (7, 9, 11), (64, 64, 16), (5, 5, 5)]
    raw = rng.standard_t(2 + seed, size=shapes[seed]) * 300 + rng.integers(-1000, 100)
    raw[rng.random(raw.shape) < 0.3] = raw.min() - 50  # an air-like background below the mean
    raw = raw.astype(np.float32)
    got = foreground_normalize(raw.copy())
    want = segvol_foreground_normalization(raw)
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got, want)


def test_constant_image_is_a_clear_error(tmp_path):
    case = nifti_case(tmp_path, "flat", np.full((8, 8, 8), 5, np.int16), np.ones((8, 8, 8), np.uint8))
    with pytest.raises(CaseError, match="constant"):
        prepare_arrays(case, ROI)


def test_arrays_equal_segvol_and_monai_transforms(tmp_path):
    from monai.transforms import Resize

    raw, label = body_case()
    case = nifti_case(tmp_path, "a", raw, label)
    arrays, fields = prepare_arrays(case, ROI)
    image, box = segvol_pipeline(raw)
    assert np.array_equal(arrays["image"], image[box].astype(np.float16))
    assert fields["crop_start"] == tuple(s.start for s in box) and fields["crop_end"] == tuple(s.stop for s in box)
    assert fields["shape"] == image[box].shape and fields["raw_shape"] == raw.shape
    assert np.array_equal(arrays["label"], np.swapaxes(label, -1, -3)[box])
    assert fields["classes"] == ("liver", "spleen")
    assert fields["voxels"] == {"liver": int((label == 1).sum()), "spleen": int((label == 2).sum())}
    assert fields["spacing"] == (2.5, 1.2, 1.5)
    assert np.allclose(fields["affine"], AFFINE)
    zoom = Resize(ROI, mode="trilinear")(image[box][None])[0]
    assert np.allclose(arrays["zoom_image"], np.asarray(zoom), atol=1e-3)
    zoom_label = Resize(ROI, mode="nearest-exact")(np.swapaxes(label, -1, -3)[box][None])[0]
    assert np.array_equal(arrays["zoom_label"], np.asarray(zoom_label))
    assert arrays["image"].dtype == np.float16 and arrays["label"].dtype == np.uint8
    assert arrays["zoom_image"].shape == arrays["zoom_label"].shape == ROI


def test_prediction_maps_back_onto_the_raw_grid_exactly(tmp_path):
    raw, label = body_case(shape=(26, 21, 13), seed=3)
    cfg = config(tmp_path)
    write_table(tmp_path, [nifti_case(tmp_path, "a", raw, label)])
    run_both(cfg)
    (row,), _ = read_manifest(tmp_path / "prep" / "manifest.json")
    assert row.shape != tuple(raw.shape[::-1]), "the synthetic body must be cropped for this test to mean much"
    prep_label = np.load(row.path(tmp_path / "prep", "label"))
    back = to_raw_grid(prep_label, row)
    assert back.shape == raw.shape and np.array_equal(back, label)
    img = nib.load(tmp_path / "raw" / "syn" / "a.nii.gz")
    assert np.allclose(np.array(row.affine), img.affine)
    pred = np.random.default_rng(0).integers(0, 3, size=row.shape).astype(np.uint8)
    assert np.array_equal(from_raw_grid(to_raw_grid(pred, row), row), pred)
    outside = np.ones(raw.shape, bool)
    outside[tuple(slice(s, e) for s, e in zip(row.crop_start[::-1], row.crop_end[::-1], strict=True))] = False
    assert not to_raw_grid(pred + 1, row)[outside].any()
    pseudo_grid = np.load(tmp_path / "pseudo" / "syn" / "a.npy")
    assert np.array_equal(np.load(row.path(tmp_path / "prep", "pseudo")),
                          from_raw_grid(resize_nearest(pseudo_grid, raw.shape), row))
    with pytest.raises(ValueError, match="prep shape"):
        to_raw_grid(pred[1:], row)


# ----------------------------------------------------------------------------------------------------------------
# bad input: one kind per case, both stages, with and without data.skip_bad_cases


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a NIfTI file at all" * 20)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_plain(path: Path) -> None:
    """An uncompressed NIfTI whose voxel data stops early (header intact)."""
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) - 500]))


BAD = {
    "corrupt": (lambda img, lab: (img, lab), "image", _corrupt, "corrupt or truncated NIfTI"),
    "truncated gz": (lambda img, lab: (img, lab), "image", _truncate, "corrupt or truncated NIfTI"),
    "truncated data": (lambda img, lab: (img, lab), "label", _truncate_plain, "corrupt or truncated NIfTI"),
    "shape mismatch": (lambda img, lab: (img, lab[:, :, :-1]), None, None, "label shape"),
    "nan": (lambda img, lab: (np.where(lab == 1, np.nan, img.astype(np.float32)), lab), None, None, "NaN/Inf"),
    "inf": (lambda img, lab: (np.where(lab == 2, np.inf, img.astype(np.float32)), lab), None, None, "NaN/Inf"),
    "non-3D": (lambda img, lab: (img[:, :, 0], lab[:, :, 0]), None, None, "expected a 3D image"),
    "4D without channels": (lambda img, lab: (np.stack([img, img], -1), lab), None, None, "expected a 3D image"),
    "empty label": (lambda img, lab: (img, np.zeros_like(lab)), None, None, "label map is empty"),
    "value outside the class map": (lambda img, lab: (img, np.where(lab == 2, 7, lab).astype(np.uint8)), None, None,
                                    "label values 7 are not in the source's class map"),
    "non-integer label": (lambda img, lab: (img, lab.astype(np.float32) * 0.5), None, None, "non-integer"),
}


def _bad_table(tmp_path: Path, kind: str) -> tuple[Case, Case]:
    make, target, damage, _ = BAD[kind]
    good = nifti_case(tmp_path, "good", *body_case(seed=1))
    img, lab = make(*body_case(seed=2))
    bad = nifti_case(tmp_path, "bad", img, lab)
    if damage is not None:
        damage(bad.image if target == "image" else bad.label)
    write_table(tmp_path, [good, bad])
    return good, bad


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, kind):
    _, bad = _bad_table(tmp_path, kind)
    with pytest.raises(CaseError) as err:
        read_case(bad)
    assert BAD[kind][3] in str(err.value)
    assert str(bad.image) in str(err.value) or str(bad.label) in str(err.value)
    cfg = config(tmp_path)
    with pytest.raises(CaseError, match=r"^syn/bad: .*skip_bad_cases") as err:
        run_pseudomask(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pseudo" / "index.json").exists() and not (tmp_path / "pseudo" / "syn" / "bad.npy").exists()
    assert leftovers(tmp_path) == []


def test_affine_mismatch(tmp_path):
    raw, label = body_case()
    shifted = AFFINE.copy()
    shifted[0, 3] += 3
    case = nifti_case(tmp_path, "bad", raw, label, label_affine=shifted)
    with pytest.raises(CaseError, match="label affine differs"):
        read_case(case)


@pytest.mark.parametrize("kind", ["corrupt", "nan", "empty label", "value outside the class map"])
def test_bad_cases_are_skipped_and_reported_when_asked(tmp_path, kind):
    _bad_table(tmp_path, kind)
    strict = config(tmp_path)
    with pytest.raises(CaseError, match="syn/bad"):
        run_pseudomask(strict)
    cfg = config(tmp_path, data={"skip_bad_cases": True})
    pseudo, prep = run_both(cfg)
    assert [s["case_id"] for s in pseudo.skipped] == ["bad"] and [s["case_id"] for s in prep.skipped] == ["bad"]
    rows, meta = read_manifest(prep.path)
    assert [r.case_id for r in rows] == ["good"]
    assert meta["skipped"][0]["case_id"] == "bad" and BAD[kind][3] in meta["skipped"][0]["reason"]
    assert not (tmp_path / "prep" / "syn" / "bad").exists() and leftovers(tmp_path) == []


def test_preprocess_failure_removes_the_manifest_and_keeps_whole_cases(tmp_path):
    """A bad case found by preprocess: one-line error, no manifest (it would describe arrays of two runs), the
    case's earlier arrays untouched, no temporary folder left."""
    good = nifti_case(tmp_path, "good", *body_case(seed=1))
    other = nifti_case(tmp_path, "other", *body_case(seed=2))
    write_table(tmp_path, [good, other])
    cfg = config(tmp_path)
    run_both(cfg)
    before = _mtimes(tmp_path / "prep" / "syn")
    _, label = body_case(seed=2)
    save_nifti(other.label, np.where(label == 2, 9, label).astype(np.uint8))
    write_table(tmp_path, [good, other])
    with pytest.raises(CaseError, match="syn/other"):
        run_pseudomask(cfg)
    assert (tmp_path / "prep" / "manifest.json").exists(), "preprocess did not run: its outputs still agree"
    run_pseudomask(config(tmp_path, data={"skip_bad_cases": True}))
    with pytest.raises(CaseError, match=r"^syn/other: .*label values 9 are not in the source's class map"):
        run_preprocess(cfg)
    assert not (tmp_path / "prep" / "manifest.json").exists() and leftovers(tmp_path) == []
    assert _mtimes(tmp_path / "prep" / "syn") == before


# ----------------------------------------------------------------------------------------------------------------
# up to date, M3D-Seg, channels, the loader


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_does_no_work_and_changes_redo_only_what_they_affect(tmp_path):
    cases = [nifti_case(tmp_path, f"c{i}", *body_case(seed=i)) for i in range(3)]
    write_table(tmp_path, cases)
    cfg = config(tmp_path)
    first_pseudo, first_prep = run_both(cfg)
    assert (first_pseudo.computed, first_prep.computed) == (3, 3)
    pseudo_times, prep_times = _mtimes(tmp_path / "pseudo" / "syn"), _mtimes(tmp_path / "prep" / "syn")
    again_pseudo, again_prep = run_both(cfg)
    assert (again_pseudo.computed, again_pseudo.reused, again_prep.computed, again_prep.reused) == (0, 3, 0, 3)
    assert _mtimes(tmp_path / "pseudo" / "syn") == pseudo_times and _mtimes(tmp_path / "prep" / "syn") == prep_times

    bigger = config(tmp_path, model={"roi_size": [8, 48, 32]})
    pseudo, prep = run_both(bigger)
    assert (pseudo.computed, prep.computed) == (0, 3)
    assert np.load(tmp_path / "prep" / "syn" / "c0" / "zoom_image.npy").shape == (8, 48, 32)

    image, label = body_case(seed=0)
    save_nifti(cases[0].label, np.where(label == 1, 2, label).astype(np.uint8))  # relabelled by hand
    pseudo, prep = run_both(bigger)
    assert (pseudo.computed, prep.computed) == (1, 1)
    assert run_preprocess(bigger, force=True).computed == 3

    write_table(tmp_path, cases[1:])  # a case left the table: its outputs go
    run_both(bigger)
    assert sorted(p.name for p in (tmp_path / "prep" / "syn").iterdir()) == ["c1", "c2"]
    assert sorted(p.name for p in (tmp_path / "pseudo" / "syn").iterdir()) == ["c1.json", "c1.npy", "c2.json",
                                                                               "c2.npy"]


def test_unlabelled_cases_are_left_out_and_counted(tmp_path):
    write_table(tmp_path, [nifti_case(tmp_path, "a", *body_case()), nifti_case(tmp_path, "t", body_case()[0], None)])
    pseudo, prep = run_both(config(tmp_path))
    assert pseudo.unlabelled == prep.unlabelled == 1 and list(prep.outputs) == ["syn/a"]
    assert read_manifest(prep.path)[1]["unlabelled"] == 1


def test_m3d_rows_later_channels_win_and_overlaps_are_noted(tmp_path):
    raw, label = body_case(dtype=np.float32)
    image = segvol_foreground_normalization(raw)  # M3D-Seg stores it normalised
    liver, spleen = label == 1, label == 2
    overlap = np.zeros_like(liver)
    overlap[8:10, 6:8, 4:6] = True  # inside the liver: also "kidney"
    case = m3d_case(tmp_path, "0001_case", image, [liver, spleen, overlap])
    write_table(tmp_path, [case])
    _, prep = run_both(config(tmp_path))
    (row,), _ = read_manifest(prep.path)
    assert row.classes == ("liver", "spleen", "kidney")
    assert any(f"{int(overlap.sum())} voxels lie in several mask channels" in n for n in row.notes)
    back = to_raw_grid(np.load(row.path(tmp_path / "prep", "label")), row)
    want = np.where(overlap, 3, np.where(spleen, 2, np.where(liver, 1, 0)))
    assert np.array_equal(back, want)
    assert row.voxels == {"liver": int((liver & ~overlap).sum()), "spleen": int(spleen.sum()),
                          "kidney": int(overlap.sum())}
    assert row.spacing == (1.0, 1.0, 1.0) and np.allclose(row.affine, np.eye(4))
    # no second foreground normalisation: the prep image is the stored one, min-maxed, transposed, cropped
    expect = from_raw_grid(segvol_minmax(image), row).astype(np.float16)
    assert np.array_equal(np.load(row.path(tmp_path / "prep", "image")), expect)


def test_m3d_mask_that_does_not_fit_the_image(tmp_path):
    raw, label = body_case(dtype=np.float32)
    case = m3d_case(tmp_path, "0001_x", raw, [label == 1])
    bad = case.label.with_name(f"mask_{(1, 5, 5, 5)}.npz")
    case.label.rename(bad)
    from dataclasses import replace

    with pytest.raises(CaseError, match="does not fit the image"):
        read_case(replace(case, label=bad))


def test_multichannel_images_keep_the_configured_channel(tmp_path):
    raw, label = body_case()
    other = (raw.astype(np.float32)[::-1] * 0.5 + 3).astype(np.float32)
    stack = np.stack([raw.astype(np.float32), other], axis=-1)
    case = nifti_case(tmp_path, "brats", stack, label, channels=("FLAIR", "T1w"), modality="MRI")
    first, fields = prepare_arrays(case, ROI)
    assert fields["notes"][0] == "kept channel 0 (FLAIR) of 2 (FLAIR, T1w)"
    single = nifti_case(tmp_path, "flair", raw.astype(np.float32), label)
    assert np.array_equal(first["image"], prepare_arrays(single, ROI)[0]["image"])
    by_name, fields = prepare_arrays(case, ROI, channel="t1w")
    assert "kept channel 1 (T1w)" in fields["notes"][0] and not np.array_equal(by_name["image"], first["image"])
    assert np.array_equal(by_name["image"], prepare_arrays(case, ROI, channel=1)[0]["image"])
    with pytest.raises(CaseError, match="'T2w' is not one of its channels"):
        prepare_arrays(case, ROI, channel="T2w")
    with pytest.raises(CaseError, match="out of range"):
        prepare_arrays(case, ROI, channel=4)


def test_a_process_pool_gives_the_same_outputs(tmp_path):
    cases = [nifti_case(tmp_path, f"c{i}", *body_case(seed=i)) for i in range(3)]
    write_table(tmp_path, cases)
    run_pseudomask(config(tmp_path))
    serial = {p: np.load(p) for p in sorted((tmp_path / "pseudo").rglob("*.npy"))}
    assert run_pseudomask(config(tmp_path), workers=2, force=True).computed == 3
    for path, array in serial.items():
        assert np.array_equal(np.load(path), array), path
    _bad_table(tmp_path, "nan")  # a bad case in a worker: the same one-line error
    with pytest.raises(CaseError, match=r"^syn/bad: .*NaN/Inf voxels"):
        run_pseudomask(config(tmp_path), workers=2)
    assert leftovers(tmp_path) == []


def test_the_loader_reads_the_prep_cache(tmp_path):
    from segevo.data.dataset import TrainDataset

    cases = [nifti_case(tmp_path, "ct", *body_case(seed=0)),
             nifti_case(tmp_path, "mr", *body_case(seed=1), modality="MRI-T2")]
    write_table(tmp_path, cases)
    _, prep = run_both(config(tmp_path))
    rows, _ = read_manifest(prep.path)
    ds = TrainDataset(prep.path.parent, rows, ROI, LoaderConfig(samples_per_epoch=6))
    for i in range(6):
        sample = ds[i]
        assert sample["image"].shape == (1, *ROI) and sample["target"].sum() > 0


def test_manifest_rows_are_json_and_relative(tmp_path):
    write_table(tmp_path, [nifti_case(tmp_path, "a", *body_case())])
    _, prep = run_both(config(tmp_path))
    data = json.loads(prep.path.read_text())
    row = data["cases"][0]
    assert row["image"] == "syn/a/image.npy" and row["pseudo"] == "syn/a/pseudo.npy"
    assert data["meta"]["roi_size"] == list(ROI) and data["meta"]["pseudomask"]["grid"] == [16, 16, 8]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("image", "label", "pseudo", "zoom_image", "zoom_label", "zoom_pseudo"):
        assert isinstance(np.load(prep.path.parent / row[name], mmap_mode="r"), np.memmap)
    for path in (prep.path.parent / "syn" / "a", tmp_path / "pseudo" / "syn" / "a.npy"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, path


def test_class_locations_sample_every_class_and_cap_the_count():
    from segevo.data.preprocess.transforms import class_locations

    label = np.zeros((20, 30, 30), np.uint8)
    label[2:18, 5:25, 5:25] = 1  # large: capped
    label[10, 10, 10] = 3  # a single voxel: kept
    loc = class_locations(label, per_class=100)
    assert loc.dtype == np.int32 and loc.shape[1] == 4
    for c, d, h, w in loc:
        assert label[d, h, w] == c
    assert (loc[:, 0] == 1).sum() == 100 and (loc[:, 0] == 3).sum() == 1 and not (loc[:, 0] == 2).any()
    assert class_locations(np.zeros((2, 2, 2), np.uint8)).shape == (0, 4)
