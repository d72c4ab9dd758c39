"""``stim-hf search``: Pareto fronts, exact BatchNorm statistics, the shared walk, budgets, export, bad input."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from test_export import perturbed
from test_families import build
from transformers import AutoModelForImageClassification

from stim_hf.analysis.costs import CostModel
from stim_hf.analysis.flops import count_flops
from stim_hf.analysis.pareto import near_front, pareto_front, pareto_layers, within_margin
from stim_hf.analysis.scoring import ScoreBatches, reestimate_batchnorm, score_subnets, tree_support
from stim_hf.cli import main as cli_main
from stim_hf.data.builtin_datasets import load_builtin_dataset
from stim_hf.data.image_datasets import DataArguments
from stim_hf.errors import ConfigError
from stim_hf.method import Subnet, find_residual_family, find_residual_stages, use_subnet
from stim_hf.method.batchnorm import batchnorm_layers
from stim_hf.tools.search import (
    Candidate,
    CandidateSpace,
    CheckpointSearch,
    SearchArguments,
    SearchImages,
    SearchResult,
    parse_budget,
    pick_candidate,
    search_subnets,
)

DIGITS = ["--dataset_name", "sklearn:digits", "--image_size", "16"]
# Small held-out and re-estimation sets, no latency: every search here takes a second or two.
QUICK = dict(holdout_samples=96, recalibrate_bn=64, batch_size=32, latency="none", output_dir=None, progress=False)


def digits() -> DataArguments:
    return DataArguments(dataset_name="sklearn:digits", image_size=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved CIFAR ResNet-14 (2 blocks per stage) with random weights and BatchNorm statistics."""
    path = tmp_path_factory.mktemp("search") / "resnet14"
    perturbed("cifar_resnet").save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def test_pareto_front_of_a_synthetic_table():
    costs = [1.0, 2.0, 3.0, 4.0, 5.0, 2.0, None, 0.5]
    accuracies = [0.10, 0.50, 0.40, 0.70, 0.70, 0.50, 0.99, 0.05]
    # 2 is beaten by 1 (cheaper, more accurate), 4 by 3 (as accurate, cheaper); 1 and 5 are the same
    # point (both kept); 6 has no cost; 7 is the cheapest.
    assert pareto_front(costs, accuracies) == [7, 0, 1, 5, 3]
    assert pareto_front([], []) == []
    # Whole layers until at least the count: the front (5 points), then the next layer (2, 4).
    assert pareto_layers(costs, accuracies, 5) == [7, 0, 1, 5, 3]
    assert sorted(pareto_layers(costs, accuracies, 6)) == [0, 1, 2, 3, 4, 5, 7]


def test_near_front_judges_a_lead_by_the_paired_standard_error():
    # 400 images. A (cost 1) gets 0..199 right; B (cost 2) those and 200..219 (55 %); C (cost 3) is B
    # with 6 of its images wrong (53.5 %, behind B on the same images: 2.5 paired standard errors);
    # D (cost 4) is 53 % on other images (100..311): 2 points behind B, but only 0.6 standard errors
    # of a difference that noisy. E has no cost.
    def right(*ranges):
        hits = torch.zeros(400, dtype=torch.bool)
        for start, stop in ranges:
            hits[start:stop] = True
        return hits

    hits = [right((0, 200)), right((0, 220)), right((6, 220)), right((100, 312)), right((0, 400))]
    costs = [1.0, 2.0, 3.0, 4.0, None]
    assert near_front(costs, hits, 2.0) == [0, 1, 3]
    assert near_front(costs, hits, 0.0) == [0, 1]  # the front
    assert near_front(costs, hits, 3.0) == [0, 1, 2, 3]


def _right(*ranges, images: int = 400) -> torch.Tensor:
    hits = torch.zeros(images, dtype=torch.bool)
    for start, stop in ranges:
        hits[start:stop] = True
    return hits


