"""``segevo predict``: segment a NIfTI volume with text, box and/or point prompts; the mask is written on the
input's exact grid and affine.

Coordinates are voxel indices of the input file's array, in its own axis order (what a viewer's voxel
coordinates show); segevo applies SegVol's axis transposition and foreground crop itself and undoes both on
the output. Several ``--text`` give one label per class (1, 2, ... in the order given, overlaps going to the
most confident class); a box and points describe one object, optionally named by one ``--text``. The label
names are also written next to the mask as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline.common import config_from_args, preflight, torch_device
from pipeline.flags import device, int_at_least, non_empty, voxel_box, voxel_point
from segevo.errors import UserError


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, metavar="IN.nii.gz", help="the volume to segment (NIfTI)")
    p.add_argument("--out", required=True, metavar="OUT.nii.gz", help="the label map to write (NIfTI)")
    p.add_argument("--modality", required=True, type=non_empty,
                   help="the image's modality (CT, MRI, ...): picks the expert")
    p.add_argument("--text", action="append", default=[], type=non_empty, metavar="NAME",
                   help="a class name (repeatable)")
    p.add_argument("--box", type=voxel_box, metavar="d0,h0,w0,d1,h1,w1", help="a box (inclusive voxel indices)")
    p.add_argument("--point", action="append", default=[], type=voxel_point, metavar="d,h,w[:label]",
                   help="a point, label 1 (positive, the default) or 0 (negative); repeatable")
    p.add_argument("--weights", help="base SegVol checkpoint (default: the one the adapter was trained on)")
    p.add_argument("--adapter", help="a segevo adapter checkpoint folder (models/adapter)")
    p.add_argument("--channel", type=int_at_least(0), default=0, help="channel of a 4D image (default 0)")
    p.add_argument("--no-zoom-in", dest="zoom_in", action="store_false", default=None,
                   help="zoom-out pass only (faster, coarser)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: inference.precision")
    p.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--trust-pickle", action="store_true", help="allow a full-pickle base checkpoint")
    p.set_defaults(run=run)


def raw_queries(args: argparse.Namespace, shape: tuple[int, ...]) -> list[dict]:
    """The prompts as parsed (whole voxel indices, see :mod:`pipeline.flags`), checked against the raw array's
    shape (before any transposition or crop)."""
    spatial = args.box is not None or bool(args.point)
    if not args.text and not spatial:
        raise UserError("give at least one prompt: --text, --box or --point")
    if spatial and len(args.text) > 1:
        raise UserError("a box or points describe one object: combine them with at most one --text")
    box = points = labels = None
    limit = tuple(int(n) - 1 for n in shape)
    if args.box is not None:
        box = np.array(args.box, dtype=np.float64)
        if np.any(box[:3] < 0) or np.any(box[3:] > np.array(limit)):
            raise UserError(f"--box {_joined(args.box)} lies outside the volume (shape {shape}, indices 0..{limit})")
    if args.point:
        points = np.array([c for c, _ in args.point], dtype=np.float64)
        labels = np.array([lab for _, lab in args.point])
        outside = np.any((points < 0) | (points > np.array(limit)), axis=1)
        if outside.any():
            coords, label = args.point[int(np.argmax(outside))]
            raise UserError(f"--point {_joined(coords)}:{label} lies outside the volume "
                            f"(shape {shape}, indices 0..{limit})")
    if spatial:
        return [{"name": args.text[0] if args.text else "object", "text": args.text[0] if args.text else None,
                 "box": box, "points": points, "labels": labels}]
    return [{"name": t, "text": t, "box": None, "points": None, "labels": None} for t in args.text]


def _joined(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def to_prep(query: dict, start: tuple[int, ...], end: tuple[int, ...]):
    """A raw-coordinate query on the prep grid: SegVol's axis order (reversed), minus the crop's start."""
    from segevo.data.manifest import AXIS_ORDER
    from segevo.inference import Query

    order = list(AXIS_ORDER)
    lo, size = np.array(start), np.array(end) - np.array(start)
    box = points = None
    if query["box"] is not None:
        b = np.concatenate([query["box"][:3][order], query["box"][3:][order]]) - np.concatenate([lo, lo])
        if np.any(b[3:] < 0) or np.any(b[:3] > size - 1):
            raise UserError("--box covers only background: it lies outside the image's non-zero region")
        box = np.concatenate([np.maximum(b[:3], 0), np.minimum(b[3:], size - 1)])
    if query["points"] is not None:
        points = np.clip(query["points"][:, order] - lo, 0, size - 1)
    return Query(query["text"], box, points, query["labels"], task=query["text"])


def run(args: argparse.Namespace) -> int:
    import nibabel as nib

    from segevo.config import InferenceConfig
    from segevo.data.preprocess.geometry import paste_back, prepare_image
    from segevo.data.readers import read_image
    from segevo.inference import ZoomInference, load_for_inference
    from segevo.io import atomic_write_bytes, atomic_write_json

    cfg, _ = config_from_args(args)
    if args.adapter is None and args.weights is None:
        raise UserError("no model: pass --weights (a SegVol checkpoint) and/or --adapter (a segevo adapter folder)")
    out = Path(args.out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise UserError(f"--out {out}: the mask is written as NIfTI: name it .nii.gz or .nii")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    preflight(args, outputs=[("--out", out), ("--out's label sidecar", _sidecar(out))],
              inputs=[("--image", args.image), ("--weights", args.weights), ("--adapter", args.adapter)])
    device = torch_device(args.device)
    raw, img = read_image(args.image, args.channel)
    queries = raw_queries(args, raw.shape)
    volume, start, end = prepare_image(raw)
    del raw
    model = load_for_inference(cfg.model, args.adapter, args.weights, args.trust_pickle)
    _warn_unknown_names(model, [q["text"] for q in queries if q["text"]])
    options = InferenceConfig.model_validate({**cfg.inference.model_dump(), **{
        k: v for k, v in (("zoom_in", args.zoom_in), ("precision", args.precision)) if v is not None}})
    zoom = ZoomInference(model.to(device), options, device)
    prep_queries = [to_prep(q, start, end) for q in queries]
    labels = np.zeros(volume.shape, dtype=np.uint8 if len(queries) < 256 else np.uint16)
    best = np.full(volume.shape, -np.inf, dtype=np.float32)
    voxels: dict[str, int] = {}
    failed: dict[str, int] = {}
    for i, result in enumerate(zoom.run(volume, args.modality, prep_queries), start=1):
        win = result.mask & (result.logits > best)
        labels[win] = i
        best[win] = result.logits[win]
        voxels[str(i)] = int(result.mask.sum())
        failed[str(i)] = _warn_non_finite(queries[i - 1]["name"], result.logits)
        extent = f"zoom-in over {result.roi}, {result.windows} windows" if result.roi else "; ".join(result.notes)
        print(f"{i}: {queries[i - 1]['name']}: {voxels[str(i)]} voxels ({extent}), {result.seconds:.2f} s")
    mask = paste_back(labels, img.shape[:3], start, end)
    header = img.header.copy()
    header.set_data_dtype(mask.dtype)
    header.set_slope_inter(1, 0)
    nifti = nib.Nifti1Image(mask, img.affine, header)
    nifti.set_qform(img.get_qform(), int(img.header["qform_code"]))
    nifti.set_sform(img.get_sform(), int(img.header["sform_code"]))
    atomic_write_bytes(out, _nifti_bytes(nifti, out))
    names = {str(i): q["name"] for i, q in enumerate(queries, start=1)}
    atomic_write_json(_sidecar(out), {"image": str(args.image), "modality": args.modality, "labels": names,
                                      "voxels": voxels, "non_finite_logits": failed})
    print(f"wrote {out} ({mask.shape}, labels {names}) and {_sidecar(out)}")
    return 0


def _warn_non_finite(name: str, logits: np.ndarray) -> int:
    """NaN/Inf logits read as background: an empty mask could be the model failing, not an absent structure.
    Counted into the sidecar and said on stderr, so the two are never confused."""
    bad = int(logits.size - np.count_nonzero(np.isfinite(logits)))
    if bad:
        print(f"segevo: warning: {name}: the model produced {bad} NaN/Inf logits of {logits.size}: those voxels "
              "are background because the model failed, not because the structure is absent", file=sys.stderr)
    return bad


def _sidecar(out: Path) -> Path:
    stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.name[: -len(".nii")]
    return out.with_name(stem + ".json")


def _nifti_bytes(nifti, out: Path) -> bytes:
    """Serialise in memory (gzip by suffix) so the file lands atomically."""
    import gzip
    import io

    raw = nifti.to_bytes()
    if out.name.endswith(".gz"):
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(raw)
        return buffer.getvalue()
    return raw


def _warn_unknown_names(model, names: list[str]) -> None:
    """Text outside the task vocabulary still works through CLIP, with the null task prior: say so."""
    if model.priors is None:
        return
    for name in names:
        if model.tasks.id(None, name) == 0:
            close = model.tasks.closest(name)
            hint = f" (closest: {', '.join(close)})" if close else ""
            print(f"segevo: warning: {name!r} is not a trained task; null task prior used{hint}", file=sys.stderr)
