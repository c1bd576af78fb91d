"""tokenizer.py: byte-level ids, specials, save/load."""

import pytest

from multimoe_rt.tokenizer import ByteTokenizer


def test_round_trip_and_specials(tmp_path):
    tok = ByteTokenizer()
    text = "naïve café — déjà vu\n\tdef f(x): return x ** 2  # ünïcode 数据"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode("a", add_eos=True) == [97, tok.eos_id]
    assert tok.decode([104, tok.sentinel(0), 105, tok.eos_id]) == "hi"
    assert tok.decode([104, tok.sentinel(2), 105], skip_special=False) == "h<extra_id_2>i"
    assert len({tok.pad_id, tok.eos_id, tok.bos_id, *map(tok.sentinel, range(tok.num_sentinels))}) == \
        tok.vocab_size - 256
    assert tok.vocab_size == 272
    # a cut multi-byte character decodes with a replacement, never raises
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"
    tok.save(tmp_path)
    assert ByteTokenizer.load(tmp_path).to_dict() == tok.to_dict()
    with pytest.raises(ValueError, match="out of range"):
        tok.sentinel(tok.num_sentinels)
