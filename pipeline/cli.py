"""``segevo``: the one front door. Each verb lives in its own ``pipeline`` module and is imported lazily,
so ``segevo --help`` answers without loading torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# verb -> (module, one-line help). Only verbs that work are listed.
VERBS: dict[str, tuple[str, str]] = {
    "download": ("segevo_pipeline.download", "fetch the raw data sources and write the case table"),
    "pseudomask": ("segevo_pipeline.pseudomask", "SegVol's FH pseudo-masks, ground truth painted on top"),
    "preprocess": ("segevo_pipeline.preprocess", "SegVol-faithful model-ready arrays and the manifest"),
    "split": ("segevo_pipeline.split", "patient-level train/val/test split and balanced subsets"),
    "train": ("segevo_pipeline.train", "fine-tune with Ray Train + DeepSpeed, tracked in MLflow"),
    "tune": ("segevo_pipeline.tune", "Optuna studies: one Ray Train run per trial, in MLflow"),
    "evaluate": ("segevo_pipeline.evaluate", "Dice and NSD per class and prompt, held-out split"),
    "predict": ("segevo_pipeline.predict", "segment a NIfTI volume with text, box or point prompts"),
    "model": ("segevo_pipeline.model", "inspect the configured model (parameters per part)"),
    "weights": ("segevo_pipeline.weights", "check or download SegVol checkpoints"),
}


class UsageError(Exception):
    """A flag the parser rejected; reported as one line (exit 2) like every other user error."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block and exits; here a bad flag is one line naming it, and ``main`` returns 2
    instead of exiting, so the front door behaves the same when called in process. Sub-parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="segevo",
        description="Adapt SegVol to new modalities: data, training, evaluation and inference.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for verb, (module, help_text) in VERBS.items():
        importlib.import_module(module).add_parser(sub, verb, help_text)
    _add_config_options(parser, top=True)
    return parser


def _add_config_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--config`` and ``--set`` on the front door and on every verb (and sub-verb), so that both
    ``segevo --config X train`` and ``segevo train --config X`` work; verb-level values are kept apart from the
    front door's (argparse would otherwise let one overwrite the other) and joined by ``parse_args``."""
    where = "top" if top else "verb"
    parser.add_argument("--config", dest=f"config_{where}", metavar="YAML", default=None if top else argparse.SUPPRESS,
                        help="config profile (default: $SEGEVO_CONFIG, else ./params.yaml, else built-in defaults)")
    parser.add_argument("--set", dest=f"sets_{where}", metavar="KEY=VALUE", action="append",
                        default=[] if top else argparse.SUPPRESS,
                        help="override a config key, e.g. --set train.lr=3e-4 (repeatable; YAML values)")
    parser.add_argument("--variant", dest=f"variant_{where}", metavar="NAME",
                        default=None if top else argparse.SUPPRESS,
                        help="apply a variant overlay (a name in compare.overlays, e.g. lora, or a YAML file) before "
                             "any --set")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_config_options(child, top=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed flags with ``config`` (the one profile named, before or after the verb), ``variant`` (likewise) and
    ``sets`` (every ``--set``, front door first)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    top, verb = args.config_top, getattr(args, "config_verb", None)
    if top is not None and verb is not None and top != verb:
        parser.error(f"--config given twice ({top} before the verb, {verb} after it): give one profile")
    args.config = verb or top
    top_v, verb_v = args.variant_top, getattr(args, "variant_verb", None)
    if top_v is not None and verb_v is not None and top_v != verb_v:
        parser.error(f"--variant given twice ({top_v} before the verb, {verb_v} after it): give one variant")
    args.variant = verb_v or top_v
    args.sets = [*args.sets_top, *getattr(args, "sets_verb", [])]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"segevo: error: {err}", file=sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("segevo: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user-facing errors are one line; tracebacks only on request
        if not _is_user_error(err) or _debug():
            raise
        print(f"segevo: error: {err}", file=sys.stderr)
        return 1


def _is_user_error(err: Exception) -> bool:
    from segevo.errors import user_errors

    return isinstance(err, user_errors())


def _debug() -> bool:
    import os

    return os.environ.get("SEGEVO_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
