"""Click parameter types that read strictly (ftkit.strict) and refuse in one line.

Click's own FLOAT takes `nan`, `inf` and `1e999`, its FloatRange lets nan past both bounds,
and its errors print four lines (usage, hint, blank, error). These types raise UserError
instead, which the CLI prints as one line with exit 2 before the command body runs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import click

from ftkit.errors import UserError
from ftkit.strict import checked_path, finite_float


def flag_of(param: click.Parameter | None) -> str:
    """How the user wrote the parameter: `--max-power-w`, or an argument's metavar."""
    if isinstance(param, click.Option) and param.opts:
        return max(param.opts, key=len)
    return param.human_readable_name if param is not None else "value"


class FiniteFloat(click.ParamType):
    """A finite number in ASCII within [min, max] (min excluded with `min_open`)."""

    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False) -> None:
        self.min, self.max, self.min_open = min, max, min_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        flag = flag_of(param)
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # a default, or a caller's value
            number: float | None = float(value) if math.isfinite(value) else None
        else:
            number = finite_float(str(value))
        if number is None:
            raise UserError(f"{flag}: {str(value)!r} is not a finite number")
        if self.min is not None and (number <= self.min if self.min_open else number < self.min):
            raise UserError(f"{flag}: {str(value)!r} must be {'>' if self.min_open else '>='} {self.min:g}")
        if self.max is not None and number > self.max:
            raise UserError(f"{flag}: {str(value)!r} must be <= {self.max:g}")
        return number


SECONDS = FiniteFloat(min=0)  # timeouts and grace periods: 0 or more, never inf or nan


class CheckedPath(click.Path):
    """click.Path that first refuses (one line, exit 2) a path the system cannot hold and,
    for outputs (`system_ok=False`), one in /proc, /sys or /dev. `fills`: ftkit writes a
    tree of its own below the path (a runs or stack directory), so leave room for it."""

    def __init__(self, *, fills: bool = False, system_ok: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fills, self.system_ok = fills, system_ok

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (str, os.PathLike)):
            checked_path(os.fspath(value), flag_of(param), fills=self.fills, system_ok=self.system_ok)  # type: ignore[arg-type]
        return super().convert(value, param, ctx)
