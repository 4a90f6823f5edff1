"""The one error path: every failure is one line, with the right exit code and a hint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sluicegate.cli import main
from sluicegate.cli_errors import describe, redact
from sluicegate.policy.bundle import BundleError
from sluicegate.policy.lint import require_sound
from sluicegate.policy.testing import copy_reference_bundle


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_HOME", str(tmp_path / "home"))


def test_unreachable_default_postgres_says_run_local_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens on this local-stack port in the tests.
    monkeypatch.setenv("SLUICE_LOCAL_POSTGRES_PORT", "1")
    assert main(["run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "sluice: error: cannot connect to Postgres at postgresql://postgres@127.0.0.1:1/postgres: "
    )
    assert err[0].endswith("run `sluice local up` (or set SLUICE_DATABASE_URL)")


def test_unreachable_configured_nats_has_no_local_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLUICE_NATS_URL", "nats://127.0.0.1:1")
    assert main(["status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sluice: error: cannot connect to NATS at nats://127.0.0.1:1")
    assert "local up" not in err[0]


def test_missing_policy_bundle_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("SLUICE_POLICY_BUNDLE", str(tmp_path / "nowhere"))
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sluice: error: policy bundle {tmp_path / 'nowhere'} is not a directory"]


def test_a_bug_is_one_line_naming_the_exception() -> None:
    failure = describe(KeyError("x"))
    assert failure.exit_code == 1
    assert failure.line == "KeyError: 'x' (SLUICE_DEBUG=1 shows the traceback)"


def test_passwords_never_reach_the_line() -> None:
    assert redact("postgresql://u:secret@h:1/db") == "postgresql://u:***@h:1/db"


def test_a_worker_refuses_a_bundle_without_data(tmp_path: Path) -> None:
    bundle = copy_reference_bundle(tmp_path / "bundle")
    (bundle / "data.json").unlink()
    with pytest.raises(BundleError, match=r"fails `sluice policy check .*`: has no data.json"):
        require_sound(bundle)


def test_the_reference_bundle_is_sound() -> None:
    from sluicegate.policy.bundle import default_bundle_path

    assert require_sound(default_bundle_path()).ok


def test_a_missing_extra_names_the_extra_to_install() -> None:
    exc = ModuleNotFoundError("No module named 'hdrh'", name="hdrh.histogram")
    failure = describe(exc)
    assert failure.exit_code == 2
    assert "[bench] extra" in failure.line
    assert "pip install 'sluicegate[bench]'" in failure.line
    # Someone else's missing module is not ours to explain.
    other = describe(ModuleNotFoundError("No module named 'foo'", name="foo"))
    assert "extra" not in other.line


def test_aiokafkas_bootstrap_error_is_not_said_twice(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from sluicegate.cli_errors import quiet_duplicates

    quiet_duplicates()
    logger = logging.getLogger("aiokafka")
    with caplog.at_level(logging.ERROR, logger="aiokafka"):
        logger.error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, "refused")
        logger.error("Unable connect to node with id %s: %s", 1, "refused")
    assert [r.getMessage() for r in caplog.records] == ["Unable connect to node with id 1: refused"]


def test_a_broken_rego_file_is_the_bundles_problem(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bundle = copy_reference_bundle(tmp_path / "bundle")
    (bundle / "broken.rego").write_text("package sluice.gate\nthis is not rego\n")
    monkeypatch.setenv("SLUICE_POLICY_BUNDLE", str(bundle))
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sluice: error: policy bundle: --> broken.rego:2:1")
