"""Fitting a bot reply into Discord messages.

Discord refuses a message longer than 2,000 characters, counted as Python's ``len`` counts
them (code points). `split_message` cuts a long reply into messages that each fit, at the most
natural place it can find, without cutting what a reader sees as one character and without
leaving a code block half open.

    for part in split_message(reply.text):
        await channel.send(part, allowed_mentions=...)

Why not ``discord.ext.commands.Paginator``: it only breaks between lines and raises
``RuntimeError`` on a line longer than a page, and GPT-2 happily writes a 3,000-character
paragraph with no line break at all; its prefix and suffix are fixed per paginator, so it
cannot close a code block mid-way and reopen it with the language it had; and it knows nothing
of grapheme clusters. ``discord.utils`` has escaping and ``as_chunks`` (fixed-size slices of an
iterable) but nothing that splits prose. So nothing here imports discord: the module is plain
text work, tested without a client.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["DISCORD_MESSAGE_LIMIT", "MIN_LIMIT", "is_grapheme_boundary", "split_message"]

DISCORD_MESSAGE_LIMIT = 2000
"""Most characters (code points) Discord accepts in one message's content."""

MIN_LIMIT = 100
"""Smallest `limit` `split_message` accepts: a reopened code fence and its closing take up to 50 characters."""

# --- grapheme clusters ---------------------------------------------------------------------
#
# A cut between two code points of one user-perceived character shows up in Discord as a broken
# glyph on both sides: a family emoji falls apart into three people and stray joiners, a flag
# into two letter boxes, a skin-toned thumb into a thumb and a colour swatch. Python's `unicodedata`
# has no grapheme-break property and the only library that does (`regex`'s ``\X``) would be a new
# dependency for a dozen lines, so this is the subset of Unicode's rules (UAX #29) that covers
# what chat text contains. Not covered: Hangul jamo sequences (precomposed syllables, which is
# what people type, are single code points anyway) and Indic conjunct rules (GB9c); there a cut
# may split a cluster Unicode would keep, which is ugly but never loses text.

_ZWJ = "\u200d"
_ZWNJ = "\u200c"
# Prepended concatenation marks (Arabic number signs and the like): they join what follows (GB9b).
_PREPEND = frozenset("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd")

# Extended_Pictographic, approximated by the blocks emoji live in. It is only asked about the
# code point after a ZWJ, where a too-wide range merely keeps a rare symbol glued to a joiner.
_PICTOGRAPHIC_RANGES = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
    (0x2139, 0x2139), (0x2194, 0x21AA), (0x231A, 0x23FF), (0x24C2, 0x24C2), (0x25AA, 0x25FE),
    (0x2600, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D),
    (0x3297, 0x3299), (0x1F000, 0x1FAFF), (0x1FC00, 0x1FFFD),
)


_REGIONAL_INDICATORS = "".join(map(chr, range(0x1F1E6, 0x1F200)))


def _is_regional_indicator(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def _is_extend(ch: str) -> bool:
    """Code points that attach to the one before them (GB9, GB9a)."""
    cp = ord(ch)
    return (
        # Combining marks, variation selectors (they are Mn), the keycap enclosure (Me) and
        # spacing vowel signs (Mc, Unicode's SpacingMark).
        unicodedata.category(ch) in ("Mn", "Me", "Mc")
        # Skin-tone modifiers are symbols (Sk) by category, but extend the emoji before them.
        or 0x1F3FB <= cp <= 0x1F3FF
        # Tag characters spell subdivision flags after a black flag (England, Scotland, Wales).
        or 0xE0020 <= cp <= 0xE007F
        or ch == _ZWNJ
    )


def _is_pictographic(ch: str) -> bool:
    if _is_regional_indicator(ch) or _is_extend(ch):
        return False
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _PICTOGRAPHIC_RANGES)


def _is_control(ch: str) -> bool:
    """Line breaks, control and invisible format characters: clusters always break around them (GB4, GB5)."""
    category = unicodedata.category(ch)
    if category in ("Cc", "Zl", "Zp", "Cs"):
        return True
    return category == "Cf" and ch != _ZWJ and ch not in _PREPEND and not _is_extend(ch)


