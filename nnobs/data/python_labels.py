"""Exact per-character labels of Python source, and where each model token starts in it.

The standard ``tokenize`` module labels every character of a Python file exactly, so these
properties need no annotation:

- ``token_type``: the lexical class of the token the character is in: name, keyword
  (``keyword.iskeyword``; soft keywords such as ``match`` count as names), op, number,
  string, comment, or whitespace (spaces, newlines, indentation, line continuations).
- ``bracket_depth``: how many ``( [ {`` enclose the character, capped at ``BRACKET_CAP``
  (the last class means "that many or more"). A bracket itself is at the depth outside it,
  so ``f(a)`` is 0 0 1 0.
- ``in_string``: inside a string literal, from its prefix and opening quote to its closing
  quote. An f-string counts whole, replacement fields included: Python 3.12+ tokenizes the
  fields into names and operators, and they are folded back into the string so labels are the
  same on every version (string type, and their brackets do not count towards depth).
- ``indent_level``: the block depth from INDENT/DEDENT, capped at ``INDENT_CAP``. A dedent
  takes effect at the start of its line, so a line's leading whitespace has that line's level;
  comment and blank lines keep the level of the block they sit in.

A model token gets the labels of its first character (byte-level tokens that start inside a
multi-byte character get that character's). Files that ``tokenize`` rejects (or that contain
error tokens, such as an unterminated string on Python 3.11) raise
:class:`UntokenizableSource`, since their labels would not be exact.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from collections.abc import Sequence

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.data.tokenizer import Tokenizer

TOKEN_TYPES = ("whitespace", "name", "keyword", "op", "number", "string", "comment")
BRACKET_CAP = 3
INDENT_CAP = 4
ATTRIBUTES = ("token_type", "bracket_depth", "in_string", "indent_level")
# Class names per attribute, index = label code.
CLASSES: dict[str, tuple[str, ...]] = {
    "token_type": TOKEN_TYPES,
    "bracket_depth": (*map(str, range(BRACKET_CAP)), f"{BRACKET_CAP}+"),
    "in_string": ("no", "yes"),
    "indent_level": (*map(str, range(INDENT_CAP)), f"{INDENT_CAP}+"),
}
_TYPE = {name: code for code, name in enumerate(TOKEN_TYPES)}
_SIMPLE = {tokenize.NUMBER: "number", tokenize.STRING: "string", tokenize.COMMENT: "comment"}
_OPENERS, _CLOSERS = "([{", ")]}"
# Python 3.12 splits f-strings (3.14 also t-strings) into START ... END tokens.
_STRING_START = {getattr(tokenize, f"{k}STRING_START", None) for k in "FT"} - {None}
_STRING_END = {getattr(tokenize, f"{k}STRING_END", None) for k in "FT"} - {None}
# A character split over tokens is rejoined over at most this many (UTF-8 has up to 4 bytes).
_MAX_GROUP = 8


class UntokenizableSource(NnobsError):
    """The text is not Python that ``tokenize`` reads exactly."""


class UnalignedTokens(NnobsError):
    """The tokenizer's pieces do not concatenate to the text, so tokens have no char spans."""


class _Labeller:
    """Fills the per-character label arrays front to back as tokens arrive."""

    def __init__(self, n: int) -> None:
        self.arrays = {
            "token_type": np.zeros(n, np.int8),
            "bracket_depth": np.zeros(n, np.int8),
            "in_string": np.zeros(n, np.int8),
            "indent_level": np.zeros(n, np.int8),
        }
        self.pos = self.depth = self.level = 0

    def fill(self, upto: int, kind: str = "whitespace", string: bool = False) -> None:
        if upto <= self.pos:
            return
        span = slice(self.pos, upto)
        self.arrays["token_type"][span] = _TYPE[kind]
        self.arrays["bracket_depth"][span] = min(self.depth, BRACKET_CAP)
        self.arrays["in_string"][span] = string
        self.arrays["indent_level"][span] = min(self.level, INDENT_CAP)
        self.pos = upto


