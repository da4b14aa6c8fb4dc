"""The simulated feed: a day of games for every provider, in each provider's real JSON
shape at its real paths (under a provider prefix), on an accelerated clock.

Every body is a trimmed recorded response (task_types/feed_templates.json, rebuilt by
tests/fixtures/build_feed_templates.py) filled with simulated values, so the same
adapters that read the real APIs read the feed. What happens in a game is a function of
(seed, game index, elapsed time) only: `/_truth` can tell a test harness exactly what
the system should have seen.
"""

from task_types.feed.bodies import BOMB_BYTES, SimulatedDay
from task_types.feed.server import RunningFeed, feed_day, main, start_feed
from task_types.feed.simulation import Faults, FeedConfig, GameDay, SimGame

__all__ = [
    "BOMB_BYTES",
    "Faults",
    "FeedConfig",
    "GameDay",
    "RunningFeed",
    "SimGame",
    "SimulatedDay",
    "feed_day",
    "main",
    "start_feed",
]
