"""Strict loading of SegVol's released checkpoints.

Three layouts exist upstream:
- ``hf``: HF ``pytorch_model.bin``, the state dict itself, keys prefixed ``model.``;
- ``v1``: ``SegVol_v1.pth``, ``{'model': state_dict, 'optimizer': ..., ...}``, keys prefixed ``module.``;
- ``vit``: ``vit_pretrain.ckpt`` (SimMIM), ``{'state_dict': ...}``; only ``model.encoder.*`` is the image
  encoder, every other entry belongs to the pre-training head and is ignored.
After the prefix, a few named rewrites absorb what other library versions wrote (see ``_NORMALISERS``). Then
the key sets must match exactly and every shape must agree: nothing is ever loaded with ``strict=False``.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segevo.errors import UserError

if TYPE_CHECKING:
    from segevo.model.segvol import SegVol

LAYOUTS = ("hf", "v1", "vit")
_PREFIX = {"hf": "model.", "v1": "module.", "vit": "model.encoder."}
_LEGACY_POSITION_IDS = "text_encoder.clip_text_model.text_model.embeddings.position_ids"
_CLIP = "text_encoder.clip_text_model."
_NORM_CROSS_ATTN = re.compile(r"^image_encoder\.blocks\.\d+\.norm_cross_attn\.(weight|bias)$")


class CheckpointError(UserError):
    """A checkpoint cannot be read, or does not match the model exactly."""


class KeyMismatch(CheckpointError):
    """The checkpoint's keys or shapes are not the model's; ``counts`` says how many of each kind differ."""

    def __init__(self, message: str, counts: dict[str, int]):
        super().__init__(message)
        self.counts = counts


@dataclass
class LoadReport:
    path: str
    layout: str
    loaded: int
    dropped: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> object:
    """``torch.load`` with ``weights_only=True``; full unpickling only when the caller trusts the file.

    A file that is neither a zip archive nor a pickle is "not a checkpoint": suggesting ``--trust-pickle`` for
    random bytes would invite the unsafe flag for nothing."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_container(path)
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported object"
            raise CheckpointError(
                f"{path}: refused: the file needs full unpickling, which can run arbitrary code ({reason[:160]}); "
                f"rerun with --trust-pickle (trust_pickle=True) only if you trust its source"
            ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{_first_line(err)}") from None
    try:
        return _torch_load(path, weights_only=False)
    except Exception as err:  # a trusted pickle can raise anything while rebuilding its objects
        raise CheckpointError(f"{path}: cannot unpickle: {_first_line(err)}") from None


def _check_container(path: Path) -> None:
    """torch writes a zip archive (``torch.save`` since 1.6) or a legacy pickle stream (protocol 2+)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    if zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    shown = "empty file" if not head else f"starts with {head!r}"
    raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle: {shown})")


def check_finite(tensors: Mapping[str, object], path: str | Path) -> None:
    """Refuse NaN/Inf in any floating-point tensor, naming it: a model with one NaN weight answers empty masks
    in silence."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = value.numel() - int(torch.isfinite(value).sum())
            if bad:
                raise CheckpointError(f"{path}: tensor {key} holds {bad} NaN/Inf values of {value.numel()}: "
                                      "refusing a non-finite checkpoint")


def _torch_load(path: Path, weights_only: bool) -> object:
    if zipfile.is_zipfile(path):  # memory-map the zip format: no copy of a 700 MB file in RAM
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def detect_layout(obj: object) -> str:
    if isinstance(obj, Mapping):
        if isinstance(obj.get("model"), Mapping):
            return "v1"
        if isinstance(obj.get("state_dict"), Mapping):
            return "vit"
        if obj and all(isinstance(k, str) and k.startswith("model.") for k in obj) \
                and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return "hf"
    top = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"unrecognised checkpoint layout (top level: {top}); expected one of {', '.join(LAYOUTS)}")


def _state_dict(obj: object, layout: str) -> Mapping[str, object]:
    if layout == "hf":
        sd = obj
    elif layout == "v1":
        sd = obj.get("model") if isinstance(obj, Mapping) else None
    else:
        sd = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping):
        want = {"hf": "a state dict", "v1": "a dict with a 'model' state dict",
                "vit": "a dict with a 'state_dict' entry"}[layout]
        raise CheckpointError(f"not a '{layout}' checkpoint: expected {want}")
    return sd


