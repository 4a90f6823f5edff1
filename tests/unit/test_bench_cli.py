"""``sluice bench`` flag handling that needs no broker."""

from __future__ import annotations

import pytest

from sluicegate.cli import main


def test_pipeline_mode_is_not_yet_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--mode", "pipeline"]) == 2
    err = capsys.readouterr().err
    assert "--mode pipeline is not implemented yet" in err


def test_unknown_transport_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--transport", "nats,rabbit"]) == 2
    assert "--transport" in capsys.readouterr().err


def test_sizes_below_the_stamp_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--sizes", "8,256"]) == 2
    assert "16 bytes" in capsys.readouterr().err
