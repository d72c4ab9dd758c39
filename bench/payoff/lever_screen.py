"""Issue 41's BigNAS levers, screened where an ST++ setting falls short of the fair front: each lever's ST++ against the
setting it changes, by the rule of docs/search.md (written before the runs): a lever goes on to seeds 2 and 3 if on
the seeds screened it closes at least half of the gap at a short budget and costs no other budget more than 0.5
points."""

from __future__ import annotations

import statistics
from typing import Any

from payoff.study import SCRATCH_LABEL
from payoff.tables import bar_verdict, budget_text, mean_std, paired_st_top1, paired_top1, pick_top1, seed_pairs

CLOSES_SHARE = 0.5  # of a short budget's gap, that a lever must close there
MAX_COST = 0.5  # points a lever may cost any budget


def base_setting(lever_setting: str, st_settings: list[str]) -> str | None:
    """The ST++ setting that ``lever_setting`` changes: the longest of ``st_settings`` its name extends by one
    ``_<lever>`` (``stpp_l2_kl_cosine_up_sandwich`` changes ``stpp_l2_kl_cosine_up``); None if none."""
    bases = [s for s in st_settings if lever_setting.startswith(s + "_") and "_" not in lever_setting[len(s) + 1 :]]
    return max(bases, key=len) if bases else None


def lever_screen(base: list[dict[str, Any]], lever: list[dict[str, Any]]) -> dict[str, Any]:
    """The screen of one lever: per budget the gap the base setting leaves to the fair front (its mean shortfall over
    all its seeds, 0 where it is level or ahead), the lever's change of the ST++ pick (paired by seed with the base)
    and the lever's own margin on the fair front; then which short budgets it closes by at least ``CLOSES_SHARE`` of
    the gap, which budgets it costs more than ``MAX_COST`` points, and whether it goes on."""
    pairs = seed_pairs(lever, base)
    budgets = []
    for i, budget in enumerate(base[0]["budgets"]):
        shortfall = [a - b for a, b in paired_top1(base, i, "ST++", SCRATCH_LABEL)]
        gap = max(0.0, -statistics.mean(shortfall)) if shortfall else 0.0
        changes = [a - b for a, b in paired_st_top1(pairs, i)]
        budgets.append(
            {
                "budget": budget["budget"],
                "budget_name": budget.get("budget_name", ""),
                "base_minus_front": shortfall,
                "gap": round(gap, 2),
                "lever_top1": [pick_top1(mine, i, "ST++") for mine, _ in pairs],
                "base_top1": [pick_top1(theirs, i, "ST++") for _, theirs in pairs],
                "change": changes,
                "lever_minus_front": [a - b for a, b in paired_top1([m for m, _ in pairs], i, "ST++", SCRATCH_LABEL)],
            }
        )
    # Decided on the figures as the report prints them (two decimals), so that a boundary reads as it is written.
    change = {i: round(statistics.mean(b["change"]), 2) for i, b in enumerate(budgets) if b["change"]}
    names = [b["budget_name"] or str(b["budget"]) for b in budgets]
    closes = [
        names[i] for i, c in change.items() if budgets[i]["gap"] > 0 and c >= round(CLOSES_SHARE * budgets[i]["gap"], 2)
    ]
    costs = [names[i] for i, c in change.items() if c < -MAX_COST]
    return {
        "setting": lever[0]["st_setting"],
        "network": lever[0]["st_network"],
        "base_setting": base[0]["st_setting"],
        "seeds": [mine["seed"] for mine, _ in pairs],
        "base_seeds": [r["seed"] for r in base],
        "budgets": budgets,
        "closes": closes,
        "costs": costs,
        "goes_on": bool(closes) and not costs,
        "full_top1": [mine["networks"][mine["st_run"]]["top1"] for mine, _ in pairs],
        "base_full_top1": [theirs["networks"][theirs["st_run"]]["top1"] for _, theirs in pairs],
    }


def lever_table(screen: dict[str, Any]) -> list[str]:
    """The screen as the report prints it: a table per budget and the rule's verdict."""
    seeds = ", ".join(map(str, screen["seeds"]))
    base_seeds = ", ".join(map(str, screen["base_seeds"]))
    lines = [
        f"{screen['network']} (`{screen['setting']}`) against `{screen['base_setting']}`, seed(s) {seeds} (test "
        f"top-1; the gap: the base's mean shortfall to the fair front over seeds {base_seeds}):",
        "",
        "| budget | base − fair front | gap | lever pick | base pick | lever − base | lever − fair front "
        "| bar (lever) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in screen["budgets"]:
        lines.append(
            f"| {budget_text(b)} | {mean_std(b['base_minus_front'])} | {b['gap']:.2f} "
            f"| {mean_std([x for x in b['lever_top1'] if x is not None])} "
            f"| {mean_std([x for x in b['base_top1'] if x is not None])} | {mean_std(b['change'])} "
            f"| {mean_std(b['lever_minus_front'])} | {bar_verdict(b['lever_minus_front'])} |"
        )
    full = [a - b for a, b in zip(screen["full_top1"], screen["base_full_top1"], strict=True)]
    lines.append(
        f"| full ResNet-20 | | | {mean_std(screen['full_top1'])} | {mean_std(screen['base_full_top1'])} "
        f"| {mean_std(full)} | | |"
    )
    closes = ", ".join(screen["closes"]) or "no short budget"
    costs = ", ".join(screen["costs"]) or "no budget"
    verdict = "goes on to seeds 2 and 3" if screen["goes_on"] else "stops here"
    lines += [
        "",
        f"Closes at least {CLOSES_SHARE:.0%} of the gap at: {closes}; costs more than {MAX_COST} points at: {costs}. "
        f"By the rule: {verdict}.",
        "",
    ]
    return lines
