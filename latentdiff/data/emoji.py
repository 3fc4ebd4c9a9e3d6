"""The Noto Color Emoji set as shards: font lookup, rendering, captions and make_emoji_shards."""
from __future__ import annotations

import io
import json
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

from PIL import Image

from latentdiff.data.loader import DataError
from latentdiff.io.files import atomic_write
from latentdiff.data.shards import ShardWriter


EMOJI_FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/noto/NotoColorEmoji.ttf",
                    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
                    "/usr/local/share/fonts/NotoColorEmoji.ttf", "/Library/Fonts/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109  # the one strike size of the CBDT bitmaps in Noto Color Emoji
# Blocks that hold the single-code-point emoji (Unicode emoji-data.txt; everything else there is text).
EMOJI_RANGES = ((0xA9, 0xA9), (0xAE, 0xAE), (0x2000, 0x2BFF), (0x3000, 0x33FF), (0x1F000, 0x1FAFF))
# Emoji components: they render, but are parts of sequences rather than pictures of a thing.
EMOJI_COMPONENTS = (set(range(0x1F1E6, 0x1F200)) | set(range(0x1F3FB, 0x1F400)) | set(range(0x1F9B0, 0x1F9B4))
                    | {0x20E3, 0x200D, 0xFE0F}
                    | set(range(0xE0020, 0xE0080)))
EMOJI_CREDIT = "Noto Color Emoji, © Google, SIL Open Font License 1.1"


def find_emoji_font(path=None) -> str:
    if path:
        if not os.path.isfile(path):
            raise DataError(f"font {path} not found; install it with `apt-get install fonts-noto-color-emoji`")
        return str(path)
    for p in EMOJI_FONT_PATHS:
        if os.path.isfile(p):
            return p
    raise DataError("Noto Color Emoji font not found; install it with `apt-get install fonts-noto-color-emoji` "
                    "or pass --font PATH")


def load_emoji_font(path):
    from PIL import ImageFont
    try:
        return ImageFont.truetype(str(path), EMOJI_FONT_SIZE)
    except OSError as e:
        raise DataError(f"cannot load {path} at size {EMOJI_FONT_SIZE} ({e}); pass a color emoji font") from None


def render_emoji(font, text: str, resolution: int) -> Image.Image | None:
    """Glyph on white, cropped to its visible pixels, padded to a centred square, LANCZOS-resized; None if blank."""
    from PIL import ImageDraw

    try:
        left, top, right, bottom = font.getbbox(text)
    except RuntimeError:  # the layout engine refuses some code points (line separators, ...)
        return None
    pad = 32  # colour bitmaps may overhang the reported box
    canvas = Image.new("RGBA", (right - min(left, 0) + 2 * pad, bottom - min(top, 0) + 2 * pad), (0, 0, 0, 0))
    try:
        ImageDraw.Draw(canvas).text((pad - min(left, 0), pad - min(top, 0)), text, font=font, embedded_color=True)
    except RuntimeError:
        return None
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    square = square.resize((resolution, resolution), Image.LANCZOS)  # Pillow premultiplies alpha for RGBA
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, square).convert("RGB")


def emoji_captions(name: str, aliases=()) -> list[str]:
    """'cat' -> ['a cat', 'an emoji of a cat', 'cat', *aliases]."""
    article = "an" if name[:1] in "aeiou" else "a"
    return [f"{article} {name}", f"an emoji of {article} {name}", name, *[a for a in aliases if a != name]]


def _emoji_package():
    try:
        import emoji  # optional: CLDR names for emoji newer than this Python's unicodedata, and aliases
        return emoji.EMOJI_DATA
    except ImportError:
        return None


def _short_name(code: str) -> str:
    """':thumbs_up:' -> 'thumbs up'."""
    return code.strip(":").replace("_", " ").lower()


