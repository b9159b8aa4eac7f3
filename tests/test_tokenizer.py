"""Tokenizer tests: Meta's Llama 3 ids, special and media tokens, long inputs, chat format, streaming, bad input.

Golden ids come from Meta's reference tests (llama-models `models/llama3/tests/api/test_tokenizer.py`) where marked.
"""

import base64
import functools
import random
from pathlib import Path

import pytest

from conftest import llama3_tokenizer_path
from mm_llama.errors import InputError, TokenizerError
from mm_llama.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    MEDIA_TOKENS,
    N_MEDIA_TOKENS,
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    _split_long_runs,
)


@functools.cache
def real_tokenizer() -> Tokenizer:
    # llama3_tokenizer_path fails (not skips) when the file is missing: CI must not turn these tests green.
    return Tokenizer.from_file(llama3_tokenizer_path())


def enc(tok: Tokenizer, text: str, **kw) -> list[int]:
    return tok.encode(text, bos=False, eos=False, **kw)


def meta_pieces(text: str, chunk: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS) -> list[str]:
    """Meta's cutting rule, written as the plain per-character loop it describes (independent of our regex)."""
    pieces = []
    for c0 in range(0, len(text), chunk):
        s = text[c0 : c0 + chunk]
        start, run_len, prev_space = 0, 0, s[0].isspace()
        for i, ch in enumerate(s):
            if ch.isspace() == prev_space:
                run_len += 1
                if run_len > max_run:
                    pieces.append(s[start:i])
                    start, run_len = i, 1
            else:
                run_len, prev_space = 1, ch.isspace()
        pieces.append(s[start:])
    return pieces


# --- Meta's golden ids ---------------------------------------------------------------------------------------------


def test_known_ids():
    tok = real_tokenizer()
    assert (tok.n_base, tok.n_words, tok.vocab_size_with_media) == (128000, 128256, 128264)
    assert enc(tok, "hello world") == [15339, 1917]
    # Meta's test_encode / test_decode
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    # Meta's chat test: "user" 882, "assistant" 78191, "system" 9125, "\n\n" 271
    assert [enc(tok, w) for w in ("user", "assistant", "system", "\n\n")] == [[882], [78191], [9125], [271]]


def test_special_token_ids():
    tok = real_tokenizer()
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010, "<|reserved_special_token_2|>": 128011, "<|reserved_special_token_246|>": 128255,
        "<|image|>": 128256, "<|video|>": 128257, "<|speech_start|>": 128258, "<|speech_end|>": 128259,
        "<|speech|>": 128260, "<|media_reserved_7|>": 128263,
    }  # fmt: skip
    assert {k: tok.special_tokens[k] for k in expected} == expected
    assert len(SPECIAL_TOKENS) == 256 and len(MEDIA_TOKENS) == N_MEDIA_TOKENS == 8
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128264))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.python_tag_id) == (128000, 128001, 128004, 128010)
    assert (tok.start_header_id, tok.end_header_id, tok.eom_id, tok.eot_id) == (128006, 128007, 128008, 128009)
    assert (tok.image_id, tok.video_id, tok.speech_start_id, tok.speech_end_id) == (128256, 128257, 128258, 128259)
    assert tok.stop_tokens == frozenset({128001, 128008, 128009})


def test_every_special_token_encodes_and_decodes():
    tok = real_tokenizer()
    assert len(tok.special_tokens) == 256 + 8
    for name, i in tok.special_tokens.items():
        assert enc(tok, name, allowed_special="all") == [i], name
        assert tok.decode([i]) == name


def test_special_text_is_plain_text_unless_allowed():
    tok = real_tokenizer()
    ids = enc(tok, "<|eot_id|>")  # never raises, unlike tiktoken's default disallowed_special="all"
    assert ids == [27, 91, 68, 354, 851, 91, 29]
    assert all(i < tok.n_base for i in ids) and tok.decode(ids) == "<|eot_id|>"
    text = "<|image|>a<|eot_id|>"
    assert enc(tok, text, allowed_special={"<|image|>"}) == [128256, 64, *ids]
    assert enc(tok, text, allowed_special="all") == [128256, 64, 128009]
    for bad in ({"<|nope|>"}, ["<|image|>"], "some"):
        with pytest.raises(TokenizerError, match="allowed_special"):
            enc(tok, text, allowed_special=bad)


