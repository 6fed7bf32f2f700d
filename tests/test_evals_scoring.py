"""Scorers on hand-written predictions: all, part, none, case and whitespace differences."""

import pytest

from evals.scoring import forced_correct, string_match_all, string_match_part, truncate_prediction


def test_string_match_all_counts_the_fraction_found():
    refs = ["7429113", "Banana", "fearless-toad"]
    assert string_match_all("7429113, banana and FEARLESS-TOAD.", refs) == 1.0
    assert string_match_all("The numbers are 7429113 and banana.", refs) == pytest.approx(2 / 3)
    assert string_match_all("I do not know.", refs) == 0.0
    assert string_match_all("the answer is BANANA", ["banana"]) == 1.0


def test_string_match_part_is_any_reference():
    refs = ["Denver Broncos", "Broncos"]
    assert string_match_part("the broncos won", refs) == 1.0
    assert string_match_part("The DENVER   broncos", refs) == 1.0  # whitespace runs collapse
    assert string_match_part("the panthers won", refs) == 0.0


def test_substring_not_token_match():
    assert string_match_all("12345678", ["2345"]) == 1.0  # RULER scores substrings
    assert string_match_all("1234", ["12345"]) == 0.0


def test_empty_references_refused():
    with pytest.raises(ValueError, match="reference"):
        string_match_all("x", [])


def test_forced_correct_needs_every_token():
    assert forced_correct([5, 6, 7], [5, 6, 7])
    assert not forced_correct([5, 6, 8], [5, 6, 7])
    assert not forced_correct([5, 6], [5, 6, 7])


def test_truncate_prediction_stops_at_blank_line():
    assert truncate_prediction("  12345\n\nThe pass key is") == "12345"
    assert truncate_prediction("a\nb") == "a\nb"