def python_char_labels(source: str) -> dict[str, np.ndarray]:
    """Exact labels for every character of ``source``: attribute -> ``(len(source),)`` int8.

    Codes index :data:`CLASSES`. Raises :class:`UntokenizableSource` when ``tokenize`` fails.
    """
    n = len(source)
    line_starts = [0, *(m.end() for m in re.finditer("\n", source))]

    def offset(row: int, col: int) -> int:
        return min(line_starts[row - 1] + col, n) if row <= len(line_starts) else n

    out = _Labeller(n)
    nested = 0  # open f-strings (3.12+), whose inner tokens are folded into the string
    fstring_start = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            start, end = offset(*tok.start), offset(*tok.end)
            if tok.type == tokenize.ERRORTOKEN:
                raise UntokenizableSource(
                    f"error token {tok.string!r} at line {tok.start[0]}: not valid Python"
                )
            if tok.type in _STRING_START:
                if nested == 0:
                    fstring_start = start
                nested += 1
            elif tok.type in _STRING_END:
                nested -= 1
                if nested == 0:
                    out.fill(fstring_start)
                    out.fill(end, "string", string=True)
            if nested or tok.type in _STRING_END:
                continue
            if tok.type == tokenize.DEDENT:
                out.fill(line_starts[min(tok.start[0], len(line_starts)) - 1])
                out.level -= 1
                continue
            out.fill(start)
            if tok.type == tokenize.INDENT:
                out.level += 1
                out.fill(end)
            elif tok.type == tokenize.NAME:
                out.fill(end, "keyword" if keyword.iskeyword(tok.string) else "name")
            elif tok.type == tokenize.OP:
                if tok.string in _CLOSERS:
                    out.depth = max(out.depth - 1, 0)
                out.fill(end, "op")
                if tok.string in _OPENERS:
                    out.depth += 1
            elif tok.type in _SIMPLE:
                out.fill(end, _SIMPLE[tok.type], string=tok.type == tokenize.STRING)
            else:  # NEWLINE, NL, ENDMARKER
                out.fill(end)
    except (tokenize.TokenError, SyntaxError) as e:  # IndentationError is a SyntaxError
        raise UntokenizableSource(f"not tokenizable as Python: {e}") from None
    out.fill(n)
    return out.arrays


def token_char_starts(
    tokenizer: Tokenizer,
    ids: Sequence[int],
    text: str,
    pieces: dict[int, str] | None = None,
) -> np.ndarray:
    """The character offset in ``text`` where each token of ``ids`` (``text`` encoded) starts.

    Works for any tokenizer whose tokens decode to consecutive pieces of the text (byte-level
    BPE, raw bytes): each token is decoded alone, and a character split over several tokens
    is decoded as a group, each token of the group starting at the character its first byte
    belongs to. ``pieces`` caches single-token decodes across calls. Raises
    :class:`UnalignedTokens` if the pieces do not rebuild the text.
    """
    pieces = {} if pieces is None else pieces
    ids = [int(i) for i in ids]
    starts = np.empty(len(ids), np.int64)
    p = i = 0
    while i < len(ids):
        if ids[i] not in pieces:
            pieces[ids[i]] = tokenizer.decode([ids[i]])
        piece = pieces[ids[i]]
        if text.startswith(piece, p):
            starts[i] = p
            p, i = p + len(piece), i + 1
            continue
        for j in range(i + 2, min(i + _MAX_GROUP, len(ids)) + 1):
            piece = tokenizer.decode(ids[i:j])
            if text.startswith(piece, p):
                break
        else:
            raise UnalignedTokens(
                f"token {i} ({ids[i]}) does not decode to the text at character {p}: "
                "attribute labels need a byte-level or byte tokenizer"
            )
        for k in range(i, j):
            starts[k] = p + len(tokenizer.decode(ids[i:k]).rstrip("\ufffd"))
        p, i = p + len(piece), j
    if p != len(text):
        raise UnalignedTokens(f"tokens cover {p} of {len(text)} characters")
    return np.minimum(starts, max(len(text) - 1, 0))
