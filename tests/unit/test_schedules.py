"""Cron fire times (app/schedules.py): 5 and 6 fields, timezones, DST, the latest missed time."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from app.schedules import check, latest_fire, next_fire

UTC = timezone.utc


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires(cron: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time in (start, end], walking next_fire as the scheduler does."""
    times: list[datetime] = []
    current = next_fire(cron, tz, start)
    while current <= end:
        times.append(current)
        current = next_fire(cron, tz, current)
    return times


# --------------------------------------------------------------------------- 5 fields


def test_five_fields_next_weekday_morning():
    # Friday 2024-01-05 noon UTC → Monday 09:00.
    assert next_fire("0 9 * * 1-5", "UTC", at(2024, 1, 5, 12)) == at(2024, 1, 8, 9)
    assert next_fire("0 9 * * mon-fri", "UTC", at(2024, 1, 5, 12)) == at(2024, 1, 8, 9)


def test_next_fire_is_strictly_after():
    assert next_fire("*/5 * * * *", "UTC", at(2024, 1, 1, 10, 5)) == at(2024, 1, 1, 10, 10)
    assert next_fire("*/5 * * * *", "UTC", at(2024, 1, 1, 10, 4, 59)) == at(2024, 1, 1, 10, 5)


def test_next_fire_is_aware_utc_whatever_the_input_zone():
    berlin = datetime(2024, 1, 10, 12, tzinfo=timezone(timedelta(hours=1)))
    result = next_fire("0 9 * * *", "UTC", berlin)
    assert result.utcoffset() == timedelta(0)
    assert result == at(2024, 1, 11, 9)


def test_month_ends_and_leap_day():
    assert next_fire("0 0 31 * *", "UTC", at(2024, 4, 1)) == at(2024, 5, 31)
    assert next_fire("0 0 29 2 *", "UTC", at(2024, 3, 1)) == at(2028, 2, 29)


# --------------------------------------------------------------------------- 6 fields (seconds first)


def test_six_fields_put_seconds_first():
    # Seconds first: 09:00:05 every day (seconds last would read minute 5 of hour 0).
    assert next_fire("5 0 9 * * *", "UTC", at(2024, 1, 1)) == at(2024, 1, 1, 9, 0, 5)
    assert fires("*/15 * * * * *", "UTC", at(2024, 1, 1, 0, 0, 7), at(2024, 1, 1, 0, 1)) == [
        at(2024, 1, 1, 0, 0, 15),
        at(2024, 1, 1, 0, 0, 30),
        at(2024, 1, 1, 0, 0, 45),
        at(2024, 1, 1, 0, 1, 0),
    ]


def test_six_fields_latest_fire():
    assert latest_fire("30 * * * * *", "UTC", at(2024, 1, 1, 10, 5, 10)) == at(2024, 1, 1, 10, 4, 30)


# --------------------------------------------------------------------------- timezones


def test_fixed_local_time_follows_the_zone_offset():
    # 09:00 in Berlin is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST).
    assert next_fire("0 9 * * *", "Europe/Berlin", at(2024, 1, 10, 12)) == at(2024, 1, 11, 8)
    assert next_fire("0 9 * * *", "Europe/Berlin", at(2024, 7, 10, 12)) == at(2024, 7, 11, 7)
    assert next_fire("0 9 * * *", "America/New_York", at(2024, 1, 10, 15)) == at(2024, 1, 11, 14)
    assert next_fire("0 9 * * *", "Asia/Kolkata", at(2024, 1, 10, 12)) == at(2024, 1, 11, 3, 30)


def test_weekday_is_the_local_weekday():
    # Monday 00:30 in Tokyo is Sunday 15:30 UTC.
    assert next_fire("30 0 * * 1", "Asia/Tokyo", at(2024, 1, 6)) == at(2024, 1, 7, 15, 30)


# --------------------------------------------------------------------------- DST


