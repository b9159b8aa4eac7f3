"""Llama 3 tokenizer: tiktoken BPE over Meta's `tokenizer.model`, special and media tokens, and the chat format.

Id layout (the real file has n_base = 128000):
    [0, n_base)                 BPE ranks read from the file
    [n_base, n_words)           256 special tokens, Llama 3.1 naming; n_words = n_base + 256 is the frozen vocabulary
    [n_words, n_words + 8)      media tokens; their embeddings live in a small trainable table, as Llama 3.2 Vision's
                                `learnable_embedding` does, so `<|image|>` = n_words (128256, what HF Mllama uses)
"""

from __future__ import annotations

import base64
import binascii
import codecs
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import tiktoken

from mm_llama.errors import InputError, TokenizerError

__all__ = [
    "MEDIA_PARTS", "MEDIA_TOKENS", "N_MEDIA_TOKENS", "SPECIAL_TOKENS", "StreamDecoder", "Tokenizer", "load_ranks",
    "write_ranks",
]

# Meta's Llama 3 pre-tokenizer regex (llama3 `tokenizer.py`); ids only match Meta's with exactly this pattern.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta cuts input into 400K-char chunks and cuts whitespace/non-whitespace runs every 25K chars, because older tiktoken
# panicked or went quadratic there (tiktoken issue 195). 0.14 copes, but BPE cannot merge across a cut, so we cut at
# the same places to produce Meta's ids.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

N_SPECIAL_TOKENS = 256
N_MEDIA_TOKENS = 8  # rows of Llama 3.2 Vision's learnable_embedding
_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]  # fmt: skip
SPECIAL_TOKENS = _NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + N_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
]
# `<|speech|>` holds the place of one spliced speech embedding (its row is never read: the splice replaces it).
MEDIA_TOKENS = ["<|image|>", "<|video|>", "<|speech_start|>", "<|speech_end|>", "<|speech|>"] + [
    f"<|media_reserved_{i}|>" for i in range(5, N_MEDIA_TOKENS)
]
ROLES = ("system", "user", "assistant", "ipython")
# Content part type → its token (transformers' Mllama chat template / the OpenAI chat format, plus video).
MEDIA_PARTS = {"image": "<|image|>", "video": "<|video|>"}
_PARTS_ACCEPTED = ('{"type": "text", "text": str}, {"type": "image"}, {"type": "video"}, '
                   '{"type": "speech", "positions": int >= 1}')
_BYTE_RANKS = {bytes([b]): b for b in range(256)}


# Where a checkpoint directory keeps its tokenizer.model: HF repositories put Meta's original files under original/.
TOKENIZER_PLACES = ("tokenizer.model", "original/tokenizer.model")


def find_tokenizer(checkpoint: str | Path) -> Path | None:
    """The tokenizer.model a checkpoint directory ships (see `TOKENIZER_PLACES`), or None."""
    return next((Path(checkpoint) / place for place in TOKENIZER_PLACES if (Path(checkpoint) / place).is_file()),
                None)


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file (one `<base64 token> <rank>` per line, Meta's `tokenizer.model` format).

    Args:
        path: the file.
    Returns:
        token bytes → rank. Raises `TokenizerError` naming the file (and line) when it is missing or malformed.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()  # ValueError unless exactly two fields
            token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
        except (ValueError, binascii.Error):
            token = b""
        if not token or token in ranks:
            raise TokenizerError(f"{path}, line {lineno}: expected '<base64 token> <rank>', a new token: {line[:60]!r}")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"tokenizer file {path} is empty: expected lines of '<base64 token> <rank>'")
    _check_ranks(ranks, str(path))
    return ranks


def write_ranks(path: str | Path, ranks: Mapping[bytes, int]) -> None:
    """Write a tiktoken ranks file that `load_ranks` reads back unchanged (the inverse of `load_ranks`).

    Args:
        path: the file to write (replaced if it exists).
        ranks: token bytes → rank, ranks 0..n-1 covering every single byte.
    Returns:
        None. Raises `TokenizerError` if the ranks are not a valid table.
    """
    _check_ranks(ranks, str(path))
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    Path(path).write_text("".join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in by_rank), encoding="ascii")


def _check_ranks(ranks: Mapping[bytes, int], source: str) -> None:
    """Ranks must be exactly 0..n-1 (special ids follow them) and cover every byte (else tiktoken panics)."""
    seen = set(ranks.values())
    if len(seen) != len(ranks) or seen != set(range(len(ranks))):
        gap = next(i for i in range(len(ranks) + 1) if i not in seen)
        raise TokenizerError(f"{source}: ranks must be 0..{len(ranks) - 1} without gaps or repeats; {gap} is missing")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{source}: every single byte needs a rank; {len(missing)} lack one (first {missing[0]})")


