"""The chat page of `relay run` in headless Chromium (Debian's `chromium`, installed by
`scripts/ensure-browser`, which `make test` runs; driven by Playwright with that
executable), with a conversation token as `make run` gives it one: opened at the address
holding the token, type a message, see the echo bot's reply, reload, see the conversation
again. The token leaves the address and its history at once; the integration token never
reaches the page (one in a link is dropped, and not used); a revoked token signs the page
out; the relay logs no token. Both stores; `relay run` as `make run` starts it, with
RELAY_CHAT_PAGE=true."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from relay.settings import Settings
from relay.store import SqlStore
from tests.fleet import fleet
from tests.helpers import make_integration
from tests.receivers import Receiver


async def mint(base: str, integration_id: str, token: str, conversation: str) -> str:
    """A `converse` token for user-1 in `conversation`, as `make run` makes one."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/webhooks/{integration_id}/conversations/{conversation}/tokens",
            json={"userId": "user-1", "scope": "converse", "expiresIn": 600},
            headers={"Authorization": f"Bearer {token}"},
        ) as answer,
    ):
        assert answer.status == 201, await answer.text()
        minted: str = (await answer.json())["token"]
        return minted


def chat_address(base: str, integration_id: str, conversation: str, token: str) -> str:
    return (
        f"{base}/chat#integration={integration_id}&conversation={conversation}"
        f"&user=user-1&token={token}"
    )


@pytest.mark.timeout(180)
async def test_talk_to_the_echo_bot_with_a_conversation_token_and_find_it_after_a_reload(
    settings: Settings, store: SqlStore, receiver: Receiver, browser: Browser, tmp_path: Path
):
    integration_id, token = await make_integration(
        store, settings, response_url=receiver.url("chat")
    )
    env = {"RELAY_CHAT_PAGE": "true", "RELAY_LOG_LEVEL": "debug"}
    async with fleet(settings, env=env, logs=tmp_path) as services:
        relay = await services.start("run")
        chat = await mint(relay.url, integration_id, token, "web-1")
        page = await browser.new_page()
        try:
            await page.goto(chat_address(relay.url, integration_id, "web-1", chat))
            await expect(page.locator("#setup")).to_be_hidden()
            await expect(page.locator("#who")).to_have_text("user-1 in web-1")
            await expect(page.locator("#status")).to_have_text("new conversation")
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
            await assert_not_in_address_or_history(page, chat)
            assert token not in await stored(page)  # the integration token never came here

            # Revoked by the back end: the next message is refused and the page signs out.
            async with (
                aiohttp.ClientSession() as http,
                http.delete(
                    f"{relay.url}/webhooks/{integration_id}/conversations/web-1/tokens",
                    headers={"Authorization": f"Bearer {token}"},
                ) as revoked,
            ):
                assert revoked.status == 204
            await say(page, "after the revocation")
            await expect(page.locator("#setup-error")).to_contain_text("refused")
            await expect(page.locator("#composer")).to_be_hidden()
            assert await page.evaluate("sessionStorage.length") == 0
        finally:
            await page.close()
        logged = "\n".join(line for service in services.services for line in service.lines())
    assert "conversation_token_id" in logged  # debug lines were written, ids and all
    assert chat not in logged
    # Webhooks went out as always.
    assert {hit.body["payload"].get("text") for hit in receiver.at("chat")} >= {
        "echo: hello from the browser",
        "echo: and again",
    }


async def test_an_integration_token_in_a_link_is_dropped_and_a_wrong_token_refused(
    settings: Settings, store: SqlStore, browser: Browser
):
    integration_id, token = await make_integration(store, settings)
    async with fleet(settings, env={"RELAY_CHAT_PAGE": "true"}) as services:
        relay = await services.start("run")
        # An old link with the integration token: it leaves the address, and is not used.
        page = await browser.new_page()
        try:
            await page.goto(f"{relay.url}/chat#integration={integration_id}&token={token}")
            await expect(page.locator("#setup-error")).to_contain_text("never an integration")
            await expect(page.locator("#composer")).to_be_hidden()
            assert await page.evaluate("sessionStorage.length") == 0
            await assert_not_in_address_or_history(page, token)
            assert integration_id in page.url  # what is no secret stays
        finally:
            await page.close()
        # A conversation token the relay does not know is refused.
        page = await browser.new_page()
        try:
            await page.goto(chat_address(relay.url, integration_id, "web-2", "rlyc_wrong"))
            await expect(page.locator("#setup-error")).to_contain_text("refused")
            assert await page.evaluate("sessionStorage.length") == 0
            await assert_not_in_address_or_history(page, "rlyc_wrong")
        finally:
            await page.close()


async def assert_not_in_address_or_history(page: Page, token: str) -> None:
    """Neither the address nor any entry of the tab's history (nor its state) holds it."""
    assert token not in page.url
    assert token not in str(await page.evaluate("JSON.stringify(history.state)"))
    session = await page.context.new_cdp_session(page)
    history = await session.send("Page.getNavigationHistory")
    await session.detach()
    urls = [entry["url"] for entry in history["entries"]]
    assert urls
    assert not [url for url in urls if token in url], urls


async def stored(page: Page) -> str:
    """Everything the page keeps in the browser's storage, as text."""
    text: str = await page.evaluate(
        "JSON.stringify([Object.entries(sessionStorage), Object.entries(localStorage)])"
    )
    return text


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")
