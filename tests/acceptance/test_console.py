"""The console in a real browser (Debian's chromium, headless, through chromium-driver)
against a running simulated day: the board shows the day's games, a score changes on
screen without a reload, a cancel from a task page reaches the runner as a Stop, and a
read-only token sees no buttons. Screenshots go to the test's temporary directory."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from runners.signals import RunnerSignals
from task_types.feed import FeedConfig
from taskmgr.models import State
from taskmgr.settings import Settings
from taskmgr.testing import wait_for
from tests.api_helpers import build, make_tokens, serving
from tests.event_helpers import simulated_day, truncate_events

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1280,900",
)

pytestmark = [
    pytest.mark.usefixtures("sports_types"),
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
        reason="chromium and chromium-driver (scripts/setup.sh installs them)",
    ),
    pytest.mark.timeout(240),
]


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(executable_path=shutil.which("chromedriver") or DRIVER), options=opts
    )
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _login(driver: Any, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()


def _wait(driver: Any, predicate: Any, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(predicate)


def _scores(driver: Any) -> dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.game')].map(g => [g.dataset.game,"
        " g.querySelector('.away-score').textContent + '-' + g.querySelector('.home-score').textContent]))"
    )


async def test_the_console_in_a_browser(
    engine: AsyncEngine, database_url: str, settings: Settings, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    await truncate_events(database_url)
    tokens = await make_tokens(engine, database_url)
    config = FeedConfig(
        seed=5, games_per_provider=1, first_start_s=3.0, spread_s=2.0, period_s=5.0, intermission_s=0.5
    )
    signals = [RunnerSignals(), RunnerSignals()]
    app = build(settings.model_copy(update={"api_stream_poll_s": 0.1}), engine)
    async with simulated_day(engine, settings, config, runner_signals=signals) as day, serving(app) as base:
        service = day.service
        games = await wait_for(lambda: _games(service, 4), timeout=30, what="the day's four game tasks")

        # The board: every game of the day, grouped by league.
        await asyncio.to_thread(_login, browser, base, tokens.write)
        cards = await asyncio.to_thread(
            _wait, browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".game")) == len(games) or None
        )
        assert cards
        board_keys = set(await asyncio.to_thread(_scores, browser))
        assert board_keys == {f"{g.payload['provider']}:{g.payload['game_id']}" for g in games}
        await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "board-start.png"))

        # A score changes on screen, with no reload (a marker set on the page survives).
        before = await asyncio.to_thread(_scores, browser)
        await asyncio.to_thread(browser.execute_script, "window.__sameDocument = 'yes'")
        changed = await asyncio.to_thread(
            _wait,
            browser,
            lambda d: (
                [k for k, v in _scores(d).items() if v != before[k] and set(v) & set("123456789")] or None
            ),
            60,
        )
        assert changed
        assert await asyncio.to_thread(browser.execute_script, "return window.__sameDocument") == "yes"
        await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "board-live.png"))

        # Cancel a running game from its task page: its runner gets the Stop.
        running = await wait_for(
            lambda: _running_game(service, signals), timeout=30, what="a game RUNNING on a runner"
        )
        holders = _holders(signals, running)
        assert holders
        await asyncio.to_thread(browser.get, f"{base}/tasks/{running}")
        await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "task-running.png"))
        await asyncio.to_thread(lambda: browser.find_element(By.ID, "cancel").click())
        await asyncio.to_thread(lambda: _wait(browser, lambda d: d.switch_to.alert).accept())
        await asyncio.to_thread(_wait, browser, lambda d: d.find_elements(By.ID, "notice") or None)
        assert (
            await asyncio.to_thread(lambda: browser.find_element(By.ID, "task-state").text)
        ) == "CANCELLED"
        await asyncio.gather(*(s.wait_for(lambda s=s: _stopped(s, running), within_s=15) for s in holders))
        assert all(running not in s.active for s in signals)
        assert (await service.get_task(running)).state is State.CANCELLED
        await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "task-cancelled.png"))

        # Read-only: the pages, but no buttons.
        other = next(g.id for g in await _games(service, 4) or [] if g.id != running)
        await asyncio.to_thread(_login, browser, base, tokens.read)
        await asyncio.to_thread(_wait, browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".game") or None)
        await asyncio.to_thread(browser.get, f"{base}/tasks/{other}")
        assert await asyncio.to_thread(lambda: browser.find_elements(By.ID, "timeline"))
        buttons = await asyncio.to_thread(lambda: browser.find_elements(By.CSS_SELECTOR, "#cancel, #retry"))
        assert buttons == []
        await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "task-read-only.png"))
        for page in ("tasks", "runners", "stats"):
            await asyncio.to_thread(browser.get, f"{base}/{page}")
            await asyncio.to_thread(browser.save_screenshot, str(tmp_path / f"{page}.png"))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(  # noqa: ASYNC240
        [
            "board-start.png",
            "board-live.png",
            "task-running.png",
            "task-cancelled.png",
            "task-read-only.png",
            "tasks.png",
            "runners.png",
            "stats.png",
        ]
    )


async def _games(service: Any, n: int) -> list[Any]:
    games = await service.list_tasks(type="live_game", limit=100)
    return games if len(games) >= n else []


async def _running_game(service: Any, signals: list[RunnerSignals]) -> uuid.UUID | None:
    """A game some runner polls now, the one with the most game left (MLB's nine)."""
    held = {tid for s in signals for tid in s.active}
    games = [
        g for g in await service.list_tasks(type="live_game", state=State.RUNNING, limit=100) if g.id in held
    ]
    games.sort(key=lambda g: g.payload["provider"] != "mlb")
    return games[0].id if games else None


def _holders(signals: list[RunnerSignals], task_id: uuid.UUID) -> list[RunnerSignals]:
    return [s for s in signals if task_id in s.active]


def _stopped(s: RunnerSignals, task_id: uuid.UUID) -> bool:
    return (
        s.stop_handled.last is not None and s.stop_handled.last.task_id == task_id and task_id not in s.active
    )