# --- round trips and long inputs -------------------------------------------------------------------------------------

ROUND_TRIP = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "chinese": "我们今天去公园散步，天气很好。你好，世界！",
    "code": "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -1\n\n\nprint(f(3))\r\n",
    "emoji": "family 👨\u200d👩\u200d👧\u200d👦, flag 🇯🇵, thumbs 👍🏽, rainbow 🏳\ufe0f\u200d🌈, 😀😀😀",
    "whitespace": "  \t \n\n\t\t  \r\n   \u3000\u00a0 x  \n \t ",
    "mixed": "Ünïcödé — «quotes» naïve café 日本語 한국어 العربية עברית ∑∫√ 🎉\x00\x7f",
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip(name):
    tok = real_tokenizer()
    assert tok.decode(enc(tok, ROUND_TRIP[name])) == ROUND_TRIP[name]


def test_split_rule_matches_meta_loop():
    # Our regex-based cutter against the per-character loop, on strings dense in runs, with tiny limits.
    rng = random.Random(0)
    alphabet = "ab \t\n\u3000\x1c\u2028é你"  # \x1c and \u2028 are str.isspace() too
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for max_run in (1, 2, 3, 7):
            want = meta_pieces(s, chunk=len(s) or 1, max_run=max_run) if s else [""]
            assert _split_long_runs(s, max_run) == want


def test_long_run_is_split_like_meta():
    tok = real_tokenizer()
    text = "x" * 30_000 + " hi " + "y" * 60_000
    ids = enc(tok, text)
    # The cuts change BPE (merges cannot cross them), so this proves they were applied ...
    assert ids != tok.model.encode(text, disallowed_special=())
    # ... at exactly Meta's places: 25,000-char slices of each run.
    pieces = ["x" * 25_000, "x" * 5_000 + " hi " + "y" * 25_000, "y" * 25_000, "y" * 10_000]
    assert meta_pieces(text) == pieces
    assert ids == [i for p in pieces for i in tok.model.encode(p)]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["mixed", "long_runs"])