def is_grapheme_boundary(text: str, index: int) -> bool:
    """Whether `index` (0 to ``len(text)``) falls between two grapheme clusters of `text`.

    A message may start or end only at such an index, so that no emoji, flag or accented
    letter is split across two messages.
    """
    if not 0 <= index <= len(text):
        raise ValueError(f"`index` must be in [0, {len(text)}], got {index}")
    if index == 0 or index == len(text):  # GB1, GB2
        return True
    before, after = text[index - 1], text[index]
    if before == "\r" and after == "\n":  # GB3
        return False
    if _is_control(before) or _is_control(after):  # GB4, GB5
        return True
    if after == _ZWJ or _is_extend(after):  # GB9, GB9a
        return False
    if before in _PREPEND:  # GB9b
        return False
    if before == _ZWJ and _is_pictographic(after):  # GB11: pictograph Extend* ZWJ x pictograph
        j = index - 2
        while j >= 0 and _is_extend(text[j]):
            j -= 1
        if j >= 0 and _is_pictographic(text[j]):
            return False
    if _is_regional_indicator(before) and _is_regional_indicator(after):  # GB12, GB13
        # Flags are pairs counted from the start of the run: break only after an even count.
        # (rstrip counts the run in C; a Python loop made a long run of flags quadratic.)
        head = text[:index]
        return (len(head) - len(head.rstrip(_REGIONAL_INDICATORS))) % 2 == 0
    return True  # GB999


# --- code fences ---------------------------------------------------------------------------

# Line-based fences, as CommonMark has them (Discord is laxer and also closes at a ``` in the
# middle of a line; model output rarely does that). Marker length is capped so that a reopened
# fence plus its closing always leaves most of the message for text.
_FENCE_OPEN = re.compile(r" {0,3}(`{3,16})([^`\n]*)")
_FENCE_CLOSE = re.compile(r" {0,3}(`{3,})[ \t]*")
_MAX_FENCE_OVERHEAD = MIN_LIMIT // 2


@dataclass(frozen=True)
class _Fence:
    """Where one fenced code block lies in the text, as indices."""

    open_start: int  # start of the opening fence line
    content_start: int  # just past the opening line's newline
    close_start: int  # start of the closing fence line; len(text) when the block is never closed
    close_end: int  # just past the closing marker
    marker: str  # the backticks that opened it; closing and reopening reuse them
    lang: str  # the language tag, e.g. "python"; "" when none

    @property
    def closing(self) -> str:
        return "\n" + self.marker

    @property
    def reopening(self) -> str:
        # A freak info string would eat the message; the block reopens untagged then.
        if len(self.marker) + len(self.lang) + 1 + len(self.closing) > _MAX_FENCE_OVERHEAD:
            return self.marker + "\n"
        return self.marker + self.lang + "\n"


def _find_fences(text: str) -> list[_Fence]:
    fences: list[_Fence] = []
    opened: tuple[int, int, str, str] | None = None
    pos = 0
    for line in text.split("\n"):
        line_end = pos + len(line)
        if opened is None:
            match = _FENCE_OPEN.fullmatch(line)
            if match:
                words = match.group(2).split()
                opened = (pos, min(line_end + 1, len(text)), match.group(1), words[0] if words else "")
        else:
            match = _FENCE_CLOSE.fullmatch(line)
            if match and len(match.group(1)) >= len(opened[2]):
                open_start, content_start, marker, lang = opened
                fences.append(_Fence(open_start, content_start, pos, pos + len(line.rstrip()), marker, lang))
                opened = None
        pos = line_end + 1
    if opened is not None:
        open_start, content_start, marker, lang = opened
        fences.append(_Fence(open_start, content_start, len(text), len(text), marker, lang))
    return fences


def _fence_around(fences: list[_Fence], index: int, *, up_to_close: bool = False) -> _Fence | None:
    """The block whose code `index` lies in (or whose closing line starts at it, with `up_to_close`)."""
    for fence in fences:
        if fence.content_start <= index < fence.close_start or (up_to_close and index == fence.close_start):
            return fence
    return None


def _fence_left_open(fences: list[_Fence], end: int) -> _Fence | None:
    """The block a chunk ending at `end` has opened but not closed."""
    for fence in fences:
        if fence.content_start < end <= fence.close_start:
            return fence
    return None


def _inside_fence_line(fences: list[_Fence], end: int) -> bool:
    """Whether a chunk ending at `end` would cut a fence line, or end on an empty block."""
    return any(
        fence.open_start < end <= fence.content_start or fence.close_start < end < fence.close_end
        for fence in fences
    )


# --- choosing where to cut -----------------------------------------------------------------

# Each pattern finds break points of one kind; `_BREAKS` lists (pattern, take the match's end?)
# best kind first. A cut ends the chunk before the separator; the next chunk skips it.
_BREAKS = (
    (re.compile(r"\n[ \t]*\n"), False),  # paragraph: a blank line
    (re.compile(r"\n"), False),  # line
    (re.compile(r"[.!?…]+[\"'”’)\]*_]*(?=\s)"), True),  # sentence: keep the stop with its sentence
    (re.compile(r"[ \t]+"), False),  # word
)
_WHITESPACE = re.compile(r"\s*")
_SPACES = re.compile(r"[ \t]*")
_BLANK_LINES = re.compile(r"(?:[ \t]*\n)*")


