"""Data tests: text batches (shapes, padding, truncation, chat dialogs), determinism and resume, bad samples, pack,
synth_text.

Every shard is written by the test itself (webdataset's ShardWriter or our `pack`), with a byte-level tokenizer.
"""

import itertools
import json
import logging
import re
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from mm_llama.data import (
    BadSample,
    SkipCounter,
    TextBatches,
    TextDataConfig,
    decode_text,
    expand_shards,
    pack,
    synth_text,
)
from mm_llama.data.world_tokenizer import world_ranks
from mm_llama.errors import ConfigError, DataError, InputError
from mm_llama.tokenizer import Tokenizer, load_ranks, write_ranks

BYTE_RANKS = {bytes([b]): b for b in range(256)}


@pytest.fixture
def tok_path(tmp_path) -> Path:
    path = tmp_path / "tokenizer.model"
    write_ranks(path, BYTE_RANKS)
    return path


def write_shards(folder: Path, shards: list[list], prefix: str = "text") -> list[Path]:
    """One tar per list; str items become `txt` samples, dicts are written as they are (keys numbered per shard)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, samples in enumerate(shards):
        path = folder / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i, sample in enumerate(samples):
                sample = {"txt": sample} if isinstance(sample, str) else sample
                sink.write({"__key__": f"{s:03d}{i:06d}", **sample})
        paths.append(path)
    return paths


def corpus(n_shards: int, per_shard: int) -> list[list[str]]:
    return [[f"doc {s}-{i}: " + "word " * ((s * 7 + i * 3) % 11) for i in range(per_shard)] for s in range(n_shards)]


def config(shards, tok_path, **overrides) -> TextDataConfig:
    values = dict(shards=str(shards), tokenizer=str(tok_path), seq_len=64, batch_size=4, shuffle_buffer=0,
                  resampled=False)
    return TextDataConfig(**{**values, **overrides})


def texts_of(batch: dict, tok: Tokenizer) -> list[str]:
    """Rows back to text: strip bos, eos and padding."""
    out = []
    for row, mask in zip(batch["tokens"], batch["mask"], strict=True):
        ids = row[mask].tolist()
        assert ids[0] == tok.bos_id
        out.append(tok.decode(ids[1:-1] if ids[-1] == tok.eos_id else ids[1:]))
    return out


def take(source: TextBatches, n: int, start: int = 0) -> list[dict]:
    return list(itertools.islice(source.batches(start), n))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["mask"], y["mask"])
        assert (x["skipped"], x["samples"]) == (y["skipped"], y["samples"])


# --- batches -------------------------------------------------------------------------------------------------------


def test_batches_shapes_padding_truncation(tmp_path, tok_path):
    texts = ["hi", "hello world", "x" * 30, "héllo wörld ✓", "a b", "the end"]
    write_shards(tmp_path / "d", [texts[:4], texts[4:]])
    source = TextBatches(config(tmp_path / "d", tok_path, seq_len=16, batch_size=4))
    tok = source.tokenizer
    assert (tok.n_words, tok.pad_id, tok.bos_id, tok.eos_id) == (512, 260, 256, 257)
    batches = list(source.batches())
    assert [b["samples"] for b in batches] == [4, 2] and [b["skipped"] for b in batches] == [0, 0]
    first, last = batches
    # Row lengths: bos + bytes + eos, cut at seq_len 16; L is the batch's longest row.
    assert first["tokens"].shape == (4, 16) and last["tokens"].shape == (2, 9)
    assert first["tokens"].dtype == torch.long and first["mask"].dtype == torch.bool
    assert first["mask"].sum(1).tolist() == [4, 13, 16, 16]
    assert first["tokens"][0].tolist() == [256, ord("h"), ord("i"), 257] + [260] * 12
    assert (first["tokens"][~first["mask"]] == 260).all()
    long_row = first["tokens"][2].tolist()  # truncated: no eos
    assert long_row == [256] + [ord("x")] * 15
    utf8 = "héllo wörld ✓".encode()
    assert first["tokens"][3].tolist() == [256, *utf8[:15]]
    assert texts_of(first, tok)[:2] == ["hi", "hello world"] and texts_of(last, tok) == ["a b", "the end"]


def test_pack_text_round_trip(tmp_path, tok_path):
    (tmp_path / "doc.txt").write_text("from a file ✓\nsecond line", encoding="utf-8")
    lines = [{"text": f"sample {i}"} for i in range(4)] + [{"txt": "doc.txt"}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    shards = pack("text", listing, tmp_path / "out", shard_size=2)
    assert [p.name for p in shards] == ["text-000000.tar", "text-000001.tar", "text-000002.tar"]
    source = TextBatches(config(f"{tmp_path}/out/text-{{000000..000002}}.tar", tok_path, batch_size=8))
    (batch,) = list(source.batches())
    assert texts_of(batch, source.tokenizer) == [f"sample {i}" for i in range(4)] + ["from a file ✓\nsecond line"]


def test_shard_specs(tmp_path):
    paths = write_shards(tmp_path / "d", corpus(3, 2))
    names = [str(p) for p in paths]
    assert expand_shards(str(tmp_path / "d")) == names
    assert expand_shards(f"{tmp_path}/d/text-{{000000..000002}}.tar") == names
    (tmp_path / "d" / "list.txt").write_text("# shards\ntext-000002.tar\n\ntext-000000.tar\n")
    assert expand_shards(str(tmp_path / "d" / "list.txt")) == [names[2], names[0]]
    with pytest.raises(DataError, match=r"text-000003.tar .*\(5 of 8 missing\)"):
        expand_shards(f"{tmp_path}/d/text-{{000000..000007}}.tar")
    with pytest.raises(DataError, match="no shards"):
        expand_shards(str(tmp_path))


def test_config_validation():
    with pytest.raises(ConfigError, match="seq_len"):
        TextDataConfig(shards="d", tokenizer="t", seq_len=1)
    with pytest.raises(ConfigError, match="max_skip_fraction"):
        TextDataConfig(shards="d", tokenizer="t", max_skip_fraction=1.5)
    with pytest.raises(ConfigError, match="resampled"):
        TextDataConfig(shards="d", tokenizer="t", resampled="yes")


# --- determinism and resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_deterministic_and_resumable(tmp_path, tok_path, num_workers):
    write_shards(tmp_path / "d", corpus(4, 25))
    cfg = config(tmp_path / "d", tok_path, batch_size=3, shuffle_buffer=10, resampled=True, seed=7,
                 num_workers=num_workers)
    fresh = take(TextBatches(cfg), 14)
    assert_same(fresh, take(TextBatches(cfg), 14))
    # start=5 → 15 samples skipped: with 2 workers, 15 is odd, so the round robin resumes at worker 1.
    for start in (1, 2, 5):
        assert_same(take(TextBatches(cfg), 14 - start, start=start), fresh[start:])
    texts = [t for b in fresh for t in texts_of(b, Tokenizer.from_file(tok_path))]
    assert len(set(texts)) > 20  # shuffled and resampled, not one document repeated
    other_seed = take(TextBatches(TextDataConfig(**{**cfg.__dict__, "seed": 8})), 14)
    assert not all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(fresh, other_seed, strict=True))


def test_fast_forward_skips_before_tokenizing(tmp_path, tok_path):
    write_shards(tmp_path / "d", corpus(2, 30))
    source = TextBatches(config(tmp_path / "d", tok_path, shuffle_buffer=8, resampled=True))
    calls = []
    prepare = source._source.samples.prepare
    source._source.samples.prepare = lambda text: calls.append(text) or prepare(text)
    resumed = list(itertools.islice(source.batches(start=50), 2))
    # 2 batches of 4, plus the one sample read ahead before a full batch is handed out; none of the 200 skipped.
    assert len(calls) == 9
    source._source.samples.prepare = prepare
    assert_same(resumed, take(source, 52)[50:])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_different_data(tmp_path, tok_path, num_workers):
    write_shards(tmp_path / "d", corpus(4, 10))
    finite = config(tmp_path / "d", tok_path, num_workers=num_workers)
    tok = Tokenizer.from_file(tok_path)
    seen = [[t for b in TextBatches(finite, rank=r, world_size=2).batches() for t in texts_of(b, tok)] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 20 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(t for shard in corpus(4, 10) for t in shard)
    with pytest.raises(DataError, match="4 shard.* cannot feed 8 ranks"):
        TextBatches(finite, rank=0, world_size=8)
    endless = config(tmp_path / "d", tok_path, resampled=True, shuffle_buffer=5, num_workers=num_workers)
    r0, r1 = (take(TextBatches(endless, rank=r, world_size=2), 5) for r in (0, 1))
    assert not set(t for b in r0 for t in texts_of(b, tok)) & set(t for b in r1 for t in texts_of(b, tok))


def test_finite_resume_with_workers(tmp_path, tok_path):
    # Shards of different sizes: a worker runs dry first, so the fast-forward happens in the main process.
    shards = corpus(3, 9)
    shards[1] = shards[1][:2]
    write_shards(tmp_path / "d", shards)
    cfg = config(tmp_path / "d", tok_path, batch_size=2, shuffle_buffer=4, num_workers=2)
    fresh = list(TextBatches(cfg).batches())
    assert sum(b["samples"] for b in fresh) == 20
    for start in (3, 7):
        assert_same(list(TextBatches(cfg).batches(start)), fresh[start:])


# --- bad samples ---------------------------------------------------------------------------------------------------


def corrupt_header(path: Path, member: str) -> None:
    """Flip a bit of the name in `member`'s own header (the block before its data; `offset` would point at the pax
    header webdataset's writer puts first): the checksum no longer matches and the member is lost."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data - 512
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def truncate_inside(path: Path, member: str) -> None:
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, tok_path, num_workers, caplog):
    good = corpus(3, 20)
    shards = [list(good[0]), list(good[1]), [*good[2], "the last one is long " * 40]]
    shards[1].insert(12, {"json": b"{}"})  # no txt member
    shards[1].insert(5, {"txt": b"\xff\xfe not utf-8"})
    paths = write_shards(tmp_path / "d", shards)
    corrupt_header(paths[0], "000000003.txt")
    truncate_inside(paths[2], "002000020.txt")
    cfg = config(tmp_path / "d", tok_path, batch_size=5, max_skip_fraction=0.25, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="mm_llama.data"):
        batches = list(TextBatches(cfg).batches())
    assert sum(b["skipped"] for b in batches) == 4
    arrived = [t for b in batches for t in texts_of(b, Tokenizer.from_file(tok_path))]
    expected = [t for i, t in enumerate(good[0]) if i != 3] + good[1] + good[2]
    assert sorted(arrived) == sorted(expected)
    if num_workers == 0:  # workers log in their own processes
        assert "text-000000.tar" in caplog.text and "corrupt tar header" in caplog.text
        assert len(caplog.records) == 1  # rate-limited: one warning per 5 s


