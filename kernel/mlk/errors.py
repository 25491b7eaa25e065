"""Errors that mlk shows to people.

A :class:`UserError` is a mistake the user can fix (a bad spec, an unknown plugin, a missing
dataset): the CLI prints its one-paragraph message and exits 2, with no traceback unless
``MLK_FULL_ERROR=1``. A :class:`PluginError` is a fault inside a plugin: it names the plugin and
its distribution so the report reaches the right people.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MlkError(Exception):
    """Base class of every error mlk raises on purpose."""

    exit_code = 1


class UserError(MlkError):
    """A mistake in what the user asked for; exit code 2.

    ``where`` names the place (a file, a key path such as ``searcher.metric``); ``choices`` lists
    the valid values, and ``got`` the value given, from which a did-you-mean is derived.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        choices: Iterable[str] | None = None,
        got: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.where = where
        self.choices = sorted(set(choices)) if choices is not None else None
        self.got = got
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        parts = [f"{self.where}: {self.message}" if self.where else self.message]
        if self.choices is not None:
            parts.append("valid choices: " + (", ".join(self.choices) if self.choices else "(none)"))
            if self.got is not None:
                near = did_you_mean(self.got, self.choices)
                if near:
                    parts.append(f"did you mean '{near}'?")
        if self.hint:
            parts.append(self.hint)
        return "\n  ".join(parts)


class PluginError(MlkError):
    """A plugin failed to load or misbehaved; names the plugin and its distribution."""

    def __init__(self, group: str, name: str, distribution: str | None, detail: str) -> None:
        self.group = group
        self.name = name
        self.distribution = distribution
        self.detail = detail
        dist = f" (distribution {distribution})" if distribution else ""
        super().__init__(f"plugin {group}/{name}{dist} failed: {detail}")


class TrialError(MlkError):
    """A trial's code raised; carries the trial id and the formatted traceback."""

    def __init__(self, trial_id: int, detail: str) -> None:
        self.trial_id = trial_id
        self.detail = detail
        super().__init__(f"trial {trial_id} failed:\n{detail}")


def did_you_mean(got: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``got``, or None when nothing is close."""
    near = difflib.get_close_matches(got, list(choices), n=1, cutoff=0.6)
    return near[0] if near else None