def test_within_margin_judges_a_deficit_by_the_paired_standard_error():
    # 400 images. The reference (0) gets 0..219 right. 1 misses 4 of its images (1 point behind, on
    # the same images: 2.0 paired standard errors); 2 misses 20 (5 points: 4.6 errors); 3 gets
    # 100..311 right (2 points behind on other images: 0.6 errors of a much noisier difference);
    # 4 ties with the reference on other images.
    hits = [_right((0, 220)), _right((4, 220)), _right((20, 220)), _right((100, 312)), _right((180, 400))]
    assert within_margin(hits, 0, 0.0) == [0, 4]
    assert within_margin(hits, 0, 1.0) == [0, 3, 4]
    assert within_margin(hits, 0, 2.5) == [0, 1, 3, 4]
    assert within_margin(hits, 0, 5.0) == [0, 1, 2, 3, 4]


def test_pick_margin_takes_the_cheapest_candidate_the_best_does_not_clearly_beat():
    def candidate(flops, hits):
        subnet = Subnet(kept=((0,),), num_blocks=(1,), input_size=8 + flops)
        return Candidate(subnet, flops=flops, params=1, accuracy=hits.float().mean().item(), loss=1.0, hits=hits)

    best = candidate(40, _right((0, 220)))
    one_point_behind = candidate(20, _right((4, 220)))
    five_points_behind = candidate(10, _right((20, 220)))
    pool = [five_points_behind, best, one_point_behind]
    assert pick_candidate(pool) is best and pick_candidate(pool, 1.0) is best
    assert pick_candidate(pool, 2.5) is one_point_behind
    assert pick_candidate(pool, 5.0) is five_points_behind
    assert pick_candidate([], 2.0) is None
    with pytest.raises(ValueError, match="same scored images"):
        pick_candidate([best, candidate(5, _right((0, 10), images=100))], 2.0)

    # Over checkpoints, a deficit is judged against the most accurate candidate of any of them, so
    # margins do not add up: CT's own pick is 4 images behind CT's best, which is 4 behind ST++'s (2.0
    # paired standard errors each), and so 8 images, 2.9 errors, behind ST++'s best.
    def searched(label, most_accurate, pick):
        return CheckpointSearch(label=label, path=label, family="cifar_resnet", model_class="M", full_flops=100,
                                full_params=1, full_size=32, strategy="enumerate", sharing="tree", space_size=2,
                                candidates=[most_accurate, pick], pick=pick, most_accurate=most_accurate)  # fmt: skip

    ct_best, ct_pick = candidate(30, _right((4, 220))), candidate(5, _right((8, 220)))
    exact = SearchResult({"pick_margin": 0.0}, [searched("CT", ct_best, ct_best), searched("ST++", best, best)])
    assert exact.pick[1] is best
    ct, stpp = searched("CT", ct_best, ct_pick), searched("ST++", best, one_point_behind)
    assert SearchResult({"pick_margin": 2.5}, [ct, stpp]).pick == (stpp, one_point_behind)
    assert SearchResult({"pick_margin": 3.0}, [ct, stpp]).pick == (ct, ct_pick)


def test_budget_parsing():
    flops, params, latency = parse_budget("flops=0.5, params=200K,latency_ms=2.5")
    assert (flops.share, flops.value, flops.limit(1000)) == (True, 0.5, 500)
    assert (params.share, params.value) == (False, 200e3)
    assert (latency.share, latency.value) == (False, 2.5)
    assert parse_budget("flops=12M")[0].limit(1e9) == 12e6
    assert parse_budget("flops=50%")[0].limit(10) == 5
    with pytest.raises(ConfigError, match=r"'flop' is not known \(did you mean 'flops'\?\)"):
        parse_budget("flop=0.5")
    with pytest.raises(ConfigError, match="latency_ms is milliseconds"):
        parse_budget("latency_ms=50%")