@pytest.mark.parametrize(("num_workers", "resampled", "shuffle_buffer"),
                         [(0, False, 0), (2, False, 0), (2, True, 0), (0, True, 5), (2, True, 5)])
def test_too_many_bad_samples_raise(tmp_path, tok_path, num_workers, resampled, shuffle_buffer):
    samples = [f"good {i}" for i in range(10)]
    samples[2:2] = [{"txt": b"\xff bad"}] * 2
    write_shards(tmp_path / "d", [samples], prefix="broken")
    cfg = config(tmp_path / "d", tok_path, num_workers=num_workers, resampled=resampled,
                 shuffle_buffer=shuffle_buffer)
    with pytest.raises(DataError) as info:
        list(itertools.islice(TextBatches(cfg).batches(), 50))
    message = str(info.value)
    assert message.startswith("too many bad samples: 2 of 4 read") and "Traceback" not in message
    assert "broken-000000.tar" in message and "not UTF-8" in message


def one_damaged_shard(folder: Path) -> Path:
    """Two shards of 200 samples; in the second a corrupt header loses sample 10 (one damaged region)."""
    paths = write_shards(folder, [[f"doc {s}-{i}" for i in range(200)] for s in range(2)])
    corrupt_header(paths[1], "001000010.txt")
    return folder


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_damage_is_counted_at_every_read(tmp_path, tok_path, num_workers):
    folder = one_damaged_shard(tmp_path / "d")
    cfg = config(folder, tok_path, batch_size=5, resampled=True, num_workers=num_workers, max_skip_fraction=0.01)
    tok = Tokenizer.from_file(tok_path)
    plain = take(TextBatches(cfg), 240)
    texts = [t for b in plain for t in texts_of(b, tok)]
    # Without a shuffle buffer a skip arrives with the sample read next: the one after the damage, in the same shard.
    passes = texts.count("doc 1-11")
    assert passes >= 2 and "doc 1-10" not in texts  # the damaged shard was drawn again and again
    assert sum(b["skipped"] for b in plain) == passes
    # The demo configs' case: a shuffle buffer larger than a shard reads the damage several times before the first
    # batch; each read counts, as a fraction of all that was read (buffer included), and the run goes on.
    shuffled = TextDataConfig(**{**cfg.__dict__, "shuffle_buffer": 500})
    fresh = take(TextBatches(shuffled), 240)
    skipped = sum(b["skipped"] for b in fresh)
    # The same shard draws as without the buffer, read up to one buffer (per worker) further ahead.
    ahead = take(TextBatches(cfg), 240 + 2 * 500 // 5)
    assert passes <= skipped <= sum(t == "doc 1-11" for b in ahead for t in texts_of(b, tok))
    assert sum(b["skipped"] for b in fresh[:1]) >= 2  # what used to stop the run: "2 of 2 read were skipped"
    assert_same(take(TextBatches(shuffled), 240 - 37, start=37), fresh[37:])


def test_skip_fraction_counts_what_was_read(tmp_path, tok_path):
    # Two workers, one shard each, 2 % bad: each worker is within its own limit (the other's samples count too), but
    # together they are over 1 %, so the main process raises, with the samples really read: the shuffle buffers' too.
    sb, bad_at = 10, {49, 99, 149, 199, 249, 299}
    shard = [{"txt": b"\xff bad"} if i in bad_at else f"good {i}" for i in range(300)]
    write_shards(tmp_path / "d", [shard, shard], prefix="broken")
    cfg = config(tmp_path / "d", tok_path, num_workers=2, shuffle_buffer=sb, max_skip_fraction=0.01)
    with pytest.raises(DataError) as info:
        list(TextBatches(cfg).batches())
    flags = [i in bad_at for i in range(300)]
    goods = [i for i, bad in enumerate(flags) if not bad]

    def read_by(item: int) -> tuple[int, int]:
        """(read, skipped) of one worker as it hands out its `item`-th sample: its buffer holds sb more good ones."""
        last = goods[sb + item - 1] if item >= 0 else -1
        return last + 1, sum(flags[: last + 1])

    # The main process takes the workers' items in turn, worker 0's i-th then worker 1's i-th (both read alike),
    # and allows max(0.01 x read, 1 per worker).
    held = [(a[0] + b[0], a[1] + b[1]) for i in range(100)
            for a, b in ((read_by(i), read_by(i - 1)), (read_by(i), read_by(i)))]
    read, skipped = next(c for c in held if c[1] > max(0.01 * c[0], 2))
    assert str(info.value).startswith(f"too many bad samples: {skipped} of {read} read were skipped "
                                      f"({skipped / read:.2%}); max_skip_fraction=0.01 tolerates at most "
                                      "max(0.01 x samples read, 2)")


def test_skip_limit_rule():
    counter = SkipCounter(0.01, warn_every=None)
    counter.bad("s.tar", "x")  # the first bad sample is tolerated
    for _ in range(197):
        counter.good()
    with pytest.raises(DataError, match=r"2 of 199 read .*s\.tar"):
        counter.bad("s.tar", "x")  # a second within the first 200 is not
    counter = SkipCounter(0.01, warn_every=None)
    counter.bad("s.tar", "x")
    for _ in range(198):
        counter.good()
    counter.bad("s.tar", "x")  # 2 of 200: exactly 1 %
    for _ in range(99):
        counter.good()
    counter.bad("s.tar", "x")  # 3 of 300
    with pytest.raises(DataError, match="4 of 301"):
        counter.bad("s.tar", "x")
    strict = SkipCounter(0.0, warn_every=None)
    with pytest.raises(DataError):
        strict.bad("s.tar", "x")
    workers = SkipCounter(0.01, streams=2, warn_every=None)  # the main process over 2 workers' reports
    workers.add(11, 1, "s.tar", "x")
    workers.add(11, 1, "s.tar", "x")  # one per worker is tolerated
    with pytest.raises(DataError, match=r"3 of 122 read .* max\(0.01 x samples read, 2\)"):
        workers.add(100, 1, "s.tar", "x")


# --- pack ----------------------------------------------------------------------------------------------------------


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_pack_media_kinds(tmp_path):
    for name in ("a.png", "b.JPG", "c.mp4", "d.flac", "e.wav"):
        (tmp_path / name).write_bytes(name.encode() * 3)
    listing = tmp_path / "images.jsonl"
    listing.write_text(json.dumps({"image": "a.png", "text": "a red circle"}) + "\n"
                       + json.dumps({"image": "b.JPG", "question": "What colour?", "answer": "Red."}) + "\n")
    (shard,) = pack("image", listing, tmp_path / "img", prefix="shapes")
    assert shard.name == "shapes-000000.tar"
    assert members(shard) == [
        ("000000000.png", b"a.png" * 3), ("000000000.txt", b"a red circle"),
        ("000000001.jpg", b"b.JPG" * 3), ("000000001.json", b'{"question": "What colour?", "answer": "Red."}'),
    ]
    listing.write_text(json.dumps({"video": "c.mp4", "question": "Which way?", "answer": "Left."}) + "\n")
    (shard,) = pack("video", listing, tmp_path / "vid")
    assert [n for n, _ in members(shard)] == ["000000000.json", "000000000.mp4"]
    listing.write_text(json.dumps({"audio": "d.flac", "text": "hello"}) + "\n"
                       + json.dumps({"audio": "e.wav", "text": "hola", "task": "asr", "language": "Spanish"}) + "\n")
    (shard,) = pack("speech", listing, tmp_path / "speech")
    assert dict(members(shard))["000000001.json"] == b'{"task": "asr", "language": "Spanish"}'
    assert [n for n, _ in members(shard)] == ["000000000.flac", "000000000.txt", "000000001.json",
                                              "000000001.txt", "000000001.wav"]


@pytest.mark.parametrize(("kind", "bad_line", "message"), [
    ("text", '{"text": "unfinished', "line 3: not valid JSON"),
    ("text", '{"txt": "missing.txt"}', "line 3: 'txt' file .*missing.txt does not exist"),
    ("image", '{"text": "no image"}', "line 3: missing key 'image'"),
    ("image", '{"image": "a.gif", "text": "x"}', "line 3: 'image' must be a .jpg/.jpeg/.png file"),
    ("speech", '{"audio": "a.wav", "text": "x", "speaker": 3}', r"line 3: unknown key\(s\) \['speaker'\]"),
])  # fmt: skip
def test_pack_rejects_bad_lines(tmp_path, kind, bad_line, message):
    for name in ("a.png", "a.wav", "a.gif"):
        (tmp_path / name).write_bytes(b"data")
    good = {"text": {"text": "fine"}, "image": {"image": "a.png", "text": "x"},
            "speech": {"audio": "a.wav", "text": "x"}}
    listing = tmp_path / "list.jsonl"
    listing.write_text(f"{json.dumps(good[kind])}\n\n{bad_line}\n{json.dumps(good[kind])}\n")
    with pytest.raises(InputError, match=message) as info:
        pack(kind, listing, tmp_path / "out")
    assert str(listing) in str(info.value) and "accepted lines" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_pack_refuses_old_shards(tmp_path):
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"text": "one"}\n')
    pack("text", listing, tmp_path / "out")
    with pytest.raises(InputError, match="already holds shards"):
        pack("text", listing, tmp_path / "out")


