"""The one id rule of recsys.data.vocab: exact raw values; an int and its canonical decimal string."""

import numpy as np
import pytest

from recsys.data.vocab import Vocab, canonical_int


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("7", 7), ("-7", -7), ("9223372036854775807", 2**63 - 1),
    (" 1 ", None), ("+1", None), ("01", None), ("-0", None), ("1_0", None), ("１", None),
    ("\u0661", None), ("1\n", None), ("", None), ("-", None), ("1e3", None), ("1" * 400, None),
])
def test_canonical_int_accepts_only_the_canonical_ascii_decimal_form(text, value):
    assert canonical_int(text) == value


def test_int_vocabulary_finds_ints_and_their_canonical_strings_only():
    v = Vocab(np.array([-1, 1, 5, 2**63 - 1]))
    ids = [1, "1", np.int64(5), "5", -1, "-1", 2**63 - 1, str(2**63 - 1)]
    np.testing.assert_array_equal(v.lookup(ids), [2, 2, 3, 3, 1, 1, 4, 4])
    # Near misses are unknown, never mapped to an id (-1 included: garbage is not "-1").
    misses = [" 1 ", "+1", "01", "１", "1.0", 1.0, True, b"1", None, [1], 2**63, -2**63 - 1,
              np.uint64(2**64 - 1), "x", "5\x00"]
    np.testing.assert_array_equal(v.lookup(misses), np.zeros(len(misses)))
    # Arrays, as the data pipeline passes them, follow the same rule.
    np.testing.assert_array_equal(v.lookup(np.array(["1", " 1", "05", "5"])), [2, 0, 0, 3])
    np.testing.assert_array_equal(v.lookup(np.array([5, 7, -1])), [3, 0, 1])
    np.testing.assert_array_equal(v.lookup([[1, 5], [7, "x"]]), [[2, 3], [0, 0]])


def test_str_vocabulary_finds_strings_exactly_and_ints_by_their_decimal_form():
    s = Vocab(np.array(["b", "1", "a"]))
    np.testing.assert_array_equal(s.lookup(["a", "b", 1, np.int64(1), "1"]), [2, 3, 1, 1, 1])
    misses = ["A", " a", "a\x00", "01", "+1", "１", True, 1.0, None]
    np.testing.assert_array_equal(s.lookup(misses), np.zeros(len(misses)))
    np.testing.assert_array_equal(s.lookup(np.array([1, 2])), [1, 0])
    np.testing.assert_array_equal(s.lookup(np.array(["a", "c"])), [2, 0])
