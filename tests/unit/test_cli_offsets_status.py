"""``sluice status`` and ``sluice offsets``: flags refused before any service is touched,
and the pieces that need no broker (log identities, lag, reset plans, group assignments)."""

from __future__ import annotations

from datetime import UTC, datetime

import click
import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from click.testing import CliRunner

from sluicegate.cli import cli, main
from sluicegate.cli_offsets import plan_reset, reset_line
from sluicegate.kafka_groups import GroupMember, GroupView, decode_assignment
from sluicegate.progress_view import Holder, PartitionState
from sluicegate.sinks.progress import LogId, StoredOffset, classify

# Nothing answers here: a test that reached a service would fail on it.
DEAD_ENV = {
    "SLUICE_NATS_URL": "nats://127.0.0.1:1",
    "SLUICE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    "SLUICE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    "SLUICE_PARTITIONS": "4",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in DEAD_ENV.items():
        monkeypatch.setenv(name, value)


def invoke(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--step", "intake"], "exactly one of --to-earliest, --to-latest, --to N"),
        (["--step", "intake", "--to-latest", "--to-earliest"], "got --to-earliest and --to-latest"),
        (["--step", "intake", "--to", "3", "--to-latest"], "got --to-latest and --to N"),
        (["--step", "intake", "--to", "-1"], "-1"),
        (["--step", "nope", "--to-latest"], "unknown step 'nope'; the pipeline has intake"),
        (["--step", "intake", "--partition", "4", "--to-latest"], "partitions 0..3"),
        (["--step", "intake", "--partition", "-1", "--to-latest"], "unknown partition -1"),
        (["--step", "responder", "--topic", "tasks", "--to-latest"], "reads tool.results"),
        (["--to-latest"], "Missing option '--step'"),
        (["--step", "intake", "--to-latest", "--transport", "pigeon"], "pigeon"),
    ],
)
def test_reset_argument_errors_exit_2(args: list[str], needle: str) -> None:
    result = invoke("offsets", "reset", *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["offsets", "show"], "Missing option '--step'"),
        (["offsets", "show", "--step", "gate2"], "the pipeline has intake"),
        (["offsets", "show", "--step", "gate", "--partition", "9"], "partitions 0..3"),
        (["status", "--step", "nope"], "unknown step 'nope'"),
        (["status", "--transport", "pigeon"], "pigeon"),
    ],
)
def test_show_and_status_argument_errors_exit_2(args: list[str], needle: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_errors_are_one_line_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["offsets", "reset", "--step", "nope", "--to-latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("sluice offsets reset: error:")
    assert "intake, context, planner, gate, tools, responder" in err[0]


def test_unreachable_service_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "nats://127.0.0.1:1" in lines[0]
    assert "Traceback" not in captured.err


def test_help_of_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["offsets", "reset", "--help"]) == 0
    assert "--to-earliest" in capsys.readouterr().out
    assert main(["status", "--help"]) == 0
    assert '"partitions"' in capsys.readouterr().out


# --- log identities ---------------------------------------------------------------

NATS_LOG = "nats:sluice_tasks@2026-12-07T15:14:00.123456+00:00"
KAFKA_LOG = "kafka:sluice.tasks@01a25131-5a4e-7753-a5f0-08b1e573eab1"


def test_log_id_parses_times_with_colons() -> None:
    parsed = LogId.parse(NATS_LOG)
    assert parsed == LogId("nats", "sluice_tasks", "2026-12-07T15:14:00.123456+00:00")
    assert LogId.parse("tasks") is None


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        (NATS_LOG, "current"),
        ("nats:sluice_tasks@2026-12-01T00:00:00+00:00", "older incarnation"),
        (KAFKA_LOG, "other transport"),
        ("tasks", "legacy"),
        ("nats:other_topic@2026-12-01T00:00:00+00:00", "other log"),
    ],
)
def test_stored_rows_are_classified_against_the_current_logs(topic: str, kind: str) -> None:
    assert classify(topic, [NATS_LOG]) == kind


# --- partitions: lag, stopped, reset plans ------------------------------------------


def state(
    *,
    offset: int | None,
    end: int | None,
    log: str | None = KAFKA_LOG,
    holder: Holder | None = None,
    known: bool = True,
    empty_end: int = -1,
) -> PartitionState:
    stored = StoredOffset(
        "intake", log or "-", 1, offset, 3, "host-1", datetime(2026, 1, 1, tzinfo=UTC)
    )
    return PartitionState(
        step="intake",
        topic="tasks",
        partition=1,
        log=log,
        stored=stored,
        log_end=end,
        empty_end=empty_end,
        holder=holder,
        liveness_known=known,
    )


def test_lag_and_stopped() -> None:
    assert state(offset=10, end=15).lag == 5
    assert state(offset=None, end=15).lag == 16  # Kafka: offsets 0..15 wait
    assert state(offset=None, end=15, empty_end=0).lag == 15  # NATS: sequences 1..15
    ahead = state(offset=40, end=15)
    assert ahead.stopped and ahead.lag == 0
    assert ahead.to_json()["beyond_end"] == 25
    assert state(offset=None, end=None, log=None).lag is None


def test_owner_is_the_holder_else_the_last_claimer() -> None:
    held = state(offset=1, end=1, holder=Holder("w-9", "lease"))
    assert (held.owner, held.owner_source, held.held) == ("w-9", "lease", True)
    idle = state(offset=1, end=1)
    assert (idle.owner, idle.owner_source, idle.held) == ("host-1", "last_claim", False)
    group = state(offset=1, end=1, holder=Holder("m1, m2", "group", exact=False))
    assert (group.owner, group.owner_source, group.held) == ("host-1", "last_claim", True)
    assert state(offset=1, end=1, known=False).held is None


