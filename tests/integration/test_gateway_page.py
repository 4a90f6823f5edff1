"""The operator page in a real headless browser (Debian's chromium, driven by Playwright).

An operator enters a key, sees the tenant's pending approvals (and not
another tenant's), approves one and denies one with reasons, and reads a
session's timeline with its trace ids after a task went through the
reference pipeline.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from playwright.async_api import Page, async_playwright, expect

from sluicegate.settings import Settings
from tests.integration.gateway_support import hold, in_thread, new_key, served
from tests.integration.pipeline_support import prepare_database, running_pipeline, settings_for
from tests.integration.test_gateway import TRACE_ID, TRACEPARENT, auth, get, post
from tests.services import new_prefix

pytestmark = pytest.mark.integration


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError(
            "no chromium for the operator page's browser test: apt-get install chromium"
        )
    return path


@pytest.fixture(scope="module")
def page_settings(nats_url: str, database_url: str) -> Settings:
    settings = settings_for(
        "nats",
        nats_url=nats_url,
        kafka_bootstrap="127.0.0.1:1",
        database_url=database_url,
        prefix=new_prefix(),
    )
    in_thread(lambda: prepare_database(settings))
    return settings


@pytest.fixture(scope="module")
def page_url(page_settings: Settings) -> Iterator[str]:
    with served(page_settings) as base:
        yield base


async def test_operator_page(page_settings: Settings, page_url: str) -> None:
    key = new_key(page_settings, "acme")
    for tenant, approval_id in [("acme", "ui-1"), ("acme", "ui-2"), ("globex", "ui-g")]:
        hold(page_settings, tenant, approval_id)
    async with running_pipeline(page_settings):
        status, accepted, _ = await post(
            page_url,
            "/v1/tasks",
            {"session": "a-ui", "data": {"prompt": "what is 6 * 7"}},
            auth(key, traceparent=TRACEPARENT),
        )
        assert status == 202
        assert (await get(page_url, f"/v1/tasks/{accepted['task_id']}?wait=60", auth(key)))[
            0
        ] == 200

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium(), headless=True)
        try:
            page = await browser.new_page()
            await page.goto(f"{page_url}/ui")
            await page.fill("#key", key)
            await page.click("#use-key")
            rows = page.locator("#approvals tbody tr")
            await expect(rows).to_have_count(2)  # acme's two, not globex's
            await expect(page.locator("#approvals")).not_to_contain_text("ui-g")

            await decide(page, "ui-1", "approve", "known customer")
            await expect(rows).to_have_count(1)
            await decide(page, "ui-2", "deny", "over budget")
            await expect(rows).to_have_count(0)
            await expect(page.locator("#status")).to_contain_text("ui-2: denied")

            await page.fill("#session", "a-ui")
            await page.click("#show-timeline")
            timeline = page.locator("#timeline tbody tr")
            await expect(timeline.first).to_contain_text("intake")
            traces = await page.locator("#timeline td.trace").all_text_contents()
            assert traces and set(traces) == {TRACE_ID}
        finally:
            await browser.close()

    status, decided = await get(page_url, "/v1/approvals?status=all", auth(key))
    outcome = {a["id"]: (a["status"], a["decided_reason"]) for a in decided["approvals"]}
    assert outcome == {"ui-1": ("approved", "known customer"), "ui-2": ("denied", "over budget")}


async def decide(page: Page, approval_id: str, verb: str, reason: str) -> None:
    row = page.locator(f'#approvals tbody tr[data-id="{approval_id}"]')
    await row.locator("input.reason").fill(reason)
    await row.locator(f"button.{verb}").click()
