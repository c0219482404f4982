"""What every family's sampling options share: the check a run makes before any model, process
group or Ray worker starts (`check_options`: each options class lists its `problems()`), and the
paths' check every family's options use. A family's options class lives with its pipeline
(CogVideo's: cogvideo/models/cogvideo/options.py)."""

from __future__ import annotations

from pathlib import Path


class OptionsError(ValueError):
    """Options a run cannot start with: one line per problem."""


def check_options(options) -> None:
    """Fail before any model or worker starts, naming every bad option at once."""
    problems = options.problems()
    if problems:
        raise OptionsError("\n".join(problems))


def path_problems(required: dict[str, str], optional: dict[str, str] | None = None) -> list[str]:
    """One line per path option a run cannot start with: a required one left empty, or a given
    one (required or optional) that does not exist. Every family's sampling options use it."""
    found = [f"{key}: required (e.g. {key}=PATH)" for key, value in required.items() if not value]
    for key, value in {**required, **(optional or {})}.items():
        if value and not Path(value).exists():
            found.append(f"{key}: {value} does not exist")
    return found
