"""Peak memory and speed of one data-stage worker on a synthetic 512x512x600 CT -> bench/results/preprocess_large.json.

usage: python bench/preprocess_large.py [--out FILE] [--shape X Y Z] [--baseline DIR]

The CT is int16 with a rescale slope and intercept in its header (as scanners write them: nibabel would hand it
out as float64), gzip-compressed, with a label map of 6 organs. Each job (the pseudo-mask of ``segevo pseudomask``
and the arrays of ``segevo preprocess``) runs in a fresh process, exactly as a pool worker runs it; the process
reports its resident memory after imports (``base``) and its peak (``ru_maxrss``). The target is a peak at most
2.5x the float32 volume above the base, which is what ``segevo.data.resources`` budgets per worker.
``--baseline DIR`` runs the same jobs on the ``segevo`` package of another checkout too (e.g. ``git archive`` of
an older commit), for a before/after in one result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import REPO, write_result  # noqa: E402

_JOB = r"""
import json, resource, sys, time
from pathlib import Path
from segevo.config import PseudoMaskConfig
from segevo.data.cases import Case
from segevo.data.preprocess.case import prepare_arrays, pseudo_mask
import segevo.data.pseudomask  # what the forkserver preloads: loaded before the baseline
kind, image, label = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
labels = {i: n for i, n in enumerate(["liver", "spleen", "left kidney", "right kidney", "aorta", "stomach"], 1)}
case = Case("bench", "big", "p", "CT", image, label, labels, image_sha256="0" * 64)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
t0 = time.perf_counter()
if kind == "pseudomask":
    pseudo_mask(case, PseudoMaskConfig())
else:
    prepare_arrays(case, (32, 256, 256))
seconds = time.perf_counter() - t0
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": seconds}))
"""


def synthetic_ct(folder: Path, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    """A body ellipse of soft tissue in air with six organ blobs; int16 stored, scaled by the header."""
    import nibabel as nib

    x, y = np.ogrid[:shape[0], :shape[1]]
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 < 1
    rng = np.random.default_rng(0)
    stored = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    organs = [(0.40, 0.45, 0.10), (0.62, 0.40, 0.06), (0.38, 0.62, 0.05), (0.62, 0.62, 0.05), (0.5, 0.55, 0.02),
              (0.55, 0.35, 0.07)]
    for z in range(shape[2]):
        plane = np.where(body, 1064, 24).astype(np.int16)  # stored = HU + 1024: air -1000, tissue +40
        for k, (ox, oy, r) in enumerate(organs, 1):
            disk = ((x - ox * shape[0]) ** 2 + (y - oy * shape[1]) ** 2) < (r * shape[0]) ** 2
            if 0.1 * shape[2] < z < 0.9 * shape[2]:
                plane[disk] += 20 * k
                label[..., z][disk] = k
        stored[..., z] = plane + rng.integers(-20, 20, size=plane.shape, dtype=np.int16)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    img = nib.Nifti1Image(stored, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    image_path, label_path = folder / "ct.nii.gz", folder / "ct_seg.nii.gz"
    nib.save(img, image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return image_path, label_path


def run_job(kind: str, image: Path, label: Path, code: Path) -> dict:
    """One job in a fresh interpreter that imports ``segevo`` from ``code`` (its working directory)."""
    out = subprocess.run([sys.executable, "-c", _JOB, kind, str(image), str(label)], cwd=code, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(kind: str, image: Path, label: Path, code: Path, volume: int, voxels: int) -> dict:
    job = run_job(kind, image, label, code)
    above = job["peak"] - job["base"]
    return {"seconds": round(job["seconds"], 1), "base_rss_gib": round(job["base"] / 2**30, 2),
            "peak_rss_gib": round(job["peak"] / 2**30, 2), "peak_above_base_gib": round(above / 2**30, 2),
            "peak_above_base_per_volume": round(above / volume, 2),
            "peak_rss_per_volume": round(job["peak"] / volume, 2),
            "voxels_per_s_millions": round(voxels / job["seconds"] / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "preprocess_large.json"))
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 600))
    parser.add_argument("--baseline", type=Path, help="a checkout whose segevo to measure as well")
    args = parser.parse_args()
    shape = tuple(args.shape)
    volume = 4 * int(np.prod(shape))
    result: dict = {"shape": list(shape), "float32_volume_gib": round(volume / 2**30, 3), "target_factor": 2.5}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        image, label = synthetic_ct(Path(tmp), shape)
        result["synthesis_s"] = round(time.perf_counter() - t0, 1)
        result["file_mib"] = round((image.stat().st_size + label.stat().st_size) / 2**20, 1)
        voxels = int(np.prod(shape))
        for kind in ("pseudomask", "preprocess"):
            result[kind] = measure(kind, image, label, REPO, volume, voxels)
            print(kind, result[kind])
            if args.baseline:
                result.setdefault("baseline", {"code": str(args.baseline)})[kind] = base = measure(
                    kind, image, label, args.baseline, volume, voxels)
                print(f"{kind} (baseline)", base)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