def test_spring_forward_a_time_that_does_not_exist_fires_at_the_jump():
    # Berlin, 2024-03-31: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
    assert fires("30 2 * * *", "Europe/Berlin", at(2024, 3, 29, 12), at(2024, 4, 1, 12)) == [
        at(2024, 3, 30, 1, 30),  # 02:30 CET
        at(2024, 3, 31, 1, 0),  # the jump: 03:00 CEST
        at(2024, 4, 1, 0, 30),  # 02:30 CEST
    ]
    # New York, 2024-03-10: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
    assert next_fire("30 2 * * *", "America/New_York", at(2024, 3, 9, 12)) == at(2024, 3, 10, 7)


def test_fall_back_a_fixed_hour_job_fires_once():
    # Berlin, 2024-10-27: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice (00:30 and 01:30 UTC).
    assert fires("30 2 * * *", "Europe/Berlin", at(2024, 10, 25, 12), at(2024, 10, 28, 12)) == [
        at(2024, 10, 26, 0, 30),
        at(2024, 10, 27, 0, 30),
        at(2024, 10, 28, 1, 30),
    ]
    # New York, 2024-11-03: 01:30 happens twice (05:30 and 06:30 UTC).
    assert fires("30 1 * * *", "America/New_York", at(2024, 11, 2, 12), at(2024, 11, 4, 12)) == [
        at(2024, 11, 3, 5, 30),
        at(2024, 11, 4, 6, 30),
    ]


def test_fall_back_a_fixed_hour_range_fires_once_per_local_hour():
    assert fires("0 1-3 * * *", "Europe/Berlin", at(2024, 10, 26, 12), at(2024, 10, 27, 12)) == [
        at(2024, 10, 26, 23, 0),  # 01:00 CEST
        at(2024, 10, 27, 0, 0),  # 02:00 CEST (not again at 02:00 CET)
        at(2024, 10, 27, 2, 0),  # 03:00 CET
    ]


def test_an_hourly_job_fires_every_real_hour_across_dst():
    # Not a fixed hour: both 02:00s of the fall-back night are real, distinct hours.
    assert fires("0 * * * *", "Europe/Berlin", at(2024, 10, 26, 22), at(2024, 10, 27, 3)) == [
        at(2024, 10, 26, 23),
        at(2024, 10, 27, 0),
        at(2024, 10, 27, 1),
        at(2024, 10, 27, 2),
        at(2024, 10, 27, 3),
    ]
    # Spring forward: one hour fewer locally, still one fire per real hour, none twice.
    assert fires("0 * * * *", "Europe/Berlin", at(2024, 3, 30, 23), at(2024, 3, 31, 3)) == [
        at(2024, 3, 31, 0),
        at(2024, 3, 31, 1),
        at(2024, 3, 31, 2),
        at(2024, 3, 31, 3),
    ]


def test_latest_fire_agrees_with_next_fire_across_dst():
    # After the repeated 02:30 (01:30 UTC) the latest fire is still the one at 00:30 UTC.
    assert latest_fire("30 2 * * *", "Europe/Berlin", at(2024, 10, 27, 1, 45)) == at(2024, 10, 27, 0, 30)
    # After the spring jump the latest fire is the jump itself.
    assert latest_fire("30 2 * * *", "Europe/Berlin", at(2024, 3, 31, 1, 5)) == at(2024, 3, 31, 1, 0)


# --------------------------------------------------------------------------- latest missed fire


def test_latest_missed_fire_after_downtime_is_the_most_recent_one():
    # Down from Monday to Thursday noon: only Thursday 09:00 Berlin (08:00 UTC) fires, not a storm.
    assert latest_fire("0 9 * * *", "Europe/Berlin", at(2024, 1, 11, 12)) == at(2024, 1, 11, 8)
    assert latest_fire("0 9 * * 1-5", "UTC", at(2024, 1, 7, 12)) == at(2024, 1, 5, 9)  # Sunday → Friday


