"""Fetching SegVol's released files from the Hugging Face Hub: resumable, checksummed, offline-aware."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from segevo.errors import DownloadError
from segevo.net import check_reachable as _probe

REPO_ID = "BAAI/SegVol"
# The Hub's "main" at commit 516701d ("add quickstart (#3)"); the weights' content is pinned by SHA256 below.
DEFAULT_REVISION = "main"
SHA256 = {"pytorch_model.bin": "500f2758a8f989339b2b2baf09a819169bc87549795193d3cfe505726ac0b399"}
FILES = ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
         "pytorch_model.bin")
VIT_FILE = "vit_pretrain.ckpt"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with a message that says what to do, instead of retrying into a dead network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise DownloadError("HF_HUB_OFFLINE is set: unset it to download, or copy the files from a machine "
                            "with network access (segevo weights download --dest DIR)")
    _probe(endpoint, "run 'segevo weights download --dest DIR' where the Hub is reachable and copy DIR here",
           timeout=timeout)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path}: SHA256 mismatch (got {actual[:12]}..., expected {expected[:12]}...); "
                            f"the file was deleted, run the download again")


def download_segvol(dest: str | os.PathLike[str], revision: str = DEFAULT_REVISION, include_vit: bool = False,
                    endpoint: str | None = None) -> list[Path]:
    """Download into ``dest``; a rerun resumes partial files and skips complete ones."""
    from huggingface_hub import hf_hub_download

    endpoint = endpoint or hub_endpoint()
    check_reachable(endpoint)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = FILES + ((VIT_FILE,) if include_vit else ())
    paths = []
    for name in names:
        try:
            local = Path(hf_hub_download(REPO_ID, name, revision=revision, local_dir=dest, endpoint=endpoint))
        except Exception as err:  # huggingface_hub raises many types (HTTP, offline, entry-not-found)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DownloadError(f"{REPO_ID}/{name} at revision {revision}: {first[:200]}") from None
        verify(local, SHA256.get(name))
        paths.append(local)
    return paths
