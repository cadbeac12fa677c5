"""Paired comparison of models scored on the same cases with the same prompts.

Two variants evaluated on one set of cases are not independent samples: a hard case is hard for both. Comparing
their two confidence intervals (each bootstrapped on its own) throws that pairing away and hides differences that
every case agrees on. Here the unit is the per-case *difference* (variant minus reference, each the mean over the
case's rows in a group: :func:`segevo.metrics.case_values`, as the summaries average them), and the bootstrap
resamples cases, the same draw for both models, so the interval is that of the paired difference. The fraction
of cases improved (and worsened) is reported beside it, because a mean can hide one large win among many small
losses.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from segevo.metrics import bootstrap_ci, case_values


def paired_difference(variant: Mapping[str, float], reference: Mapping[str, float], n_resamples: int,
                      seed: int, level: float = 0.95) -> dict | None:
    """Mean per-case difference ``variant - reference`` over the cases both have, with its paired percentile
    bootstrap interval and the fractions of cases improved and worsened; None when no case is shared."""
    shared = sorted(variant.keys() & reference.keys())
    if not shared:
        return None
    diff = np.array([variant[c] - reference[c] for c in shared], dtype=np.float64)
    mean, lo, hi = bootstrap_ci(diff, n_resamples, level, seed)
    return {"cases": len(shared), "diff": round(mean, 4), "diff_lo": round(lo, 4), "diff_hi": round(hi, 4),
            "improved": round(float(np.mean(diff > 0)), 4), "worsened": round(float(np.mean(diff < 0)), 4)}


def compare(rows: Sequence[dict], references: Sequence[str], keys: Sequence[str], n_resamples: int, seed: int,
            metrics: Sequence[str] = ("dice", "nsd")) -> list[dict]:
    """Every variant against every reference, per group of ``keys`` and per metric. ``rows`` carry a
    ``variant`` field; a variant is not compared with itself."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[tuple(r[k] for k in keys)][r["variant"]].append(r)
    out = []
    for group, by_variant in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        for reference in references:
            if reference not in by_variant:
                continue
            for variant, members in by_variant.items():
                if variant == reference:
                    continue
                for metric in metrics:
                    entry = paired_difference(case_values(members, metric),
                                              case_values(by_variant[reference], metric), n_resamples, seed)
                    if entry is not None:
                        out.append({**dict(zip(keys, group, strict=True)), "variant": variant,
                                    "reference": reference, "metric": metric, **entry})
    return out
