"""What the ``lens`` command prints of a capture's strings: shown, never obeyed by the terminal."""

from __future__ import annotations

import pytest

from lens_callbacks.cli.text import escape, table


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("conv2d_3_7", "conv2d_3_7"),
        ("features.6:1", "features.6:1"),
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),  # sets the window title
        ("\x1b[2J", "\\x1b[2J"),  # clears the screen
        ("a\nFORGED line", "a\\x0aFORGED line"),
        ("a\rFORGED", "a\\x0dFORGED"),
        ("\x9b31m", "\\x9b31m"),  # the one-byte CSI of C1
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # right-to-left override
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("tab\there", "tab\\x09here"),
        ("émoji ✓ 数据", "émoji ✓ 数据"),
    ],
)
def test_escape_shows_control_characters(text: str, shown: str) -> None:
    assert escape(text) == shown


def test_table_escapes_every_cell_and_aligns_what_it_shows() -> None:
    printed = table(["label", "n"], [["relu\x1b[2J\nFORGED", "1"], ["conv", "22"]], numeric={1})
    assert printed.splitlines() == [
        "label                   n",
        "---------------------  --",
        "relu\\x1b[2J\\x0aFORGED   1",
        "conv                   22",
    ]