def test_reset_plans() -> None:
    [latest] = plan_reset([state(offset=10, end=15)], "latest", None, force=False)
    assert (latest.new, latest.skipped) == (15, 5)
    [earliest] = plan_reset([state(offset=10, end=15)], "earliest", None, force=False)
    assert earliest.new is None
    [to] = plan_reset([state(offset=10, end=15)], "to", 7, force=False)
    assert (to.new, to.back) == (6, True)
    assert "delivered again" in reset_line("intake", to, None)
    [ahead] = plan_reset([state(offset=10, end=15)], "to", 14, force=False)
    assert (ahead.new, ahead.skipped, ahead.back) == (13, 3, False)
    assert "skips 3 messages" in reset_line("intake", ahead, None)
    [start] = plan_reset([state(offset=10, end=15)], "to", 0, force=False)
    assert start.new is None  # the next offset is the first: nothing processed
    [back] = plan_reset([state(offset=40, end=15)], "latest", None, force=False)
    assert (back.new, back.skipped) == (15, 0)
    assert "back from 40" in reset_line("intake", back, None)


def test_reset_refusals() -> None:
    held = state(offset=1, end=5, holder=Holder("w-9", "lease"))
    with pytest.raises(click.ClickException, match="live worker w-9 holds its NATS lease"):
        plan_reset([held], "latest", None, force=False)
    assert plan_reset([held], "latest", None, force=True)[0].new == 5
    group = state(offset=1, end=5, holder=Holder("m1, m2", "group", exact=False, group="p.gate"))
    with pytest.raises(click.ClickException, match=r"group p.gate holds it \(m1, m2\)"):
        plan_reset([group], "earliest", None, force=False)
    unknown = state(offset=1, end=5, known=False)
    with pytest.raises(click.ClickException, match="cannot tell whether"):
        plan_reset([unknown], "earliest", None, force=False)
    with pytest.raises(click.ClickException, match="has no log yet"):
        plan_reset([state(offset=None, end=None, log=None)], "earliest", None, force=True)
    with pytest.raises(click.BadParameter, match="N may be at most 6"):
        plan_reset([state(offset=1, end=5)], "to", 7, force=True)


# --- Kafka group members ---------------------------------------------------------------


def test_assignments_decode_from_the_consumer_protocol() -> None:
    raw = ConsumerProtocolMemberAssignment(0, [("p.tasks", [0, 2])], b"").encode()
    assert decode_assignment(raw) == {("p.tasks", 0), ("p.tasks", 2)}
    assert decode_assignment(b"") is None
    assert decode_assignment(b"\x00") is None
    member = GroupMember("m-1", "client", "/10.0.0.7", frozenset({("p.tasks", 2)}))
    group = GroupView("p.intake", "Stable", (member,))
    assert group.live and group.assignments_known
    assert group.holder("p.tasks", 2) is member
    assert group.holder("p.tasks", 1) is None
    assert member.name == "client@10.0.0.7"
    assert not GroupView("p.intake", "Empty").live


async def test_kafka_owners_from_assignments_and_from_live_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real Kafka reports who is assigned what; Tansu only that a group is live."""
    from sluicegate import progress_view
    from sluicegate.cli_status import pipeline_steps
    from sluicegate.settings import Settings

    steps = [s for s in pipeline_steps() if s.name in ("intake", "responder", "gate")]
    assigned = GroupMember("m-1", "w1", "/10.0.0.1", frozenset({("p.tasks", 0), ("p.tasks", 2)}))
    other = GroupMember("m-2", "w2", "/10.0.0.2", frozenset({("p.tasks", 1), ("p.tasks", 3)}))
    tansu = GroupMember("m-3", "", "", None)
    seen: dict[str, object] = {}

    async def fake(
        bootstrap: str, groups: list[str], *, listed_prefix: str | None = None, **_: object
    ) -> dict[str, GroupView]:
        seen["groups"], seen["listed"] = groups, listed_prefix
        return {
            "p.intake": GroupView("p.intake", "Stable", (assigned, other)),
            "p.faust.gate": GroupView("p.faust.gate", "Stable", (tansu,)),
            "p.responder": GroupView("p.responder", "Empty"),
        }

    monkeypatch.setattr(progress_view, "describe_groups", fake)
    settings = Settings(transport="kafka", topic_prefix="p", partitions=4)
    kind, workers, holders = await progress_view._kafka_owners(settings, steps)
    assert kind == "groups"
    assert "p.faust" in seen["groups"] and "p.faust.gate" in seen["groups"]  # type: ignore[operator]
    assert seen["listed"] == "p.faust."
    assert [(w.worker, w.steps) for w in workers] == [
        ("w1@10.0.0.1", ("intake",)),
        ("w2@10.0.0.2", ("intake",)),
        ("m-3", ("gate",)),
    ]
    assert workers[0].detail["partitions"] == ["p.tasks[0]", "p.tasks[2]"]
    assert holders[("intake", ("p.tasks", 1))] == Holder(
        "w2@10.0.0.2", "assignment", group="p.intake"
    )
    gate = holders[("gate", ("p.actions.proposed", 3))]
    assert (gate.exact, gate.group, gate.worker) == (False, "p.faust.gate", "m-3")
    assert not any(step == "responder" for step, _ in holders)