def test_latest_fire_is_at_or_before_now():
    assert latest_fire("0 9 * * *", "UTC", at(2024, 1, 10, 9)) == at(2024, 1, 10, 9)
    assert latest_fire("0 9 * * *", "UTC", at(2024, 1, 10, 8, 59, 59)) == at(2024, 1, 9, 9)
    assert latest_fire("0 9 * * *", "UTC", at(2024, 1, 10, 9, 0, 0) + timedelta(microseconds=1)) == at(
        2024, 1, 10, 9
    )


@pytest.mark.parametrize(
    ("cron", "tz", "start"),
    [
        ("0 9 * * 1-5", "Europe/Berlin", at(2024, 3, 29, 20)),
        ("30 2 * * *", "Europe/Berlin", at(2024, 3, 29, 20)),
        ("0 * * * *", "Europe/Berlin", at(2024, 3, 29, 20)),
        ("*/7 * * * *", "America/New_York", at(2024, 3, 8, 20)),
        ("15 */2 * * * *", "Australia/Lord_Howe", at(2024, 10, 4, 20)),  # a 30-minute DST shift
    ],
)
def test_latest_and_next_bracket_now(cron, tz, start):
    """Over three days around a spring-forward: latest <= now < next, and nothing fires in between."""
    for step in range(0, 72 * 3600, 2333):
        moment = start + timedelta(seconds=step)
        latest, following = latest_fire(cron, tz, moment), next_fire(cron, tz, moment)
        assert latest <= moment < following
        assert next_fire(cron, tz, latest) == following, moment


@pytest.mark.parametrize(
    ("cron", "tz", "fire"),
    [
        ("0 * * * *", "Europe/Berlin", at(2024, 10, 27, 1, 0)),  # 02:00 CET, the second 02:00
        ("*/20 * * * *", "Europe/Berlin", at(2024, 10, 27, 1, 40)),  # 02:40 CET
        ("0 * * * *", "America/New_York", at(2024, 11, 3, 6, 0)),  # 01:00 EST, the second 01:00
    ],
)
def test_latest_fire_in_the_repeated_hour_is_the_fire_just_due(cron, tz, fire):
    assert next_fire(cron, tz, fire - timedelta(seconds=1)) == fire  # the scheduler's next_run_at
    assert latest_fire(cron, tz, fire + timedelta(milliseconds=50)) == fire


def test_fixed_hour_schedule_computed_in_the_repeated_hour_does_not_fire_again():
    moment = at(2024, 10, 27, 1, 10)  # 02:10 CET, after 02:30 CEST (00:30 UTC) fired
    assert latest_fire("30 2 * * *", "Europe/Berlin", moment) == at(2024, 10, 27, 0, 30)
    assert next_fire("30 2 * * *", "Europe/Berlin", moment) == at(2024, 10, 28, 1, 30)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("cron", "tz"),
    [
        ("0 9 * * 1-5", "Europe/Berlin"),
        ("*/15 * * * * *", "UTC"),
        ("0 0 1 1 *", "America/New_York"),
        ("0 9 * * mon-fri", "UTC"),
    ],
)
def test_valid_schedules(cron, tz):
    assert check(cron, tz) is None


@pytest.mark.parametrize("cron", ["", "* * * *", "* * * * * * *", "@daily", "0 9"])
def test_wrong_number_of_fields(cron):
    assert (
        check(cron, "UTC") == "cron needs 5 fields (minute hour day month weekday) or 6 (with seconds first)"
    )


@pytest.mark.parametrize("cron", ["61 * * * *", "* 24 * * *", "a b c d e", "0 9 * * funday", "*/0 * * * *"])
def test_invalid_expressions(cron):
    assert check(cron, "UTC") == f"invalid cron expression {cron!r}"


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "Europe/berlin ", "../etc/passwd", "+01:00"])
def test_unknown_timezone(tz):
    assert check("0 9 * * *", tz) == f"unknown timezone {tz!r}"


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 4 *"])
def test_a_cron_that_never_fires_is_invalid(cron):
    assert check(cron, "UTC") is not None
