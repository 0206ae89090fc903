"""Stop strings over the whole generation, with vLLM's rules (vllm/v1/engine/detokenizer.py), no engine.

vLLM's ``check_stop_strings``: only the newly added characters (plus ``len(stop) - 1`` before them)
are searched; the stop completing earliest wins; the output is cut before the stop, or after it with
``include_stop_str_in_output``; nothing is checked before ``min_tokens`` tokens.
"""

from __future__ import annotations

from tokenslice_sidecar.stops import StopScanner, find_stop


def test_find_stop_earliest_completion_wins():
    # "cd" completes at 4, "bcde" at 5: the earlier completion wins even though "bcde" starts first
    assert find_stop("abcdef", 6, ["bcde", "cd"], False) == ("cd", 2)
    assert find_stop("abcdef", 6, ["bcde", "cd"], True) == ("cd", 4)


def test_find_stop_searches_only_new_text_and_its_overlap():
    assert find_stop("xxSTOPyy", 2, ["STOP"], False) is None  # completed before the new characters
    assert find_stop("xxSTOPyy", 3, ["STOP"], False) == ("STOP", 2)  # its last character 'P' is new
    assert find_stop("xxST", 1, ["STOP"], False) is None
    assert find_stop("abc", 0, ["a"], False) is None
    assert find_stop("abc", 3, [], False) is None


def _feed_all(scanner: StopScanner, pieces: list[str]) -> tuple[str, str | None]:
    out = ""
    for piece in pieces:
        text, stop = scanner.feed(piece, 1)
        out += text
        if stop is not None:
            return out, stop
    return out + scanner.flush(), None


def test_stop_spanning_pieces_never_leaks():
    """The text of a stop that completes across events (or chunks) is held back, then cut off."""
    scanner = StopScanner(["END!"])
    assert scanner.feed("Hello E", 1) == ("Hell", None)  # 3 characters held back
    assert scanner.feed("N", 1) == ("o", None)
    assert scanner.feed("D", 1) == (" ", None)  # "END" is still held: it may become "END!"
    assert scanner.feed("! more", 1) == ("", "END!")
    assert scanner.text == "Hello "


def test_hold_back_is_longest_stop_minus_one():
    scanner = StopScanner(["abcd", "x"])
    assert scanner.feed("0123456", 1) == ("0123", None)  # 3 characters held: a stop of 4 may be completing
    assert scanner.flush() == "456"


def test_include_stop_str_in_output_holds_nothing_and_keeps_the_stop():
    scanner = StopScanner(["lo w"], include_in_output=True)
    assert scanner.feed("hel", 1) == ("hel", None)
    assert scanner.feed("lo world", 1) == ("lo w", "lo w")
    assert scanner.text == "hello w" and scanner.stop_end == len("hello w")


def test_stop_end_marks_where_the_stop_completed():
    scanner = StopScanner(["cd"])
    assert scanner.feed("abcdef", 3) == ("ab", "cd")
    assert scanner.stop_end == 4  # 'cd' ends at 4: tokens past it are dropped by the driver
    assert scanner.text == "ab"


def test_min_tokens_suppresses_stops_until_reached():
    scanner = StopScanner(["a"], min_tokens=2)
    assert scanner.feed("a", 1) == ("a", None)  # token 1 of 2: not checked (held back nothing: stop len 1)
    assert scanner.feed("a", 1) == ("a", None)  # token 2: still not past min_tokens
    assert scanner.feed("ba", 1) == ("b", "a")  # token 3: checked, and only the new text is searched


def test_no_stops_releases_everything():
    scanner = StopScanner([])
    assert _feed_all(scanner, ["a", "b", "c"]) == ("abc", None)