def _split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> list[str]:
    """Cut `text` every `max_run` characters inside any whitespace or non-whitespace run longer than that.

    Same cuts as Meta's `_split_whitespaces_or_nonwhitespaces` (runs by `str.isspace`, which `\\s` matches), found
    with a regex instead of a Python loop per character. The lookbehinds anchor matches at run starts (linear time).
    """
    long_run = rf"(?<!\S)\S{{{max_run + 1},}}|(?<!\s)\s{{{max_run + 1},}}"
    cuts = [c for m in re.finditer(long_run, text) for c in range(m.start() + max_run, m.end(), max_run)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


class Tokenizer:
    """Llama 3 tokenizer with media tokens above the frozen vocabulary and Meta's chat format.

    Args:
        ranks: BPE token bytes → rank, ranks 0..n_base-1 (see `load_ranks`).
        name: what errors call this tokenizer (the file name for `from_file`).
    """

    def __init__(self, ranks: Mapping[bytes, int], name: str = "tokenizer"):
        _check_ranks(ranks, name)
        self.name = name
        self.n_base = len(ranks)
        self.n_words = self.n_base + N_SPECIAL_TOKENS
        self.vocab_size_with_media = self.n_words + N_MEDIA_TOKENS
        self.special_tokens = {tok: self.n_base + i for i, tok in enumerate(SPECIAL_TOKENS + MEDIA_TOKENS)}
        self.model = tiktoken.Encoding(
            name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=dict(ranks), special_tokens=self.special_tokens
        )
        st = self.special_tokens
        self.bos_id, self.eos_id = st["<|begin_of_text|>"], st["<|end_of_text|>"]
        self.eot_id, self.eom_id = st["<|eot_id|>"], st["<|eom_id|>"]
        self.pad_id, self.python_tag_id = st["<|finetune_right_pad_id|>"], st["<|python_tag|>"]
        self.start_header_id, self.end_header_id = st["<|start_header_id|>"], st["<|end_header_id|>"]
        self.image_id, self.video_id = st["<|image|>"], st["<|video|>"]
        self.speech_start_id, self.speech_end_id = st["<|speech_start|>"], st["<|speech_end|>"]
        self.speech_id = st["<|speech|>"]
        self.stop_tokens = frozenset({self.eos_id, self.eom_id, self.eot_id})

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tiktoken-format ranks file, e.g. Meta's Llama 3 `tokenizer.model`.

        Args:
            path: the ranks file.
        Returns:
            the tokenizer; `TokenizerError` naming the file if it is missing or malformed.
        """
        return cls(load_ranks(path), name=str(path))

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A tokenizer with one rank per byte and no merges: 256 ranks, n_words 512.

        Returns:
            the tokenizer; `write_ranks(path, {bytes([b]): b for b in range(256)})` stores the same table.
        """
        return cls(_BYTE_RANKS, name="byte-level")

    def encode(
        self, text: str, *, bos: bool, eos: bool, allowed_special: Literal["none", "all"] | AbstractSet[str] = "none"
    ) -> list[int]:
        """Encode text to ids, optionally wrapped in `<|begin_of_text|>` / `<|end_of_text|>`.

        Args:
            text: the text.
            bos, eos: prepend `bos_id` / append `eos_id`.
            allowed_special: special-token names that become their ids when they appear in `text` ("all" for every
                one, media tokens included); any other special-token text is encoded as plain text (as Meta's
                `disallowed_special=()` does), never an error.
        Returns:
            the ids.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"{self.name}: encode takes a str, got {type(text).__name__}")
        allowed = set() if allowed_special == "none" else allowed_special
        if allowed != "all" and not (isinstance(allowed, AbstractSet) and allowed <= self.special_tokens.keys()):
            raise TokenizerError(f"allowed_special must be 'none', 'all' or a set of special token names: {allowed!r}")
        ids = [self.bos_id] if bos else []
        # Chunk first, then cut long runs inside each chunk: Meta's order, which fixes where BPE merges may not cross.
        for start in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[start : start + MAX_ENCODE_CHARS]):
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size_with_media:
                raise TokenizerError(f"{self.name}: token id {i} is outside [0, {self.vocab_size_with_media})")
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special or media token gives its name); `StreamDecoder` builds on it."""
        return self.model.decode_single_token_bytes(self._checked([token_id])[0])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of `ids`, which need not be valid UTF-8."""
        return self.model.decode_bytes(self._checked(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text.

        Args:
            ids: token ids in [0, vocab_size_with_media); special and media ids decode to their names.
        Returns:
            the text; invalid UTF-8 becomes U+FFFD, as in Meta's reference. An id out of range raises `TokenizerError`.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # Chat format: Meta's `chat_format.py` encodes header, "\n\n" and content separately, so BPE never merges across.
    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids.

        Args:
            role: one of "system", "user", "assistant", "ipython".
        Returns:
            the ids; `InputError` for another role.
        """
        if role not in ROLES:
            raise InputError(f"unknown chat role {role!r}; accepted: {', '.join(ROLES)}")
        role_ids, sep_ids = self.encode(role, bos=False, eos=False), self.encode("\n\n", bos=False, eos=False)
        return [self.start_header_id, *role_ids, self.end_header_id, *sep_ids]

    def encode_message(self, role: str, content: str | Sequence[Mapping]) -> list[int]:
        """One chat message: header, content, `<|eot_id|>`.

        Args:
            role: one of "system", "user", "assistant", "ipython".
            content: a str, stripped of leading/trailing whitespace (Meta's llama3 chat format); or a list of parts
                (transformers' Mllama chat template, the OpenAI chat format) that puts media anywhere in the message:
                `{"type": "text", "text": str}`, `{"type": "image"}` → `<|image|>`, `{"type": "video"}` → `<|video|>`,
                `{"type": "speech", "positions": P}` → `<|speech_start|>`, P × `<|speech|>`, `<|speech_end|>` (an
                utterance of P spliced embeddings, `MMLlama.speech_positions`).
                Text parts are not stripped, and adjacent ones are joined before encoding, as the template renders
                them. Special-token text inside a text part (a typed "<|image|>" or "<|eot_id|>") stays plain text,
                unlike the Mllama template, which would turn it into the token: user text must not be able to forge
                media or turn boundaries (prompt injection).
        Returns:
            the ids; `InputError` for a bad role or content.
        """
        return self._encode_message(role, content, "message")

    def _encode_message(self, role: str, content: str | Sequence[Mapping], where: str) -> list[int]:
        header = self.encode_header(role)
        if isinstance(content, str):
            return header + self.encode(content.strip(), bos=False, eos=False) + [self.eot_id]
        if not isinstance(content, (list, tuple)):
            raise InputError(f"{where}: content must be a str or a list of parts ({_PARTS_ACCEPTED}); "
                             f"got {type(content).__name__}")
        ids, text = [], []  # text: the run of adjacent text parts, encoded as one string
        for j, part in enumerate(content):
            kind = _part_kind(part, f"{where}, part {j}")
            if kind == "text":
                text.append(part["text"])
                continue
            ids += self.encode("".join(text), bos=False, eos=False) + self._media_ids(kind, part)
            text = []
        return header + ids + self.encode("".join(text), bos=False, eos=False) + [self.eot_id]

    def _media_ids(self, kind: str, part: Mapping) -> list[int]:
        """A checked media part's ids: its token, or for speech `<|speech_start|>`, one `<|speech|>` per position
        (the model splices the utterance's embeddings there) and `<|speech_end|>`."""
        if kind == "speech":
            return [self.speech_start_id] + [self.speech_id] * part["positions"] + [self.speech_end_id]
        return [self.special_tokens[MEDIA_PARTS[kind]]]

    def encode_dialog(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> list[int]:
        """A whole dialog: `<|begin_of_text|>`, each message, then the assistant header to be completed.

        No system message is added unless one is given (the Mllama template adds a dated one to text-only dialogs).

        Args:
            messages: dicts with "role" and "content", a str or a list of parts (see `encode_message`), e.g.
                `{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}`.
            add_generation_prompt: append the assistant header for the model to continue.
        Returns:
            the ids.
        """
        ids = [self.bos_id]
        for n, msg in enumerate(messages):
            if isinstance(msg, Mapping) and "media" in msg:
                raise InputError(f"message {n}: the 'media' key is gone; put media in 'content' as a list of parts, "
                                 "e.g. [{'type': 'image'}, {'type': 'text', 'text': '...'}]")
            if not isinstance(msg, Mapping) or msg.keys() != {"role", "content"}:
                raise InputError(f"message {n} must be a dict with exactly 'role' and 'content'; got {msg!r}")
            ids += self._encode_message(msg["role"], msg["content"], f"message {n}")
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids


def _part_kind(part: object, where: str) -> str:
    """The type of one content part, after checking its shape; `InputError` naming `where` otherwise."""
    kind = part.get("type") if isinstance(part, Mapping) else None
    kind = kind if isinstance(kind, str) else None
    if kind == "text":
        ok = part.keys() == {"type", "text"} and isinstance(part["text"], str)
    elif kind == "speech":  # the utterance's embeddings: `MMLlama.speech_positions` says how many
        n = part.get("positions")
        ok = part.keys() == {"type", "positions"} and isinstance(n, int) and not isinstance(n, bool) and n >= 1
    else:
        ok = kind in MEDIA_PARTS and part.keys() == {"type"}
    if not ok:
        raise InputError(f"{where}: expected one of {_PARTS_ACCEPTED}; got {part!r:.200}")
    return kind


class StreamDecoder:
    """Turns ids into text one at a time, holding back a UTF-8 sequence split across tokens until it is complete.

    Args:
        tokenizer: the tokenizer whose ids are pushed.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # The stdlib incremental decoder keeps an incomplete trailing sequence and replaces invalid bytes exactly as a
        # one-shot `bytes.decode(errors="replace")` of the whole stream would.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id.

        Args:
            token_id: the id.
        Returns:
            the text it completes ("" while a multi-byte character is still incomplete).
        """
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End the stream.

        Returns:
            whatever was held back (U+FFFD for an incomplete sequence); the decoder is then ready for a new stream.
        """
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
