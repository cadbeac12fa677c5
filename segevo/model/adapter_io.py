"""Adapter checkpoints: only what was trained (the experts, priors, gates) as safetensors, plus the JSON that
rebuilds the model around them (model, adapters and priors config, task vocabulary). A few MB at full size.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from segevo.config import AdaptersConfig, ModelConfig, PriorsConfig, format_error
from segevo.data.tasks import TaskVocabulary
from segevo.io import atomic_write_bytes, atomic_write_json, read_json
from segevo.model.adapted import AdaptedSegVol
from segevo.model.checkpoint import CheckpointError, check_finite, check_keys
from segevo.model.segvol import SegVol

FORMAT = "segevo-adapters/1"
WEIGHTS, META = "adapters.safetensors", "adapters.json"


def trained_state_dict(model: AdaptedSegVol) -> dict[str, torch.Tensor]:
    """The parameters that fine-tuning changes: everything that requires grad (the base is frozen)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_adapters(model: AdaptedSegVol, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapters.safetensors`` + ``adapters.json`` into ``directory`` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in trained_state_dict(model).items()}
    tmp = directory / f".{WEIGHTS}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "model": model.base.cfg.model_dump(mode="json"),
        "adapters": model.adapters_cfg.model_dump(mode="json"),
        "priors": model.priors_cfg.model_dump(mode="json"),
        "tasks": json.loads(model.tasks.to_json()),
        "base": model.base_origin,
        "trainable": model.trainable_counts(),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    atomic_write_json(directory / META, meta)
    return directory


def read_meta(directory: str | os.PathLike[str]) -> dict:
    """``adapters.json`` checked for what :func:`build_from_adapters` reads, every error naming the file."""
    folder = Path(directory)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise CheckpointError(f"{folder}: {what}; an adapter checkpoint is a folder with {META} and {WEIGHTS}")
    path = folder / META
    if not path.exists():
        raise CheckpointError(f"{path}: no adapter metadata (expected {META} and {WEIGHTS})")
    meta = read_json(path, "adapter metadata file", CheckpointError)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("model", dict), ("adapters", dict), ("priors", dict), ("tasks", list)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: '{key}' must be a JSON {'object' if kind is dict else 'array'}")
    base = meta.get("base") or {}
    if not isinstance(base, dict) or not isinstance(base.get("weights"), str | None) \
            or isinstance(base.get("seed"), bool) or not isinstance(base.get("seed"), int | None):
        raise CheckpointError(f"{path}: 'base' must be an object with 'weights' (a path or null) and 'seed' "
                              "(an integer or null)")
    if not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in meta["tasks"]):
        raise CheckpointError(f"{path}: 'tasks' must list [dataset, class] pairs of strings")
    return meta


def seeded_base(model_cfg: ModelConfig, seed: int) -> SegVol:
    """The random SegVol that ``seed`` makes (what training builds without base weights), the global RNG left as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SegVol(model_cfg)


def build_from_adapters(directory: str | os.PathLike[str], base_weights: str | os.PathLike[str] | None = None,
                        trust_pickle: bool = False) -> AdaptedSegVol:
    """Rebuild the adapted model an adapter checkpoint was trained as, on the given base weights."""
    from segevo.model.checkpoint import load_checkpoint

    meta = read_meta(directory)
    origin = meta.get("base") or {}
    try:
        model_cfg = ModelConfig.model_validate(meta["model"])
        if base_weights is None and origin.get("weights") is None and origin.get("seed") is not None:
            base = seeded_base(model_cfg, int(origin["seed"]))  # the random base the adapters were trained on
        else:
            base = SegVol(model_cfg)
        adapters = AdaptersConfig.model_validate(meta["adapters"])
        priors = PriorsConfig.model_validate(meta["priors"])
    except ValidationError as err:
        raise CheckpointError(format_error(f"{Path(directory) / META}: invalid configuration", err)) from None
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"{Path(directory) / META}: invalid configuration: {err}") from None
    if base_weights is None and origin.get("weights"):
        base_weights = origin["weights"]
        if not Path(base_weights).is_file():
            raise CheckpointError(f"{Path(directory) / META}: trained on base weights {base_weights}, which are "
                                  "not there: pass the base checkpoint explicitly")
    if base_weights is not None:
        load_checkpoint(base, base_weights, trust_pickle=trust_pickle)
    model = AdaptedSegVol(base, adapters, priors, TaskVocabulary(tuple(t) for t in meta["tasks"]))
    model.base_origin = {"weights": str(base_weights) if base_weights else None,
                         "seed": origin.get("seed") if base_weights is None else None}
    load_adapters(model, directory)
    return model.eval()


def load_adapters(model: AdaptedSegVol, directory: str | os.PathLike[str]) -> None:
    """Strictly load an adapter checkpoint into a model built with the same configuration."""
    path = Path(directory) / WEIGHTS
    read_meta(directory)
    if path.is_dir() or not path.exists():
        raise CheckpointError(f"{path}: {'is a directory, not' if path.is_dir() else 'no such'} adapter weights file")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
    expected = trained_state_dict(model)
    try:
        check_keys(expected, tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    check_finite(tensors, path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def export_merged(model: AdaptedSegVol, modality: str, out: str | os.PathLike[str]) -> Path:
    """A plain SegVol checkpoint (HF layout) with ``modality``'s expert merged in; priors cannot be merged and
    are left out, so the file reproduces the MoA model's output for that modality only without priors."""
    expert = model.experts_of(modality, 1)[0]
    state = (model.moa.merged_state_dict(expert) if model.moa is not None
             else {k: v.detach().clone() for k, v in model.base.state_dict().items()})
    buffer = io.BytesIO()
    torch.save({f"model.{k}": v for k, v in state.items()}, buffer)
    return atomic_write_bytes(out, buffer.getvalue())
