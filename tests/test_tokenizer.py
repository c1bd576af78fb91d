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


def _random_ids(rng, n, tok):
    """Random text bytes with multi-byte characters, some cut, and special ids between them."""
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice([tok.eos_id, tok.pad_id, tok.sentinel(0)]))
        elif r < 0.15:
            out.append(rng.randrange(0x80, 0xC0))   # a stray continuation byte: U+FFFD
        else:
            out.extend(chr(rng.choice([rng.randrange(32, 127), 0xE9, 0x6570, 0x1F600])).encode())
    return out[:n]


def test_stream_decoders_equal_the_whole_decode():
    import random

    from multimoe_rt.tokenizer import WindowStreamDecoder

    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(50):
        ids = _random_ids(rng, rng.randrange(1, 60), tok)
        for dec in (tok.stream_decoder(), WindowStreamDecoder(tok.decode)):
            text = "".join(dec.push(i) for i in ids) + dec.flush()
            assert text == tok.decode(ids), ids
    # a character split over tokens comes out whole, with its last byte
    dec = tok.stream_decoder()
    assert [dec.push(b) for b in "é€".encode()] == ["", "é", "", "", "€"]


def test_stream_decoding_work_per_token_is_flat():
    """Work (ids decoded) per token is the same at 256 and at 4,000 tokens, for both decoders and for the server's
    TextStream over them; re-decoding the whole output per token would make it grow 16x."""
    import random

    from multimoe_rt.tokenizer import WindowStreamDecoder

    tok = ByteTokenizer()
    ids = _random_ids(random.Random(1), 4000, tok)

    def per_token(make, n):
        dec = make()
        for i in ids[:n]:
            dec.push(i)
        return dec.work / n

    for make in (tok.stream_decoder, lambda: WindowStreamDecoder(tok.decode)):
        short, long = per_token(make, 256), per_token(make, 4000)
        assert long <= short * 1.1 and long <= 32, (short, long)   # 32: two decodes of a 16-id window

    oa = pytest.importorskip("multimoe_rt.integrations.openai_api", reason="openai_api imports pydantic")

    class Window(oa.ByteCodec):
        def stream_decoder(self):
            return WindowStreamDecoder(self.tok.decode)

    for codec in (oa.ByteCodec(tok), Window(tok)):
        works, pending = [], []
        for n in (256, 4000):
            ts = oa.TextStream(codec, ["</stop>", "\n\n\n"])
            for i in ids[:n]:
                ts.push(i)
                pending.append(len(ts.pending))
            works.append(ts.work / n)
            assert ts.emitted + ts.flush() == tok.decode(ids[:n]) or ts.stopped
        assert works[1] <= works[0] * 1.1
        assert max(pending) <= 16   # the text the stop search scans stays bounded too


def test_lone_surrogates_are_a_value_error():
    with pytest.raises(ValueError, match="surrogate"):
        ByteTokenizer().encode("a\ud800")
