"""The engine's activity over the last hour: tokens per minute by kind, old minutes dropped."""

from __future__ import annotations

from batchd.engine_activity import EngineActivity


def test_tokens_are_counted_per_minute_by_kind_and_the_share_follows() -> None:
    clock = [6000.0]
    activity = EngineActivity(clock=lambda: clock[0])
    activity.record(realtime=True, tokens=10)
    activity.record(realtime=False, tokens=30)
    clock[0] += 60
    activity.record(realtime=False, tokens=60)
    hour = activity.last_hour()
    assert len(hour["points"]) == 60
    assert hour["points"][-2:] == [
        {"minute": 6000 - 6000 % 60, "realtime": 10, "batch": 30},
        {"minute": 6060 - 6060 % 60, "realtime": 0, "batch": 60},
    ]
    assert (hour["realtime_tokens"], hour["batch_tokens"]) == (10, 90)
    assert hour["realtime_share"] == 0.1


def test_minutes_older_than_an_hour_drop_out() -> None:
    clock = [0.0]
    activity = EngineActivity(clock=lambda: clock[0])
    activity.record(realtime=True, tokens=5)
    clock[0] += 3600
    activity.record(realtime=False, tokens=7)
    hour = activity.last_hour()
    assert (hour["realtime_tokens"], hour["batch_tokens"]) == (0, 7)


def test_nothing_recorded_is_a_share_of_zero() -> None:
    hour = EngineActivity(clock=lambda: 0.0).last_hour()
    assert hour["realtime_share"] == 0.0
    assert all(p["realtime"] == p["batch"] == 0 for p in hour["points"])
