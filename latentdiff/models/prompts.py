"""AUTOMATIC1111's prompt syntax: emphasis, BREAK, prompt editing and alternation; and encoding with the weights.

- `(word)` x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` x1.3, `\\(` `\\)` `\\[` `\\]` `\\\\` literal;
  `BREAK` starts a new 75-token chunk (parse_attention, encode).
- `[from:to:when]`, `[to:when]`, `[from::when]` switch text at a step (`when` with a '.' is a fraction of the
  steps, without one a step number), `[a|b|c]` cycles per step (prompt_schedule).

Malformed syntax never raises: it is read as A1111 reads it, as literal text. The parser is our own; its results
are checked against A1111's lark grammar on a corpus (tests/test_prompt_syntax.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from latentdiff.models.text_encoder import EOT, SOT

ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack: a chunk ending within 20 tokens of a comma breaks there

# ----------------------------------------------------------------------------------------------
# Emphasis: (text, weight) fragments


# A1111's tokens, in order of preference: escapes, brackets, a weight closing a round bracket, plain runs, ':'.
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_WEIGHT = -1.0  # A1111 marks a BREAK as the fragment ("BREAK", -1)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention: (text, weight) fragments, runs of equal weight merged, BREAK as
    ("BREAK", -1). Unclosed brackets apply to the end; a stray closer, ':' or weight without '(' is text."""
    res: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float):
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            rounds.append(len(res))
        elif tok == "[":
            squares.append(len(res))
        elif weight is not None and rounds and _number(weight) is not None:
            scale(rounds.pop(), _number(weight))
        elif weight is not None and rounds:
            # A1111 raises on a weight float() cannot read ("(a:1.2.3)"); read as text up to the ')' that closes
            res.append([tok[:-1], 1.0])
            scale(rounds.pop(), ROUND)
        elif tok == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif tok == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])
    for pos in rounds:
        scale(pos, ROUND)
    for pos in squares:
        scale(pos, SQUARE)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def _number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Prompt editing and alternation: a recursive-descent reading of A1111's grammar
#
#   start     : (prompt | stray '[' ']' '(' ')' ':')*
#   prompt    : (emphasized | scheduled | alternate | plain | whitespace)*
#   emphasized: '(' prompt ')' | '(' prompt ':' prompt ')' | '[' prompt ']'
#   scheduled : '[' [prompt ':'] prompt ':' [ws] NUMBER [ws] ']'
#   alternate : '[' prompt ('|' [prompt])+ ']'
#   plain     : ([^\\[]():|] | '\\' any)+
#
# A construct whose brackets do not close is literal text at the top level; a '|' outside an alternate, or a
# trailing '\\', makes the whole prompt literal (A1111's parser rejects it and uses the text as is).


class _Reject(Exception):
    """The prompt is not in the grammar: A1111 then uses it as plain text."""


@dataclass
class _Scheduled:
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")