def _emoji_entries(font, sequences: bool):
    """(text, name, aliases) for every emoji the font draws, and a Counter of what was skipped and why."""
    pkg = _emoji_package()
    skipped: Counter = Counter()
    entries = []

    def pkg_entry(text):
        return pkg and (pkg.get(text) or pkg.get(text + "\ufe0f"))

    for lo, hi in EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            try:
                drawn = font.getmask(ch).getbbox() is not None
            except RuntimeError:
                drawn = False
            if not drawn:
                if pkg_entry(ch):
                    skipped["blank (an emoji this font version does not draw)"] += 1
                continue  # not in the font: not an emoji candidate
            if cp in EMOJI_COMPONENTS:
                skipped["emoji component (skin tone, hair style, regional indicator, keycap part)"] += 1
                continue
            name = unicodedata.name(ch, "").lower()
            entry = pkg_entry(ch)
            if not name and entry:
                name = _short_name(entry["en"])
            if not name:
                version = unicodedata.unidata_version
                skipped[f"no Unicode name (newer than unicodedata {version}; pip install emoji)"] += 1
                continue
            entries.append((ch, name, entry))
    if sequences:
        if pkg is None:
            raise DataError("--sequences needs names for emoji sequences: pip install emoji")
        glyph_width = font.getbbox("\U0001F408")[2]
        for text, entry in sorted(pkg.items()):
            base = text.replace("\ufe0f", "")
            if len(base) < 2 or entry.get("status", 2) != 2:  # fully-qualified sequences only
                continue
            try:
                width = font.getbbox(text)[2]
            except RuntimeError:
                width = 0
            if not 0 < width <= 1.5 * glyph_width:  # the font has no ligature: it would draw the parts side by side
                skipped["sequence the font does not join into one glyph"] += 1
                continue
            entries.append((text, _short_name(entry["en"]), entry))

    # Aliases: readable words only, and never one that names another emoji (it would blur the captions).
    names = Counter(name for _, name, _ in entries)
    alias_lists = []
    for _, name, entry in entries:
        cand = [entry["en"], *entry.get("alias", [])] if entry else []
        alias_lists.append(sorted({_short_name(a) for a in cand} - {name}))
    uses = Counter(a for al in alias_lists for a in al)
    out = []
    for (text, name, _), al in zip(entries, alias_lists):
        al = [a for a in al if re.fullmatch(r"[a-z][a-z ']*", a) and names[a] == 0 and uses[a] == 1]
        out.append((text, name, al))
    return out, skipped


def _emoji_key(text: str) -> str:
    return "u" + "_".join(f"{ord(c):x}" for c in text if c != "\ufe0f")


def make_emoji_shards(out, resolution: int = 64, per_shard: int = 100, font_path=None, sequences: bool = False,
                      overwrite: bool = False, progress: bool = True) -> dict:
    """Render the emoji set to shards plus index.jsonl (codepoint, name, shard, key per emoji)."""
    from PIL import features
    from tqdm import tqdm

    path = find_emoji_font(font_path)
    if sequences and not features.check("raqm"):
        raise DataError("--sequences needs Pillow built with libraqm (skin tones and ZWJ sequences are ligatures)")
    font = load_emoji_font(path)
    entries, skipped = _emoji_entries(font, sequences)
    index = []
    with ShardWriter(out, "emoji", per_shard, overwrite) as writer:
        for text, name, aliases in tqdm(entries, desc="emoji", unit="img", disable=not progress):
            img = render_emoji(font, text, resolution)
            if img is None:
                skipped["blank render"] += 1
                continue
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=True)
            codepoint = " ".join(f"U+{ord(c):04X}" for c in text if c != "\ufe0f")
            meta = {"width": resolution, "height": resolution, "source": f"{os.path.basename(path)} {codepoint}",
                    "codepoint": codepoint, "name": name, "captions": emoji_captions(name, aliases),
                    "aliases": aliases}
            key = _emoji_key(text)
            shard = writer.write(key, {"png": buf.getvalue(), "txt": name.encode("utf-8"),
                                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            index.append({"codepoint": codepoint, "char": text, "name": name, "shard": shard, "key": key})
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index)
    with atomic_write(Path(out) / "index.jsonl") as tmp:
        tmp.write_text(lines, encoding="utf-8")
    return {"written": writer.count, "shards": [str(p) for p in writer.paths], "skipped": dict(skipped),
            "font": path, "aliases": _emoji_package() is not None}
