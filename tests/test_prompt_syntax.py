"""A1111's prompt syntax: the parser against A1111's lark grammar, emphasis, BREAK, chunking, and the conditioning
schedule the pipeline runs (prompt editing and alternation on A1111's step count, every text encoded once)."""

import itertools
import re

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.models.prompts import (BREAK_WEIGHT, chunk_tokens, encode, encode_dual, parse_attention,
                                       prompt_schedule, text_at_call)
from latentdiff.models.text_encoder import EOT, SOT, DualTextEncoder, TextConfig, TextEncoder

# ----------------------------------------------------------------------------------------------
# The schedule parser against A1111's grammar, run by lark (the parser generator A1111 uses)

# A1111 modules/prompt_parser.py's grammar (v1.10), the specification our recursive-descent parser implements.
A1111_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def lark_schedule(prompt: str, steps: int):
    """A1111's schedule semantics on lark's parse tree, walked here: a text per step at which anything changes;
    a `when` with '.' is a fraction of the steps, else a step; an unparsable prompt is its own text."""
    lark = pytest.importorskip("lark")
    parser = lark_schedule.__dict__.setdefault("parser", lark.Lark(A1111_GRAMMAR))
    try:
        tree = parser.parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends, whens = {steps}, {}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            number = next(c for c in node.children if isinstance(c, lark.Token) and c.type == "NUMBER")
            v = float(number) * (steps if "." in number else 1)
            whens[id(node)] = min(steps, int(v))
            if whens[id(node)] >= 1:
                ends.add(whens[id(node)])
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))

    def text(node, step):
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return str(node)
        if node.data == "scheduled":  # children: before | None, after, ws, NUMBER, ws
            return text(node.children[0], step) if step <= whens[id(node)] else text(node.children[1], step)
        if node.data == "alternate":
            return text(node.children[(step - 1) % len(node.children)], step)
        return "".join(text(c, step) for c in node.children)

    return [(end, text(tree, end)) for end in sorted(ends)]


CORPUS = [
    # plain, emphasis kept verbatim for the attention parser
    "test", "", "a photo of a cat", "(masterpiece), ((best quality)), [blurry]", "(red:1.3) car, (blue:0.7) sky",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "(a:2) (b) [c] [[d]]", "(nested (deep (deeper:1.2)))",
    # prompt editing: [from:to:when], [to:when], [from::when], fractions and steps, spaces
    "a [b:3]", "a [b: 3]", "a [b:3 ]", "a [[[b]]:2]", "[(a:2):3]", "a [b : c : 1] d", "a[b:[c:d:2]:1]e",
    "a [b:.5] c", "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
    "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]", "[dog:cat:5]", "[dog:cat:0.5]",
    "[dog::4]", "[dog::0.3]", "[:cat:4]", "[a:b:0]", "[a:b:-2]", "[a:b:1.5]", "[a:b:100]", "[a:b:+3]",
    "[a:b:1e1]", "[a:b:2.5e-1]", "[a:b:5.]", "[(red:1.2):(blue:0.8):0.5] ball", "[a:[b:[c:d:6]:4]:2]",
    "photo, [sketch:painting:10], 4k", "[a: 3 :4]", "[a:5:6]", "[a:b:c:1]",
    # alternation, with empty and nested options
    "[a|(b:1.1)]", "[fe|]male", "[fe|||]male", "[cat|dog|bird] in a [forest|city]", "[|x]", "[a|[b:c:3]]",
    "[[a|b]:c:4]", "([a|b])", "[a|b|c|d|e|f|g|h|i|j|k|l]",
    # escapes and malformed syntax: read as A1111 reads it
    "a [unbalanced", "a [{b|d{:.5] c", "((a][:b:c [d:3]", r"\(literal\) [a:b:2]", r"a \[b:c:2\]", r"back\\slash",
    "a | b", "(a|b)", "[a|b", "a)]:(", "[a:b:c]", "[a:b:]", "[:3]", "[::3]", "x [a:b:2", "x [a:b:2]]",
    "ends with backslash \\", "([a:b:2])", "[a:(b:3]", "] [ ) (", "[a:b:0.5 ] and (c:1.5)", "a:b:3",
    "[a\\:b:c:2]", "[a:b\\]:2]", "BREAK [a:b:2] BREAK", "multi\nline [a:b:2]", "[a:b\n:2]",
]


