"""Readers for the raw formats that are not NIfTI (MetaImage, DICOM series), so every source's images reach the
case table as NIfTI on a RAS world grid, plus an atomic NIfTI writer.

Both readers return arrays in (i, j, k) voxel order with a 4x4 voxel -> RAS (mm) affine, nibabel's convention.
DICOM and MetaImage (ITK) coordinates are LPS, hence the sign flip of the first two world axes.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segevo.errors import UserError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_MET_TYPES = {
    "MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4", "MET_INT": "i4",
    "MET_ULONG": "u4", "MET_LONG": "i4", "MET_ULONG_LONG": "u8", "MET_LONG_LONG": "i8", "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}


class FormatError(UserError):
    """A raw file cannot be read or describes an image segevo cannot place on a grid."""


def _metaimage_header(path: Path) -> dict[str, str]:
    header: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw in f:
            key, sep, value = raw.decode("latin-1").partition("=")
            if not sep:
                raise FormatError(f"{path}: not a MetaImage header (line {raw[:40]!r} has no '=')")
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                header["_data_offset"] = str(f.tell())
                break
    return header


def metaimage_files(path: Path) -> list[Path]:
    """The header and, when separate, the data file of a MetaImage (for provenance checksums)."""
    data = _metaimage_header(path).get("ElementDataFile", "LOCAL")
    return [path] if data == "LOCAL" else [path, path.parent / data]


def read_metaimage(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D single-channel ``.mhd``/``.mha`` image (raw or zlib-compressed data) and its RAS affine."""
    h = _metaimage_header(path)
    try:
        if int(h.get("NDims", "0")) != 3:
            raise FormatError(f"{path}: NDims is {h.get('NDims')!r}, only 3D images are supported")
        if int(h.get("ElementNumberOfChannels", "1")) != 1 or int(h.get("HeaderSize", "0")) != 0:
            raise FormatError(f"{path}: multi-channel images and HeaderSize are not supported")
        dims = [int(v) for v in h["DimSize"].split()]
        dtype = np.dtype(_MET_TYPES[h["ElementType"]])
        spacing = [float(v) for v in (h.get("ElementSpacing") or h.get("ElementSize") or "1 1 1").split()]
        offset = [float(v) for v in (h.get("Offset") or h.get("Position") or h.get("Origin") or "0 0 0").split()]
        matrix = [float(v) for v in (h.get("TransformMatrix") or h.get("Rotation") or h.get("Orientation")
                                     or "1 0 0 0 1 0 0 0 1").split()]
    except KeyError as err:
        raise FormatError(f"{path}: MetaImage header lacks or has an unknown {err.args[0]!r}") from None
    except ValueError as err:
        raise FormatError(f"{path}: malformed MetaImage header ({err})") from None
    big = (h.get("BinaryDataByteOrderMSB") or h.get("ElementByteOrderMSB") or "False").lower() == "true"
    dtype = dtype.newbyteorder(">" if big else "<")
    data_file = h.get("ElementDataFile", "")
    if data_file == "LOCAL":
        with open(path, "rb") as f:
            f.seek(int(h["_data_offset"]))
            payload = f.read()
    else:
        payload = (path.parent / data_file).read_bytes()
    if h.get("CompressedData", "False").lower() == "true":
        try:
            payload = zlib.decompress(payload)
        except zlib.error as err:
            raise FormatError(f"{path}: compressed data is corrupt ({err})") from None
    count = int(np.prod(dims))
    if len(payload) != count * dtype.itemsize or len(dims) != 3 or len(spacing) != 3 or len(matrix) != 9:
        raise FormatError(f"{path}: {len(payload)} data bytes for DimSize {dims} of {h['ElementType']}")
    array = np.frombuffer(payload, dtype=dtype).reshape(dims[::-1]).transpose(2, 1, 0)
    # ITK reads TransformMatrix row by row as the direction of each image axis (itkMetaImageIO)
    axes = np.array(matrix).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = axes.T * np.array(spacing)
    lps[:3, 3] = offset
    return array.astype(dtype.newbyteorder("="), copy=False), _LPS_TO_RAS @ lps