def test_reestimated_statistics_equal_full_batch_statistics():
    model = perturbed("cifar_resnet")
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    # One batch: torch's own running estimate after one train-mode batch (momentum None) is that
    # batch's mean and unbiased variance, layer by layer.
    reference = perturbed("cifar_resnet").train()
    for layer in batchnorm_layers(reference):
        layer.reset_running_stats()
        layer.momentum = None
    with torch.no_grad():
        reference(pixel_values=images)
    reestimate_batchnorm(model, [images])
    for ours, theirs in zip(batchnorm_layers(model), batchnorm_layers(reference), strict=True):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)

    # Three batches: the stem's statistics are still exactly those of all 24 images at once (pooled,
    # not an average of per-batch variances, not a moving average).
    reestimate_batchnorm(model, list(images.split(8)))
    with torch.no_grad():
        var, mean = torch.var_mean(model.resnet.stem.conv(images), dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(model.resnet.stem.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.resnet.stem.bn.running_var, var, rtol=1e-5, atol=1e-6)


def test_flops_and_parameters_add_up_per_block():
    model = perturbed("cifar_resnet")
    stages = find_residual_stages(model)
    example = torch.zeros(1, 3, 16, 16)
    costs = CostModel(model, stages, example)
    for rule in ("prefix", "subset"):
        for subnet in CandidateSpace(stages, rule, "full", [8, 16]).enumerate()[::5]:
            assert costs.flops(subnet) == count_flops(model, example, stages, subnet)
            assert costs.parameters(subnet) == sum(
                p.numel()
                for name, p in model.named_parameters()
                if not any(
                    f"stages.{s}.layers.{b}." in name for s in range(3) for b in range(2) if b not in subnet.kept[s]
                )
            )


@pytest.mark.parametrize(
    ("name", "rule"),
    [("cifar_resnet", "prefix"), ("cifar_resnet", "subset"), ("hf_convnext", "prefix"), ("timm_resnet", "prefix")],
)
def test_tree_walk_scores_like_each_subnet_on_its_own(name, rule):
    model = perturbed(name)
    family, stages = find_residual_family(model)
    generator = torch.Generator().manual_seed(0)
    size = 16 if name == "cifar_resnet" else 32  # ConvNeXt needs its stride; timm ResNet's stem takes 4x
    subnets = CandidateSpace(stages, rule, "full", [size]).enumerate()
    batches = ScoreBatches(
        [torch.randn(8, 3, size, size, generator=generator) for _ in range(3)],
        [torch.randn(8, 3, size, size, generator=generator) for _ in range(2)],
        [torch.randint(0, 10, (8,), generator=generator) for _ in range(2)],
    )
    assert tree_support(model, stages, batches.images[0][:1]).supported
    state = [layer.running_mean.clone() for layer in batchnorm_layers(model)]
    naive = score_subnets(model, stages, subnets, batches, "naive")
    tree = score_subnets(model, stages, subnets, batches, "tree")
    assert [s.correct for s in tree] == [s.correct for s in naive]
    for ours, theirs in zip(tree, naive, strict=True):
        assert ours.loss_sum == pytest.approx(theirs.loss_sum, rel=1e-6)
    assert len({round(s.loss_sum, 4) for s in naive}) > len(subnets) // 2, "sub-networks should score differently"
    for layer, before in zip(batchnorm_layers(model), state, strict=True):  # the model's statistics are restored
        assert torch.equal(layer.running_mean, before)


def test_shared_walk_is_refused_where_blocks_take_more_than_a_tensor():
    model = build("hf_vit").eval()
    stages = find_residual_stages(model)
    support = tree_support(model, stages, torch.zeros(1, 3, 16, 16))
    assert not support.supported and "called with other arguments" in support.reason


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["cifar_resnet", "hf_resnet", "hf_regnet", "hf_convnext", "hf_vit", "hf_swin", "timm_resnet"]
)
def test_every_exportable_family_is_searched(name):
    model = perturbed(name)
    family, stages = find_residual_family(model)
    sizes = "8,16" if family.supports_smaller_inputs and name != "hf_convnext" else "16"
    result = search_subnets([model], digits(), SearchArguments(input_sizes=sizes, budget="flops=0.7", **QUICK))
    (searched,) = result.checkpoints
    space = CandidateSpace(stages, "prefix", "full", [int(s) for s in sizes.split(",")])
    assert len(searched.candidates) == len(space) == searched.space_size
    assert searched.sharing == ("naive" if name in ("hf_vit", "hf_swin") else "tree")
    assert searched.pick is not None and searched.pick.flops <= 0.7 * searched.full_flops