def test_million_characters(kind):
    tok = real_tokenizer()
    base = "".join(ROUND_TRIP.values()) + " Lorem ipsum dolor sit amet.\n"
    if kind == "mixed":
        text = (base * (1_000_000 // len(base) + 1))[:1_000_000]
    else:  # runs longer than 25,000 chars, one of them across the 400,000-char chunk boundary
        text = base * 100 + "ab" * 20_000 + " " * 30_000 + "z" * 60_000
        text += base * ((395_000 - len(text)) // len(base)) + "q" * 70_000
        text = (text + base * (1_000_000 // len(base)))[:1_000_000]
    assert len(text) == 1_000_000
    ids = enc(tok, text)
    pieces = meta_pieces(text)
    assert len(pieces) >= (3 if kind == "mixed" else 9)
    assert ids == [i for p in pieces for i in tok.model.encode(p, disallowed_special=())]
    assert tok.decode(ids) == text


# --- chat format ---------------------------------------------------------------------------------------------------


def test_chat_format_with_image():
    tok = real_tokenizer()
    content = [3923, 374, 304, 279, 6945, 30]  # "What is in the picture?"
    assert enc(tok, "What is in the picture?") == content
    want = [128000, 128006, 882, 128007, 271, 128256, *content, 128009, 128006, 78191, 128007, 271]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    ids = tok.encode_dialog(msgs)
    assert ids == want
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is in the picture?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.encode_dialog(msgs, add_generation_prompt=False) == want[:-4]


def test_chat_format_matches_meta_dialog():
    tok = real_tokenizer()
    # Meta's test_encode_dialog
    msgs = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    assert tok.encode_dialog(msgs) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
        128006, 78191, 128007, 271,
    ]  # fmt: skip
    assert tok.encode_header("ipython") == [128006, *enc(tok, "ipython"), 128007, 271]
    assert tok.encode_message("assistant", [{"type": "video"}, {"type": "text", "text": "Hi"}])[4:] == [
        128257, *enc(tok, "Hi"), 128009,
    ]  # fmt: skip


def test_string_content_is_stripped_as_before():
    tok = real_tokenizer()
    # Meta's llama3 chat format strips str content; list content (below) is taken as given.
    assert tok.encode_message("user", "  Hi there \n") == tok.encode_message("user", "Hi there")
    assert tok.encode_message("user", "Hi there") == [128006, 882, 128007, 271, *enc(tok, "Hi there"), 128009]
    parts = tok.encode_message("user", [{"type": "text", "text": "  Hi there \n"}])
    assert parts == [128006, 882, 128007, 271, *enc(tok, "  Hi there \n"), 128009]
    assert tok.encode_message("user", "") == tok.encode_message("user", []) == [128006, 882, 128007, 271, 128009]


# Golden ids from transformers' own chat template rendering, made once by a scratch script outside the repo:
#   transformers 5.24.0; MllamaProcessor(MllamaImageProcessor(), tokenizer, chat_template=T).apply_chat_template(
#   messages, add_generation_prompt=True, tokenize=True), each image part carrying a 64x48 PIL image.
#   tokenizer: PreTrainedTokenizerFast over TikTokenConverter(vocab_file=../shared/llama3/tokenizer.model,
#   pattern=SPLIT_PATTERN, extra_special_tokens=SPECIAL_TOKENS + ["<|image|>"]).converted(), bos "<|begin_of_text|>".
#   T: meta-llama/Llama-3.2-11B-Vision-Instruct chat_template.json as released (Sep 2024), text taken from verbatim
#   copies (NVIDIA/NeMo nemo/collections/multimodal/data/energon/conversation.py MLlamaTemplateConfig, swift Jinja
#   ChatTemplateTests.swift); the Dec 2024 Hub revision (discussion #84: system message allowed with images) gives
#   the same ids here. With an image and no system message the template emits no system block, like encode_dialog.
MLLAMA_TEXT_IMAGE_TEXT = [
    128000, 128006, 882, 128007, 271,  # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n
    10596, 520, 420, 25, 128256,  # "Look at this:" <|image|>
    3639, 12745, 374, 279, 9518, 30, 128009,  # " What colour is the square?" <|eot_id|>
    128006, 78191, 128007, 271,  # <|start_header_id|>assistant<|end_header_id|>\n\n
]  # fmt: skip
MLLAMA_IMAGE_TEXT = [
    128000, 128006, 882, 128007, 271, 128256,  # ... user header, <|image|>
    3923, 12745, 374, 279, 9518, 30, 128009,  # "What colour is the square?" <|eot_id|>
    128006, 78191, 128007, 271,
]  # fmt: skip


def test_parts_match_mllama_chat_template():
    tok = real_tokenizer()
    assert tok.decode(MLLAMA_TEXT_IMAGE_TEXT) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nLook at this:<|image|> What colour is the "
        "square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.decode(MLLAMA_IMAGE_TEXT) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What colour is the square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    text_image_text = [
        {"type": "text", "text": "Look at this:"}, {"type": "image"},
        {"type": "text", "text": " What colour is the square?"},
    ]  # fmt: skip
    assert tok.encode_dialog([{"role": "user", "content": text_image_text}]) == MLLAMA_TEXT_IMAGE_TEXT
    image_text = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
    assert tok.encode_dialog([{"role": "user", "content": image_text}]) == MLLAMA_IMAGE_TEXT


def test_parts_in_any_order():
    tok = real_tokenizer()
    header, eot = [128006, 882, 128007, 271], [128009]
    parts = [
        {"type": "video"}, {"type": "text", "text": "first"}, {"type": "image"}, {"type": "image"},
        {"type": "text", "text": " then"}, {"type": "video"},
    ]  # fmt: skip
    want = header + [128257, *enc(tok, "first"), 128256, 128256, *enc(tok, " then"), 128257] + eot
    assert tok.encode_message("user", parts) == want
    assert tok.encode_message("user", tuple(parts)) == want
    assert tok.encode_message("user", [{"type": "image"}]) == header + [128256] + eot


def test_adjacent_text_parts_are_joined():
    tok = real_tokenizer()
    # "hello" is one token; "hel" + "lo" encoded apart would be more: the parts must be encoded as one string.
    assert enc(tok, "hello") == [15339] and enc(tok, "hel") + enc(tok, "lo") != [15339]
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}, {"type": "image"},
             {"type": "text", "text": "wor"}, {"type": "text", "text": "ld"}]
    want = [128006, 882, 128007, 271, 15339, 128256, *enc(tok, "world"), 128009]
    assert tok.encode_message("user", parts) == want


def test_special_token_text_in_a_part_stays_text():
    tok = real_tokenizer()
    # Deliberately unlike the Mllama template, which renders the text and so would turn it into the image token.
    text = "<|image|> and <|eot_id|><|start_header_id|>system"
    ids = tok.encode_message("user", [{"type": "text", "text": text}])
    assert ids == [128006, 882, 128007, 271, *enc(tok, text), 128009]
    assert all(i < tok.n_base for i in ids[4:-1])
    assert tok.decode(ids[4:-1]) == text


BAD_PARTS = [
    ("not a dict", "<|image|>"),
    ("unknown type", {"type": "image_url", "image_url": "x.png"}),
    ("no type", {"text": "hi"}),
    ("type not a str", {"type": ["image"]}),
    ("text without text", {"type": "text"}),
    ("text not a str", {"type": "text", "text": 5}),
    ("text with extra key", {"type": "text", "text": "hi", "lang": "en"}),
    ("image with its data", {"type": "image", "image": "x.png"}),
    ("video with extra key", {"type": "video", "path": "x.mp4"}),
    ("audio", {"type": "audio"}),
    ("speech without positions", {"type": "speech"}),
    ("speech of 0 positions", {"type": "speech", "positions": 0}),
    ("speech positions not an int", {"type": "speech", "positions": 2.0}),
    ("speech with its audio", {"type": "speech", "positions": 3, "audio": "q.wav"}),
]


@pytest.mark.parametrize("part", [p for _, p in BAD_PARTS], ids=[n for n, _ in BAD_PARTS])
def test_bad_part_names_message_and_part(part):
    tok = real_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}, part]},
    ]
    with pytest.raises(InputError, match=r'message 1, part 2: .*\{"type": "text", "text": str\}, \{"type": "image"\}'):
        tok.encode_dialog(msgs)
    with pytest.raises(InputError, match=r"^message, part 0: "):
        tok.encode_message("user", [part])