def _best_end(text: str, pos: int, room: int, fences: list[_Fence]) -> int:
    """Where to end a chunk that starts at `pos` and may hold `room` characters of `text`."""
    hi = pos + room
    # Ending at or before the first non-blank character would leave a chunk of only whitespace.
    first = _WHITESPACE.match(text, pos).end()

    def usable(end: int) -> bool:
        return first < end <= hi and not _inside_fence_line(fences, end) and is_grapheme_boundary(text, end)

    ends = [
        [match.end() if take_end else match.start() for match in pattern.finditer(text, pos, min(len(text), hi + 1))]
        for pattern, take_end in _BREAKS
    ]
    # A better kind of break wins only if it still fills half the message: otherwise a short
    # opening line would go out alone and double the number of messages for little gain.
    for floor in (pos + room // 2, first + 1):
        for kind in ends:
            for end in reversed(kind):
                if end < floor:
                    break
                if usable(end):
                    return end
    # No break anywhere: one word (a URL, a line of code) longer than the message.
    for end in range(hi, first, -1):
        if is_grapheme_boundary(text, end) and not _inside_fence_line(fences, end):
            return end
    # A single grapheme cluster longer than a message (a stack of thousands of combining marks)
    # cannot be sent whole; cutting it is the only way to send it at all.
    return hi


def _cut(text: str, pos: int, room: int, fences: list[_Fence]) -> tuple[int, str]:
    """The chunk's end and the fence closing it needs ("" if none), together within `room`."""
    reserve = 0
    while True:
        end = _best_end(text, pos, room - reserve, fences)
        fence = _fence_left_open(fences, end)
        closing = fence.closing if fence else ""
        if len(closing) <= reserve:
            return end, closing
        # Make room for the closing fence and choose again; the new end may even leave the block.
        reserve = len(closing)


def _skip_to_content(text: str, pos: int, fences: list[_Fence]) -> int:
    """Where the chunk after a cut at `pos` starts: past the separator the cut left behind."""
    cut = pos
    while pos < len(text):
        fence = _fence_around(fences, pos, up_to_close=True)
        if fence is None:
            new = _WHITESPACE.match(text, pos).end()
        else:
            # Inside code, indentation is meaning: drop only blank lines, and the spaces at a
            # cut in the middle of an over-long line.
            new = pos
            if text[new - 1] != "\n":
                new = _SPACES.match(text, new).end()
            new = _BLANK_LINES.match(text, new).end()
            if new >= fence.close_start:
                # Only the closing fence is left, and the previous chunk already closed the block.
                new = fence.close_end
        if new == pos:
            break
        pos = new
    # Whitespace followed by a combining mark is one cluster; do not start on the mark. Never
    # step back past the cut itself, which a forced cut inside a cluster leaves off a boundary.
    while pos > cut and not is_grapheme_boundary(text, pos):
        pos -= 1
    return pos


def split_message(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """Split a bot reply into Discord messages of at most `limit` characters each.

    Cuts prefer, in order, paragraph breaks, line breaks, sentence ends and spaces (as long as
    the message stays at least half full), and fall back to cutting inside an over-long word.
    No cut falls inside a grapheme cluster (emoji sequences, flags, accented letters). A cut
    inside a ```` ``` ```` code block closes the block at the end of the message and reopens it,
    with its language tag, at the start of the next; those characters count towards `limit`.
    Messages are trimmed of surrounding whitespace, except that code keeps its indentation.
    Empty or whitespace-only text gives no messages.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"`limit` must be an int, got {type(limit).__name__}")
    if limit < MIN_LIMIT:
        raise ValueError(f"`limit` must be at least {MIN_LIMIT}, got {limit}")
    # CR LF is one grapheme cluster, which would forbid cutting at the line break itself;
    # Discord shows both the same way.
    text = text.replace("\r\n", "\n")
    text_end = len(text.rstrip())
    fences = _find_fences(text)

    chunks: list[str] = []
    pos = _skip_to_content(text, 0, fences)
    while pos < text_end:
        fence = _fence_around(fences, pos)
        opening = fence.reopening if fence else ""
        room = limit - len(opening)
        if text_end - pos <= room:
            end, closing = text_end, ""
        else:
            end, closing = _cut(text, pos, room, fences)
        body = text[pos:end].rstrip()
        if body.strip():
            chunks.append(opening + body + closing)
        pos = _skip_to_content(text, end, fences)
    return chunks
