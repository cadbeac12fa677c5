"""Strict flags: every value is checked by the parser before any work, rejected in one line that names the flag
and the accepted range (exit 2), and voxel prompts are whole numbers."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segevo_pipeline.cli import main
from segevo_pipeline.flags import device, int_at_least, positive_seconds, voxel_box, voxel_point

FAST = settings(max_examples=100, deadline=None)


def rejected(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("segevo: error: "), captured.err
    return captured.err


# (argv, what the one line must say): the three plus the other numeric and choice flags of every verb.
BAD_FLAGS = [
    (["train", "--epochs", "0"], "argument --epochs: 0 is out of range: expected an integer >= 1"),
    (["train", "--epochs", "-3"], "--epochs: -3 is out of range"),
    (["train", "--epochs", "2.5"], "--epochs: '2.5' is not a whole number"),
    (["train", "--epochs", "ten"], "--epochs: 'ten' is not a whole number"),
    (["train", "--steps-per-epoch", "0"], "--steps-per-epoch: 0 is out of range"),
    (["train", "--num-workers", "0"], "--num-workers: 0 is out of range"),
    (["train", "--run-id", "../escape"], "--run-id: '../escape': use letters"),
    (["evaluate", "--device", "banana"], "--device: 'banana' is not a device: expected cpu, cuda or cuda:N"),
    (["evaluate", "--device", "cuda:x"], "--device: 'cuda:x' is not a device"),
    (["evaluate", "--max-cases", "0"], "--max-cases: 0 is out of range"),
    (["evaluate", "--split", "holdout"], "--split: invalid choice"),
    (["tune", "--trials", "0"], "--trials: 0 is out of range"),
    (["tune", "--timeout", "-1"], "--timeout: -1 is out of range: expected a number of seconds > 0"),
    (["tune", "--timeout", "nan"], "--timeout: nan is out of range"),
    (["tune", "--timeout", "inf"], "--timeout: inf is out of range"),
    (["tune", "--study", "a b"], "--study: 'a b': use letters"),
    (["preprocess", "--workers", "0"], "--workers: 0 is out of range"),
    (["pseudomask", "--workers", "1e3"], "--workers: '1e3' is not a whole number"),
    (["weights", "check", "x.bin", "--layout", "v2"], "--layout: invalid choice"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--box", "1,2,3,4.5,5,6"],
     "--box: '1,2,3,4.5,5,6': expected d0,h0,w0,d1,h1,w1, 6 whole voxel indices (a voxel index has no fraction)"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--box", "1,2,3,4,5"], "--box"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--box", "5,2,3,4,5,6"],
     "each start must not exceed its end"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--point", "1,2,3.0"],
     "a voxel index has no fraction"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--point", "1,2,3:2"],
     "label must be 1 (positive) or 0 (negative)"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--point", "nan,1,1"], "--point"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--channel", "-1"],
     "--channel: -1 is out of range: expected an integer >= 0"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", " "], "--modality: must not be empty"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--text", ""], "--text: must not be"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--device", "gpu"], "--device"),
    (["predict", "--image", "i.nii", "--out", "o.nii", "--modality", "MRI", "--precision", "fp16"], "--precision"),
    (["predict", "--out", "o.nii", "--modality", "MRI"], "required: --image"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a)[:60] for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = rejected(capsys, *argv)
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_cuda_that_is_not_there_is_one_line(tmp_path, capsys):
    from segevo.errors import UserError
    from segevo_pipeline.common import torch_device

    torch_device("cpu")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=r"--device cuda:3: not available \(this machine has 0 CUDA devices\)"):
        torch_device("cuda:3")


INTS = st.integers(min_value=-10**6, max_value=10**6)


@FAST
@given(st.lists(INTS, min_size=6, max_size=6))
def test_property_whole_boxes_parse_exactly(values):
    text = ",".join(map(str, values))
    if all(a <= b for a, b in zip(values[:3], values[3:], strict=True)):
        assert voxel_box(text) == values
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="start must not exceed"):
            voxel_box(text)


@FAST
@given(st.lists(INTS, min_size=3, max_size=3), st.sampled_from(["", ":0", ":1"]))
def test_property_whole_points_parse_exactly(coords, label):
    parsed, lab = voxel_point(",".join(map(str, coords)) + label)
    assert parsed == coords and lab == (0 if label == ":0" else 1)


@FAST
@given(st.text(max_size=40))
def test_property_any_prompt_string_parses_to_whole_numbers_or_fails_cleanly(text):
    """Any string either parses to whole voxel indices (what the user typed, exactly) or is one clean
    ArgumentTypeError: never a float, a silent rounding or another exception."""
    for parse, n in ((voxel_box, 6), (lambda t: voxel_point(t)[0], 3)):
        try:
            values = parse(text)
        except argparse.ArgumentTypeError as err:
            assert "\n" not in str(err)
            continue
        assert len(values) == n and all(type(v) is int for v in values)


@FAST
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=6, max_size=6))
def test_property_fractional_or_non_finite_voxels_are_refused(values):
    text = ",".join(repr(v) for v in values)  # repr of a float always has a '.', 'e', 'nan' or 'inf'
    with pytest.raises(argparse.ArgumentTypeError):
        voxel_box(text)
    with pytest.raises(argparse.ArgumentTypeError):
        voxel_point(",".join(repr(v) for v in values[:3]))


@FAST
@given(st.integers(min_value=-5, max_value=5), st.integers(min_value=-5, max_value=5))
def test_property_integer_ranges(low, value):
    parse = int_at_least(low)
    if value >= low:
        assert parse(str(value)) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected an integer >= {low}"):
            parse(str(value))


@FAST
@given(st.text(max_size=12))
def test_property_devices_and_seconds(text):
    try:
        assert device(text) in ("cpu", "cuda") or text.startswith("cuda:")
    except argparse.ArgumentTypeError as err:
        assert "expected cpu, cuda or cuda:N" in str(err)
    try:
        assert positive_seconds(text) > 0
    except argparse.ArgumentTypeError as err:
        assert "seconds" in str(err)


@FAST
@given(st.tuples(*[st.integers(1, 50)] * 3), st.lists(st.integers(-3, 55), min_size=6, max_size=6),
       st.lists(st.tuples(st.lists(st.integers(-3, 55), min_size=3, max_size=3), st.sampled_from([0, 1])),
                max_size=3))
def test_property_prompts_are_checked_against_the_volume(shape, box, points):
    """A box or point is accepted exactly when every index lies in 0..shape-1 (and points include a positive
    one), and is then kept as given."""
    from segevo.errors import UserError
    from segevo.inference import check_query
    from segevo_pipeline.predict import queries_from_args

    pairs = list(zip(box[:3], box[3:], strict=True))
    box = [min(p) for p in pairs] + [max(p) for p in pairs]  # what the parser lets through
    args = argparse.Namespace(text=[], box=box, point=points)
    inside = all(0 <= v <= n - 1 for v, n in zip(box, shape * 2, strict=True)) and all(
        0 <= v <= n - 1 for coords, _ in points for v, n in zip(coords, shape, strict=True))
    positive = not points or any(label == 1 for _, label in points)
    try:
        (query,) = [check_query(q, shape) for q in queries_from_args(args)]
    except UserError as err:
        assert not (inside and positive)
        assert ("lies outside the volume" in str(err)) if not inside else "positive" in str(err)
        return
    assert inside and positive and query.box.tolist() == box
    assert query.points is None if not points else query.points.tolist() == [c for c, _ in points]