# --- synth_text ----------------------------------------------------------------------------------------------------

SENTENCES = re.compile(r"[A-Z][A-Za-z ,:]+[.?!](?: [A-Z][A-Za-z ,:]+[.?!])*")  # capitalised, ASCII, punctuated


def shard_samples(paths: list[Path]) -> list[tuple[str, str]]:
    """(member extension, text) per sample."""
    return [(name.rsplit(".", 1)[1], data.decode("ascii")) for p in paths for name, data in members(p)]


def test_synth_text(tmp_path, tok_path):
    paths = synth_text(tmp_path / "a", 60, seed=3, shard_size=16)
    assert [p.name for p in paths] == [f"text-{i:06d}.tar" for i in range(4)]
    samples = shard_samples(paths)
    assert len(samples) == 60 and len(set(samples)) == 60
    texts = [t for ext, t in samples if ext == "txt"]
    dialogs = [json.loads(t)["messages"] for ext, t in samples if ext == "json"]
    assert len(texts) + len(dialogs) == 60 and len(texts) >= 10 and len(dialogs) >= 20  # a third are descriptions
    lines = [line for t in texts for line in t.split("\n")]
    turns = [m["content"] for messages in dialogs for m in messages if m["role"] != "system"]
    assert all(SENTENCES.fullmatch(x) for x in lines + turns), [x for x in lines + turns if not SENTENCES.fullmatch(x)]
    assert any(re.search(r" is (left|right) of | is (above|below) ", line) for line in lines)
    repeats = [m for m in dialogs if m[0]["role"] == "system"]
    assert 3 <= len(repeats) <= 18  # a seventh of 60 are the typed recognition task
    for messages in repeats:  # the speech stage's asr prompt, and the sentence said back word for word
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == "Repeat after me in English:"
        assert messages[1]["content"] == messages[2]["content"]
    for messages in dialogs:
        if messages[0]["role"] == "system":
            continue
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert messages[0]["content"].endswith(("?", ".")) and all(m["content"].strip() for m in messages)
    again = synth_text(tmp_path / "b", 60, seed=3, shard_size=16)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # byte-identical shards
    assert shard_samples(synth_text(tmp_path / "c", 60, seed=4, shard_size=16)) != samples
    tok = Tokenizer.from_file(tmp_path / "a" / "tokenizer.model")
    assert tok.n_words == 768 and load_ranks(tmp_path / "a" / "tokenizer.model") == world_ranks()
    cfg = config(tmp_path / "a", tmp_path / "a" / "tokenizer.model", batch_size=60, seq_len=1024)
    (batch,) = take(TextBatches(cfg), 1)
    assert batch["skipped"] == 0
    rows = sorted(tuple(row[mask].tolist()) for row, mask in zip(batch["tokens"], batch["mask"], strict=True))
    expected = [tok.encode(t, bos=True, eos=True) for t in texts]
    expected += [tok.encode_dialog(m, add_generation_prompt=False) for m in dialogs]
    assert rows == sorted(tuple(x) for x in expected)  # txt as [bos] text [eos], json in the chat format


