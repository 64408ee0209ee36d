"""Cron expressions as Kubeflow Pipelines' scheduler reads them.

KFP's ScheduledWorkflow controller parses with robfig/cron v1: six fields, seconds first, always in UTC. Users
write standard five-field cron, which that parser would read shifted by one field, so `kfp_cron` converts and
validates before anything reaches the server.
"""

from __future__ import annotations

import re

from blueprint.config import ConfigError


class CronError(ConfigError):
    """An expression the scheduler would reject or misread; the message names it."""


_CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
_CRON_NAMES = {
    "month": {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    "day-of-week": {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def _cron_value(expr: str, field: str, token: str, lo: int, hi: int) -> int:
    names = _CRON_NAMES.get(field, {})
    if token.upper() in names:
        return names[token.upper()]
    if not token.isdigit():
        raise CronError(
            f"invalid cron expression {expr!r}: {field} {token!r} is not a number"
            + (f" or one of {', '.join(names)}" if names else "")
        )
    value = int(token)
    if not lo <= value <= hi:
        raise CronError(f"invalid cron expression {expr!r}: {field} {value} is outside {lo}-{hi}")
    return value


def kfp_cron(expr: str) -> str:
    """`expr` as the 6-field cron KFP's scheduler parses (seconds first), or CronError naming it.

    KFP's ScheduledWorkflow controller uses robfig/cron v1, whose parser reads FIVE fields as
    `second minute hour day-of-month month` (day-of-week optional), not as standard cron: "0 3 * * 1" would
    run at minute 3 of every hour in January. A 5-field expression is therefore read as standard cron and
    given "0" seconds: "0 3 * * 1" -> "0 0 3 * * 1" (03:00 every Monday). Descriptors (@daily, ...) pass as is.
    """
    text = " ".join(str(expr).split())
    if text in _CRON_DESCRIPTORS:
        return text
    if text.startswith("@every "):
        return _every(expr, text)
    fields = text.split(" ") if text else []
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise CronError(
            f"invalid cron expression {expr!r}: expected 5 fields (minute hour day-of-month "
            f"month day-of-week) or 6 (seconds first), got {len(fields)}"
        )
    for (field, lo, hi), value in zip(_CRON_FIELDS, fields, strict=True):
        for item in value.split(","):
            _check_item(expr, field, item, lo, hi)
    return " ".join(fields)


def _every(expr: str, text: str) -> str:
    """An `@every DURATION` expression, checked: Go's duration syntax, at least a minute."""
    if not re.fullmatch(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", text):
        raise CronError(f"invalid cron expression {expr!r}: @every needs a duration like 6h or 90m")
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text[len("@every ") :])
    if sum(float(n) * _SECONDS[unit] for n, unit in parts) < 60:  # the controller would start a run each second
        raise CronError(f"invalid cron expression {expr!r}: @every needs at least 1m between runs")
    return text


def _check_item(expr: str, field: str, item: str, lo: int, hi: int) -> None:
    """One comma-separated item of a field: `?`, `*`, a value, or a range, each with an optional `/step`."""
    if item == "?" and field in ("day-of-month", "day-of-week"):
        return
    span, slash, step = item.partition("/")
    if slash and (not step.isdigit() or int(step) < 1):
        raise CronError(f"invalid cron expression {expr!r}: {field} step {step!r} must be >= 1")
    if span == "*":
        return
    first, dash, last = span.partition("-")
    start = _cron_value(expr, field, first, lo, hi)
    if dash and _cron_value(expr, field, last, lo, hi) < start:
        raise CronError(f"invalid cron expression {expr!r}: {field} range {span!r} runs backwards")
