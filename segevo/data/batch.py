"""The training batch the loader workers build and the loss consumes: the contract between data and training.

It lives on the data side so that a DataLoader worker imports torch and the data modules only, never the model
or peft (``segevo.losses`` imports it from here, not the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainBatch:
    """One training batch; every tensor has the batch first. ``target`` holds 1, 0, or -1 (ignore)."""

    image: torch.Tensor  # (B, 1, D, H, W) float
    target: torch.Tensor  # (B, 1, D, H, W) int8
    class_names: list[str]
    modalities: list[str]
    task_ids: torch.Tensor  # (B,) long
    boxes: torch.Tensor  # (B, 6)
    point_coords: torch.Tensor  # (B, N, 3)
    point_labels: torch.Tensor  # (B, N), -1 = padding
    pseudo_target: torch.Tensor | None = None  # (B, 1, D, H, W) int8: a pseudo-mask region, -1 ignore
    pseudo_boxes: torch.Tensor | None = None
    pseudo_point_coords: torch.Tensor | None = None
    pseudo_point_labels: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TrainBatch:
        moved = {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                 for k, v in self.__dict__.items()}
        return TrainBatch(**moved)