@pytest.mark.parametrize(("sample", "message"), [
    ({"json": b"[1, 2]"}, "'json' must be an object with a non-empty list 'messages'"),
    ({"json": b'{"messages": []}'}, "'json' must be an object with a non-empty list 'messages'"),
    ({"json": b'{"messages": [{"role": "robot", "content": "hi"}]}'}, "message 0 must be .*got {'role': 'robot'"),
    ({"json": b'{"messages": [{"role": "user", "content": 3}]}'}, "message 0 must be"),
    ({"json": b'{"messages": [{"role": "user", "content": "x", "name": "y"}]}'}, "message 0 must be"),
    ({"json": b'{"messages": '}, "'json' is not UTF-8 JSON"),
    ({"json": b'{"messages": [{"role": "user", "content": "x"}]}', "txt": b"x"}, "has both 'txt' and 'json'"),
    ({"png": b"x"}, r"has neither 'txt' nor 'json' \(it has \['png'\]\)"),
])  # fmt: skip
def test_bad_dialog_samples(sample, message):
    with pytest.raises(BadSample, match=message) as info:
        decode_text({"__key__": "k1", "__url__": "u", **sample})
    assert "sample k1" in str(info.value)
    good = {"__key__": "k2", "json": b'{"messages": [{"role": "user", "content": "Hi!"}]}'}
    assert decode_text(good) == [{"role": "user", "content": "Hi!"}]


def test_write_ranks_round_trip(tmp_path):
    ranks = {**BYTE_RANKS, b"ab": 256, b"\xff\xfe": 257}
    write_ranks(tmp_path / "t.model", ranks)
    assert load_ranks(tmp_path / "t.model") == ranks
    assert Tokenizer.byte_level().encode("hé", bos=False, eos=False) == list("hé".encode())
