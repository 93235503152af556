"""Tokens become streamed text in one place (TextStreamer): partial characters held back, stop strings, the
max-token cut and EOS, with a real subword tokenizer whose non-ASCII characters span several tokens."""

import json
import shutil

import numpy as np
import pytest

from conftest import write_byte_fallback_bpe
from dg_runtime import Block, DiffusionGemma, Done, Stats, TextCodec, TextStreamer
from dg_runtime.artifact import MANIFEST_NAME, write_manifest

TEXT = "naïve café – 日本語 🙂 done"
EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    folder = write_byte_fallback_bpe(tmp_path_factory.mktemp("bpe"))
    (folder / "tokenizer_config.json").write_text("{}")
    return TextCodec(folder)


def streamed(codec, blocks, max_tokens=1000, stop=()):
    streamer = TextStreamer(codec, [EOS], PAD, max_tokens, stop)
    deltas = [streamer.add(np.array(b)) for b in blocks] + [streamer.finish()]
    return deltas, streamer


def test_characters_split_across_blocks_stream_whole(codec):
    ids = codec.encode(TEXT)
    assert codec.decode(ids) == TEXT
    assert len(ids) > len(TEXT.split()) + 20  # the non-ASCII characters are byte tokens, several per character
    for cut in range(1, len(ids)):
        deltas, streamer = streamed(codec, [ids[:cut], ids[cut:] + [EOS, PAD]])
        assert "".join(deltas) == streamer.text == TEXT, cut
        assert not any("\ufffd" in d for d in deltas), (cut, deltas)
        assert streamer.finish_reason == "stop" and list(streamer.tokens) == ids


def test_stop_strings_and_the_token_cut(codec):
    ids = codec.encode(TEXT)
    for cut in range(1, len(ids)):
        deltas, streamer = streamed(codec, [ids[:cut], ids[cut:]], stop=["日本"])
        assert "".join(deltas) == streamer.text == "naïve café – " and streamer.stop_string_hit, cut
    for max_tokens in range(1, len(ids)):
        deltas, streamer = streamed(codec, [ids[:7], ids[7:]], max_tokens=max_tokens)
        assert "".join(deltas) == streamer.text and "\ufffd" not in streamer.text
        assert TEXT.startswith(streamer.text) and streamer.finish_reason == "length"
        assert codec.decode(ids[:max_tokens]).rstrip("\ufffd") == streamer.text


def test_dg_run_prints_a_character_split_across_blocks(exported, tmp_path, monkeypatch, capsys):
    """dg-run's stdout, with blocks that end in the middle of characters (the model replaced by those blocks)."""
    from dg_runtime.cli import main as dg_run

    _, artifact = exported("window8-top2")
    copy = tmp_path / "bpe.dg"
    shutil.copytree(artifact, copy)
    write_byte_fallback_bpe(copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    write_manifest(copy, manifest)
    ids = TextCodec(copy).encode(TEXT)
    canvas = 8
    blocks = [ids[i:i + canvas] for i in range(0, len(ids), canvas)]
    blocks[-1] = (blocks[-1] + [EOS] + [PAD] * canvas)[:canvas]

    def stream(self, input_ids, **options):
        for index, block in enumerate(blocks):
            yield Block(index, np.array([block]), 1)
        yield Done(np.array([sum(blocks, [])]), Stats(blocks=len(blocks)))

    monkeypatch.setattr(DiffusionGemma, "stream", stream)
    capsys.readouterr()
    assert dg_run([str(copy), "--raw", "hello"]) == 0
    assert capsys.readouterr().out.strip() == TEXT
