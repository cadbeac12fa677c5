"""The CLIP tokenizer offline: packaged BPE list and hub-style directory give SegVol's token ids."""

from __future__ import annotations

import json

import pytest

from segevo.model.tokenizer import (
    TokenizerUnavailable,
    load_tokenizer,
    packaged_bpe_path,
    vocabulary_from_bpe,
)


@pytest.fixture(scope="module")
def fixture(key_table):
    return key_table("segvol_hf")["text_prompt_fixture"]


def _prompts(fixture) -> list[str]:
    return [fixture["template"].format(organ) for organ in fixture["organs"]]


def test_packaged_vocabulary_gives_segvol_token_ids(fixture):
    enc = load_tokenizer(None)(_prompts(fixture), padding=True)
    assert enc["input_ids"] == fixture["input_ids_padding_True"]
    assert enc["attention_mask"] == fixture["attention_mask_padding_True"]


def test_hub_style_directory_gives_the_same_ids(fixture, tmp_path):
    vocab, merges = vocabulary_from_bpe(packaged_bpe_path())
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    enc = load_tokenizer(str(tmp_path))(_prompts(fixture), padding=True)
    assert enc["input_ids"] == fixture["input_ids_padding_True"]
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == fixture["bos"] and vocab["<|endoftext|>"] == 49407


def test_incomplete_directory_is_a_clear_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerUnavailable, match="vocab.json and merges.txt"):
        load_tokenizer(str(tmp_path))