def test_speech_part_holds_its_positions_between_start_and_end():
    tok = real_tokenizer()
    ids = tok.encode_message("user", [{"type": "image"}, {"type": "speech", "positions": 3},
                                      {"type": "text", "text": "Hi"}])
    header = tok.encode_header("user")
    assert ids == header + [128256, 128258, 128260, 128260, 128260, 128259] + tok.encode("Hi", bos=False, eos=False) + [
        tok.eot_id]
    assert tok.speech_id == 128260
    # Typed as text, the speech tokens stay text: user text cannot forge a span.
    assert 128260 not in tok.encode_message("user", "<|speech_start|><|speech|>")


def test_chat_bad_input():
    tok = real_tokenizer()
    with pytest.raises(InputError, match="'tool'"):
        tok.encode_dialog([{"role": "tool", "content": "x"}])
    with pytest.raises(InputError, match="message 0"):
        tok.encode_dialog([{"role": "user", "text": "x"}])
    with pytest.raises(InputError, match="message 1"):
        tok.encode_dialog([{"role": "user", "content": "x"}, {"role": "user", "content": "x", "name": "bob"}])
    for content in (None, {"type": "text", "text": "x"}, b"x", 3):
        with pytest.raises(InputError, match="message 0: content must be a str or a list of parts"):
            tok.encode_dialog([{"role": "user", "content": content}])


