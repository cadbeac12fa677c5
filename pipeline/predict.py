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
from typing import TYPE_CHECKING

import numpy as np

from segevo.errors import UserError
from segevo_pipeline.common import config_from_args, preflight, torch_device
from segevo_pipeline.flags import device, int_at_least, non_empty, voxel_box, voxel_point

if TYPE_CHECKING:
    from segevo.inference import Query


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
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="default: inference.precision (fp32, as SegVol; bf16 is faster)")
    p.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--trust-pickle", action="store_true", help="allow a full-pickle base checkpoint")
    p.set_defaults(run=run)


def queries_from_args(args: argparse.Namespace) -> list[Query]:
    """The prompts as parsed (whole voxel indices of the file's array, see :mod:`segevo_pipeline.flags`): one query per
    ``--text``, or one object described by a box and/or points (and at most one ``--text``). Their coordinates are
    checked against the image by the library."""
    from segevo.inference import Query

    spatial = args.box is not None or bool(args.point)
    if not args.text and not spatial:
        raise UserError("give at least one prompt: --text, --box or --point")
    if spatial and len(args.text) > 1:
        raise UserError("a box or points describe one object: combine them with at most one --text")
    if not spatial:
        return [Query(text=t) for t in args.text]
    box = np.array(args.box, dtype=np.float64) if args.box is not None else None
    points = np.array([c for c, _ in args.point], dtype=np.float64) if args.point else None
    labels = np.array([lab for _, lab in args.point]) if args.point else None
    return [Query(args.text[0] if args.text else None, box, points, labels)]


def run(args: argparse.Namespace) -> int:
    from segevo.config import InferenceConfig
    from segevo.inference import Predictor, PromptError
    from segevo.io import atomic_write_json

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
    queries = queries_from_args(args)
    options = InferenceConfig.model_validate({**cfg.inference.model_dump(), **{
        k: v for k, v in (("zoom_in", args.zoom_in), ("precision", args.precision)) if v is not None}})
    predictor = Predictor.load(cfg.model, options, args.adapter, args.weights, args.trust_pickle,
                               torch_device(args.device))
    for name, close in predictor.untrained([q.text for q in queries if q.text]).items():
        hint = f" (closest: {', '.join(close)})" if close else ""
        print(f"segevo: warning: {name!r} is not a trained task; null task prior used{hint}", file=sys.stderr)
    try:
        prediction = predictor.predict_file(args.image, args.modality, queries, args.channel)
    except PromptError as err:
        raise UserError(f"{args.image}: {err}") from None
    for i, o in enumerate(prediction.outcomes, start=1):
        extent = f"zoom-in over {o.roi}, {o.windows} windows" if o.roi else "; ".join(o.notes)
        print(f"{i}: {o.name}: {o.voxels} voxels ({extent}), {o.seconds:.2f} s")
        if o.non_finite:
            print(f"segevo: warning: {o.name}: the model produced {o.non_finite} NaN/Inf logits: those voxels are "
                  "background because the model failed, not because the structure is absent", file=sys.stderr)
    prediction.save(out)
    outcomes = list(enumerate(prediction.outcomes, start=1))
    atomic_write_json(_sidecar(out), {
        "image": str(args.image), "modality": args.modality, "labels": prediction.names,
        "voxels": {str(i): o.voxels for i, o in outcomes},
        "non_finite_logits": {str(i): o.non_finite for i, o in outcomes}})
    print(f"wrote {out} ({prediction.labels.shape}, labels {prediction.names}) and {_sidecar(out)}")
    return 0


def _sidecar(out: Path) -> Path:
    stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.name[: -len(".nii")]
    return out.with_name(stem + ".json")
