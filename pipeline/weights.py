"""``segevo weights check|download``: verify a SegVol checkpoint against the configured model, or fetch the
released files from the Hugging Face Hub."""

from __future__ import annotations

import argparse

from pipeline.common import config_from_args, preflight, print_part_table


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

    cfg, source = config_from_args(args)
    model = SegVol(cfg.model)
    report = load_checkpoint(model, args.path, layout=args.layout, trust_pickle=args.trust_pickle)
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
