"""The output pre-flight (``segevo.guard``): no output is ever one of the inputs, however spelled; directories,
unwritable folders and replaced folders holding inputs are refused before any work, in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segevo.errors import OutputError
from segevo.guard import preflight, same_file

READ_ONLY = Path("/proc/segevo-out.json")  # /proc refuses new files even to root (os.access would say yes)


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.nii.gz").write_bytes(b"scan")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    return tmp_path


def spellings(tree: Path) -> list[str]:
    """Ways to name ``in/scan.nii.gz`` from ``out/``: relative, ./, ../, absolute, doubled slashes, a symlink, a
    symlinked folder and a hard link."""
    scan = tree / "in" / "scan.nii.gz"
    (tree / "link.nii.gz").symlink_to(scan)
    (tree / "dirlink").symlink_to(tree / "in")
    os.link(scan, tree / "hard.nii.gz")
    return ["../in/scan.nii.gz", "./../in/scan.nii.gz", "../in/../in/scan.nii.gz", str(scan),
            f"{tree}//in//scan.nii.gz", "../link.nii.gz", "../dirlink/scan.nii.gz", "../hard.nii.gz",
            str(tree / "out" / ".." / "hard.nii.gz")]


def test_every_spelling_of_an_input_is_refused(tree):
    cases = spellings(tree)
    for spelled in cases:
        with pytest.raises(OutputError, match=r"^--out .*: is the input --image"):
            preflight(outputs=[("--out", spelled)], inputs=[("--image", str(tree / "in" / "scan.nii.gz"))])
        with pytest.raises(OutputError, match="is the input"):  # and the other way round
            preflight(outputs=[("--out", str(tree / "in" / "scan.nii.gz"))], inputs=[("--image", spelled)])
    assert len(cases) == 9
    assert (tree / "in" / "scan.nii.gz").read_bytes() == b"scan"


def test_a_new_file_beside_the_input_is_fine(tree):
    preflight(outputs=[("--out", "../in/mask.nii.gz"), ("--out", "mask.nii.gz"), ("--out", "new/deeper/m.nii")],
              inputs=[("--image", "../in/scan.nii.gz"), ("--weights", None)])
    assert sorted(p.name for p in (tree / "in").iterdir()) == ["scan.nii.gz"]  # the probe left nothing


@pytest.mark.parametrize(("make", "message"), [
    (lambda t: (t / "out" / "m.nii.gz").mkdir(), "is a directory"),
    (lambda t: (t / "out" / "file").write_text("x"), "is not a folder"),
])
def test_directories_and_files_in_the_way(tree, make, message):
    make(tree)
    target = "m.nii.gz" if "directory" in message else "file/m.nii.gz"
    with pytest.raises(OutputError, match=message):
        preflight(outputs=[("--out", target)])


def test_unwritable_folder_is_found_before_the_work():
    with pytest.raises(OutputError, match=r"^--out /proc/segevo-out.json: folder /proc is not writable"):
        preflight(outputs=[("--out", READ_ONLY)])
    with pytest.raises(OutputError, match="not writable"):
        preflight(folders=[("--dest", "/proc/segevo-weights")])


def test_folders_and_replaced_folders(tree):
    scan = tree / "in" / "scan.nii.gz"
    with pytest.raises(OutputError, match="is a file; expected a folder"):
        preflight(folders=[("--dest", scan)])
    with pytest.raises(OutputError, match="is a file; expected a folder"):
        preflight(replaced=[("train.output", scan)])
    (tree / "dirlink").symlink_to(tree / "in")
    for folder in (tree / "in", tree, "../in", "../dirlink"):
        with pytest.raises(OutputError, match=r"train.output .*: holds the input --image"):
            preflight(replaced=[("train.output", folder)], inputs=[("--image", scan)])
    preflight(replaced=[("train.output", "models/adapter")], inputs=[("--image", scan)])
    assert not (tree / "out" / "models").exists()  # a pre-flight creates nothing


def test_output_inside_an_input_folder_may_not_replace_its_files(tree):
    with pytest.raises(OutputError, match="lies in the input --adapter"):
        preflight(outputs=[("--out", "../in/scan.nii.gz")], inputs=[("--adapter", tree / "in")])


NAMES = st.sampled_from(["a", "b.c", "scan.nii.gz"]) | st.text(alphabet="abc.", min_size=1, max_size=6).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from([".", "..", "in", "out", "x"]), max_size=5), name=NAMES,
       input_name=NAMES)
def test_property_refused_exactly_when_it_is_the_same_file(tree, parts, name, input_name):
    """For any spelling (``.``/``..``/folders) of any name, the guard refuses exactly the outputs that
    resolve to the input file, and never touches the tree."""
    source = tree / "in" / input_name
    source.write_bytes(b"input")
    out = Path(*parts, name) if parts else Path(name)
    clash = same_file(out, source)
    assert clash == (os.path.realpath(out) == os.path.realpath(source))
    try:
        preflight(outputs=[("--out", out)], inputs=[("--image", source)])
        refused = None
    except OutputError as err:
        refused = str(err)
    if clash:
        assert refused is not None and "is the input --image" in refused and "\n" not in refused
    elif refused is not None:  # only a directory in the way or a missing/unwritable folder may refuse it
        assert "is a directory" in refused or "not a folder" in refused or "not writable" in refused
    assert source.read_bytes() == b"input"
    source.unlink()