def test_budget_is_respected_and_the_pick_is_the_best_under_it(checkpoint, tmp_path):
    # The Pareto layers alone (halving_margin 0): on 6 images no lead is significant, so the default
    # margin would keep every candidate to the last round (checked at the end).
    args = SearchArguments(
        input_sizes="8,12,16", budget="flops=0.45,params=35K", halving_margin=0.0, **{**QUICK, "output_dir": tmp_path}
    )
    result = search_subnets([checkpoint], digits(), args)
    (searched,) = result.checkpoints
    limit_flops = 0.45 * searched.full_flops
    inside = [c for c in searched.candidates if c.flops <= limit_flops and c.params <= 35e3]
    assert 0 < len(inside) < len(searched.candidates)
    assert {id(c) for c in searched.candidates if c.within_budget} == {id(c) for c in inside}
    # Successive halving: every candidate scored on a few images, the last round on all 96.
    final = [c for c in searched.candidates if c.scored_images == 96]
    assert {c.scored_images for c in searched.candidates} == {6, 24, 96} and 0 < len(final) < len(searched.candidates)
    assert searched.pick.scored_images == 96
    assert searched.pick.accuracy == max(c.accuracy for c in inside if c.scored_images == 96)
    assert searched.pick.flops <= limit_flops and searched.pick.params <= 35e3
    # Fronts (among the fully scored): no candidate is as cheap and strictly more accurate.
    for member in (c for c in final if c.pareto_flops):
        assert not any(c.flops <= member.flops and c.accuracy > member.accuracy for c in final)
    report = json.loads((tmp_path / "pareto.json").read_text())
    assert report["pick"]["depths"] == list(searched.pick.depths)
    rows = (tmp_path / "pareto.csv").read_text().splitlines()
    assert len(rows) == 1 + len(searched.candidates) and (tmp_path / "pareto.png").stat().st_size > 0
    # The margin only adds survivors: all that reached the last round above reach it again.
    wide = search_subnets([checkpoint], digits(), replace(args, halving_margin=2.0, output_dir=None)).checkpoints[0]
    last = {c.subnet for c in wide.candidates if c.scored_images == 96}
    assert {c.subnet for c in final} <= last and len(last) > len(final)


def test_progress_in_a_log_is_a_line_per_phase_with_a_fixed_total(checkpoint, capsys):
    """stderr is no terminal here (as in a log file): whole lines, no carriage returns, each phase's total fixed."""
    args = SearchArguments(
        input_sizes="8,12,16", budget="flops=0.45", halving_margin=0.0, **{**QUICK, "progress": True}
    )
    (searched,) = search_subnets([checkpoint], digits(), args).checkpoints
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("search resnet14, ")]
    scored = {}  # candidates each round scored, by the records: 6, 24 and 96 images
    for c in searched.candidates:
        scored[c.scored_images] = scored.get(c.scored_images, 0) + 1
    rounds = [sum(n for images, n in scored.items() if images >= share) for share in (6, 24, 96)]
    for number, (total, share) in enumerate(zip(rounds, (6, 25, 100), strict=True), start=1):
        name = f"search resnet14, round {number} of 3 ({share}% of the images)"
        phase = [line for line in lines if line.startswith(name + ": ")]
        assert phase[0].startswith(f"{name}: 0/{total} subnets (0%)"), phase
        assert re.fullmatch(rf"{re.escape(name)}: {total}/{total} subnets \(100%\), \d+ s, done", phase[-1]), phase
        assert all(f"/{total} subnets" in line for line in phase)  # the total never changes within a phase
    assert len(lines) == sum(len([x for x in lines if f"round {n} of 3" in x]) for n in (1, 2, 3))