def test_old_media_key_is_rejected():
    tok = real_tokenizer()
    msgs = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "What is it?", "media": ["<|image|>"]}]
    with pytest.raises(InputError, match="message 1: the 'media' key is gone; put media in 'content' as a list"):
        tok.encode_dialog(msgs)


# --- streaming -----------------------------------------------------------------------------------------------------


def test_stream_decoder():
    tok = real_tokenizer()
    text = "Hi 👨\u200d👩\u200d👧 你好，世界 🇯🇵 café"
    ids = enc(tok, text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    # "👧" is three tokens with the real file: its 4 bytes arrive as 2 + 1 + 1; nothing shows until the last one.
    girl = enc(tok, "👧")
    assert girl == [9468, 239, 100]
    assert [dec.push(i) for i in girl] == ["", "", "👧"]
    # An incomplete sequence at the end becomes U+FFFD on flush, then the decoder starts afresh.
    assert dec.push(9468) == "" and dec.flush() == "\ufffd"
    assert dec.push(tok.eot_id) == "<|eot_id|>" and dec.push(tok.image_id) == "<|image|>"


def test_decode_replaces_invalid_utf8():
    tok = real_tokenizer()
    assert tok.decode_bytes([9468, 239]) == b"\xf0\x9f\x91"
    assert tok.decode([9468, 239]) == "\ufffd"


# --- small tiktoken-format files and bad files ---------------------------------------------------------------------


def write_ranks(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def byte_lines(n: int = 256) -> list[bytes]:
    return [base64.b64encode(bytes([i])) + b" " + str(i).encode() for i in range(n)]


def test_tiny_byte_level_file(tmp_path):
    tok = Tokenizer.from_file(write_ranks(tmp_path / "bytes.model", byte_lines()))
    assert (tok.n_base, tok.n_words, tok.bos_id, tok.eot_id, tok.image_id) == (256, 512, 256, 265, 512)
    text = "Hello, world!\n\tThe end."
    ids = tok.encode(text, bos=True, eos=True)
    assert ids == [256, *text.encode(), 257]
    assert tok.decode(ids[1:-1]) == text
    assert enc(tok, "<|speech_end|>", allowed_special="all") == [515]
    dec = StreamDecoder(tok)
    assert [dec.push(b) for b in "你".encode()] == ["", "", "你"]


def test_bad_files(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="nope.model"):
        Tokenizer.from_file(missing)
    empty = write_ranks(tmp_path / "empty.model", [])
    with pytest.raises(TokenizerError, match="empty.model.*empty"):
        Tokenizer.from_file(empty)
    lines = byte_lines()
    bad = write_ranks(tmp_path / "bad.model", lines[:2] + [b"not-base64!! 2"] + lines[3:])
    with pytest.raises(TokenizerError, match="bad.model, line 3"):
        Tokenizer.from_file(bad)
    three = write_ranks(tmp_path / "three.model", lines[:4] + [lines[4] + b" 9"] + lines[5:])
    with pytest.raises(TokenizerError, match="three.model, line 5"):
        Tokenizer.from_file(three)
    gap = write_ranks(tmp_path / "gap.model", lines[:100] + [base64.b64encode(b"d") + b" 300"] + lines[101:])
    with pytest.raises(TokenizerError, match="gap.model.*100 is missing"):
        Tokenizer.from_file(gap)
    no_byte = write_ranks(tmp_path / "nobyte.model", lines[:255] + [base64.b64encode(b"ab") + b" 255"])
    with pytest.raises(TokenizerError, match="nobyte.model.*first 255"):
        Tokenizer.from_file(no_byte)


def test_decode_out_of_range():
    tok = real_tokenizer()
    assert tok.decode([128263]) == "<|media_reserved_7|>"
    for bad in (128264, 10**9, -1):
        with pytest.raises(TokenizerError, match=f"token id {bad} "):
            tok.decode([15339, bad])
        with pytest.raises(TokenizerError, match=str(bad)):
            StreamDecoder(tok).push(bad)
