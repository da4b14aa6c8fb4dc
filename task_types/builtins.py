"""The built-in handlers, listed explicitly."""

from __future__ import annotations

from task_types.base import Handler
from task_types.game import LiveGameHandler
from task_types.noop import NoopHandler
from task_types.period_score import PeriodScoreHandler
from task_types.schedule import ScheduleHandler
from task_types.stat_correction import StatCorrectionHandler


def handlers() -> list[Handler]:
    return [
        NoopHandler(),
        LiveGameHandler(),
        PeriodScoreHandler(),
        StatCorrectionHandler(),
        ScheduleHandler(),
    ]
