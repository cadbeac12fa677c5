"""Training samples from the prep cache: (crop, class target, prompts, modality, task) ready for the step.

Everything random about sample ``i`` of epoch ``e`` comes from one generator seeded with (seed, e, i), so a
sample is the same whatever the number of loader workers or ranks. Indices may carry their epoch,
``(epoch, i)`` (what ``EpochSampler`` yields), because persistent loader workers never see ``set_epoch``
called on the main process's copy of the dataset; a plain ``i`` uses the dataset's own epoch.

Which (case, class) a sample shows is drawn from weights that can balance classes and modalities (rare organs
and scarce MRI would otherwise be seen rarely).

Per sample, as SegVol does: either the whole volume resized to the ROI (precomputed by ``preprocess``) or an
ROI-sized crop centred on the class (positive) or anywhere (negative); flips on each axis and intensity
scale/shift (MONAI transforms); then a box (jittered) and positive/negative points from the target, and the
same for a random pseudo-mask region when the case has pseudo-masks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Flip, ScaleIntensityRange, ShiftIntensity
from torch.utils.data import Dataset

from segevo.config import LoaderConfig
from segevo.data.batch import TrainBatch
from segevo.data.manifest import PrepCase
from segevo.data.prompts import bounding_box, jitter_box, sample_points
from segevo.data.tasks import TaskVocabulary


def task_vocabulary(cases: Sequence[PrepCase]) -> TaskVocabulary:
    """Tasks are (source, class) pairs, in a stable order."""
    return TaskVocabulary(sorted({(c.source, name) for c in cases for name in c.classes if c.voxels.get(name)}))


def sampling_weights(entries: Sequence[tuple[int, str]], cases: Sequence[PrepCase], balance: str) -> np.ndarray:
    """One weight per (case, class) entry so that each class and/or modality gets an equal share."""
    w = np.ones(len(entries))
    if "class" in balance:
        count = Counter(name for _, name in entries)
        w /= np.array([count[name] for _, name in entries])
    if "modality" in balance:
        mod = [cases[i].modality.split("-")[0] for i, _ in entries]
        mass = Counter()
        for m, x in zip(mod, w, strict=True):
            mass[m] += x
        w /= np.array([mass[m] for m in mod])
    return w / w.sum()


class TrainDataset(Dataset):
    def __init__(self, root: str | Path, cases: Sequence[PrepCase], roi: tuple[int, int, int], cfg: LoaderConfig,
                 tasks: TaskVocabulary | None = None):
        self.root = Path(root)
        self.cases = list(cases)
        self.roi = tuple(roi)
        self.cfg = cfg
        self.tasks = tasks or task_vocabulary(self.cases)
        self.entries = [(i, name) for i, c in enumerate(self.cases) for name in c.classes if c.voxels.get(name)]
        if not self.entries:
            raise ValueError("no case in the training split has a labelled class")
        self.weights = sampling_weights(self.entries, self.cases, cfg.balance)
        self.epoch = 0
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return self.cfg.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _array(self, i: int, name: str) -> np.ndarray:
        key = (i, name)
        if key not in self._arrays:  # memory-mapped: each worker maps a file once, reads only its crops
            self._arrays[key] = np.load(self.cases[i].path(self.root, name), mmap_mode="r")
        return self._arrays[key]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        cfg = self.cfg
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        rng = np.random.default_rng([cfg.seed, epoch, index])
        case_idx, name = self.entries[rng.choice(len(self.entries), p=self.weights)]
        case = self.cases[case_idx]
        k = case.classes.index(name) + 1
        image, label, pseudo = self._window(case_idx, k, rng)
        target = label == k
        flips = [axis for axis in range(3) if rng.random() < cfg.flip_probability]
        if flips:
            image = np.asarray(Flip(spatial_axis=flips)(image[None]))[0]
            target = np.flip(target, flips)
            pseudo = np.flip(pseudo, flips) if pseudo is not None else None
        image = self._intensity(image, rng)
        sample = {
            "image": torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))[None],
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.int8))[None],
            "case": case.key,
            "class_name": name,
            "modality": case.modality,  # the full name: its expert and its own modality prior pool
            "task_id": self.tasks.id(case.source, name),
            **self._prompts(target, rng, ""),
        }
        if pseudo is not None:
            sample.update(self._pseudo(pseudo, rng))
        return sample

    def _window(self, i: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        cfg, case = self.cfg, self.cases[i]
        use_pseudo = cfg.pseudo and case.pseudo is not None
        if rng.random() < cfg.resize_probability:
            label = np.asarray(self._array(i, "zoom_label"))
            if (label == k).any():  # a tiny structure can vanish in the resize: then crop instead
                pseudo = np.asarray(self._array(i, "zoom_pseudo")) if use_pseudo else None
                return np.asarray(self._array(i, "zoom_image"), dtype=np.float32), label, pseudo
        label_full = self._array(i, "label")
        shape = np.array(label_full.shape)
        roi = np.array(self.roi)
        room = np.maximum(shape - roi, 0)
        start = None
        if rng.random() >= cfg.positive_fraction:  # negative crop: anywhere, kept if the class shows in it
            candidate = rng.integers(0, room + 1)
            window = tuple(slice(a, a + r) for a, r in zip(candidate, roi, strict=True))
            if (np.asarray(label_full[window]) == k).any():
                start = candidate
        if start is None:  # positive crop: centred on a voxel of the class
            start = np.clip(self._foreground_voxel(i, k, rng) - roi // 2, 0, room)
        window = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
        pad = [(0, int(r - min(r, s - a))) for a, r, s in zip(start, roi, shape, strict=True)]
        image = np.pad(np.asarray(self._array(i, "image")[window], dtype=np.float32), pad)
        label = np.pad(np.asarray(label_full[window]), pad)
        pseudo = np.pad(np.asarray(self._array(i, "pseudo")[window]), pad, constant_values=-1) if use_pseudo else None
        return image, label, pseudo

    def _foreground_voxel(self, i: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """A random voxel of class ``k``: from the precomputed class locations, else searched slab by slab."""
        if self.cases[i].locations is not None:
            locations = self._array(i, "locations")
            rows = np.flatnonzero(locations[:, 0] == k)
            if rows.size:
                return np.asarray(locations[rng.choice(rows), 1:], dtype=np.int64)
        label = self._array(i, "label")
        d = label.shape[0]
        for _ in range(8):
            z = int(rng.integers(0, d))
            lo, hi = max(0, z - 4), min(d, z + 4)
            hits = np.flatnonzero(np.asarray(label[lo:hi]) == k)
            if hits.size:
                dz, h, w = np.unravel_index(rng.choice(hits), (hi - lo, *label.shape[1:]))
                return np.array([lo + dz, h, w])
        hits = np.flatnonzero(np.asarray(label) == k)
        return np.array(np.unravel_index(rng.choice(hits), label.shape))

    def _intensity(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        if rng.random() < cfg.intensity_probability:
            factor = 1 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale)
            image = np.asarray(ScaleIntensityRange(0.0, 1.0, 0.0, factor)(image))
        if rng.random() < cfg.intensity_probability:
            image = np.asarray(ShiftIntensity(rng.uniform(-cfg.intensity_shift, cfg.intensity_shift))(image))
        return np.asarray(image, dtype=np.float32)

    def _prompts(self, mask: np.ndarray, rng: np.random.Generator, prefix: str) -> dict:
        cfg = self.cfg
        box = jitter_box(bounding_box(mask), mask.shape, cfg.box_jitter, rng)
        n_pos = 1 + int(rng.integers(0, cfg.max_extra_positive + 1))
        n_neg = int(rng.integers(0, cfg.max_negative + 1))
        coords, labels = sample_points(mask, n_pos, n_neg, cfg.num_points, rng)
        return {f"{prefix}boxes": torch.from_numpy(box), f"{prefix}point_coords": torch.from_numpy(coords),
                f"{prefix}point_labels": torch.from_numpy(labels)}

    def _pseudo(self, pseudo: np.ndarray, rng: np.random.Generator) -> dict:
        ids, counts = np.unique(pseudo[pseudo >= 0], return_counts=True)
        ids = ids[counts >= self.cfg.pseudo_min_fraction * pseudo.size]
        if ids.size == 0:  # nothing usable in this window: an all-ignored target with a dummy prompt
            mask = np.zeros(pseudo.shape, dtype=bool)
            mask[tuple(s // 2 for s in pseudo.shape)] = True
            target = np.full(pseudo.shape, -1, dtype=np.int8)
        else:
            mask = pseudo == rng.choice(ids)
            target = mask.astype(np.int8)
        return {"pseudo_target": torch.from_numpy(target)[None], **self._prompts(mask, rng, "pseudo_")}


def collate(samples: list[dict]) -> TrainBatch:
    """Stack samples into a ``TrainBatch``; pseudo fields only when every sample has them."""
    def stack(key: str) -> torch.Tensor:
        return torch.stack([s[key] for s in samples])

    has_pseudo = all("pseudo_target" in s for s in samples)
    return TrainBatch(
        image=stack("image"), target=stack("target"), class_names=[s["class_name"] for s in samples],
        modalities=[s["modality"] for s in samples], task_ids=torch.tensor([s["task_id"] for s in samples]),
        boxes=stack("boxes"), point_coords=stack("point_coords"), point_labels=stack("point_labels"),
        pseudo_target=stack("pseudo_target") if has_pseudo else None,
        pseudo_boxes=stack("pseudo_boxes") if has_pseudo else None,
        pseudo_point_coords=stack("pseudo_point_coords") if has_pseudo else None,
        pseudo_point_labels=stack("pseudo_point_labels") if has_pseudo else None,
    )