def _rename(sd: Mapping[str, object], layout: str) -> dict[str, object]:
    prefix = _PREFIX[layout]
    if layout == "vit":
        return {"image_encoder." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _drop_legacy_position_ids(sd: dict[str, object], dropped: list[str]) -> None:
    """transformers <= 4.30 saved CLIP's ``position_ids`` buffer; it is ``arange(77)``, recomputed here."""
    if _LEGACY_POSITION_IDS in sd:
        del sd[_LEGACY_POSITION_IDS]
        dropped.append(_LEGACY_POSITION_IDS)


def _nest_clip_text_model(sd: dict[str, object], dropped: list[str]) -> None:
    """transformers >= 5.6 writes the CLIP tower without its ``text_model.`` level."""
    for key in [k for k in sd if k.startswith(_CLIP) and not k.startswith(_CLIP + "text_model.")]:
        sd[_CLIP + "text_model." + key[len(_CLIP):]] = sd.pop(key)


def _drop_norm_cross_attn(sd: dict[str, object], dropped: list[str]) -> None:
    """MONAI >= 1.4 ViTs carry a ``norm_cross_attn`` LayerNorm that the ViT never calls."""
    for key in [k for k in sd if _NORM_CROSS_ATTN.match(k)]:
        del sd[key]
        dropped.append(key)


_NORMALISERS: tuple[Callable[[dict[str, object], list[str]], None], ...] = (
    _nest_clip_text_model,
    _drop_legacy_position_ids,
    _drop_norm_cross_attn,
)


def canonical_state_dict(obj: object, layout: str = "auto") -> tuple[str, dict[str, object], list[str]]:
    """(layout, state dict keyed like ``SegVol.state_dict()``, keys dropped by the named rewrites)."""
    if layout == "auto":
        layout = detect_layout(obj)
    elif layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    sd = _rename(_state_dict(obj, layout), layout)
    dropped: list[str] = []
    for rule in _NORMALISERS:
        rule(sd, dropped)
    return layout, sd, dropped


def _listing(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:10])
    more = f" ... and {len(keys) - 10} more" if len(keys) > 10 else ""
    return f"{len(keys)} {kind}: {shown}{more}"


def check_keys(expected: Mapping[str, torch.Tensor], sd: Mapping[str, object]) -> None:
    """Raise with a listing (first 10 of each kind + count) unless keys and shapes match exactly."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        if isinstance(v, torch.Tensor) else f"{k} (not a tensor: {type(v).__name__})"
        for k, v in sd.items()
        if k in expected and not (isinstance(v, torch.Tensor) and v.shape == expected[k].shape)
    ]
    problems = [_listing(kind, keys) for kind, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped tensors", misshaped))
                if keys]
    if problems:
        counts = {kind: len(keys) for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                      ("mis-shaped tensors", misshaped)) if keys}
        raise KeyMismatch("checkpoint does not match the model: " + "; ".join(problems), counts)


def check_checkpoint_file(path: str | Path, layout: str = "auto", trust_pickle: bool = False) -> str:
    """Read a checkpoint and check its layout and finiteness without a model: what a verb that loads it later
    (in another process) checks up front. Returns the layout."""
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    try:
        layout, sd, _ = canonical_state_dict(obj, layout)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    check_finite(sd, path)
    return layout


def load_checkpoint(model: SegVol, path: str | Path, layout: str = "auto",
                    trust_pickle: bool = False) -> LoadReport:
    """Load a SegVol checkpoint into ``model`` strictly; ``vit`` fills the image encoder only."""
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    try:
        layout, sd, dropped = canonical_state_dict(obj, layout)
        target = model.image_encoder if layout == "vit" else model
        if layout == "vit":
            sd = {k[len("image_encoder."):]: v for k, v in sd.items()}
        check_keys(target.state_dict(), sd)
    except KeyMismatch as err:
        raise KeyMismatch(f"{path}: {err}", err.counts) from None
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    check_finite(sd, path)
    target.load_state_dict(sd, strict=True)
    parts = {name: n for name, n in model.parameter_counts().items() if layout != "vit" or name == "image_encoder"}
    return LoadReport(path=str(path), layout=layout, loaded=len(sd), dropped=dropped, parts=parts)