@pytest.mark.parametrize("steps", [10, 20, 7])
def test_schedule_matches_a1111s_grammar_on_the_corpus(steps):
    assert len(CORPUS) >= 50
    for prompt in CORPUS:
        assert prompt_schedule(prompt, steps) == lark_schedule(prompt, steps), prompt


@pytest.mark.parametrize("prompt,want", [
    # A1111's own doctests (steps=10); the '{b|d{' one is A1111's parse error with today's lark: literal text
    ("test", [(10, "test")]), ("a [b:3]", [(3, "a "), (10, "a b")]), ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]), ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]), ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]), ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]), ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("[a|(b:1.1)]", [(k, "a" if k % 2 else "(b:1.1)") for k in range(1, 11)]),
    ("[fe|]male", [(k, "female" if k % 2 else "male") for k in range(1, 11)]),
    ("[fe|||]male", [(k, "female" if k % 4 == 1 else "male") for k in range(1, 11)])])
def test_a1111_documented_schedules(prompt, want):
    assert prompt_schedule(prompt, 10) == want


def test_fantasy_landscape_example_from_a1111():
    # The example at the top of A1111's prompt_parser.py, 100 steps.
    p = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
         "[: in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(p, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful")]


def test_text_at_call_is_a1111s_reconstruct_cond_batch():
    # The first entry whose last step is >= the call number (calls counted from 0); past the end, the first.
    sched = [(3, "a"), (7, "b"), (10, "c")]
    assert [sched[text_at_call(sched, c)][1] for c in range(13)] == list("aaaabbbbcccaa")


# ----------------------------------------------------------------------------------------------
# Emphasis


@pytest.mark.parametrize("text,want", [
    # A1111's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]), (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # worked out from A1111's rules
    ("((word))", [("word", 1.1 * 1.1)]), ("[word]", [("word", 1 / 1.1)]), ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]), ("(word:-1)", [("word", -1.0)]), ("(a:b)", [("a:b", 1.1)]),
    ("a:b", [("a:b", 1.0)]), ("a ]", [("a ]", 1.0)]), ("[a:0.5]", [("a:0.5", 1 / 1.1)]),
    (r"\\(a)", [("\\", 1.0), ("a", 1.1)]), ("", [("", 1.0)]), ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", BREAK_WEIGHT), ("b", 1.0)]), ("aBREAKb", [("aBREAKb", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 scales the marker: no break then
    ("x,BREAK,y", [("x,", 1.0), ("BREAK", BREAK_WEIGHT), (",y", 1.0)]), ("((a)(b:0.5))", [("a", 1.21), ("b", 0.55)]),
])
def test_attention_weights(text, want):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-15)


