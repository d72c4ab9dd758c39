"""Budgets of ``stim-hf search``: ``flops=0.5``, ``flops=12M``, ``params=200K``, ``latency_ms=2.5``."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from stim_hf.errors import ConfigError

BUDGET_KEYS = {
    "flops": "FLOPs per image, a share of the full network's (0.5 or 50%) or a count (12M, 1.5G)",
    "params": "parameters, a share of the full network's (0.5 or 50%) or a count (200K)",
    "latency_ms": "batch-1 latency in milliseconds, measured on --device",
}
_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class BudgetLimit:
    """One limit of a budget: ``key`` (flops, params, latency_ms) at most ``value``, or ``value`` x full."""

    key: str
    value: float
    share: bool = False
    text: str = ""

    def limit(self, full: float | None) -> float:
        """The limit in the key's unit, for a full network of cost ``full``."""
        return self.value * full if self.share else self.value

    def allows(self, cost: float, full: float | None) -> bool:
        """Whether ``cost`` is within the limit (float rounding of a share forgiven)."""
        return cost <= self.limit(full) * (1 + 1e-9)


def parse_budget(text: str | None) -> list[BudgetLimit]:
    """``"flops=0.5,latency_ms=3"`` into limits; :class:`ConfigError` naming the fix for anything else.

    For flops and params a plain number up to 1 (or a percentage) is a share of the full network,
    a larger number or one with a K / M / G / T suffix a count; latency_ms is milliseconds.
    """
    if text is None or not str(text).strip():
        return []
    limits = []
    for part in str(text).split(","):
        key, equals, value = part.strip().partition("=")
        key = key.strip().lower()
        if key not in BUDGET_KEYS:
            close = difflib.get_close_matches(key, list(BUDGET_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"--budget key '{key}' is not known{hint}; use "
                + ", ".join(f"{name}= ({meaning})" for name, meaning in BUDGET_KEYS.items())
            )
        if not equals or not value.strip():
            raise ConfigError(f"--budget {part.strip()!r} needs a value, e.g. --budget {key}=0.5")
        limits.append(_parse_limit(key, value.strip(), part.strip()))
    if len({limit.key for limit in limits}) != len(limits):
        raise ConfigError(f"--budget {text!r} gives a key twice; give each of flops, params, latency_ms once")
    return limits


def _parse_limit(key: str, value: str, text: str) -> BudgetLimit:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT%]?)", value)
    if match is None:
        raise ConfigError(f"--budget {text!r}: '{value}' is not a number; e.g. {key}=0.5, {key}=50% or {key}=12M")
    number, suffix = float(match.group(1)), match.group(2).lower()
    if number <= 0:
        raise ConfigError(f"--budget {text!r} must be positive")
    if key == "latency_ms":
        if suffix:
            raise ConfigError(f"--budget {text!r}: latency_ms is milliseconds, a plain number (e.g. latency_ms=2.5)")
        return BudgetLimit(key, number, False, text)
    if suffix == "%":
        if number > 100:
            raise ConfigError(f"--budget {text!r}: a share is at most 100%")
        return BudgetLimit(key, number / 100, True, text)
    if not suffix and number <= 1:
        return BudgetLimit(key, number, True, text)
    return BudgetLimit(key, number * _SUFFIXES[suffix], False, text)


def format_count(value: float) -> str:
    """``12.3M``-style text for a count."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"