class _Parser:
    def __init__(self, text: str):
        self.s = text

    def prompt(self, i: int) -> tuple[list, int]:
        """Items (str or node) from i up to the first character that cannot continue a prompt."""
        items, s = [], self.s
        while i < len(s):
            m = _PLAIN.match(s, i)
            if m:
                items.append(m.group(0))
                i = m.end()
                continue
            if s[i] in "([":
                got = self.paren(i) if s[i] == "(" else self.square(i)
                if got is None:
                    break
                node, i = got
                items += node
                continue
            break
        return items, i

    def paren(self, i: int):
        """'(' prompt ')' or '(' prompt ':' prompt ')', kept verbatim: ([items], end) or None."""
        inner, j = self.prompt(i + 1)
        if j < len(self.s) and self.s[j] == ")":
            return ["("] + inner + [")"], j + 1
        if j < len(self.s) and self.s[j] == ":":
            second, k = self.prompt(j + 1)
            if k < len(self.s) and self.s[k] == ")":
                return ["("] + inner + [":"] + second + [")"], k + 1
        return None

    def number_close(self, i: int):
        """[ws] NUMBER [ws] ']' from i: (number text, end) or None."""
        s = self.s
        while i < len(s) and s[i].isspace():
            i += 1
        m = _NUMBER.match(s, i)
        if not m:
            return None
        j = m.end()
        while j < len(s) and s[j].isspace():
            j += 1
        return (m.group(0), j + 1) if j < len(s) and s[j] == "]" else None

    def square(self, i: int):
        """'[' ... ']' as emphasis (verbatim), scheduled or alternate: ([items], end) or None."""
        s = self.s
        first, j = self.prompt(i + 1)
        if j >= len(s):
            return None
        if s[j] == "]":
            return ["["] + first + ["]"], j + 1
        if s[j] == "|":
            options = [first]
            while j < len(s) and s[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            return ([_Alternate(options)], j + 1) if j < len(s) and s[j] == "]" else None
        if s[j] == ":":
            got = self.number_close(j + 1)  # [to:when]
            if got:
                return [_Scheduled(None, first, got[0])], got[1]
            second, k = self.prompt(j + 1)  # [from:to:when]
            if k < len(s) and s[k] == ":":
                got = self.number_close(k + 1)
                if got:
                    return [_Scheduled(first, second, got[0])], got[1]
        return None

    def start(self) -> list:
        items, i, s = [], 0, self.s
        while i < len(s):
            got, i = self.prompt(i)
            items += got
            if i < len(s):
                if s[i] in "[]():":
                    items.append(s[i])
                    i += 1
                else:  # '|' outside an alternate, or a '\' with nothing (or a line break) after it
                    raise _Reject
        return items


def _nodes(items):
    for it in items:
        if isinstance(it, _Scheduled):
            yield it
            yield from _nodes(it.before or [])
            yield from _nodes(it.after)
        elif isinstance(it, _Alternate):
            yield it
            for option in it.options:
                yield from _nodes(option)


def _text_at(items, step: int) -> str:
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, _Scheduled):
            out.append(_text_at(it.before or [], step) if step <= it.when else _text_at(it.after, step))
        else:
            out.append(_text_at(it.options[(step - 1) % len(it.options)], step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt schedule: [(last step, text)], each text in force up to and including its step.

    A `when` with a '.' is a fraction of `steps` (0.25 of 20 is step 5), without one a step; a schedule's text
    changes after step `when` (A1111's get_learned_conditioning_prompt_schedules, its newer scheduling).
    """
    try:
        items = _Parser(prompt).start()
    except _Reject:
        return [(steps, prompt)]
    ends = {steps}
    for node in _nodes(items):
        if isinstance(node, _Scheduled):
            v = float(node.number)
            v = v * steps if "." in node.number else v
            node.when = min(steps, int(v)) if math.isfinite(v) else (steps if v > 0 else -1)
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))
    return [(end, _text_at(items, end)) for end in sorted(ends)]


def text_at_call(schedule: list[tuple[int, str]], call: int) -> int:
    """The index of the schedule entry A1111 uses at the call-th model evaluation (counted from 0)."""
    for k, (end, _) in enumerate(schedule):
        if call <= end:
            return k
    return 0


# ----------------------------------------------------------------------------------------------
# Encoding: A1111's chunking (BREAK, comma backtrack) and its "Original" emphasis


def chunk_tokens(encoder, text: str, syntax: bool = True) -> list[tuple[list[int], list[float]]]:
    """A prompt cut into chunks of (77 token ids, 77 weights) as A1111's tokenize_line cuts it.

    Each fragment of parse_attention is tokenized alone; BREAK closes a chunk; a chunk that fills up within 20
    tokens after a comma moves the tokens after the comma to the next one; a textual-inversion embedding is not
    split across chunks. Without syntax the text is one fragment of weight 1 (no BREAK either).
    """
    n = encoder.config.context_length - 2
    fragments = parse_attention(text) if syntax else [(text, 1.0)]
    comma = encoder.encode_text(",")[0] if syntax else None
    spans = _embedding_spans(encoder)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close():
        nonlocal ids, mults, last_comma
        pad = encoder.pad_id
        chunks.append(([SOT] + ids + [EOT] + [pad] * (n - len(ids)), [1.0] + mults + [1.0] * (n - len(mults) + 1)))
        ids, mults, last_comma = [], [], -1

    for frag, weight in fragments:
        if frag == "BREAK" and weight == BREAK_WEIGHT:
            close()
            continue
        tokens = encoder.encode_text(frag)
        pos = 0
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == comma:
                last_comma = len(ids)
            elif len(ids) == n and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                moved, moved_w = ids[last_comma + 1:], mults[last_comma + 1:]
                ids, mults = ids[:last_comma + 1], mults[:last_comma + 1]
                close()
                ids, mults = moved, moved_w
            if len(ids) == n:
                close()
            width = spans.get(tok, 1)
            if width > 1 and len(ids) + width > n:  # an embedding goes whole into the next chunk
                close()
            ids += tokens[pos:pos + width]
            mults += [weight] * width
            pos += width
    if ids or not chunks:
        close()
    return chunks


def count_chunks(encoder, texts: str | list[str], steps: int = 1, syntax: bool = True) -> int:
    """How many 77-token chunks of context these prompts are encoded into together (at least 1): the most any one
    of them needs over every text its schedule uses in `steps` steps, each cut by chunk_tokens (BREAK, comma
    backtrack, whole embeddings), as encode cuts them; without syntax, the plain 75-token cut of
    TextEncoder.tokenize_chunks. The one count behind the server's prompt limit, its batches and the memory
    estimate: it tokenizes, and runs no model."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not syntax:
        return encoder.num_chunks(texts)
    variants = {text for t in texts for _, text in prompt_schedule(t, steps)}
    return max([1] + [len(chunk_tokens(encoder, text)) for text in variants])


def _embedding_spans(encoder) -> dict[int, int]:
    """First token id of each textual-inversion embedding -> its number of vectors."""
    return {ids[0]: len(ids) for ids in getattr(encoder, "_embedding_ids", {}).values() if ids}


def _emphasize(hidden: torch.Tensor, mults: torch.Tensor) -> torch.Tensor:
    """A1111's 'Original' emphasis per chunk: scale each token's output, then restore the chunk's mean.

    A1111 takes the mean over the chunk of every text encoded together (a prompt's schedule variants); ours is
    per text, so a text encodes the same whatever it is batched with. Means in float32 also for fp16 models.
    """
    h = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    weighted = h * mults[..., None].to(h.dtype)
    restore = h.mean(dim=(-2, -1), keepdim=True) / weighted.mean(dim=(-2, -1), keepdim=True)
    return (weighted * restore).to(hidden.dtype)


def encode(encoder, texts: list[str], clip_skip: int | None = None, min_chunks: int = 1, syntax: bool = True,
           pooled: bool = False):
    """(hidden (B, 77 k, width), pooled (B, embed_dim) of the first chunk or None) with A1111's emphasis.

    Every text gets the same k = max(min_chunks, chunks of the longest), shorter ones padded with empty chunks,
    so conditional and unconditional rows share one batch. The pooled vector is not weighted, as in A1111.
    """
    per_text = [chunk_tokens(encoder, t, syntax) for t in texts]
    k = max([min_chunks] + [len(c) for c in per_text])
    empty = chunk_tokens(encoder, "", syntax)[0]
    per_text = [c + [empty] * (k - len(c)) for c in per_text]
    ids = torch.tensor([[tok for tok, _ in c] for c in per_text], dtype=torch.long)  # (B, k, 77)
    mults = torch.tensor([[w for _, w in c] for c in per_text], dtype=torch.float64)
    B, _, L = ids.shape
    hidden, pool = encoder.hidden_and_pooled(ids.view(B * k, L), clip_skip, pooled=pooled)
    if bool((mults != 1).any()):
        hidden = _emphasize(hidden, mults.view(B * k, L).to(hidden.device))
    return hidden.view(B, k * L, -1), None if pool is None else pool.view(B, k, -1)[:, 0]


def encode_dual(dual, texts: list[str], clip_skip: int | None = None, min_chunks: int = 1, syntax: bool = True):
    """SDXL: (context of both encoders joined per token, bigG's pooled vector), each encoder emphasized alone."""
    ctx_l, _ = encode(dual.clip_l, texts, clip_skip, min_chunks, syntax)
    ctx_g, pooled = encode(dual.clip_g, texts, clip_skip, min_chunks, syntax, pooled=True)
    return torch.cat([ctx_l, ctx_g], dim=-1), pooled
