"""The operator console (`/console`) of `relay run` in headless Chromium (Debian's `chromium`,
driven by Playwright with that executable, as the chat page's test does): a wrong token is
refused; with an admin token, find the dead letters of an endpoint that failed, replay one,
purge one, replay the rest, and see them delivered in the conversation's timeline, in the
attempts and at the endpoint; resend one; recover the purged one; give the integration a
new signing secret, shown once; give it its own bot and a pace, and take them back. Both
stores.

`RELAY_SCREENSHOT=docs/console.png pytest tests/test_console_page.py` also saves a picture
of the populated console (the docs' admin page, docs/api/admin.md).
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from playwright.async_api import (
    Browser,
    Dialog,
    Error,
    Locator,
    Page,
    expect,
)

from relay import admin
from relay.settings import Settings
from relay.store import SqlStore
from tests.fleet import fleet
from tests.helpers import eventually, make_integration, message
from tests.receivers import Hit, Receiver

CONVERSATION = "console-conv"
# Three quick attempts, then the dead-letter queue; no breaker in the way of the 500s.
FAST_DEATH = {"RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.2,0.2", "RELAY_BREAKER_THRESHOLD": "1000"}


@pytest.mark.timeout(240)
async def test_log_in_find_dead_letters_replay_and_purge_them_and_see_them_delivered(
    settings: Settings, store: SqlStore, receiver: Receiver, browser: Browser
):
    started = datetime.now(UTC) - timedelta(minutes=1)
    admin_token, _ = await admin.create_token(store, None, "admin")
    # The endpoint fails until the test lets it answer (its own path: the receiver serves
    # both stores' runs).
    endpoint = f"console-{uuid.uuid4().hex[:8]}"
    url = receiver.on(endpoint, *[500] * 1000)
    integration_id, token = await make_integration(store, settings, "console-shop", url)
    made = await store.get_integration(integration_id)
    assert made is not None
    old_secret = made.signing_secret
    async with fleet(settings, env=FAST_DEATH) as services:
        relay = await services.start("run")
        await post_messages(relay.url, integration_id, token)
        # UTC in the page too: the time fields read as local time.
        context = await browser.new_context(
            viewport={"width": 1200, "height": 800}, timezone_id="UTC"
        )
        page = await context.new_page()
        page.on("dialog", accept)
        errors: list[Error] = []
        page.on("pageerror", lambda error: errors.append(error))
        try:
            answer = await page.goto(f"{relay.url}/console")
            assert answer is not None
            assert answer.headers["cache-control"] == "no-store"
            assert "connect-src 'self'" in answer.headers["content-security-policy"]
            await log_in(page, "not-an-admin-token")
            await expect(page.locator("#login-error")).to_contain_text("refused")
            await log_in(page, admin_token)
            await expect(page.locator("#queues-rows tr").first).to_contain_text(
                settings.queue_prefix
            )

            # Each message's two responses (typing, then the echo) die after three attempts.
            await open_tab(page, "dead")
            await page.fill("#dead-form [name=integrationId]", integration_id)
            dead = page.locator("#dead-rows tr")
            await refreshed_until(page, "#dead-form button[type=submit]", dead, 4)
            receiver.scripts[endpoint] = []  # the endpoint is back
            await act(page, dead.filter(has_text="echo: hello 1"), "Replay")
            await expect(page.locator("#notice")).to_have_text("Replayed 1 dead letter(s).")
            await act(page, dead.filter(has_text="typing").first, "Purge")
            await expect(page.locator("#notice")).to_have_text("Purged 1 dead letter(s).")
            await expect(dead).to_have_count(2)
            await page.click("#dead-replay-all")
            await expect(page.locator("#notice")).to_have_text("Replayed 2 dead letter(s).")
            await expect(dead).to_have_count(0)

            # The integration's attempts: the failures, then the deliveries.
            await open_tab(page, "integrations")
            await act(
                page, page.locator("#integrations-rows tr", has_text=integration_id), "Attempts"
            )
            await page.select_option("#attempts-form [name=statusClass]", "2xx")
            attempts = page.locator("#attempts-rows tr")
            await refreshed_until(page, "#attempts-form button[type=submit]", attempts, 3)
            await page.select_option("#attempts-form [name=statusClass]", "5xx")
            await refreshed_until(page, "#attempts-form button[type=submit]", attempts, 12)

            # The timeline: three responses delivered, the purged one dead.
            await act(page, attempts.first, "Timeline")
            sent = page.locator("#timeline li[data-state=delivered]")
            await refreshed_until(page, "#conversation-form button[type=submit]", sent, 3)
            await expect(page.locator("#timeline > li")).to_have_count(6)
            await expect(page.locator("#timeline li[data-state=dead]")).to_have_count(1)
            echo = sent.filter(has_text="echo: hello 1")
            await expect(echo.locator(".attempts li")).to_have_count(4)  # 500, 500, 500, 200
            if os.environ.get("RELAY_SCREENSHOT"):
                await page.screenshot(path=os.environ["RELAY_SCREENSHOT"])

            # Resend a delivered response: the endpoint gets it again, same webhook-id.
            await act(page, echo, "Resend")
            await eventually(lambda: delivered(receiver, endpoint, "echo: hello 1", 2), timeout=30)
            assert (
                len({hit.headers["webhook-id"] for hit in ok(receiver, endpoint, "echo: hello 1")})
                == 1
            )

            # Recover what died since the test began: the purged typing indicator.
            await open_tab(page, "integrations")
            row = page.locator("#integrations-rows tr", has_text=integration_id)
            await row.locator("input[type=datetime-local]").fill(
                started.strftime("%Y-%m-%dT%H:%M:%S")
            )
            await act(page, row, "Recover since")
            await expect(page.locator("#notice")).to_have_text(
                "console-shop: 1 response(s) sent again."
            )
            await open_tab(page, "conversation")
            await refreshed_until(page, "#conversation-form button[type=submit]", sent, 4)

            # A new signing secret, shown this once; the old one signs too for a day.
            await open_tab(page, "integrations")
            row = page.locator("#integrations-rows tr", has_text=integration_id)
            await act(page, row, "Rotate secret")
            await expect(page.locator("#secret-box")).to_be_visible()
            secret = await page.locator("#secret-value").input_value()
            record = await store.get_integration(integration_id)
            assert record is not None
            assert record.signing_secrets(datetime.now(UTC)) == [secret, old_secret]
            await expect(page.locator("#secret-label")).to_contain_text("shown this once")
            await page.click("#secret-done")
            await expect(page.locator("#secret-box")).to_be_hidden()
            assert await page.locator("#secret-value").input_value() == ""
            assert secret.removeprefix("whsec_") not in await page.content()

            # Its own bot and a pace: the bot's secret is written, never shown again.
            await act(page, row, "Settings")
            form = page.locator("#settings-form")
            await form.locator("[name=adapter]").fill("http")
            await form.locator("[name=botUrl]").fill("http://127.0.0.1:9/bot")
            await form.locator("[name=secret]").fill("bot-secret-CANARY")
            await form.locator("[name=deliveryRate]").fill("5")
            await form.locator("[name=expiringTypes]").fill("typing=10, custom=60")
            await form.get_by_role("button", name="Save").click()
            await idle(page)
            await expect(page.locator("#notice")).to_have_text("console-shop: settings saved.")
            await expect(row).to_contain_text("(secret set)")
            await expect(row).to_contain_text("5/s, burst 5")
            await expect(row).to_contain_text("expire: typing=10, custom=60")
            record = await store.get_integration(integration_id)
            assert record is not None
            assert record.bot is not None
            assert (record.bot.adapter, record.bot.secret) == ("http", "bot-secret-CANARY")
            assert record.delivery.delivery_rate == 5
            assert "bot-secret-CANARY" not in await page.content()
            # Back to the deployment's bot, unpaced.
            await act(page, row, "Settings")
            await form.locator("[name=adapter]").fill("")
            await form.locator("[name=deliveryRate]").fill("")
            await form.get_by_role("button", name="Save").click()
            await idle(page)
            await expect(row).to_contain_text("RELAY_BOT")
            await expect(row).to_contain_text("unpaced")

            await page.click("#logout")
            await expect(page.locator("#login")).to_be_visible()
            assert await page.evaluate("sessionStorage.length") == 0
            assert errors == []
        finally:
            await context.close()
    assert await delivered(receiver, endpoint, "echo: hello 2", 1)


async def post_messages(base: str, integration_id: str, token: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        for n in (1, 2):
            body = message(n, conversationId=CONVERSATION)
            async with http.post(f"{base}/webhooks/{integration_id}", json=body) as answer:
                assert answer.status == 200, await answer.text()


async def accept(dialog: Dialog) -> None:
    """The console asks before it purges or replays many."""
    await dialog.accept()


async def log_in(page: Page, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#login-button")
    await idle(page)


async def open_tab(page: Page, name: str) -> None:
    """Open a tab, and wait until it has loaded."""
    await page.click(f"[data-tab={name}]")
    await idle(page)


async def act(page: Page, row: Locator, name: str) -> None:
    """Press the button `name` of a row, and wait until what it started is done."""
    await row.get_by_role("button", name=name, exact=True).click()
    await idle(page)


async def idle(page: Page) -> None:
    """Until the page's actions (and their API calls) are done."""
    await expect(page.locator("body.busy")).to_have_count(0)


async def refreshed_until(page: Page, button: str, shown: Locator, count: int) -> None:
    """Press `button` (a refresh) until `shown` counts `count` elements, or fail."""

    async def counted() -> bool:
        await page.click(button)
        await idle(page)
        return await shown.count() == count

    await eventually(counted, timeout=30, interval=0.2)


def ok(receiver: Receiver, endpoint: str, text: str) -> list[Hit]:
    """What the endpoint answered 200 to of the response `text`."""
    return [
        hit
        for hit in receiver.at(endpoint)
        if hit.status == 200 and hit.body["payload"].get("text") == text
    ]


async def delivered(receiver: Receiver, endpoint: str, text: str, times: int) -> bool:
    """Whether the endpoint answered 200 to the response `text` at least `times` times."""
    return len(ok(receiver, endpoint, text)) >= times