def test_line_progress_writes_a_line_every_few_seconds(monkeypatch):
    import io

    from stim_hf.tools import progress as progress_module

    clock = iter([0.0, 1.0, 6.0, 7.0, 13.0, 14.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    with progress_module.progress(10, "phase", "subnet", every_s=5.0, file=stream) as bar:
        assert isinstance(bar, progress_module.LineProgress)
        for _ in range(4):
            bar.update(2)  # at 1 s (no line), 6 s (a line), 7 s (none), 13 s (a line)
    assert stream.getvalue().splitlines() == [
        "phase: 0/10 subnets (0%), 0 s",
        "phase: 4/10 subnets (40%), 6 s, 0.667 subnets/s, about 9 s left",
        "phase: 8/10 subnets (80%), 13 s, 0.615 subnets/s, about 3 s left",
        "phase: 8/10 subnets (80%), 14 s, stopped",
    ]
    silent = io.StringIO()
    with progress_module.progress(3, "off", enabled=False, file=silent) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def test_line_progress_of_a_long_phase_writes_about_a_hundred_lines(monkeypatch):
    """A line at most per 1 % of the work as well: a 3-hour run at 2 steps/s would write 4,320 lines at one every
    5 seconds, its hundred percents write a hundred."""
    import io

    from stim_hf.tools import progress as progress_module

    clock = iter(range(10_000))  # a second a unit
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(clock)))
    stream = io.StringIO()
    with progress_module.progress(6_000, "long", "step", every_s=5.0, file=stream) as bar:
        for _ in range(6_000):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 101  # the first, one per 60 steps short of the end, the last
    assert lines[1].startswith("long: 60/6000 steps (1%), ") and lines[-1].startswith("long: 6000/6000 steps (100%)")


def test_a_pick_margin_trades_a_lead_the_images_cannot_resolve_for_fewer_flops(checkpoint, tmp_path):
    quick = {**QUICK, "halving_rounds": 1, "input_sizes": "8,12,16", "budget": "flops=0.8"}
    exact = search_subnets([checkpoint], digits(), SearchArguments(**quick)).checkpoints[0]
    within = [c for c in exact.candidates if c.within_budget]
    assert exact.pick.accuracy == max(c.accuracy for c in within)
    # A margin no deficit on 96 images reaches: the cheapest candidate under the budget (here one
    # image behind the most accurate, at 58 % of its FLOPs).
    args = SearchArguments(pick_margin=1e6, export=str(tmp_path / "pick"), **{**quick, "output_dir": tmp_path / "out"})
    result = search_subnets([checkpoint], digits(), args)
    (searched,) = result.checkpoints
    assert [(c.subnet, c.accuracy) for c in searched.candidates] == [(c.subnet, c.accuracy) for c in exact.candidates]
    cheapest = min(c.flops for c in within)
    assert searched.pick.flops == cheapest <= exact.pick.flops and result.pick[1] is searched.pick
    # What the pick gave up is on record: in pareto.json, the summary and the export's card.
    assert searched.most_accurate.subnet == exact.pick.subnet and exact.most_accurate is exact.pick
    report = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert report["settings"]["pick_margin"] == 1e6 and report["pick"]["flops"] == cheapest
    assert report["checkpoints"][0]["most_accurate"]["depths"] == list(exact.pick.depths)
    card = (tmp_path / "pick" / "README.md").read_text()
    assert "with the fewest FLOPs among those within 1e+06 paired standard errors of the most accurate of" in card
    gave_up = searched.most_accurate is not searched.pick
    assert ("The most accurate, " in card) == gave_up
    assert ("the pick (--pick-margin 1e+06) is" in result.summary()) == gave_up


