"""The chat page of `relay run` in headless Chromium (Debian's `chromium`, installed by
`scripts/ensure-browser`, which `make test` runs; driven by Playwright with that
executable): sign in with the integration token, type a message, see the echo bot's reply,
reload, see the conversation again; the token is never in the page's address or its
history (an old link with one in its fragment is cleaned, and not used). Both stores;
`relay run` as `make run` starts it, with RELAY_CHAT_PAGE=true."""

from __future__ import annotations

import pytest
from playwright.async_api import Browser, Page, expect

from relay.settings import Settings
from relay.store import SqlStore
from tests.fleet import fleet
from tests.helpers import make_integration
from tests.receivers import Receiver


@pytest.mark.timeout(180)
async def test_talk_to_the_echo_bot_in_the_browser_and_find_the_conversation_after_a_reload(
    settings: Settings, store: SqlStore, receiver: Receiver, browser: Browser
):
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("chat")
    )
    async with fleet(settings, env={"RELAY_CHAT_PAGE": "true"}) as services:
        relay = await services.start("run")
        page = await browser.new_page()
        try:
            # The address `make run` prints names the integration; the token is typed in.
            await page.goto(f"{relay.url}/chat#integration={integration_id}")
            await expect(page.locator("#setup")).to_be_visible()
            await expect(page.locator("#integration")).to_have_value(integration_id)
            await page.fill("#token", token)
            await page.click("#start")
            await expect(page.locator("#setup")).to_be_hidden()
            await say(page, "hello from the browser")
            reply = page.locator(".item.outgoing", has_text="echo: hello from the browser")
            await expect(reply).to_have_count(1, timeout=15_000)
            await say(page, "and again")
            await expect(page.locator(".item.outgoing", has_text="echo: and again")).to_have_count(
                1, timeout=15_000
            )

            await page.reload()
            # The history, streamed: both messages and both echoes, once each, in order.
            await expect(page.locator(".item", has_text="echo: and again")).to_have_count(
                1, timeout=15_000
            )
            shown = [
                text.split("\n")[0] for text in await page.locator("#log .item").all_inner_texts()
            ]
            assert [s for s in shown if s != "typing…"] == [
                "hello from the browser",
                "echo: hello from the browser",
                "and again",
                "echo: and again",
            ]
            assert await page.locator("#log .item").count() == 6  # with the typing indicators
            assert await page.locator("#status").inner_text() == "live"
            await assert_token_not_in_address_or_history(page, token)

            await page.click("#signout")
            await expect(page.locator("#setup")).to_be_visible()
            assert await page.evaluate("sessionStorage.length") == 0
        finally:
            await page.close()
    # Webhooks went out as always.
    assert {hit.body["payload"].get("text") for hit in receiver.at("chat")} >= {
        "echo: hello from the browser",
        "echo: and again",
    }


async def test_a_token_in_an_old_link_leaves_the_address_and_is_not_used(
    settings: Settings, store: SqlStore, browser: Browser
):
    integration_id, token = await make_integration(store, settings)
    async with fleet(settings, env={"RELAY_CHAT_PAGE": "true"}) as services:
        relay = await services.start("run")
        page = await browser.new_page()
        try:
            await page.goto(f"{relay.url}/chat#integration={integration_id}&token={token}")
            await expect(page.locator("#setup-error")).to_contain_text("sign in")
            await expect(page.locator("#integration")).to_have_value(integration_id)
            assert await page.evaluate("sessionStorage.length") == 0
            await assert_token_not_in_address_or_history(page, token)
            # A wrong token is refused, and the form comes back.
            await page.fill("#token", "rly_wrong")
            await page.click("#start")
            await expect(page.locator("#setup-error")).to_contain_text("refused")
            await expect(page.locator("#setup")).to_be_visible()
            assert await page.evaluate("sessionStorage.length") == 0
        finally:
            await page.close()


async def assert_token_not_in_address_or_history(page: Page, token: str) -> None:
    """Neither the address nor any entry of the tab's history (nor its state) holds it."""
    assert token not in page.url
    assert token not in str(await page.evaluate("JSON.stringify(history.state)"))
    session = await page.context.new_cdp_session(page)
    history = await session.send("Page.getNavigationHistory")
    await session.detach()
    urls = [entry["url"] for entry in history["entries"]]
    assert urls
    assert not [url for url in urls if token in url], urls


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")
