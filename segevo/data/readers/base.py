"""What every image reader shares: the volume it returns and the checks that turn a bad file into a one-line
:class:`~segevo.data.cases.CaseError` naming it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segevo.data.cases import CaseError

if TYPE_CHECKING:
    from segevo.data.cases import Case


@dataclass
class RawVolume:
    """One case as read from disk, checked, in raw array order (X, Y, Z)."""

    image: np.ndarray  # float32, finite
    label: np.ndarray | None  # label values of the source's class map (M3D-Seg: channel k -> k + 1)
    affine: np.ndarray
    spacing: tuple[float, float, float]  # (X, Y, Z) in mm
    normalised: bool  # M3D-Seg images are stored foreground-normalised already
    channels: Any = None  # M3D-Seg: the sparse (K, X*Y*Z) mask, for the pseudo-mask overlay (overlaps kept)
    notes: list[str] = field(default_factory=list)


class ImageReader(Protocol):
    """One raw format of the case table, registered under its ``format`` (the case table's ``format`` value)
    and the file endings it reads (:mod:`segevo.data.readers`)."""

    format: str
    suffixes: tuple[str, ...]

    def check(self, case: Case) -> list[str]:
        """Open the case's files cheaply (download's validation): the class names present in the label."""

    def read(self, case: Case, channel: int | str = 0) -> RawVolume:
        """Read and check the image and label in full (the data stages)."""

    def read_image(self, path: Path, channel: int = 0) -> tuple[np.ndarray, Any]:
        """One image outside any case table (predict): float32 in raw array order, and what writing a mask on
        its grid needs (the format's image object)."""


def unreadable(path: Path, kind: str, err: BaseException) -> CaseError:
    if path.is_dir():
        return CaseError(f"{path}: is a directory, not a {kind} file")
    if isinstance(err, FileNotFoundError):
        return CaseError(f"{path}: file not found")
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CaseError(f"{path}: corrupt or truncated {kind} ({detail})")


def to_float32(data: np.ndarray, path: Path) -> np.ndarray:
    """What MONAI's ``LoadImage`` hands SegVol's transforms. NaN/Inf in the file and finite float64 values that
    overflow float32 are told apart: calling the latter NaN/Inf would send the user looking for what is not there."""
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise CaseError(f"{path}: voxel type {data.dtype} is not a real number")
    if data.dtype.kind == "f":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise CaseError(f"{path}: {bad} NaN/Inf voxels")
    with np.errstate(over="ignore"):
        image = data.astype(np.float32, copy=False)  # in its memory order: no copy for what the reader made
    if not image.flags.writeable or isinstance(image, np.memmap):  # an uncompressed file mapped read-only
        image = np.array(image, order="K")
    if data.dtype != np.float32:
        big = image.size - int(np.count_nonzero(np.isfinite(image)))
        if big:
            raise CaseError(f"{path}: {big} voxels are finite but beyond the float32 range (|value| > "
                            f"{np.finfo(np.float32).max:.3g}), which the model computes in")
    return image