def a1111_emphasis(prompt: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention (modules/prompt_parser.py, v1.10) restated as a character scanner, as the
    reference for parse_attention. Its tokens, tried in this order at each position: a backslash with the next
    character when that is a bracket or a backslash (else a lone backslash, which stands for nothing); '(' or '[';
    a ':' with an optional sign, a run of digits and dots and ')', spaces allowed either side of the number; ')'
    or ']'; a run of anything but backslash, brackets and ':'; a lone ':'. A closer (or a weight) with its bracket
    open multiplies every fragment since that bracket by 1.1, 1/1.1 (or the weight, read by float(): A1111 raises
    ValueError on '1.2.3'); without one it is text. Text is split at BREAK (and the spaces round it) into
    ("BREAK", -1) markers, which brackets multiply too. Brackets left open multiply to the end, the round ones
    first, each kind from the outermost; then neighbours of exactly equal weight are joined."""
    pieces: list[list] = []  # [text, weight]
    open_at: dict[str, list[int]] = {"(": [], "[": []}

    def scale(bracket: str, factor: float):
        for piece in pieces[open_at[bracket].pop():]:
            piece[1] *= factor

    def add_text(s: str):
        for k, part in enumerate(re.split(r"\s*\bBREAK\b\s*", s)):
            if k:
                pieces.append(["BREAK", -1.0])
            pieces.append([part, 1.0])

    def weight_at(i: int):
        """(float text, index after the ')') of a ':weight)' token starting at prompt[i] == ':', or None."""
        j = i + 1
        while j < len(prompt) and prompt[j].isspace():
            j += 1
        first = j + (j < len(prompt) and prompt[j] in "+-")
        end = first
        while end < len(prompt) and (prompt[end] == "." or prompt[end].isdecimal()):
            end += 1
        close = end
        while close < len(prompt) and prompt[close].isspace():
            close += 1
        if end == first or close == len(prompt) or prompt[close] != ")":
            return None
        return prompt[j:end], close + 1

    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\":
            escaped = prompt[i + 1:i + 2]
            literal = escaped if escaped and escaped in "()[]\\" else ""
            pieces.append([literal, 1.0])
            i += 1 + len(literal)
        elif c in "([":
            open_at[c].append(len(pieces))
            i += 1
        elif c == ":" and weight_at(i) is not None:
            number, after = weight_at(i)
            if open_at["("]:
                scale("(", float(number))
            else:
                add_text(prompt[i:after])
            i = after
        elif c in ")]" and open_at["(" if c == ")" else "["]:
            scale("(" if c == ")" else "[", 1.1 if c == ")" else 1 / 1.1)
            i += 1
        elif c in ":)]":
            add_text(c)
            i += 1
        else:
            end = i
            while end < len(prompt) and prompt[end] not in "\\()[]:":
                end += 1
            add_text(prompt[i:end])
            i = end
    for bracket, factor in (("(", 1.1), ("[", 1 / 1.1)):
        for start in open_at[bracket]:
            for piece in pieces[start:]:
                piece[1] *= factor
    if not pieces:
        return [("", 1.0)]
    return [("".join(t for t, _ in run), w) for w, run in itertools.groupby(pieces, key=lambda piece: piece[1])]


EMPHASIS_CORPUS = [
    # nesting, both kinds, explicit weights inside and around
    "(((((((((a)))))))))", "[[[[[a]]]]]", "((a:1.2):1.3)", "([a]:0.5)", "[(a:1.2)]", "[(a)]", "([a])",
    "(a)(b)(c:1.1)", "(a:1.1)(b)", "((a)(b:0.5))", "(a (b [c (d:0.8) e] f) g)", "(a[b:1.2)c]", "[a(b]c)",
    "(masterpiece:1.2), (best quality:1.1), ((ultra detailed)), [[lowres]], (bad hands:-0.5)",
    # weights: signs, spaces, leading and trailing dots, zero, what is not a weight
    "(a:+1.5)", "(a:-.5)", "(a:1.)", "(a:.25)", "(a: 1.5)", "(a :1.5)", "(a:1.5 )", "(a:\t2)", "(a:\n2\n)",
    "(a:0)(b:-0)", "(a:1 .2)", "(a::1.2)", "(a:1.2:1.3)", "(a:1e2)", "(a:1,5)", "[[a]:1.5]", "[a:1.5]",
    "a:1.5)", "(a:1.5)))", "((a:1.5)", "(a:007)", "(a:1.5", "(a:１.５)",
    # escapes and lone backslashes
    r"\(a\)", r"\((a)\)", r"\\(a)", r"\\\(a)", r"a\b", "trailing \\", r"(a\)b)", r"[a\]b]", r"\[\]\(\)\\",
    r"(a\:1.2)", r"(\\:1.2)",
    # BREAK: alone, repeated, inside brackets, touching punctuation, across lines
    "BREAK", "a BREAK", "BREAK a", "BREAKBREAK", "a  BREAK  BREAK  b", "a\nBREAK\nb", "(BREAK:1.5)",
    "[a BREAK b]", "(a BREAK (b) BREAK c", "a BREAK:b", "x :BREAK y", "(a) BREAK [b]",
    # stray and crossing brackets, unicode text
    ")))", "]]]", "(((", "[[[", ") a (", "] a [", "(a]", "[a)", "(café:1.2) 日本語 [Ω]", ":::",
]
# A1111 raises ValueError on these (float() of a dotted run that is not a number); parse_attention reads the weight
# as text and the bracket as a plain one (test_attention_weights), so they are left out of the comparison.
A1111_RAISES = {"(a:1.2.3)", "(a:.)", "(a: 1..2 )", "(a:+.)"}


def test_attention_matches_a1111s_algorithm_on_the_corpus():
    prompts = CORPUS + EMPHASIS_CORPUS + sorted(A1111_RAISES)
    assert len(prompts) >= 50
    raised = set()
    for prompt in prompts:
        try:
            want = a1111_emphasis(prompt)
        except ValueError:
            raised.add(prompt)
            continue
        got = parse_attention(prompt)
        assert [t for t, _ in got] == [t for t, _ in want], prompt
        assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12, abs=0), prompt
    assert raised == A1111_RAISES


# ----------------------------------------------------------------------------------------------
# Chunks and the emphasis on the encoder's output


def small_encoder(width=32, pad="eos", embed_dim=0, seed=0):
    """A random CLIP text tower in float64, every parameter perturbed (a zero LayerNorm bias would make each
    token's output mean exactly 0, which no trained encoder has and which the mean restoration divides by)."""
    torch.manual_seed(seed)
    enc = TextEncoder(TextConfig(width=width, layers=2, heads=2, pad=pad, embed_dim=embed_dim)).double().eval()
    return perturbed(enc)


def perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def test_break_and_comma_backtrack_and_padding():
    enc = small_encoder()
    bpe = enc.encode_text
    word, comma = bpe("cat")[0], bpe(",")[0]
    (c0,) = chunk_tokens(enc, "(cat:1.5) cat")
    assert c0[0][:4] == [SOT, word, word, EOT] and c0[0][4:] == [EOT] * 73 and c0[1][:4] == [1.0, 1.5, 1.0, 1.0]
    a, b = chunk_tokens(enc, "cat BREAK (cat)")
    assert a[0][:3] == [SOT, word, EOT] and b[0][:3] == [SOT, word, EOT] and b[1][1] == pytest.approx(1.1)
    # 70 words, a comma, 10 words: the chunk fills at 75 within 20 tokens of the comma, so the 4 words after the
    # comma move to the next chunk (A1111's comma_padding_backtrack = 20)
    first, second = chunk_tokens(enc, "cat " * 70 + ", " + "cat " * 10)
    assert first[0][1:73] == [word] * 70 + [comma] + [EOT] and len(first[0]) == 77
    assert second[0][1:12] == [word] * 10 + [EOT]
    # without a comma nearby the chunk is cut at 75
    first, second = chunk_tokens(enc, "cat " * 80)
    assert first[0][1:76] == [word] * 75 and second[0][1:7] == [word] * 5 + [EOT]
    (empty,) = chunk_tokens(enc, "")
    assert empty[0] == [SOT, EOT] + [EOT] * 75 and empty[1] == [1.0] * 77
    zero_pad = small_encoder(pad="zero")
    assert chunk_tokens(zero_pad, "cat")[0][0][:5] == [SOT, word, EOT, 0, 0]


def test_textual_inversion_embedding_is_not_split():
    enc = small_encoder()
    enc.set_embeddings({"myemb": torch.randn(4, 32, dtype=torch.float64)})
    ids = enc._embedding_ids["myemb"]
    first, second = chunk_tokens(enc, "cat " * 73 + "myemb")
    assert ids[0] not in first[0] and second[0][1:5] == ids


def test_emphasis_scales_outputs_and_restores_each_chunks_mean():
    # A1111's 'Original' emphasis: z * w per token, then z * mean(z) / mean(z * w), over each 77-token chunk.
    enc = small_encoder()
    text = "a (red:1.4) [car] BREAK (blue:0.6) sky"
    got, _ = encode(enc, [text, "plain"])
    chunks = chunk_tokens(enc, text)
    assert len(chunks) == 2 and got.shape == (2, 154, 32)
    for k, (ids, w) in enumerate(chunks):
        z = enc(torch.tensor([ids]))[0]
        wz = z * torch.tensor(w, dtype=torch.float64)[:, None]
        want = wz * (z.mean() / wz.mean())
        torch.testing.assert_close(got[0, 77 * k:77 * (k + 1)], want, rtol=1e-12, atol=1e-12)
    # an unweighted prompt is the encoder's own output; its second chunk an empty prompt's
    torch.testing.assert_close(got[1], enc.encode(["plain"], min_chunks=2)[0], rtol=1e-12, atol=1e-12)


def test_sdxl_emphasis_is_applied_to_each_encoder_and_not_to_pooled():
    torch.manual_seed(1)
    dual = DualTextEncoder(TextConfig(width=32, layers=2, heads=2, output_layer="penultimate", output_ln_final=False),
                           TextConfig(width=16, layers=2, heads=2, act="gelu", output_layer="penultimate", pad="zero",
                                      embed_dim=16, output_ln_final=False)).double().eval()
    perturbed(dual)
    ctx, pooled = encode_dual(dual, ["(a cat:1.5) on a mat"])
    want_l, _ = encode(dual.clip_l, ["(a cat:1.5) on a mat"])
    want_g, want_pool = encode(dual.clip_g, ["(a cat:1.5) on a mat"], pooled=True)
    torch.testing.assert_close(ctx, torch.cat([want_l, want_g], -1), rtol=0, atol=0)
    _, plain_pool = dual.encode_with_pooled(["a cat on a mat"])
    torch.testing.assert_close(pooled, plain_pool, rtol=1e-12, atol=1e-12)  # same tokens, weights left out
    assert not torch.allclose(ctx, dual.encode(["a cat on a mat"]))


# ----------------------------------------------------------------------------------------------
# The pipeline: conditioning per model call, every distinct text encoded once, --no-prompt-syntax


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from latentdiff.pipeline import Pipeline
    return Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def record_contexts(pipe, monkeypatch):
    seen = []
    real = pipe.unet_call

    def spy(x, t, context, *rest):
        seen.append(context.clone())
        return real(x, t, context, *rest)
    monkeypatch.setattr(pipe, "unet_call", spy)
    return seen


def encoded(pipe, texts):
    return encode(pipe.text, texts)[0]


@pytest.mark.parametrize("sampler,calls", [("Euler", 6), ("Heun", 11)])
def test_prompt_editing_switches_at_a1111s_model_call(pipe, monkeypatch, sampler, calls):
    # "[cat:dog:3]" over 6 steps: calls 0..3 see "cat", later ones "dog" (A1111 counts model calls, so Heun's
    # second calls count too, and past step 6 it falls back to the first text); the negative is scheduled too.
    seen = record_contexts(pipe, monkeypatch)
    pipe("[cat:dog:3]", "[ugly:blurry:0.5]", steps=6, sampler=sampler, guidance=5.0, seed=1, progress=False)
    assert len(seen) == calls
    texts = {t: encoded(pipe, [t])[0] for t in ("cat", "dog", "ugly", "blurry")}
    for c, ctx in enumerate(seen):
        pos = "cat" if c <= 3 or c > 6 else "dog"
        neg = "ugly" if c <= 3 or c > 6 else "blurry"
        torch.testing.assert_close(ctx[1], texts[pos], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ctx[0], texts[neg], rtol=1e-5, atol=1e-5)


def test_alternation_follows_a1111s_schedule(pipe, monkeypatch):
    seen = record_contexts(pipe, monkeypatch)
    pipe("a [cat|dog]", steps=6, sampler="Euler", guidance=1.0, seed=1, progress=False)
    a, b = encoded(pipe, ["a cat", "a dog"])
    want = [a, a, b, a, b, a]  # entries end at steps 1..6; call c uses the first with c <= end
    for ctx, w in zip(seen, want, strict=True):
        torch.testing.assert_close(ctx[0], w, rtol=1e-5, atol=1e-5)


def test_every_distinct_text_is_encoded_once_per_request(pipe, monkeypatch):
    calls = []
    real = pipe.text.hidden_and_pooled
    monkeypatch.setattr(pipe.text, "hidden_and_pooled",
                        lambda ids, *a, **k: calls.append(ids.shape) or real(ids, *a, **k))
    pipe(["[cat:dog:0.5] (red:1.2)", "[cat|dog]"], ["", "[x:y:2]"], steps=8, sampler="Euler", guidance=4.0, seed=0,
         progress=False)
    # one encoder call, one chunk per distinct text: cat (red:1.2), dog (red:1.2), cat, dog, "", x, y
    assert calls == [(7, 77)]


def test_weights_change_the_conditioning_and_the_flag_turns_them_off(pipe, monkeypatch):
    seen = record_contexts(pipe, monkeypatch)
    pipe("a (cat:1.5)", steps=1, guidance=1.0, progress=False)
    pipe("a (cat:1.5)", steps=1, guidance=1.0, progress=False, prompt_syntax=False)
    weighted, literal = seen
    torch.testing.assert_close(weighted[0], encode(pipe.text, ["a (cat:1.5)"])[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(literal[0], pipe.text.encode(["a (cat:1.5)"])[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(weighted, literal)


def test_generate_no_prompt_syntax_round_trips_through_the_png(tmp_path, capsys, tiny_checkpoint):
    from latentdiff.generate import main
    from latentdiff.io.images import parse_parameters
    base = ["a [cat:dog:1] (red:1.3)", "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--seed", "4"]
    assert main(base + ["-o", str(tmp_path / "on.png")]) == 0
    assert main(base + ["--no-prompt-syntax", "-o", str(tmp_path / "off.png")]) == 0
    on, off = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("on", "off"))
    assert not np.array_equal(on, off)
    params = parse_parameters(Image.open(tmp_path / "off.png").info["parameters"])
    assert params["prompt"] == "a [cat:dog:1] (red:1.3)" and params["Prompt syntax"] == "off"
    assert "Prompt syntax" not in parse_parameters(Image.open(tmp_path / "on.png").info["parameters"])
    assert main(["--from-png", str(tmp_path / "off.png"), "--checkpoint", str(tiny_checkpoint),
                 "-o", str(tmp_path / "again.png")]) == 0
    again = np.asarray(Image.open(tmp_path / "again.png").convert("RGB"))
    assert np.array_equal(again, off)
    capsys.readouterr()


def test_sdxl_pipeline_schedules_both_encoders_and_zeroes_the_empty_negative(tmp_path, monkeypatch):
    from latentdiff.io.checkpoint import build_models
    from latentdiff.io.config import load_model_config
    from latentdiff.pipeline import Pipeline
    from test_sdxl import SMALL
    (tmp_path / "small.yaml").write_text(SMALL)
    torch.manual_seed(0)
    models = build_models(load_model_config(tmp_path / "small.yaml"))
    perturbed(models.text)
    pipe = Pipeline(models, device="cpu")
    seen = []
    real = pipe.unet_call
    monkeypatch.setattr(pipe, "unet_call", lambda x, t, c, y: seen.append((c.clone(), y.clone())) or real(x, t, c, y))
    pipe("a [(cat:1.3):dog:1]", "", steps=3, sampler="Euler", guidance=5.0, seed=0, progress=False)
    cat, cat_pool = encode_dual(pipe.text, ["a (cat:1.3)"])
    dog, dog_pool = encode_dual(pipe.text, ["a dog"])
    assert len(seen) == 3
    for call, (ctx, y) in enumerate(seen):
        want, pool = (cat, cat_pool) if call <= 1 else (dog, dog_pool)
        torch.testing.assert_close(ctx[1], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[1, :pool.shape[-1]], pool[0], rtol=1e-5, atol=1e-5)  # pooled leads the vector
        assert not ctx[0].any() and not y[0, :pool.shape[-1]].any()  # SDXL samples an empty negative as zeros
