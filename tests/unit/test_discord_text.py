"""Splitting replies into Discord-sized messages: adapters/discord_text.py."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.discord_text import MIN_LIMIT, is_grapheme_boundary, split_message

FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # man ZWJ woman ZWJ girl: 5 code points
FLAG_FR = "\U0001F1EB\U0001F1F7"
FLAG_DE = "\U0001F1E9\U0001F1EA"
THUMB_MEDIUM = "\U0001F44D\U0001F3FD"  # thumbs up + skin tone
RAINBOW_FLAG = "\U0001F3F3\ufe0f\u200d\U0001F308"  # white flag VS16 ZWJ rainbow
SCOTLAND = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"  # black flag + tags
KEYCAP_ONE = "1\ufe0f\u20e3"
E_ACUTE = "e\u0301"  # e + combining acute
HEART = "\u2764\ufe0f"
CLUSTERS = [FAMILY, FLAG_FR, FLAG_DE, THUMB_MEDIUM, RAINBOW_FLAG, SCOTLAND, KEYCAP_ONE, E_ACUTE, HEART]

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog",
    "while", "seven", "wizards", "quietly", "hex", "jovial", "zebras",
]
FENCE_LINE = re.compile(r"^ {0,3}```", re.MULTILINE)


def words_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def sentences(n_chars: int, seed: int = 0) -> str:
    """Prose of short sentences, about `n_chars` long."""
    rng = random.Random(seed)
    out: list[str] = []
    while sum(len(s) + 1 for s in out) < n_chars:
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return " ".join(out)


def assert_well_formed(chunks: list[str], limit: int = 2000) -> None:
    for chunk in chunks:
        assert chunk, "empty chunk"
        assert len(chunk) <= limit, f"chunk of {len(chunk)} > {limit}"
        assert chunk == chunk.strip(), f"untrimmed chunk {chunk[:40]!r}...{chunk[-40:]!r}"
        assert len(FENCE_LINE.findall(chunk)) % 2 == 0, f"unbalanced fences in {chunk!r}"


def cut_offsets(text: str, chunks: list[str]) -> list[int]:
    """Where, in `text`, each cut fell; only for text with no whitespace (chunks join back exactly)."""
    assert "".join(chunks) == text
    offsets, total = [], 0
    for chunk in chunks[:-1]:
        total += len(chunk)
        offsets.append(total)
    return offsets


# --- short and plain text ------------------------------------------------------------------


def test_short_text_is_one_unchanged_chunk():
    assert split_message("Hello there! How are you?") == ["Hello there! How are you?"]
    text = "Line one.\n\nLine two.\n  indented? not code, but inner whitespace stays"
    assert split_message(text) == [text]


def test_exactly_limit_is_one_chunk_and_surrounding_whitespace_is_trimmed():
    text = "x" * 1999 + "."
    assert split_message("\n  " + text + "  \n") == [text]


@pytest.mark.parametrize("text", ["", " ", "\n\n\t  \n"])
def test_empty_or_blank_text_gives_no_chunks(text):
    assert split_message(text) == []


def test_5000_characters_of_words_keep_every_word():
    text = words_text(5000)
    chunks = split_message(text)
    assert len(chunks) == 3
    assert_well_formed(chunks)
    assert " ".join(chunks).split() == text.split()
    # Words are never split: each chunk starts and ends on a whole word.
    for chunk in chunks:
        assert chunk.split()[0] in WORDS and chunk.split()[-1] in WORDS


def test_paragraph_break_preferred_over_mid_paragraph_split():
    first, second = sentences(1500, seed=1), sentences(1500, seed=2)
    chunks = split_message(first + "\n\n" + second)
    assert chunks == [first, second]


def test_line_break_preferred_over_sentence_and_sentence_over_space():
    lines = sentences(1200, seed=3) + "\n" + sentences(1500, seed=4)
    assert split_message(lines)[0] == sentences(1200, seed=3)
    prose = sentences(3000, seed=5)
    chunks = split_message(prose)
    assert all(chunk.endswith(".") for chunk in chunks)
    assert " ".join(chunks) == prose


def test_a_short_opening_paragraph_does_not_go_out_alone():
    # A paragraph break in the first half of the message would waste most of it; the cut
    # goes to a later, lesser break instead.
    text = "Sure!\n\n" + sentences(3000, seed=6)
    chunks = split_message(text)
    assert chunks[0].startswith("Sure!\n\n") and len(chunks[0]) > 1000
    assert_well_formed(chunks)


def test_single_over_long_word_is_hard_split():
    chunks = split_message("a" * 4500)
    assert [len(c) for c in chunks] == [2000, 2000, 500]
    assert "".join(chunks) == "a" * 4500


def test_over_long_url_between_words_is_hard_split_but_words_are_not():
    url = "https://example.com/" + "p" * 2500
    text = "see " + url + " for details"
    chunks = split_message(text)
    assert_well_formed(chunks)
    assert chunks[0] == "see"
    assert "".join(chunks[1:]) == url + " for details"


# --- grapheme clusters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "index", "expected"),
    [
        (FAMILY, 1, False), (FAMILY, 2, False), (FAMILY, 3, False), (FAMILY, 4, False),
        (FLAG_FR + FLAG_DE, 1, False), (FLAG_FR + FLAG_DE, 2, True), (FLAG_FR + FLAG_DE, 3, False),
        ("\U0001F1EB" + FLAG_FR, 1, False), ("\U0001F1EB" + FLAG_FR, 2, True),  # pairs count from the run's start
        (THUMB_MEDIUM, 1, False), (THUMB_MEDIUM + "x", 2, True),
        (RAINBOW_FLAG, 1, False), (RAINBOW_FLAG, 2, False), (RAINBOW_FLAG, 3, False),
        (SCOTLAND, 1, False), (SCOTLAND, 6, False), (SCOTLAND + "a", 7, True),
        (KEYCAP_ONE, 1, False), (KEYCAP_ONE, 2, False),
        (E_ACUTE, 1, False), ("ab", 1, True), (HEART, 1, False),
        ("a\u200db", 1, False), ("a\u200db", 2, True),  # a ZWJ joins the next only between pictographs
        ("\r\n", 1, False), ("a\nb", 1, True), ("a\nb", 2, True),
        ("", 0, True), ("abc", 0, True), ("abc", 3, True),
    ],
)
def test_grapheme_boundary_hand_checked(text, index, expected):
    assert is_grapheme_boundary(text, index) is expected


def test_grapheme_boundary_rejects_index_out_of_range():
    with pytest.raises(ValueError, match=r"`index`.*got 4"):
        is_grapheme_boundary("abc", 4)


def test_grapheme_boundary_agrees_with_regex_module():
    # `regex` comes with transformers; its \X implements all of UAX #29, so it is an oracle here.
    regex = pytest.importorskip("regex")
    text = "".join(CLUSTERS) + " plain é \u0915\u093f x" + "".join(reversed(CLUSTERS)) + FLAG_FR * 3 + "\U0001F1EB"
    expected = {0}
    for match in regex.finditer(r"\X", text):
        expected.add(match.end())
    assert {i for i in range(len(text) + 1) if is_grapheme_boundary(text, i)} == expected


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_cluster_straddling_the_limit_is_never_cut(cluster):
    for lead in range(2000 - len(cluster), 2001):
        text = "x" * lead + cluster * 3
        chunks = split_message(text)
        assert_well_formed(chunks)
        for offset in cut_offsets(text, chunks):
            assert is_grapheme_boundary(text, offset), (lead, offset)
        assert chunks[0] == text[: len(chunks[0])]
        assert chunks[0].endswith("x") or chunks[0].endswith(cluster)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_long_run_of_clusters_splits_only_between_them(cluster):
    for lead in range(len(cluster)):
        text = "x" * lead + cluster * (5000 // len(cluster))
        chunks = split_message(text)
        assert_well_formed(chunks)
        for chunk in chunks[1:]:
            assert chunk.startswith(cluster)
        for offset in cut_offsets(text, chunks):
            assert is_grapheme_boundary(text, offset)
            assert (offset - lead) % len(cluster) == 0 or offset < lead


def test_mixed_emoji_run_is_never_cut_inside_a_cluster():
    rng = random.Random(7)
    text = "".join(rng.choice(CLUSTERS) for _ in range(2000))
    chunks = split_message(text, limit=MIN_LIMIT)
    assert_well_formed(chunks, limit=MIN_LIMIT)
    for offset in cut_offsets(text, chunks):
        assert is_grapheme_boundary(text, offset)
        assert text[offset] != "\u200d" and text[offset - 1] != "\u200d"
        assert not ("\U0001F3FB" <= text[offset] <= "\U0001F3FF")
    # Flags stay pairs: no chunk holds an odd number of regional indicators.
    for chunk in chunks:
        assert sum("\U0001F1E6" <= ch <= "\U0001F1FF" for ch in chunk) % 2 == 0


def test_cluster_longer_than_a_message_is_cut_rather_than_unsendable():
    # Thousands of stacked combining marks are one cluster; cutting it is the only way to send it.
    text = "e" + "\u0301" * 4500
    chunks = split_message(text)
    assert [len(c) for c in chunks] == [2000, 2000, 501]
    assert "".join(chunks) == text


def test_combining_mark_after_a_space_stays_with_it():
    # A space carrying a combining mark is how a lone accent is written: one visible cluster,
    # so the chunk starts with it rather than with a bare mark (and does not trim it away).
    text = "word " * 399 + "abcd \u0301tail more words"
    chunks = split_message(text)
    assert len(chunks) == 2 and all(len(chunk) <= 2000 for chunk in chunks)
    assert chunks[1].startswith(" \u0301tail")
    assert " ".join(chunks).split() == text.split()


# --- code fences ---------------------------------------------------------------------------


def code_lines(n_chars: int) -> list[str]:
    lines, i = [], 0
    while sum(len(line) + 1 for line in lines) < n_chars:
        lines.append(f"def f{i}(x):" if i % 4 == 0 else f"    if x > {i}:\n        return x * {i}  # deep")
        i += 1
    return "\n".join(lines).split("\n")


def code_of(chunks: list[str]) -> list[str]:
    """The code lines of all chunks, in order, without fence lines."""
    out: list[str] = []
    for chunk in chunks:
        inside = False
        for line in chunk.split("\n"):
            if FENCE_LINE.match(line):
                inside = not inside
            elif inside:
                out.append(line)
    return out


def test_long_python_block_is_closed_and_reopened_with_its_language():
    code = code_lines(3000)
    text = "Here is the code:\n\n```python\n" + "\n".join(code) + "\n```\n\nHope that helps."
    chunks = split_message(text)
    assert len(chunks) == 2
    assert_well_formed(chunks)
    assert chunks[0].startswith("Here is the code:\n\n```python\n") and chunks[0].endswith("\n```")
    assert chunks[1].startswith("```python\n") and chunks[1].endswith("Hope that helps.")
    assert code_of(chunks) == code  # indentation kept, nothing lost, no line cut


@pytest.mark.parametrize("limit", [MIN_LIMIT, 300, 1000])
def test_python_block_with_small_limits_reopens_every_chunk(limit):
    code = code_lines(3000)
    text = "```python\n" + "\n".join(code) + "\n```"
    chunks = split_message(text, limit=limit)
    assert len(chunks) > 3
    assert_well_formed(chunks, limit=limit)
    assert all(chunk.startswith("```python\n") and chunk.endswith("\n```") for chunk in chunks)
    assert code_of(chunks) == code
    # Lines go out whole and no chunk starts with an empty code block.
    for chunk in chunks:
        assert chunk.split("\n")[1].strip()


def test_mixed_prose_and_fences():
    js = code_lines(900)
    plain = ["$ make test", "  all good"] * 60
    text = (
        sentences(700, seed=8) + "\n\n```js\n" + "\n".join(js) + "\n```\n" + sentences(900, seed=9)
        + "\n\n```\n" + "\n".join(plain) + "\n```\n\n" + sentences(400, seed=10)
    )
    chunks = split_message(text, limit=500)
    assert_well_formed(chunks, limit=500)
    assert code_of(chunks) == js + plain
    # Every chunk that continues a block reopens it with that block's tag (none for the plain one).
    for chunk in chunks:
        first = chunk.split("\n")[0]
        if first.startswith("```") and first != "```js":
            assert first == "```"
    assert any(chunk.startswith("```js\n") for chunk in chunks[1:])
    prose_words = [w for c in chunks for line in c.split("\n") for w in line.split()]
    original = [w for line in text.split("\n") for w in line.split()]
    strip_fences = [w for w in prose_words if not w.startswith("```")]
    assert strip_fences == [w for w in original if not w.startswith("```")]


def test_unclosed_fence_is_closed_between_chunks_and_left_as_written_at_the_end():
    code = code_lines(2500)
    text = "```py\n" + "\n".join(code)
    chunks = split_message(text)
    assert chunks[0].endswith("\n```") and chunks[1].startswith("```py\n")
    assert not chunks[-1].endswith("```")
    assert code_of([c + ("" if c.endswith("```") else "\n```") for c in chunks]) == code


def test_fence_with_freak_info_string_reopens_untagged():
    text = "```" + "x" * 60 + "\n" + "\n".join(code_lines(400)) + "\n```"
    chunks = split_message(text, limit=MIN_LIMIT)
    assert_well_formed(chunks, limit=MIN_LIMIT)
    assert all(chunk.startswith("```\n") for chunk in chunks[1:])


def test_crlf_text_splits_at_line_breaks():
    text = "\r\n".join(sentences(300, seed=s) for s in range(10))
    chunks = split_message(text)
    assert_well_formed(chunks)
    assert "\r" not in "".join(chunks)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [99, 0, -5])
def test_limit_below_minimum_raises(limit):
    with pytest.raises(ValueError, match=rf"`limit`.*got {limit}"):
        split_message("hello", limit=limit)


@pytest.mark.parametrize("limit", [2000.0, "2000", True])
def test_limit_of_wrong_type_raises(limit):
    with pytest.raises(TypeError, match="`limit`"):
        split_message("hello", limit=limit)


def test_text_of_wrong_type_raises():
    with pytest.raises(TypeError, match="`text`"):
        split_message(None)  # type: ignore[arg-type]


# --- properties ----------------------------------------------------------------------------

_ALPHABET = st.sampled_from(["a", "bc", " ", "\n", "\n\n", ".", "  ", "```py\n", "\n```\n", "    "] + CLUSTERS)


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_ALPHABET, max_size=400), limit=st.integers(MIN_LIMIT, 260))
def test_any_text_gives_bounded_trimmed_chunks_that_keep_every_character(parts, limit):
    text = "".join(parts)
    chunks = split_message(text, limit=limit)
    for chunk in chunks:
        assert chunk and len(chunk) <= limit and chunk == chunk.strip()

    def visible(s: str) -> str:
        # What a reader gets, less whitespace and the fences the split adds (or keeps).
        return re.sub(r"\s+", "", s).replace("```py", "").replace("`", "")

    assert visible("".join(chunks)) == visible(text)