def test_exported_pick_has_the_logits_of_the_subnet_inside_the_model(checkpoint, tmp_path):
    args = SearchArguments(input_sizes="8,12", budget="flops=0.6", export=str(tmp_path / "pick"), **QUICK)
    result = search_subnets([checkpoint], digits(), args)
    _, pick = result.pick
    exported = AutoModelForImageClassification.from_pretrained(tmp_path / "pick").eval()
    assert [s.num_blocks for s in find_residual_stages(exported)] == list(pick.depths)

    model = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    stages = find_residual_stages(model)
    images = SearchImages(digits(), args, torch.device("cpu")).at(pick.input_size)
    reestimate_batchnorm(model, images.recalibration, stages, pick.subnet)
    x = images.images[0]
    with torch.no_grad(), use_subnet(stages, pick.subnet):
        inside = model(pixel_values=x).logits
    torch.testing.assert_close(exported(pixel_values=x).logits, inside, rtol=0, atol=1e-5)
    correct = int((exported(pixel_values=torch.cat(images.images)).logits.argmax(-1) == torch.cat(images.labels)).sum())
    assert correct / images.num_images == pick.accuracy

    info = json.loads((tmp_path / "pick" / "export_info.json").read_text())
    assert info["input_size"] == pick.input_size and info["search"]["depths"] == list(pick.depths)
    card = (tmp_path / "pick" / "README.md").read_text()
    assert f"{100 * pick.accuracy:.2f}%" in card and f"{pick.input_size} px" in card
    assert "Re-estimated for this sub-network" in card and "Inherited from the full network" not in card


@pytest.mark.parametrize("strategy", ["enumerate", "evolution"])
def test_search_is_deterministic_for_a_seed(checkpoint, strategy):
    evolution = dict(population=6, generations=2) if strategy == "evolution" else {}

    def run(seed):
        args = SearchArguments(
            strategy=strategy, sampling="subset", input_sizes="8,16", budget="flops=0.8", seed=seed,
            **evolution, **QUICK,
        )  # fmt: skip
        searched = search_subnets([checkpoint], digits(), args).checkpoints[0]
        return [(c.subnet, c.accuracy, c.loss) for c in searched.candidates], searched.pick.subnet

    first, again = run(3), run(3)
    assert first == again
    if strategy == "evolution":
        assert len(first[0]) < 100, "evolution should score a part of the 9 x 4 x 4 x 2 candidates"
        assert {c for c, _, _ in run(4)[0]} != {c for c, _, _ in first[0]}


def test_several_checkpoints_share_one_report(checkpoint, tmp_path):
    other = perturbed("cifar_resnet")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1.5)
    quick = {**QUICK, "halving_rounds": 1, "input_sizes": "8,16", "sample_space": "0,1,1", "output_dir": tmp_path}
    result = search_subnets([checkpoint, other], digits(), SearchArguments(labels=["CT", "ST++"], **quick))
    assert [c.label for c in result.checkpoints] == ["CT", "ST++"]
    assert [len(c.candidates) for c in result.checkpoints] == [8, 8]
    overall, pick = result.pick
    assert pick.accuracy == max(c.pick.accuracy for c in result.checkpoints)
    report = json.loads((tmp_path / "pareto.json").read_text())
    assert [c["label"] for c in report["checkpoints"]] == ["CT", "ST++"] and report["pick"][
        "checkpoint"
    ] == overall.label
    assert {row.split(",")[0] for row in (tmp_path / "pareto.csv").read_text().splitlines()[1:]} == {"CT", "ST++"}


def test_scores_come_from_training_images_unless_the_validation_split_is_asked_for(checkpoint):
    quick = {**QUICK, "halving_rounds": 1, "input_sizes": "16", "sampling": "prefix", "sample_space": "0,0,1"}
    held_out = search_subnets([checkpoint], digits(), SearchArguments(**quick)).settings
    assert held_out["scored_on"] == "96 held-out training images (seed 42)"
    validation = search_subnets([checkpoint], digits(), SearchArguments(score_split="validation", **quick)).settings
    assert validation["scored_on"] == "96 images of the validation split (--score-split validation)"


def test_recipe_gives_sampling_sizes_and_seed(checkpoint, tmp_path):
    from stim_hf.tools.search import parse_search_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset_name: sklearn:digits\nimage_size: 16\nstim_method: st\nseed: 5\n")
    args, data_args, checkpoints = parse_search_args([checkpoint, "--config", str(recipe)])
    assert (args.sampling, args.min_input_scale, args.seed, data_args.image_size) == ("subset", 1.0, 5, 16)
    with pytest.raises(ConfigError, match="--sampling prefix"):
        parse_search_args([checkpoint, "--config", str(recipe), "--export", str(tmp_path / "x")])


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the fix, nothing written
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "mobilenet"
    build("hf_mobilenet_v2").save_pretrained(path)
    return str(path)


