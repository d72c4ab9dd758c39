"""The fair report (issue 41): the bar per budget, the per-seed picks, the fine-tuning, the cost, two ST++ settings side
by side with the lambda screen's rule, the dedicated-size check; ``fair/results.json``, ``results.md``, ``payoff.png``."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from payoff.fair_front import FRONTS, add_fair_finetuning, fair_seed_record
from payoff.finetuning import finetune_table, shape_key
from payoff.lever_screen import base_setting, lever_screen, lever_table
from payoff.network_records import score_finished_networks
from payoff.study import SCRATCH_LABEL
from payoff.tables import bar_verdict, budget_text, mean_std, paired_st_top1, paired_t, paired_top1, seed_pairs


def dedicated_check(records: list[dict[str, Any]]) -> list[str]:
    """Each dedicated-size training against the same network trained at random sizes, run at that size (test top-1,
    paired by seed): the rule that carries a dedicated training into the 50k front (more than +0.5 in the mean)."""
    pairs: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for r in records:
        at = {}
        for p in r["scratch_points"]:
            at[p["network"], p["trained_at"], p["input_size"]] = p["test_top1"]
        for (network, trained, size), top1 in at.items():
            if isinstance(trained, int) and trained != 32 and (network, "random", size) in at:
                pairs.setdefault((network, size), []).append((r["seed"], top1, at[network, "random", size]))
    lines = [
        "| network @ size | seeds | trained at that size | trained at random sizes | dedicated − random (paired) "
        "| into the 50k front (> +0.5) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (network, size), rows in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        diffs = [a - b for _, a, b in rows]
        verdict = "yes" if len(rows) >= 3 and statistics.mean(diffs) > 0.5 else ("no" if len(rows) >= 3 else "-")
        lines.append(
            f"| {network} @{size} | {', '.join(str(seed) for seed, _, _ in rows)} "
            f"| {mean_std([a for _, a, _ in rows])} | {mean_std([b for _, _, b in rows])} | {mean_std(diffs)} "
            f"| {verdict} |"
        )
    return lines if len(lines) > 2 else []


def _fair_pick_text(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    network = p["network"] if not p["network"].startswith("ST++") else ",".join(map(str, p["depths"]))
    trained = "" if p["network"].startswith("ST++") else f", trained at {p['trained_at']}"
    return f"{p['test_top1']:.2f} ({network} @{p['input_size']}{trained}, {100 * p['flop_share']:.0f}%)"


def fair_budget_table(records: list[dict[str, Any]]) -> list[str]:
    """Per budget, over the seeds: ST++'s pick against the fair front's (paired, with the bar's verdict) and against
    the 32-px trainings' alone (what was published before)."""
    lines = [
        "| budget | ST++ pick | from-scratch pick (fair front) | ST++ − it | t (p) | seeds ST++ ahead | bar "
        "| 32-px-only pick | ST++ − it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, budget in enumerate(records[0]["budgets"]):
        st = [r["budgets"][i]["picks"]["ST++"] for r in records]
        fair = [r["budgets"][i]["picks"][SCRATCH_LABEL] for r in records]
        only_32 = [r["budgets"][i]["picks"]["from scratch, 32 px only"] for r in records]
        diffs = [a - b for a, b in paired_top1(records, i, "ST++", SCRATCH_LABEL)]
        old = [a - b for a, b in paired_top1(records, i, "ST++", "from scratch, 32 px only")]
        lines.append(
            f"| {budget_text(budget)} | {mean_std([p['test_top1'] for p in st if p])} "
            f"| {mean_std([p['test_top1'] for p in fair if p])} | {mean_std(diffs)} | {paired_t(diffs)} "
            f"| {sum(d > 0 for d in diffs)} of {len(diffs)} | {bar_verdict(diffs)} "
            f"| {mean_std([p['test_top1'] for p in only_32 if p])} | {mean_std(old)} |"
        )
    return lines


def fair_cost_table(records: list[dict[str, Any]]) -> list[str]:
    """Per seed: the ST++ training plus its search (plus the fine-tuning of its picks, if any), the trainings alone its
    front's picks came from, all of them."""
    lines = [
        "| seed | ST++: train / wall min, search s | fine-tuning its picks: min | picked trainings alone "
        "| their train / wall min, search s | every training alone: train / wall min |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        networks = r["networks"]
        st = next(n for n in networks.values() if n["network"].startswith("ST++"))
        alone = {run: n for run, n in networks.items() if not n["network"].startswith("ST++")}
        picked = sorted({b["picks"][SCRATCH_LABEL]["run"] for b in r["budgets"] if b["picks"][SCRATCH_LABEL]})
        total = lambda key, runs, alone=alone: sum(alone[run].get(key) or 0.0 for run in runs)  # noqa: E731
        once: dict[str, float] = {}  # a pick fine-tuned once counts once, whatever the budgets it wins
        for b in r["budgets"]:
            for n, f in b.get("finetuned", {}).items():
                once.setdefault(f"{n} ep. {shape_key(f)}", f["minutes"])
        tuning = ", ".join(f"{key}: {minutes:.1f}" for key, minutes in once.items()) or "-"
        names = ", ".join(f"{alone[run]['network']} at {alone[run]['trained_at']}" for run in picked)
        lines.append(
            f"| {r['seed']} | {st['train_minutes']} / {st['wall_minutes']}, {st['search_seconds']} | {tuning} "
            f"| {names} | {total('train_minutes', picked):.1f} / {total('wall_minutes', picked):.1f}, "
            f"{total('search_seconds', picked):.1f} | {total('train_minutes', alone):.1f} / "
            f"{total('wall_minutes', alone):.1f} |"
        )
    return lines


# The lambda-5 screen at full data (issue 41): lambda 5 goes on to seeds 2 and 3 if its picks beat lambda 2's by at least
# SCREEN_GAIN points at SCREEN_BUDGETS or more budgets.
SCREEN_GAIN, SCREEN_BUDGETS = 0.5, 3


def setting_comparison(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[str]:
    """Two ST++ settings' picks at each budget and their full networks, paired over the seeds both have, with the
    lambda screen's rule (the first setting's picks ahead by at least ``SCREEN_GAIN`` at ``SCREEN_BUDGETS`` budgets)."""
    a_name, b_name = first[0]["st_network"], second[0]["st_network"]
    pairs = seed_pairs(first, second)
    if not pairs:
        return []
    lines = [
        f"{a_name} against {b_name}, seeds {', '.join(str(a['seed']) for a, _ in pairs)} (test top-1; paired by seed):",
        "",
        f"| budget | {a_name} pick | {b_name} pick | {a_name} − {b_name} | seeds {a_name} ahead |",
        "| --- | --- | --- | --- | --- |",
    ]
    ahead = 0
    for i, budget in enumerate(first[0]["budgets"]):
        both = paired_st_top1(pairs, i)
        diffs = [x - y for x, y in both]
        if diffs and statistics.mean(diffs) >= SCREEN_GAIN:
            ahead += 1
        lines.append(
            f"| {budget_text(budget)} | {mean_std([x for x, _ in both])} | {mean_std([y for _, y in both])} "
            f"| {mean_std(diffs)} | {sum(d > 0 for d in diffs)} of {len(diffs)} |"
        )
    full = [(network_top1_of(a), network_top1_of(b)) for a, b in pairs]
    lines += [
        f"| full ResNet-20 | {mean_std([x for x, _ in full])} | {mean_std([y for _, y in full])} "
        f"| {mean_std([x - y for x, y in full])} | {sum(x > y for x, y in full)} of {len(full)} |",
        "",
        f"{a_name}'s picks beat {b_name}'s by at least +{SCREEN_GAIN} points at {ahead} of "
        f"{len(first[0]['budgets'])} budgets (the full-data screen's rule: at {SCREEN_BUDGETS} or more, {a_name} "
        f"goes on to seeds 2 and 3): {'met' if ahead >= SCREEN_BUDGETS else 'not met'}.",
        "",
    ]
    return lines


def network_top1_of(record: dict[str, Any]) -> float:
    """A seed record's full ST++ network's test top-1."""
    return record["networks"][record["st_run"]]["top1"]


def fair_markdown(by_setting: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """The fair report: per ST++ setting the budget table and the per-seed picks, then the dedicated-size check and
    the networks' records (which trainings each seed's fronts hold)."""
    first = next(iter(by_setting.values()))[0]
    test = f"{args.test_samples:,} CIFAR-10 test images" if args.test_samples else "all 10,000 test images"
    lines = [
        f"ST++'s searched sub-networks against networks trained alone (issue 41), CIFAR-10, {first['train_samples']:,} "
        f"training images, {first['epochs']} epochs. Test top-1 (%) on {test}. Every pick is chosen on "
        f"{first['heldout']['images']:,} held-out training images none of the seed's networks trained on, BatchNorm "
        "re-estimated at its size, then exported (BatchNorm re-estimated again) and scored on the test split as "
        "exported. From scratch: the best of ResNet-8, -14 and -20 trained alone, each at 32 px, at the random sizes "
        "ST++ draws for its sub-networks (13..32 px, `full_input_scale 0.43`) and at dedicated sizes "
        "(`--image_size S`), each scored at 13, 19, 26 and 32 px (a dedicated training at its own size only). "
        "'32 px only' is the front of the figures published before (issue 30).",
        "",
    ]
    held: dict[tuple[str, str], list[int]] = {}
    for r in next(iter(by_setting.values())):
        for n in r["networks"].values():
            if not n["network"].startswith("ST++"):
                held.setdefault((n["network"], str(n["trained_at"])), []).append(r["seed"])
    lines += [
        "The fair front holds, by seed: "
        + "; ".join(
            f"{network} trained at {at}{' px' if at.isdigit() else ' sizes'} (seeds {', '.join(map(str, seeds))})"
            for (network, at), seeds in sorted(held.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        )
        + ". The bar: `lead` is at least +0.5 in the mean and ahead on every seed, `level` at least level in the mean.",
        "",
    ]
    seeds = {r["seed"] for r in next(iter(by_setting.values()))}
    if any(set(held_seeds) != seeds for held_seeds in held.values()):
        lines += [
            "**Not every seed's front holds the same trainings yet** (some are still to train): until they do, the "
            "fair-front columns compare unlike fronts across seeds, and the bar's verdict is provisional.",
            "",
        ]
    for setting, records in by_setting.items():
        seeds = ", ".join(str(r["seed"]) for r in records)
        lines += [f"### {records[0]['st_network']} (`{setting}`), seeds {seeds}", "", *fair_budget_table(records), ""]
        lines += [
            "| seed | budget | ST++ pick | " + " | ".join(FRONTS) + " |",
            "| --- | --- | --- |" + " --- |" * len(FRONTS),
        ]
        for r in records:
            for b in r["budgets"]:
                cells = [_fair_pick_text(b["picks"][k]) for k in ("ST++", *FRONTS)]
                lines.append(f"| {r['seed']} | {budget_text(b)} | " + " | ".join(cells) + " |")
        lines.append("")
        finetuned = finetune_table(records)
        if finetuned:
            lines += [
                "Fine-tuning ST++'s pick (issue 41's first lever; `stim-hf finetune`'s defaults: KL from its frozen "
                "ResNet-20, SGD lr 0.01 cosine, on the images the ResNet-20 trained on), scored on the test split "
                "before and after, against the fair front's pick (paired by the seeds fine-tuned); minutes of the "
                "whole fine-tuning, its training in brackets:",
                "",
                *finetuned,
                "",
            ]
    for records in by_setting.values():
        lines += [
            f"Cost, {records[0]['st_network']}: one ST++ training and its search against the trainings alone whose "
            "points the fair front picked at some budget (what a user would have trained to match every pick), and "
            "against every training the front holds (minutes of training from the logged pace / wall clock):",
            "",
            *fair_cost_table(records),
            "",
        ]
    settings = list(by_setting.values())
    for i, first in enumerate(settings):
        for second in settings[i + 1 :]:
            lines += setting_comparison(first, second)
    any_records = next(iter(by_setting.values()))
    check = dedicated_check(any_records)
    if check:
        lines += ["Dedicated-size check (test top-1 at the size; paired by seed):", "", *check, ""]
    lines += [
        "Trainings each seed's fronts hold (test top-1 of the whole network: ST++'s full ResNet-20; a network trained "
        "alone at its largest size, BatchNorm re-estimated; training minutes from the logged pace / wall clock, two "
        "runs at once):",
        "",
        "| seed | run | network | trained at | top-1 | train / wall min |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in any_records:
        for run, n in sorted(r["networks"].items()):
            lines.append(
                f"| {r['seed']} | {run} | {n['network']} | {n['trained_at']} | {n['top1']} "
                f"| {n['train_minutes']} / {n['wall_minutes']} |"
            )
    return "\n".join(lines) + "\n"


def fair_plot(by_setting: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per ST++ setting, the picks against the budget (mean and std over seeds): ST++ and each from-scratch front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_setting), figsize=(6 * len(by_setting), 4.5), squeeze=False)
    styles = {"ST++": ("tab:orange", "o-"), SCRATCH_LABEL: ("black", "D-")}
    styles |= {
        "from scratch, 32 px and random sizes": ("tab:gray", "D--"),
        "from scratch, 32 px only": ("tab:blue", "s:"),
    }
    for ax, records in zip(axes[0], by_setting.values(), strict=True):
        shares = [100 * b["budget"] for b in records[0]["budgets"]]
        for label, (color, style) in styles.items():
            values = [[r["budgets"][i]["picks"][label] for r in records] for i in range(len(shares))]
            means = [statistics.mean(p["test_top1"] for p in v) if all(v) else float("nan") for v in values]
            stds = [statistics.stdev(p["test_top1"] for p in v) if all(v) and len(v) > 1 else 0.0 for v in values]
            ax.errorbar(shares, means, yerr=stds, fmt=style, color=color, capsize=3, label=label, ms=4)
        ax.set(xlabel="budget (FLOPs, % of ResNet-20 at 32 px)", ylabel="test top-1 (%)",
               title=f"{records[0]['st_network']}, {len(records)} seed{'s' * (len(records) > 1)}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fair_report(args: argparse.Namespace) -> int:
    """Score the study's finished trainings that have no record yet (with ``--study``), then write the fair report
    (``fair/results.json``, ``results.md``, ``payoff.png`` in ``--report-dir``) from the committed records."""
    if args.study is not None and args.study.is_dir():
        score_finished_networks(args)
    by_setting = {
        setting: records for setting in args.st_settings.split(",") if (records := setting_records(setting, args))
    }
    if not by_setting:
        print("no seed has a record of the ST++ settings asked for", file=sys.stderr)
        return 1
    add_fair_finetuning(by_setting, args)
    screens = lever_screens(by_setting, args)
    out = args.report_dir / "fair"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r for rs in by_setting.values() for r in rs], indent=1) + "\n")
    text = fair_markdown(by_setting, args)
    if screens:
        (out / "levers.json").write_text(json.dumps(screens, indent=1) + "\n")
        text += "\n" + "\n".join(lever_markdown(screens))
    (out / "results.md").write_text(text)
    fair_plot(by_setting, out / "payoff.png")
    print(text)
    return 0


def setting_records(setting: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The seed records (:func:`fair_seed_record`) of the ST++ ``setting`` for the ``--seeds`` that have one."""
    return [r for seed in (int(s) for s in args.seeds.split(",")) if (r := fair_seed_record(seed, setting, args))]


def lever_screens(by_setting: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The screen of each ``--lever-settings`` setting that has a record, against the ST++ setting it changes."""
    screens = []
    for setting in filter(None, args.lever_settings.split(",")):
        base = base_setting(setting, list(by_setting))
        if base is None:
            raise SystemExit(
                f"--lever-settings {setting}: changes none of the --st-settings reported ({', '.join(by_setting)}); "
                "name the setting it changes there too"
            )
        records = setting_records(setting, args)
        if records:
            screens.append(lever_screen(by_setting[base], records))
        else:
            print(f"--lever-settings {setting}: no seed has a record of it yet", file=sys.stderr)
    return screens


def lever_markdown(screens: list[dict[str, Any]]) -> list[str]:
    """The levers' section of the fair report."""
    lines = [
        "### The BigNAS levers, screened where the recipe falls short",
        "",
        "Each lever is a new ST++ training of the setting it changes, on the same subsets, scored as every network "
        "here. The rule (docs/search.md, written before the runs): a lever goes on to seeds 2 and 3 if on seed 1 it "
        "closes at least half of the gap at a short budget and costs no other budget more than 0.5 points; it enters "
        "a recipe only if over 3 seeds the bar then holds at that budget.",
        "",
    ]
    for screen in screens:
        lines += lever_table(screen)
    return lines
