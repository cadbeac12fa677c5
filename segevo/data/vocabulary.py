"""One name per anatomical structure across all sources, so that "kidney_left" (TotalSegmentator), "left kidney"
(AMOS, CHAOS) and "Kidney_L" are one class for the text prompt, the priors and the evaluation tables.

Canonical names are lower-case English with single spaces, the side first ("left adrenal gland"), American
spelling ("tumor"), and SegVol's own wording where it has one ("gallbladder", "inferior vena cava"), because
its CLIP text tower was trained on those prompts. Names without an entry pass through normalised: a new
source still works, it just keeps its own wording until a synonym is added here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from segevo.errors import UserError

# Whole-name synonyms, applied to the normalised name without its side ("kidney left" -> "kidney").
SYNONYMS: dict[str, str] = {
    # AMOS22 (its dataset.json spells the aorta "arota" and calls the IVC "postcava")
    "arota": "aorta",
    "postcava": "inferior vena cava",
    "gall bladder": "gallbladder",
    "prostate/uterus": "prostate or uterus",
    # TotalSegmentator
    "urinary bladder": "bladder",
    "clavicula": "clavicle",
    "iliac vena": "iliac vein",
    "portal vein and splenic vein": "portal and splenic vein",
    "autochthon": "autochthonous back muscle",
    # common abbreviations and variants in other data sets
    "ivc": "inferior vena cava",
    "vena cava inferior": "inferior vena cava",
    "postcava vein": "inferior vena cava",
    "adrenal": "adrenal gland",
    "oesophagus": "esophagus",
    "gall": "gallbladder",
    "urinarybladder": "bladder",
    # MSD Task05_Prostate and Task10_Colon
    "pz": "prostate peripheral zone",
    "tz": "prostate transition zone",
    "colon cancer primaries": "colon cancer",
}

# Names that mean different structures in different data sets ("cancer" is a liver tumor in MSD Task03 and a
# lung tumor in Task06): looked up by a context such as "msd/Task03_Liver" before the global table.
CONTEXT_SYNONYMS: dict[str, dict[str, str]] = {
    "msd/Task01_BrainTumour": {"edema": "peritumoral edema", "non-enhancing tumor": "non-enhancing tumor core",
                               "enhancing tumor": "enhancing tumor"},
    "msd/Task03_Liver": {"cancer": "liver tumor"},
    "msd/Task04_Hippocampus": {"anterior": "anterior hippocampus", "posterior": "posterior hippocampus"},
    "msd/Task06_Lung": {"cancer": "lung tumor"},
    "msd/Task07_Pancreas": {"cancer": "pancreas tumor"},
    "msd/Task08_HepaticVessel": {"vessel": "hepatic vessel", "tumor": "liver tumor"},
}

_WORDS = {"tumour": "tumor", "tumours": "tumors", "oedema": "edema", "haemorrhage": "hemorrhage"}
_SIDES = {"left": "left", "right": "right", "l": "left", "r": "right", "lt": "left", "rt": "right"}


class LabelError(UserError):
    """A case's label map holds values its source does not declare."""


def normalise(name: str) -> str:
    """Lower case, ``_`` as a space, single spaces, British -> American words; hyphens stay ("non-enhancing")."""
    text = re.sub(r"[_\s]+", " ", name.strip().lower())
    return " ".join(_WORDS.get(word, word) for word in text.split())


def _split_side(words: list[str]) -> tuple[str | None, list[str]]:
    """TotalSegmentator puts the side last or in the middle ("rib_left_1"); a lone "L"/"R" only counts at the end."""
    full = [i for i, w in enumerate(words) if w in ("left", "right")]
    if len(full) == 1 and len(words) > 1:
        return words[full[0]], words[:full[0]] + words[full[0] + 1:]
    if not full and len(words) > 1 and words[-1] in _SIDES:
        return _SIDES[words[-1]], words[:-1]
    return None, words


def canonical(name: str, context: str | None = None) -> str:
    """The unified name of a structure: context synonyms, then the side moved first and global synonyms."""
    text = normalise(name)
    if context is not None and text in CONTEXT_SYNONYMS.get(context, {}):
        return CONTEXT_SYNONYMS[context][text]
    if text in SYNONYMS:
        return SYNONYMS[text]
    side, words = _split_side(text.split())
    rest = " ".join(words)
    if len(words) == 2 and words[0] == "vertebrae":  # TotalSegmentator's "vertebrae_L5" -> "l5 vertebra"
        rest = f"{words[1]} vertebra"
    rest = SYNONYMS.get(rest, rest)
    return f"{side} {rest}" if side else rest


def label_map(raw: Mapping[int | str, str], context: str | None = None) -> dict[int, str]:
    """A source's class map with int keys and canonical names; 0 (background) is implicit and dropped."""
    out: dict[int, str] = {}
    seen: dict[str, int] = {}
    for key, name in raw.items():
        value = int(key)
        if value == 0:
            continue
        if value < 0:
            raise LabelError(f"label value {value} ({name!r}) is negative")
        unified = canonical(name, context)
        if unified in seen:
            raise LabelError(f"label values {seen[unified]} and {value} both mean {unified!r}")
        seen[unified] = value
        out[value] = unified
    return dict(sorted(out.items()))


def check_labels(case: str, values: Iterable[int], class_map: Mapping[int, str]) -> list[str]:
    """The canonical names present in a case; raises when a value is neither 0 nor declared by its source."""
    present = sorted({int(v) for v in values} - {0})
    unknown = [v for v in present if v not in class_map]
    if unknown:
        declared = ", ".join(f"{k}" for k in sorted(class_map)) or "none"
        shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise LabelError(f"{case}: label values {shown} are not in the source's class map (declared: {declared})")
    return [class_map[v] for v in present]
