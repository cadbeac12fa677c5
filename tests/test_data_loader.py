"""The training loader over a (synthetic) prep cache: shapes, prompts, seeds, balance, distributed use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prep_helpers import ROI, write_case
from torch.utils.data import DataLoader

from segevo.config import LoaderConfig
from segevo.data.dataset import TrainDataset, collate, sampling_weights
from segevo.data.prompts import bounding_box, jitter_box, sample_points
from segevo.data.sampler import EpochSampler


@pytest.fixture()
def prep(tmp_path):
    cases = [
        write_case(tmp_path, "ct_a", "CT", (12, 40, 44), ["liver", "spleen"], pseudo=True, seed=0),
        write_case(tmp_path, "ct_b", "CT", (6, 30, 30), ["liver"], pseudo=False, seed=1),  # smaller than the ROI
        write_case(tmp_path, "mr_a", "MRI-T2", (10, 36, 36), ["liver", "kidney"], pseudo=True, seed=2),
    ]
    return tmp_path, cases


def test_samples_have_roi_shapes_and_valid_prompts(prep):
    root, cases = prep
    ds = TrainDataset(root, cases, ROI, LoaderConfig(samples_per_epoch=40))
    for i in range(40):
        s = ds[i]
        assert s["image"].shape == (1, *ROI) and s["image"].dtype == torch.float32
        assert s["target"].shape == (1, *ROI) and s["target"].sum() > 0
        box, target = s["boxes"], s["target"][0].numpy().astype(bool)
        assert (box[:3] <= box[3:]).all() and (box[3:] < torch.tensor(ROI)).all()
        labels, coords = s["point_labels"], s["point_coords"].long()
        assert labels.shape == (21,) and labels[0] == 1
        for c, lab in zip(coords, labels, strict=True):
            if lab == 1:
                assert target[tuple(c)]
            elif lab == 0:
                assert not target[tuple(c)]
        source = s["case"].split("/")[0]
        assert s["modality"] == next(c.modality for c in cases if c.key == s["case"])  # the full name (MRI-T2)
        assert s["task_id"] == ds.tasks.id(source, s["class_name"]) > 0


def test_a_sample_is_the_same_whatever_the_workers(prep):
    root, cases = prep
    cfg = LoaderConfig(samples_per_epoch=8, seed=3)
    single = [TrainDataset(root, cases, ROI, cfg)[i] for i in range(8)]
    loader = DataLoader(TrainDataset(root, cases, ROI, cfg), batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    stacked = torch.cat([b.image for b in batches])
    assert torch.equal(stacked, torch.stack([s["image"] for s in single]))
    assert [n for b in batches for n in b.class_names] == [s["class_name"] for s in single]
    other_epoch = TrainDataset(root, cases, ROI, cfg)
    other_epoch.set_epoch(1)
    assert any(not torch.equal(other_epoch[i]["image"], single[i]["image"]) for i in range(8))


def test_ranks_see_disjoint_indices_with_their_epoch():
    sampler = [EpochSampler(11, rank=r, world=2) for r in (0, 1)]
    for s in sampler:
        s.set_epoch(3)
    seen = [list(s) for s in sampler]
    assert len(seen[0]) == len(seen[1]) == 5 and {e for part in seen for e, _ in part} == {3}
    indices = [i for part in seen for _, i in part]
    assert sorted(indices) == list(range(10)), "disjoint, together all but the remainder"
    with pytest.raises(ValueError, match="rank 2"):
        EpochSampler(4, rank=2, world=2)


def _epoch_samples(loaders, epoch: int) -> list[torch.Tensor]:
    from segevo.training import epoch_batches

    return [torch.cat([b.image.flatten(1), b.task_ids[:, None].float()], 1) for b in epoch_batches(loaders, epoch)]


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_workers_draw_fresh_samples_every_epoch_and_the_same_as_in_process(prep, workers):
    """Persistent loader workers keep their own dataset copy: the epoch must reach them with each index."""
    from segevo.config import parse_config
    from segevo.data.dataset import task_vocabulary
    from segevo.training import make_loaders

    root, cases = prep
    tasks = task_vocabulary(cases)

    def loaders(n: int):
        cfg = parse_config({"loader": {"samples_per_epoch": 8, "seed": 5},
                            "train": {"batch_size": 2, "loader_workers": n, "val_samples": 1}})
        return make_loaders(cfg, root, cases, cases, tasks, rank=1, world=2)

    pooled, serial = loaders(workers), loaders(0)
    e0, e1, again = _epoch_samples(pooled, 0), _epoch_samples(pooled, 1), _epoch_samples(pooled, 0)
    assert len(e0) == 2
    assert any(not torch.equal(a, b) for a, b in zip(e0, e1, strict=True)), "epoch 1 replayed epoch 0"
    for epoch, drawn in ((0, e0), (1, e1), (0, again)):
        for a, b in zip(drawn, _epoch_samples(serial, epoch), strict=True):
            assert torch.equal(a, b), f"epoch {epoch}: {workers} workers drew other samples than none"


def test_collate_builds_a_train_batch_with_pseudo_only_when_all_have_it(prep):
    root, cases = prep
    ds = TrainDataset(root, cases[:1], ROI, LoaderConfig(samples_per_epoch=4, resize_probability=0))
    batch = collate([ds[i] for i in range(4)])
    assert batch.image.shape == (4, 1, *ROI) and batch.pseudo_target is not None
    assert batch.point_labels.shape == (4, 21) and batch.task_ids.shape == (4,)
    no_pseudo = TrainDataset(root, cases[1:2], ROI, LoaderConfig(samples_per_epoch=2))
    assert collate([no_pseudo[0], ds[0]]).pseudo_target is None


def test_balanced_weights_equalise_classes_and_modalities(prep):
    _, cases = prep
    entries = [(i, n) for i, c in enumerate(cases) for n in c.classes]
    w = sampling_weights(entries, cases, "class+modality")
    by_mod = {"CT": 0.0, "MRI": 0.0}
    for (i, _), x in zip(entries, w, strict=True):
        by_mod[cases[i].modality.split("-")[0]] += x
    assert by_mod["CT"] == pytest.approx(0.5) and by_mod["MRI"] == pytest.approx(0.5)
    uniform = sampling_weights(entries, cases, "none")
    assert np.allclose(uniform, 1 / len(entries))


def test_prompt_helpers():
    mask = np.zeros((6, 10, 10), bool)
    mask[1:3, 2:5, 4:9] = True
    assert bounding_box(mask).tolist() == [1, 2, 4, 2, 4, 8]
    assert bounding_box(np.zeros((2, 2, 2), bool)) is None
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = jitter_box(bounding_box(mask), mask.shape, 0.3, rng)
        assert (b[:3] <= b[3:]).all() and b.min() >= 0 and (b[3:] <= np.array(mask.shape) - 1).all()
    coords, labels = sample_points(mask, 3, 4, 10, rng)
    assert labels.tolist()[:3] == [1, 1, 1] and (labels == -1).sum() >= 3
    with pytest.raises(ValueError, match="empty mask"):
        sample_points(np.zeros((2, 2, 2), bool), 1, 0, 3, rng)