# DICOM: the few data elements needed to place an uncompressed slice in space (tag -> name, value kind)
_DICOM_TAGS = {
    (0x0020, 0x0032): ("ImagePositionPatient", "ds"), (0x0020, 0x0037): ("ImageOrientationPatient", "ds"),
    (0x0028, 0x0030): ("PixelSpacing", "ds"), (0x0028, 0x1052): ("RescaleIntercept", "ds"),
    (0x0028, 0x1053): ("RescaleSlope", "ds"), (0x0028, 0x0008): ("NumberOfFrames", "ds"),
    (0x0028, 0x0002): ("SamplesPerPixel", "us"), (0x0028, 0x0010): ("Rows", "us"),
    (0x0028, 0x0011): ("Columns", "us"), (0x0028, 0x0100): ("BitsAllocated", "us"),
    (0x0028, 0x0103): ("PixelRepresentation", "us"),
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SYNTAXES = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # UID -> implicit VR (both little endian)
_UNDEFINED = 0xFFFFFFFF


class _DicomReader:
    """Walks the data elements of one file; skips sequences (nested, defined or undefined length)."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos, self.implicit = path, data, 132, False

    def element(self) -> tuple[tuple[int, int], bytes, int]:
        """(tag, VR or b'', value length) of the next element; the position is left at its value."""
        d, p = self.data, self.pos
        if p + 8 > len(d):
            raise FormatError(f"{self.path}: truncated DICOM file")
        tag = (int.from_bytes(d[p:p + 2], "little"), int.from_bytes(d[p + 2:p + 4], "little"))
        if tag[0] == 0xFFFE or self.implicit:  # items and delimiters never carry a VR
            self.pos = p + 8
            return tag, b"", int.from_bytes(d[p + 4:p + 8], "little")
        vr = d[p + 4:p + 6]
        if vr in _LONG_VRS:
            self.pos = p + 12
            return tag, vr, int.from_bytes(d[p + 8:p + 12], "little")
        self.pos = p + 8
        return tag, vr, int.from_bytes(d[p + 6:p + 8], "little")

    def skip_undefined(self, end: tuple[int, int]) -> None:
        """Skip to past the delimiter ``end`` of an undefined-length sequence or item."""
        while True:
            tag, _, length = self.element()
            if tag == end:
                return
            if length == _UNDEFINED:
                self.skip_undefined((0xFFFE, 0xE00D) if tag == (0xFFFE, 0xE000) else (0xFFFE, 0xE0DD))
            else:
                self.pos += length


def read_dicom_slice(path: Path) -> tuple[np.ndarray, dict[str, tuple[float, ...]]]:
    """One uncompressed single-frame DICOM slice (rows, columns), rescaled, and its geometry tags."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise FormatError(f"{path}: not a DICOM file (no 'DICM' after the 128-byte preamble)")
    r = _DicomReader(path, data)
    syntax = None
    while r.pos + 2 <= len(data) and data[r.pos:r.pos + 2] == b"\x02\x00":  # file meta group, explicit VR
        tag, _, length = r.element()
        if tag == (0x0002, 0x0010):
            syntax = data[r.pos:r.pos + length].rstrip(b"\x00 ").decode("ascii", "replace")
        r.pos += length
    if syntax not in _SYNTAXES:
        raise FormatError(f"{path}: transfer syntax {syntax} is not supported (only uncompressed little endian); "
                          f"decompress the series first, e.g. with gdcmconv --raw")
    r.implicit = _SYNTAXES[syntax]
    tags: dict[str, tuple[float, ...]] = {}
    pixels = None
    while r.pos < len(data):
        tag, _, length = r.element()
        if tag == (0x7FE0, 0x0010):
            if length == _UNDEFINED:
                raise FormatError(f"{path}: encapsulated (compressed) pixel data is not supported")
            pixels = data[r.pos:r.pos + length]
            break
        if length == _UNDEFINED:
            r.skip_undefined((0xFFFE, 0xE0DD))
            continue
        value = data[r.pos:r.pos + length]
        r.pos += length
        if tag in _DICOM_TAGS:
            name, kind = _DICOM_TAGS[tag]
            if kind == "us":
                tags[name] = (float(int.from_bytes(value[:2], "little")),)
            else:
                text = value.decode("ascii", "replace").strip("\x00 ")
                tags[name] = tuple(float(v) for v in text.split("\\") if v.strip())
    need = ("Rows", "Columns", "BitsAllocated", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    missing = [k for k in need if k not in tags]
    if pixels is None or missing:
        raise FormatError(f"{path}: DICOM slice lacks {', '.join(missing) or 'pixel data'}, so it cannot be "
                          f"placed in space")
    if tags.get("SamplesPerPixel", (1,))[0] != 1 or tags.get("NumberOfFrames", (1,))[0] > 1:
        raise FormatError(f"{path}: only single-frame greyscale slices are supported")
    rows, cols, bits = (int(tags[k][0]) for k in ("Rows", "Columns", "BitsAllocated"))
    signed = tags.get("PixelRepresentation", (0,))[0] == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    if bits not in (8, 16, 32) or len(pixels) < rows * cols * dtype.itemsize:
        raise FormatError(f"{path}: {len(pixels)} bytes of pixel data for {rows}x{cols} at {bits} bits")
    array = np.frombuffer(pixels, dtype, count=rows * cols).reshape(rows, cols)
    slope, intercept = tags.get("RescaleSlope", (1.0,))[0], tags.get("RescaleIntercept", (0.0,))[0]
    if slope == 1 and intercept == int(intercept):
        return (array.astype(np.int32) + int(intercept)), tags
    return (array * np.float32(slope) + np.float32(intercept)).astype(np.float32), tags


def read_dicom_series(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One series of single-frame, uncompressed DICOM slices stacked along the slice normal.

    Returns the (columns, rows, slices) array with the modality's rescale applied, the RAS affine, and the order
    in which the given files were stacked (so per-slice masks given in file order can follow).
    """
    if not files:
        raise FormatError("empty DICOM series")
    read = [read_dicom_slice(f) for f in files]
    slices = [pixels for pixels, _ in read]
    metas = [meta for _, meta in read]
    iop = np.array(metas[0]["ImageOrientationPatient"], dtype=float)
    for f, m in zip(files, metas, strict=True):
        if not np.allclose(m["ImageOrientationPatient"], iop, atol=1e-4):
            raise FormatError(f"{f}: slice orientation differs from the rest of the series")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([m["ImagePositionPatient"] for m in metas], dtype=float)
    order = [int(i) for i in np.argsort(positions @ normal, kind="stable")]
    depth = positions[order] @ normal
    if len(order) > 1 and np.min(np.diff(depth)) < 1e-3:
        raise FormatError(f"{files[order[0]].parent}: two slices share one position (mixed series?)")
    if any(s.shape != slices[0].shape for s in slices):
        raise FormatError(f"{files[0].parent}: slices differ in size")
    row_spacing, col_spacing = (float(v) for v in metas[0]["PixelSpacing"])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # along a row = increasing column index = array axis 0
    lps[:3, 1] = col_dir * row_spacing
    step = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1) if len(order) > 1 else normal
    lps[:3, 2] = step
    lps[:3, 3] = positions[order[0]]
    volume = np.stack([slices[i] for i in order], axis=-1).transpose(1, 0, 2)
    if volume.dtype.kind == "i" and volume.size and np.iinfo(np.int16).min <= volume.min() \
            and volume.max() <= np.iinfo(np.int16).max:
        volume = volume.astype(np.int16)
    return volume, _LPS_TO_RAS @ lps, order


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write a ``.nii.gz`` atomically (a temp name in the same folder, then a rename)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name.removesuffix('.nii.gz')}.{os.getpid()}.tmp.nii.gz")
    try:
        nib.save(nib.Nifti1Image(array, affine), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def natural_key(path: Path) -> list[object]:
    """File-name order with numbers compared as numbers (``IMG-2`` before ``IMG-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]
