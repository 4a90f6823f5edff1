"""``sluice bench`` flag handling that needs no broker."""

from __future__ import annotations

import pytest

from sluicegate.cli import main


def test_unknown_transport_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--transport", "nats,rabbit"]) == 2
    assert "--transport" in capsys.readouterr().err


def test_sizes_below_the_stamp_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--sizes", "8,256"]) == 2
    assert "16 bytes" in capsys.readouterr().err
