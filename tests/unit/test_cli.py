"""The ``sluice`` entry point: help, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import click
import pytest

from sluicegate.cli import COMMANDS, BadSettingError, cli, load_settings, main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    # Never look at a real .sluice: status reads pid files under the home.
    monkeypatch.setenv("SLUICE_HOME", str(tmp_path_factory.mktemp("home")))


def test_help_lists_the_local_group(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "local" in out
    assert "SLUICE_TRANSPORT" in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_registered_command_loads(name: str) -> None:
    with click.Context(cli) as ctx:
        assert isinstance(cli.get_command(ctx, name), click.Command)


def test_local_up_help_documents_eval(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["local", "up", "--help"]) == 0
    assert 'eval "$(sluice local up)"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SLUICE_TRANSPORT", "carrier-pigeon"),
        ("SLUICE_PARTITIONS", "many"),
        ("SLUICE_LOCAL_NATS_PORT", "70000"),
    ],
)
def test_bad_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["local", "status"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert variable in lines[0]
    assert value in lines[0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SLUICE_NATS_URL", "nats://127.0.0.1:not-a-port"),
        ("SLUICE_KAFKA_BOOTSTRAP", "127.0.0.1:99999"),
        ("SLUICE_DATABASE_URL", "host=a,b port=1,2,3"),
    ],
)
def test_unusable_service_url_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["local", "status"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]


def test_bad_flag_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["local", "up", "--no-such-flag"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "--no-such-flag" in lines[0]


def test_bad_service_name_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["local", "up", "rabbitmq"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "rabbitmq" in lines[0]


def test_unknown_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_flag_override_is_named_as_a_flag() -> None:
    with pytest.raises(BadSettingError, match=r"--partitions=0"):
        load_settings(partitions=0)


def test_flags_override_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TRANSPORT", "nats")
    assert load_settings(transport="kafka").transport == "kafka"
    assert load_settings(transport=None).transport == "nats"
