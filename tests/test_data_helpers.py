"""Stand-ins for the remote data sources (no tests here): a local HTTP file server, archive builders and writers
for the raw formats (NIfTI, DICOM, MetaImage, M3D-Seg), so the real download and listing code runs offline."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np


class FileServer:
    """Serves ``files`` (URL path without the leading slash -> bytes) on 127.0.0.1 with Range support.

    ``cut_first`` names files whose first GET sends half the body and drops the connection; ``ignore_range``
    makes the server answer every GET with the whole file (200), as some servers do.
    """

    def __init__(self, files: dict[str, bytes], cut_first: set[str] | None = None, ignore_range: bool = False):
        self.files = files
        self.cut_first = set(cut_first or ())
        self.ignore_range = ignore_range
        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append(("GET", name, rng))
                if name not in server.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files[name]
                start = 0 if server.ignore_range or not rng else int(rng.split("=")[1].split("-")[0])
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start or (rng and not server.ignore_range) else 200)
                if rng and not server.ignore_range:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                body = data[start:]
                if name in server.cut_first:
                    server.cut_first.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, name: str) -> list[str | None]:
        return [r[2] for r in self.requests if r[0] == "GET" and r[1] == name]

    def __enter__(self) -> FileServer:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        return probe.server_address[1]


# --- archives ------------------------------------------------------------------------------------------------

def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --- raw formats ---------------------------------------------------------------------------------------------

def nifti_gz(array: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4) if affine is None else affine).to_bytes())


def labelled_pair(shape=(8, 7, 5), values=(1, 2), ct: bool = False, seed: int = 0,
                  affine: np.ndarray | None = None) -> tuple[bytes, bytes]:
    """A small image (CT-like with air at -1000 HU, or MR-like non-negative) and a label map using ``values``."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000 if ct else 0, 400, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        label[i % shape[0], 1:3, 1:3] = v
    return nifti_gz(image, affine), nifti_gz(label, affine)


def _element(group: int, element: int, vr: bytes, value: bytes, implicit: bool = False,
             undefined: bool = False) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    length = 0xFFFFFFFF if undefined else len(value)
    if implicit:
        return struct.pack("<HHI", group, element, length) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, length) + value
    return struct.pack("<HH2sH", group, element, vr, length) + value


def _sequence(implicit: bool) -> bytes:
    """An undefined-length sequence holding one undefined-length item (a nested element inside)."""
    inner = _element(0x0008, 0x0100, b"SH", b"T-D4000", implicit)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return _element(0x0008, 0x2218, b"SQ", item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), implicit, undefined=True)


def dicom_bytes(pixels: np.ndarray, position, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.7),
                intercept: float = 0.0, instance: int = 1, implicit: bool = False,
                syntax: bytes | None = None) -> bytes:
    """A minimal single-frame DICOM file: signed 16-bit, uncompressed, little endian (explicit or implicit VR),
    with an undefined-length sequence before the image tags, as scanners write them."""
    def ds(values) -> bytes:
        return "\\".join(f"{v:g}" for v in values).encode()

    def el(group: int, element: int, vr: bytes, value: bytes) -> bytes:
        return _element(group, element, vr, value, implicit)

    rows, cols = pixels.shape
    syntax = syntax or (b"1.2.840.10008.1.2" if implicit else b"1.2.840.10008.1.2.1")
    meta = _element(0x0002, 0x0010, b"UI", syntax)
    meta = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta))) + meta
    body = b"".join([
        el(0x0008, 0x0060, b"CS", b"MR"),
        _sequence(implicit),
        el(0x0020, 0x0013, b"IS", str(instance).encode()),
        el(0x0020, 0x0032, b"DS", ds(position)),
        el(0x0020, 0x0037, b"DS", ds(orientation)),
        el(0x0028, 0x0002, b"US", struct.pack("<H", 1)),
        el(0x0028, 0x0004, b"CS", b"MONOCHROME2"),
        el(0x0028, 0x0010, b"US", struct.pack("<H", rows)),
        el(0x0028, 0x0011, b"US", struct.pack("<H", cols)),
        el(0x0028, 0x0030, b"DS", ds(spacing)),
        el(0x0028, 0x0100, b"US", struct.pack("<H", 16)),
        el(0x0028, 0x0101, b"US", struct.pack("<H", 16)),
        el(0x0028, 0x0102, b"US", struct.pack("<H", 15)),
        el(0x0028, 0x0103, b"US", struct.pack("<H", 1)),
        el(0x0028, 0x1052, b"DS", ds([intercept])),
        el(0x0028, 0x1053, b"DS", b"1"),
        el(0x7FE0, 0x0010, b"OW", pixels.astype("<i2").tobytes()),
    ])
    return b"\0" * 128 + b"DICM" + meta + body


def png_bytes(grey: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def metaimage(name: str, array: np.ndarray, spacing=(0.6, 0.7, 3.0), offset=(-10.0, -20.0, 30.0),
              compressed: bool = False) -> dict[str, bytes]:
    """``<name>.mhd`` + data file for a (x, y, z) array, as ITK writes them (x fastest, LPS world)."""
    types = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.uint8): "MET_UCHAR"}
    data = np.ascontiguousarray(array.transpose(2, 1, 0)).astype(array.dtype.newbyteorder("<")).tobytes()
    ext = "zraw" if compressed else "raw"
    if compressed:
        import zlib

        data = zlib.compress(data)
    header = "\n".join([
        "ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compressed}", "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        "Offset = " + " ".join(f"{v:g}" for v in offset), "CenterOfRotation = 0 0 0",
        "AnatomicalOrientation = RAI", "ElementSpacing = " + " ".join(f"{v:g}" for v in spacing),
        "DimSize = " + " ".join(str(v) for v in array.shape), f"ElementType = {types[array.dtype]}",
        f"ElementDataFile = {Path(name).name}.{ext}",
    ]) + "\n"
    return {f"{name}.mhd": header.encode(), f"{name}.{ext}": data}


def m3d_case(shape=(6, 5, 4), channels: int = 2, filled=(0, 1), seed: int = 0) -> dict[str, bytes]:
    """``image.npy`` (1, X, Y, Z) and ``mask_(K, X, Y, Z).npz`` (sparse K x voxels) as M3D-Seg stores a case."""
    import scipy.sparse

    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    mask = np.zeros((channels, *shape), np.int32)
    for c in filled:
        mask[c, c % shape[0], 1:3, 1:3] = 1
    buf_img, buf_mask = io.BytesIO(), io.BytesIO()
    np.save(buf_img, image)
    scipy.sparse.save_npz(buf_mask, scipy.sparse.csr_matrix(mask.reshape(channels, -1)))
    mask_name = f"mask_({channels}, {', '.join(map(str, shape))}).npz"
    return {"image.npy": buf_img.getvalue(), mask_name: buf_mask.getvalue()}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
