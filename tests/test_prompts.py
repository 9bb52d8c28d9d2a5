"""Prompt files, BOS policy, seeded shuffle, batching."""

import pytest
import torch

from sinkscope.promptset import BUILTIN_PROMPT_FILES, PromptError, make_batches, read_prompt_file, tokenize
from sinkscope.testing import byte_tokenizer


def test_builtin_prompt_files_ship_with_the_package():
    assert len(read_prompt_file()) == 56
    assert len(read_prompt_file("natural_mixed.txt")) == 512
    assert set(BUILTIN_PROMPT_FILES) == {"prose56.txt", "natural_mixed.txt"}


def test_prompt_file_rules(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("  first prompt  \n\n\t\nsecond\n", encoding="utf-8")
    assert read_prompt_file(str(f)) == ["first prompt", "second"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PromptError, match="holds no prompts"):
        read_prompt_file(str(empty))
    with pytest.raises(PromptError, match="not found"):
        read_prompt_file(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf8")
    with pytest.raises(PromptError, match="UTF-8"):
        read_prompt_file(str(bad))


def test_bos_policy():
    tok = byte_tokenizer()
    auto = tokenize(tok, ["abc"], bos="auto").ids[0].tolist()
    always = tokenize(tok, ["abc"], bos="always").ids[0].tolist()
    assert auto[0] != tok.bos_token_id  # this tokenizer adds no BOS by default
    assert always == [tok.bos_token_id] + auto
    assert tokenize(tok, ["<bos>abc"], bos="never").ids[0].tolist() == auto
    with pytest.raises(PromptError, match="--bos"):
        tokenize(tok, ["abc"], bos="sometimes")


def test_shuffle_is_seeded_and_keeps_special_tokens_first():
    tok = byte_tokenizer()
    texts = ["the quick brown fox jumps", "over the lazy dog again and again"]
    a = tokenize(tok, texts, bos="always", shuffle_seed=3)
    b = tokenize(tok, texts, bos="always", shuffle_seed=3)
    c = tokenize(tok, texts, bos="always", shuffle_seed=4)
    plain = tokenize(tok, texts, bos="always")
    assert all(torch.equal(x, y) for x, y in zip(a.ids, b.ids))
    assert any(not torch.equal(x, y) for x, y in zip(a.ids, c.ids))
    for s, p in zip(a.ids, plain.ids):
        assert s[0] == tok.bos_token_id
        assert sorted(s.tolist()) == sorted(p.tolist()) and not torch.equal(s, p)


def test_batches_are_right_padded_bucketed_and_cover_every_prompt():
    tok = byte_tokenizer()
    texts = ["a" * n for n in (9, 3, 7, 1, 12, 5, 2)]
    p = tokenize(tok, texts)
    batches = make_batches(p, batch_size=3, pad_id=tok.pad_token_id)
    seen = torch.cat([b.index for b in batches]).tolist()
    assert sorted(seen) == list(range(len(texts)))
    for b in batches:
        for row, i in enumerate(b.index.tolist()):
            n = len(p.ids[i])
            assert torch.equal(b.input_ids[row, :n], p.ids[i])
            assert b.attention_mask[row, :n].all() and not b.attention_mask[row, n:].any()
            assert (b.input_ids[row, n:] == tok.pad_token_id).all()
    widths = [b.input_ids.shape[1] for b in batches]
    assert widths == sorted(widths)  # bucketed by length: padding stays small
    assert sum(b.input_ids.numel() for b in batches) < sum(max(p.lengths) for _ in texts)
