"""The CLIP BPE tokenizer, offline.

SegVol loads ``openai/clip-vit-base-patch32``'s tokenizer from the hub. Here it comes either from a local
tokenizer directory (the hub's ``vocab.json`` + ``merges.txt``) or is rebuilt in memory from the BPE merge
list that open-clip-torch ships (``bpe_simple_vocab_16e6.txt.gz``): the same 49,408-token vocabulary and ids.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

from segevo.errors import MissingResource

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


class TokenizerUnavailable(MissingResource):
    """Neither a tokenizer directory nor a packaged BPE vocabulary is available."""


def packaged_bpe_path() -> Path:
    """Locate open-clip-torch's BPE file without importing open_clip (it would pull torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / BPE_FILE
            if candidate.is_file():
                return candidate
    raise TokenizerUnavailable(
        f"no CLIP BPE vocabulary found: install it with 'pip install --no-deps open-clip-torch' (ships "
        f"{BPE_FILE}) or set model.text.tokenizer_dir to a folder with vocab.json and merges.txt"
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def vocabulary_from_bpe(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary order: bytes, bytes + ``</w>``, one token per merge, then the two specials."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerUnavailable(f"{bpe_path}: not a CLIP BPE merge list ({len(merges)} merges read)")
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def load_tokenizer(directory: str | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer from ``directory`` (hub file layout) or, when None, from the packaged BPE list."""
    if directory is not None:
        path = Path(directory)
        if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            raise TokenizerUnavailable(f"{path}: tokenizer directory needs vocab.json and merges.txt")
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    vocab, merges = vocabulary_from_bpe(packaged_bpe_path())
    return CLIPTokenizer(vocab=vocab, merges=merges)
