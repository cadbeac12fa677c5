"""The unified vocabulary: every source's spelling of a structure becomes one canonical name."""

from __future__ import annotations

import pytest

from segevo.data.sources import amos22, chaos
from segevo.data.vocabulary import LabelError, canonical, check_labels, label_map


@pytest.mark.parametrize(("raw", "context", "expected"), [
    ("kidney_left", None, "left kidney"),
    ("Kidney_L", None, "left kidney"),
    ("inferior_vena_cava", None, "inferior vena cava"),
    ("postcava", None, "inferior vena cava"),
    ("arota", None, "aorta"),
    ("Gall Bladder", None, "gallbladder"),
    ("adrenal_gland_right", None, "right adrenal gland"),
    ("rib_left_1", None, "left rib 1"),
    ("vertebrae_L5", None, "l5 vertebra"),
    ("urinary_bladder", None, "bladder"),
    ("iliac_vena_right", None, "right iliac vein"),
    ("left atrium", None, "left atrium"),
    ("PZ", None, "prostate peripheral zone"),
    ("cancer", "msd/Task03_Liver", "liver tumor"),
    ("cancer", "msd/Task06_Lung", "lung tumor"),
    ("Tumour", "msd/Task08_HepaticVessel", "liver tumor"),
    ("enhancing tumour", "msd/Task01_BrainTumour", "enhancing tumor"),
    ("non-enhancing tumor", "msd/Task01_BrainTumour", "non-enhancing tumor core"),
    ("Anterior", "msd/Task04_Hippocampus", "anterior hippocampus"),
    ("Some_New Structure", None, "some new structure"),
])
def test_canonical(raw, context, expected):
    assert canonical(raw, context) == expected


def test_sources_agree_on_shared_organs():
    amos = set(label_map(amos22.LABELS).values())
    mr = set(label_map(chaos.MR_LABELS).values())
    assert mr <= amos
    assert {"aorta", "inferior vena cava", "gallbladder", "prostate or uterus"} <= amos


def test_canonical_is_idempotent():
    names = [*amos22.LABELS.values(), "kidney_cyst_left", "lung_middle_lobe_right", "vertebrae_T12",
             "portal_vein_and_splenic_vein", "clavicula_left", "autochthon_right", "non-enhancing tumor"]
    for name in names:
        once = canonical(name)
        assert canonical(once) == once, name


def test_label_map_drops_background_and_refuses_clashes():
    assert label_map({"0": "background", "1": "Liver", "2": "cancer"}, "msd/Task03_Liver") == {
        1: "liver", 2: "liver tumor"}
    with pytest.raises(LabelError, match="both mean 'left kidney'"):
        label_map({1: "kidney_left", 2: "Left Kidney"})


def test_check_labels_names_the_case_and_the_values():
    names = check_labels("msd/la_003", [0, 2, 1, 2], {1: "liver", 2: "spleen"})
    assert names == ["liver", "spleen"]
    with pytest.raises(LabelError, match=r"msd/la_003: label values 7, 9 are not in the source's class map"):
        check_labels("msd/la_003", [0, 1, 7, 9], {1: "liver", 2: "spleen"})