BAD = {
    "unknown budget key": (["--budget", "macs=0.5"], r"--budget key 'macs' is not known; use flops="),
    "budget below the smallest": (
        ["--budget", "flops=100K", "--input-sizes", "8,16"],
        r"--budget flops=100K is below the smallest sub-network .*depths=1,1,1 at 8 px needs .*raise the budget",
    ),
    "missing device": (["--device", "cuda:7"], r"--device cuda:7 is not on this machine .*--device cpu"),
    "held-out split too large": (
        ["--holdout-samples", "5000"],
        r"--holdout-samples 5000 plus --recalibrate-bn 64 need 5,064 training images, but the training data has "
        r"1,527; lower --holdout-samples",
    ),
    "negative pick margin": (["--pick-margin", "-1"], r"pick_margin=-1.0 must be a number, 0 or more"),
    "output folder exists": ([], r"--output-dir '.*out' already exists and is not empty; give a new folder"),
    "family that cannot be exported": ([], r"cannot be searched: .*MobileNetV2's config has no per-stage depth"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_fix_and_writes_nothing(case, checkpoint, mobilenet_checkpoint, tmp_path,
                                                                  capsys):  # fmt: skip
    if case == "missing device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    extra, message = BAD[case]
    out, export = tmp_path / "out", tmp_path / "export"
    if case == "output folder exists":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    source = mobilenet_checkpoint if case == "family that cannot be exported" else checkpoint
    argv = ["search", source, *DIGITS, "--output-dir", str(out), "--export", str(export), "--recalibrate-bn", "64"]
    assert cli_main([*argv, "--holdout-samples", "64", "--latency", "none", "--progress", "false", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stim-hf: error: "), err
    assert __import__("re").search(message, err), err
    assert not export.exists()
    assert (
        (not out.exists()) if case != "output folder exists" else sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    )


# --------------------------------------------------------------------------------------------------
# Only the data a search uses
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validation_parquet(tmp_path_factory):
    """200 digits as a parquet file: validation data without any training source."""
    path = tmp_path_factory.mktemp("search") / "validation.parquet"
    load_builtin_dataset("sklearn:digits")["train"].select(range(200)).to_parquet(str(path))
    return str(path)


NEEDS_TRAINING_DATA = {
    "held-out training images (the default)": ([], r"scores on held-out training images .*no training data was given; "
                                                   r"add --train_file.*--score-split validation --recalibrate-bn 0$"),
    "re-estimation": (["--score-split", "validation", "--recalibrate-bn", "64"],
                      r"--recalibrate-bn 64 re-estimates BatchNorm statistics on training images, but no training "
                      r"data was given; add --train_file.*or pass --recalibrate-bn 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NEEDS_TRAINING_DATA))
def test_training_data_is_asked_for_only_where_the_search_uses_it(case, checkpoint, validation_parquet, tmp_path,
                                                                   capsys):  # fmt: skip
    extra, message = NEEDS_TRAINING_DATA[case]
    argv = ["search", checkpoint, "--validation_file", validation_parquet, "--image_size", "16",
            "--output-dir", str(tmp_path / "out"), "--latency", "none", "--progress", "false", *extra]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stim-hf: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_validation_data_alone_is_enough_to_search_on_the_validation_split(checkpoint, validation_parquet, tmp_path):
    argv = ["search", checkpoint, "--validation_file", validation_parquet, "--image_size", "16", "--input-sizes", "16",
            "--score-split", "validation", "--recalibrate-bn", "0", "--holdout-samples", "150",
            "--output-dir", str(tmp_path / "out"), "--latency", "none", "--progress", "false"]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert report["settings"]["scored_on"] == "150 images of the validation split (--score-split validation)"
    assert len(report["checkpoints"][0]["pareto_flops"]) >= 1


def test_early_halving_rounds_score_a_uniform_sample_of_a_class_sorted_file(tmp_path):
    # CIFAR-10's parquet files are sorted by class. Held-out images kept in the file's order gave
    # round 1 of successive halving (the first 1/16) a single class, and its pick missed the
    # exhaustive one by 1.7 points on a ResNet-56 (docs/search.md, "Speed").
    path = tmp_path / "sorted.parquet"
    digits_train = load_builtin_dataset("sklearn:digits")["train"]
    by_class = sorted(range(len(digits_train)), key=lambda i: digits_train[i]["label"])
    digits_train.select(by_class).to_parquet(str(path))
    data = DataArguments(train_file=str(path), image_size=16)
    images = SearchImages(data, SearchArguments(**{**QUICK, "holdout_samples": 640}), torch.device("cpu"))
    first = torch.cat(images.at(16).head(40, 0).labels)  # round 1's share of 640: 1/16
    assert len(first) == 40 and len(first.unique()) >= 6


# --------------------------------------------------------------------------------------------------
# Held-out and re-estimation counts fitted to a small training split
# --------------------------------------------------------------------------------------------------


def _counts(num_train: int, **given) -> tuple[int, int]:
    from stim_hf.tools.search.images import fit_sample_counts

    return fit_sample_counts(SearchArguments(**given), num_train)


def test_default_counts_shrink_to_half_the_split_each_and_say_so(caplog):
    assert _counts(50_000) == (2000, 2000)
    assert _counts(4000) == (2000, 2000)
    with caplog.at_level("WARNING", logger="stim_hf.tools.search.images"):
        assert _counts(1437) == (718, 719)
    assert "1,437 images, too few for the default 2,000 held-out and 2,000 re-estimation images: using 718 held-out " \
           "and 719 re-estimation images" in caplog.text  # fmt: skip
    # One count given: the other takes what it leaves; validation scoring fits the re-estimation images alone.
    assert _counts(1500, holdout_samples=1000) == (1000, 500)
    assert _counts(1500, recalibrate_bn=300) == (1200, 300)
    assert _counts(1500, score_split="validation") == (2000, 1500)
    assert _counts(1500, recalibrate_bn=0, holdout_samples=1500) == (1500, 0)


@pytest.mark.parametrize(
    ("num_train", "given", "message"),
    [
        (511, {}, r"511 images, too few to score sub-networks honestly: a search fits at least 256 images to each of "
                  r"--holdout-samples and --recalibrate-bn .*set both counts yourself"),
        (1200, {"holdout_samples": 1000}, r"--holdout-samples 1000 leaves 200 of the 1,200 training images for "
                                          r"--recalibrate-bn, fewer than the 256 .*; lower --holdout-samples, or set "
                                          r"--recalibrate-bn yourself"),
        (3000, {"holdout_samples": 2000, "recalibrate_bn": 2000},
         r"--holdout-samples 2000 plus --recalibrate-bn 2000 need 4,000 training images, but the training data has "
         r"3,000; .*or leave them unset"),
    ],
)  # fmt: skip
def test_counts_that_cannot_fit_are_refused_naming_the_minimum_or_the_fix(num_train, given, message):
    with pytest.raises(ConfigError, match=message):
        _counts(num_train, **given)
    # Counts given explicitly are the user's: any that fit are used, however small.
    assert _counts(200, holdout_samples=96, recalibrate_bn=64) == (96, 64)


def test_a_search_with_default_counts_runs_on_a_small_split_and_records_them(checkpoint, tmp_path):
    argv = ["search", checkpoint, *DIGITS, "--input-sizes", "16", "--output-dir", str(tmp_path / "out"),
            "--latency", "none", "--progress", "false"]  # fmt: skip
    assert cli_main(argv) == 0
    settings = json.loads((tmp_path / "out" / "pareto.json").read_text())["settings"]
    half = settings["num_scored_images"]
    assert (settings["holdout_samples"], settings["recalibrate_bn"]) == (half, settings["num_recalibration_images"])
    assert settings["sample_counts_fitted"] == ["holdout_samples", "recalibrate_bn"]
    assert 0 <= settings["num_recalibration_images"] - half <= 1 and half > 700
