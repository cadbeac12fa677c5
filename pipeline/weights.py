"""``segevo weights check|download``: verify a SegVol checkpoint against the configured model, or fetch the
released files from the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from segevo_pipeline.common import config_from_args, preflight, print_part_table


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    verbs = p.add_subparsers(dest="weights_verb", metavar="ACTION", required=True)

    check = verbs.add_parser(
        "check", help="load a checkpoint strictly into the configured model and report it",
        description="Load a SegVol checkpoint strictly into the model built from the current config, then "
                    "print the detected layout and the parameters per part. Any missing, unexpected or "
                    "mis-shaped key is an error.",
    )
    check.add_argument("path", metavar="PATH", help="pytorch_model.bin, SegVol_v1.pth or vit_pretrain.ckpt")
    check.add_argument("--layout", choices=["auto", "hf", "v1", "vit"], default="auto",
                       help="checkpoint layout (default: detect)")
    check.add_argument("--trust-pickle", action="store_true",
                       help="allow full unpickling (runs code from the file): only for files you trust")
    check.set_defaults(run=run_check)

    download = verbs.add_parser(
        "download", help="fetch SegVol's released files from the Hugging Face Hub",
        description="Download SegVol's files (model weights, tokenizer, config) with huggingface_hub. "
                    "Interrupted downloads resume; files with a known checksum are verified.",
    )
    download.add_argument("--revision", default=None, help="Hub revision (default: the pinned one)")
    download.add_argument("--dest", default="weights/segvol", help="target folder (default: %(default)s)")
    download.add_argument("--include-vit", action="store_true",
                          help="also fetch the encoder-only vit_pretrain.ckpt (353 MB)")
    download.set_defaults(run=run_download)


def run_check(args: argparse.Namespace) -> int:
    from segevo.model import SegVol, load_checkpoint
    from segevo.model.checkpoint import CheckpointError, KeyMismatch

    cfg, source = config_from_args(args)
    model = SegVol(cfg.model)
    try:
        report = load_checkpoint(model, args.path, layout=args.layout, trust_pickle=args.trust_pickle)
    except KeyMismatch as err:
        fits = fitting_profiles(args.path, args.layout, args.trust_pickle)
        if not fits:
            raise
        counts = "; ".join(f"{n} {kind}" for kind, n in err.counts.items())
        raise CheckpointError(f"{args.path}: does not fit the model of {source} ({counts}); its geometry is that "
                              f"of {', '.join(fits)}: rerun with --config {fits[0]}") from None
    print(f"checkpoint: {report.path}")
    print(f"layout: {report.layout} ({report.loaded} tensors loaded strictly into the model of {source})")
    for key in report.dropped:
        print(f"  dropped by a named rule: {key}")
    print("parameters per part:")
    print_part_table(report.parts)
    return 0


def run_download(args: argparse.Namespace) -> int:
    from segevo.hub import DEFAULT_REVISION, download_segvol

    config_from_args(args)
    preflight(args, folders=[("--dest", args.dest)])
    paths = download_segvol(args.dest, revision=args.revision or DEFAULT_REVISION, include_vit=args.include_vit)
    for path in paths:
        print(path)
    weights = [p for p in paths if p.name == "pytorch_model.bin"]
    if weights:
        print(f"next: segevo --config configs/full.yaml weights check {weights[0]}")
    return 0


def fitting_profiles(path: str, layout: str, trust_pickle: bool) -> list[str]:
    """The shipped profiles (params.yaml, configs/*.yaml) whose model a checkpoint fits key for key and shape for
    shape, checked on shape-only (meta) models: no weights are built."""
    import torch

    from segevo.config import ConfigError, load_config
    from segevo.model import SegVol
    from segevo.model.checkpoint import KeyMismatch, canonical_state_dict, check_keys, read_checkpoint

    repo = Path(__file__).resolve().parents[1]
    layout, sd, _ = canonical_state_dict(read_checkpoint(path, trust_pickle=trust_pickle), layout)
    fits = []
    shipped = sorted((repo / "configs").glob("*.yaml"), key=lambda p: (p.name != "full.yaml", p.name))
    for profile in [repo / "params.yaml", *shipped]:
        try:
            with torch.device("meta"):
                model = SegVol(load_config(profile).model)
            target = model.image_encoder if layout == "vit" else model
            keys = {k.removeprefix("image_encoder."): v for k, v in sd.items()} if layout == "vit" else sd
            check_keys(target.state_dict(), keys)
        except (KeyMismatch, ConfigError):  # a mismatch, or a profile that does not load
            continue
        fits.append(str(profile.relative_to(repo)) if profile.is_relative_to(repo) else str(profile))
    return fits
