"""Every verb against malformed inputs, in process through the front door: exactly one stderr line, a non-zero
exit, no traceback, nothing written anywhere in the workspace, and every input unchanged by checksum.

The workspace holds a tiny config, a prepared data root (manifest, split, arrays), a base checkpoint, an adapter
folder and a NIfTI image, plus broken variants of each; each case runs one command line from inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from prep_helpers import write_prep

from segevo.config import parse_config
from segevo.data.tasks import TaskVocabulary
from segevo.model import SegVol
from segevo.model.adapter_io import save_adapters
from segevo.training import build_model
from segevo_pipeline.cli import main

CFG = {"model": TINY, "priors": {"dim": 16, "num_heads": 2}, "data": {"root": "data"},
       "tune": {"storage": "sqlite:///study.db"}}


def config(ws: Path, name: str, **sections: dict) -> str:
    doc = json.loads(json.dumps(CFG))
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    (ws / name).write_text(yaml.safe_dump(doc))
    return name


def data_root(ws: Path, name: str, damage: Callable[[Path], None]) -> str:
    """A copy of the good data root, damaged, and a config pointing at it."""
    root = ws / "roots" / name
    shutil.copytree(ws / "data", root)
    damage(root)
    return config(ws, f"{name}.yaml", data={"root": f"roots/{name}"})


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("workspace")
    config(ws, "tiny.yaml")
    write_prep(ws / "data")
    cfg = parse_config(CFG)
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in SegVol(cfg.model).state_dict().items()}
    torch.save(state, ws / "base.bin")
    state["model.mask_decoder.iou_prediction_head.layers.0.weight"][0, 0] = float("nan")
    torch.save(state, ws / "nan.bin")
    (ws / "random.bin").write_bytes(np.random.default_rng(0).bytes(2048))
    save_adapters(build_model(cfg, TaskVocabulary([("demo", "liver")])), ws / "adapter")
    volume = np.random.default_rng(0).random((40, 36, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), ws / "scan.nii.gz")
    (ws / "link.nii.gz").symlink_to(ws / "scan.nii.gz")
    os.link(ws / "scan.nii.gz", ws / "hard.nii.gz")
    (ws / "outdir.nii.gz").mkdir()
    (ws / "mask.json").write_text(yaml.safe_dump(CFG))  # a config whose name is predict's sidecar for mask.nii.gz
    (ws / "empty.yaml").write_text("# nothing\n")
    (ws / "dup.yaml").write_text("model:\n  roi_size: [8, 32, 32]\nmodel: {}\n")
    (ws / "bool.yaml").write_text(yaml.safe_dump({**CFG, "adapters": {"experts": {"MRI": {"rank": True}}}}))
    (ws / "afile").write_text("not a folder")
    (ws / "metrics").mkdir()
    (ws / "metrics" / "eval.json").write_text(json.dumps(CFG))  # a config (JSON is YAML) where evaluate writes
    (ws / "metrics" / "train.json").write_text(json.dumps(CFG))  # and where train writes
    config(ws, "out_dot.yaml", train={"output": "."})
    config(ws, "report_dot.yaml", evaluate={"report": "."})
    config(ws, "subset.yaml", train={"subset": "999"})
    config(ws, "root_file.yaml", data={"root": "afile"})
    config(ws, "nan_base.yaml", train={"base_weights": "nan.bin"})
    config(ws, "bad_storage.yaml", tune={"storage": "nonsense"})
    config(ws, "junk_study.yaml", tune={"storage": "sqlite:///random.bin"})
    config(ws, "dir_study.yaml", tune={"storage": "sqlite:///adapter"})
    data_root(ws, "list_manifest", lambda r: (r / "prep" / "manifest.json").write_text("[]"))
    data_root(ws, "row_manifest", lambda r: (r / "prep" / "manifest.json").write_text(
        json.dumps({"version": 1, "meta": {}, "cases": [{"source": 3}]})))
    data_root(ws, "no_split", lambda r: (r / "split.json").unlink())
    data_root(ws, "bad_split", lambda r: (r / "split.json").write_text('{"train": "demo/demo_ct1"}'))
    data_root(ws, "alien_split", lambda r: (r / "split.json").write_text(
        '{"train": ["x/y"], "val": [], "test": ["x/y"]}'))
    data_root(ws, "cut_array", lambda r: (r / "prep" / "demo_ct2" / "label.npy").write_bytes(b"\x93NUMPY"))
    data_root(ws, "nan_image", lambda r: np.save(r / "prep" / "demo_ct1" / "image.npy",
                                                 np.full((12, 40, 44), np.nan, np.float16)))
    data_root(ws, "list_cases", lambda r: ((r / "raw").mkdir(), (r / "raw" / "cases.json").write_text("[]")))
    return ws


PREDICT = ["predict", "--modality", "MRI", "--box", "2,2,2,20,20,10", "--adapter", "adapter"]

# (case id, argv): each must fail in one line, write nothing, change nothing.
CASES: list[tuple[str, list[str]]] = [
    ("predict out is the image", [*PREDICT, "--image", "scan.nii.gz", "--out", "scan.nii.gz"]),
    ("predict out is ./image", [*PREDICT, "--image", "scan.nii.gz", "--out", "./scan.nii.gz"]),
    ("predict out is ../ws/image", [*PREDICT, "--image", "scan.nii.gz", "--out", "../{ws}/scan.nii.gz"]),
    ("predict out is a symlink", [*PREDICT, "--image", "scan.nii.gz", "--out", "link.nii.gz"]),
    ("predict out is a hard link", [*PREDICT, "--image", "scan.nii.gz", "--out", "hard.nii.gz"]),
    ("predict image is a link to out", [*PREDICT, "--image", "link.nii.gz", "--out", "hard.nii.gz"]),
    ("predict sidecar is the config", ["--config", "mask.json", *PREDICT, "--image", "scan.nii.gz",
                                       "--out", "mask.nii.gz"]),
    ("predict out is the adapter's file", [*PREDICT, "--image", "scan.nii.gz", "--out",
                                           "adapter/adapters.nii"]),
    ("predict out is a directory", [*PREDICT, "--image", "scan.nii.gz", "--out", "outdir.nii.gz"]),
    ("predict out is read-only", [*PREDICT, "--image", "scan.nii.gz", "--out", "/proc/mask.nii.gz"]),
    ("predict out folder missing", [*PREDICT, "--image", "scan.nii.gz", "--out", "nowhere/mask.nii.gz"]),
    ("predict fractional box", ["predict", "--modality", "MRI", "--box", "2,2,2.5,20,20,10", "--adapter", "adapter",
                                "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict box outside", ["predict", "--modality", "MRI", "--box", "2,2,2,20,20,99", "--adapter", "adapter",
                             "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict point label", [*PREDICT, "--point", "1,1,1:2", "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict device banana", [*PREDICT, "--device", "banana", "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict image is a directory", [*PREDICT, "--image", "adapter", "--out", "m.nii.gz"]),
    ("predict image is weights", [*PREDICT, "--image", "base.bin", "--out", "m.nii.gz"]),
    ("predict NaN weights", ["predict", "--modality", "CT", "--box", "2,2,2,20,20,10", "--weights", "nan.bin",
                             "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict random weights", ["predict", "--modality", "CT", "--box", "2,2,2,20,20,10", "--weights", "random.bin",
                                "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict weights directory", ["predict", "--modality", "CT", "--box", "2,2,2,20,20,10", "--weights", "adapter",
                                   "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict adapter is a file", ["predict", "--modality", "MRI", "--box", "2,2,2,20,20,10", "--adapter", "afile",
                                   "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict empty config", ["--config", "empty.yaml", *PREDICT, "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict duplicate key", ["--config", "dup.yaml", *PREDICT, "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("predict bool rank", ["--config", "bool.yaml", *PREDICT, "--image", "scan.nii.gz", "--out", "m.nii.gz"]),
    ("weights check NaN", ["weights", "check", "nan.bin"]),
    ("weights check random bytes", ["weights", "check", "random.bin"]),
    ("weights check directory", ["weights", "check", "adapter"]),
    ("weights check layout", ["weights", "check", "base.bin", "--layout", "v9"]),
    ("weights download dest is a file", ["weights", "download", "--dest", "afile"]),
    ("model summary out is the config", ["model", "summary", "--out", "tiny.yaml"]),
    ("model summary out is a directory", ["model", "summary", "--out", "adapter"]),
    ("model summary out read-only", ["model", "summary", "--out", "/proc/summary.json"]),
    ("model summary bool config", ["--config", "bool.yaml", "model", "summary"]),
    ("split out is the manifest", ["split", "--out", "data/prep/manifest.json"]),
    ("split out is the config", ["split", "--out", "tiny.yaml"]),
    ("split manifest is a list", ["--config", "list_manifest.yaml", "split"]),
    ("split manifest row", ["--config", "row_manifest.yaml", "split"]),
    ("split manifest missing", ["split", "--manifest", "nowhere.json"]),
    ("train epochs 0", ["train", "--epochs", "0"]),
    ("train epochs fraction", ["train", "--epochs", "1.5"]),
    ("train manifest is a list", ["--config", "list_manifest.yaml", "train"]),
    ("train no split", ["--config", "no_split.yaml", "train"]),
    ("train malformed split", ["--config", "bad_split.yaml", "train"]),
    ("train split of other cases", ["--config", "alien_split.yaml", "train"]),
    ("train truncated array", ["--config", "cut_array.yaml", "train"]),
    ("train unknown subset", ["--config", "subset.yaml", "train"]),
    ("train output holds the config", ["--config", "out_dot.yaml", "train"]),
    ("train NaN base weights", ["--config", "nan_base.yaml", "train"]),
    ("tune report without a study", ["tune", "--report"]),
    ("tune trials 0", ["tune", "--trials", "0"]),
    ("tune profile over the config", ["tune", "--report", "--write-profile", "tiny.yaml"]),
    ("tune bad storage", ["--config", "bad_storage.yaml", "tune", "--report"]),
    ("tune study is not a database", ["--config", "junk_study.yaml", "tune", "--report"]),
    ("tune study is a directory", ["--config", "dir_study.yaml", "tune", "--report"]),
    ("tune malformed split", ["--config", "bad_split.yaml", "tune"]),
    ("evaluate max-cases 0", ["evaluate", "--max-cases", "0"]),
    ("evaluate device", ["evaluate", "--device", "banana"]),
    ("evaluate adapter is a file", ["evaluate", "--adapter", "afile", "--split", "train"]),
    ("evaluate manifest row", ["--config", "row_manifest.yaml", "evaluate", "--adapter", "adapter"]),
    ("evaluate truncated array", ["--config", "cut_array.yaml", "evaluate", "--adapter", "adapter"]),
    ("evaluate report holds the config", ["--config", "report_dot.yaml", "evaluate", "--adapter", "adapter",
                                          "--split", "train"]),
    ("evaluate NaN prepared image", ["--config", "nan_image.yaml", "evaluate", "--adapter", "adapter",
                                     "--split", "train"]),
    ("evaluate metrics over the config", ["--config", "metrics/eval.json", "evaluate", "--adapter", "adapter",
                                          "--split", "train"]),
    ("train metrics over the config", ["--config", "metrics/train.json", "train"]),
    ("evaluate NaN weights", ["evaluate", "--adapter", "none", "--weights", "nan.bin", "--split", "train"]),
    ("download root is a file", ["--config", "root_file.yaml", "download"]),
    ("download unknown source", ["download", "--source", "nope"]),
    ("pseudomask workers 0", ["pseudomask", "--workers", "0"]),
    ("pseudomask case table is a list", ["--config", "list_cases.yaml", "pseudomask"]),
    ("preprocess root is a file", ["--config", "root_file.yaml", "preprocess"]),
    ("preprocess case table is a list", ["--config", "list_cases.yaml", "preprocess"]),
    ("preprocess no case table", ["preprocess"]),
]


def snapshot(ws: Path) -> dict[str, str]:
    """Every path under the workspace with its content hash (folders and links included)."""
    out = {}
    for path in sorted(ws.rglob("*")):
        rel = str(path.relative_to(ws))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize(("name", "argv"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_everything_as_it_was(ws, name, argv, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    monkeypatch.delenv("SEGEVO_CONFIG", raising=False)
    monkeypatch.delenv("SEGEVO_DEBUG", raising=False)
    argv = [a.replace("{ws}", ws.name) for a in argv]
    if "--config" not in argv:
        argv = ["--config", "tiny.yaml", *argv]
    before = snapshot(ws)
    code = main(argv)
    captured = capsys.readouterr()
    assert code in (1, 2), (code, captured.err)
    assert captured.err.count("\n") == 1 and captured.err.startswith("segevo: error: "), captured.err
    assert "Traceback" not in captured.err
    assert snapshot(ws) == before, f"{name}: the workspace changed"
    assert not Path("/proc/mask.nii.gz").exists()


def test_every_verb_is_covered():
    from segevo_pipeline.cli import VERBS

    covered = {argv[argv.index("--config") + 2] if "--config" in argv else argv[0] for _, argv in CASES}
    assert covered == set(VERBS)
    assert len(CASES) >= 60


def test_a_malformed_training_summary_fails_before_the_evaluation(ws, tmp_path, capsys, monkeypatch):
    """``metrics/train.json`` (read for the MLflow run) is validated before the work, not after it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "abs.yaml").write_text(yaml.safe_dump({**CFG, "data": {"root": str(ws / "data")}}))
    for text, message in (("[1]", "a training summary must be a JSON object"), ("{", "not valid JSON"),
                          ('{"run_id": 3}', "'run_id' must be a string")):
        (tmp_path / "metrics" / "train.json").write_text(text)
        before = snapshot(tmp_path)
        code = main(["--config", "abs.yaml", "evaluate", "--adapter", str(ws / "adapter"),
                     "--split", "train"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and f"metrics/train.json: {message}" in err, err
        assert snapshot(tmp_path) == before
