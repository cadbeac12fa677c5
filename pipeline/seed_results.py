"""The SegEVOLution prototype's published Dice (400-subset test split, text + point prompt, one run, n = 3-4
volumes per class, Dice ``2TP/(|P|+|G|+1)``), keyed by what our data calls the same structure, so the
evaluation report can put them beside our numbers where the data match (same source, modality and class)."""

from __future__ import annotations

from typing import NamedTuple


class SeedRow(NamedTuple):
    modality: str
    source: str  # our data source that holds the same data set
    structure: str  # our unified class name
    dataset: str  # the prototype's data set label
    n: int
    baseline: float
    lora: float
    prior: float


SEED_ROWS: tuple[SeedRow, ...] = (
    SeedRow("CT", "msd", "colon cancer", "0018 (MSD colon)", 4, 0.518, 0.575, 0.678),
    SeedRow("CT", "msd", "liver", "0020 (MSD liver)", 3, 0.950, 0.959, 0.958),
    SeedRow("CT", "msd", "liver tumor", "0020 (MSD liver)", 3, 0.430, 0.482, 0.491),
    SeedRow("CT", "msd", "pancreas", "0022 (MSD pancreas)", 3, 0.751, 0.772, 0.766),
    SeedRow("CT", "msd", "pancreas tumor", "0022 (MSD pancreas)", 3, 0.692, 0.653, 0.659),
    SeedRow("CT", "msd", "spleen", "0023 (MSD spleen)", 3, 0.964, 0.963, 0.963),
    SeedRow("MRI", "promise12", "prostate", "promise12_mr_42", 4, 0.380, 0.763, 0.775),
    # the prototype swapped BraTS' names: its "Enhancing Tumor" row is really edema and vice versa
    SeedRow("MRI", "msd", "peritumoral edema", "brats_mr_42", 4, 0.236, 0.343, 0.473),
    SeedRow("MRI", "msd", "enhancing tumor", "brats_mr_42", 4, 0.405, 0.002, 0.282),
    SeedRow("MRI", "msd", "non-enhancing tumor core", "brats_mr_42", 4, 0.154, 0.025, 0.058),
    SeedRow("MRI", "amos22", "liver", "amos_mrct_42", 4, 0.873, 0.960, 0.960),
    SeedRow("MRI", "amos22", "spleen", "amos_mrct_42", 4, 0.958, 0.958, 0.960),
    SeedRow("MRI", "amos22", "right kidney", "amos_mrct_42", 4, 0.951, 0.951, 0.951),
    SeedRow("MRI", "amos22", "left kidney", "amos_mrct_42", 4, 0.952, 0.943, 0.949),
    SeedRow("MRI", "amos22", "aorta", "amos_mrct_42", 4, 0.900, 0.840, 0.893),
    SeedRow("MRI", "amos22", "inferior vena cava", "amos_mrct_42", 4, 0.778, 0.764, 0.761),
    SeedRow("MRI", "amos22", "pancreas", "amos_mrct_42", 4, 0.672, 0.735, 0.756),
    SeedRow("MRI", "amos22", "stomach", "amos_mrct_42", 4, 0.708, 0.817, 0.830),
    SeedRow("MRI", "amos22", "duodenum", "amos_mrct_42", 4, 0.616, 0.568, 0.569),
    SeedRow("MRI", "amos22", "esophagus", "amos_mrct_42", 4, 0.568, 0.551, 0.609),
    SeedRow("MRI", "amos22", "gallbladder", "amos_mrct_42", 4, 0.537, 0.495, 0.485),
    SeedRow("MRI", "amos22", "left adrenal gland", "amos_mrct_42", 4, 0.486, 0.618, 0.586),
    SeedRow("MRI", "amos22", "right adrenal gland", "amos_mrct_42", 4, 0.430, 0.560, 0.554),
    SeedRow("MRI", "chaos", "liver", "chaos_mrct_42", 3, 0.577, 0.913, 0.913),
    SeedRow("MRI", "chaos", "spleen", "chaos_mrct_42", 3, 0.592, 0.893, 0.581),
    SeedRow("MRI", "chaos", "right kidney", "chaos_mrct_42", 3, 0.858, 0.859, 0.855),
    SeedRow("MRI", "chaos", "left kidney", "chaos_mrct_42", 3, 0.611, 0.800, 0.804),
)

# Overall text + point, sample-weighted (seed-results.md headline table): (overall, CT, MRI)
SEED_OVERALL = {"baseline": (0.5744, 0.7069, 0.5492), "lora": (0.6470, 0.7258, 0.6321),
                "prior": (0.6651, 0.7485, 0.6493)}


def seed_row(modality: str, source: str, structure: str) -> SeedRow | None:
    """The prototype's row for the same data, if it published one (source ``msd/Task03_Liver`` matches ``msd``)."""
    base = source.split("/")[0]
    return next((r for r in SEED_ROWS if (r.modality, r.source, r.structure) == (modality, base, structure)), None)
