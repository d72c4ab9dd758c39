"""The images a search scores its candidates on and re-estimates their BatchNorm statistics with."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from stim_hf.analysis.scoring import ScoreBatches
from stim_hf.data.image_datasets import DataArguments, get_label_names, load_image_datasets
from stim_hf.data.transforms import collate_image_batch, with_image_transforms
from stim_hf.errors import ConfigError
from stim_hf.method import Subnet, resize_for_subnet
from stim_hf.method.batchnorm import preserved_rng_state
from stim_hf.tools.datasets_progress import datasets_work_in_lines
from stim_hf.tools.search.arguments import FIT_MINIMUM, SearchArguments

logger = logging.getLogger(__name__)


def fit_sample_counts(args: SearchArguments, num_train: int) -> tuple[int, int]:
    """The held-out and re-estimation image counts for a training split of ``num_train`` images.

    Counts given explicitly are used as given, and refused when the split cannot hold them. Counts left
    unset shrink to fit a small split (both unset: half of it each, the defaults' 1:1; one unset: what
    the other leaves), announced in one line. Below ``FIT_MINIMUM`` images for a fitted count, too
    few remain to rank candidates honestly, and the search is refused before any scoring.
    """
    on_train = args.score_split == "train"
    holdout, recal = (args.holdout_samples if on_train else 0), args.recalibrate_bn
    if holdout + recal <= num_train:
        return args.holdout_samples, recal
    fitted = [name for name in args.fitted_counts if on_train or name == "recalibrate_bn"]
    if not fitted:
        held = f"--holdout-samples {holdout} plus " if on_train else ""
        raise ConfigError(
            f"{held}--recalibrate-bn {recal} need {holdout + recal:,} training images, but the training data has "
            f"{num_train:,}; lower --holdout-samples or --recalibrate-bn so they fit, or leave them unset to fit "
            "them to the data"
        )
    before = (
        f"{holdout:,} held-out and {recal:,} re-estimation images" if on_train else f"{recal:,} re-estimation images"
    )
    if len(fitted) == 2:
        holdout, recal = num_train // 2, num_train - num_train // 2
    elif fitted == ["holdout_samples"]:
        holdout = num_train - recal
    else:
        recal = num_train - holdout
    counts = {"holdout_samples": holdout, "recalibrate_bn": recal}
    if len(fitted) == 1 and counts[fitted[0]] < FIT_MINIMUM:
        given = "recalibrate_bn" if fitted == ["holdout_samples"] else "holdout_samples"
        flag, other = f"--{given.replace('_', '-')}", f"--{fitted[0].replace('_', '-')}"
        raise ConfigError(
            f"{flag} {getattr(args, given)} leaves {max(counts[fitted[0]], 0):,} of the {num_train:,} training images "
            f"for {other}, fewer than the {FIT_MINIMUM} a search needs to score honestly (docs/search.md, Scoring); "
            f"lower {flag}, or set {other} yourself"
        )
    if any(counts[name] < FIT_MINIMUM for name in fitted):
        raise ConfigError(
            f"the training data has {num_train:,} images, too few to score sub-networks honestly: a search fits "
            f"at least {FIT_MINIMUM} images to each of "
            + " and ".join(f"--{n.replace('_', '-')}" for n in fitted)
            + " (docs/search.md, Scoring); give more training data, or set both counts yourself to search on fewer"
        )
    after = (
        f"{holdout:,} held-out and {recal:,} re-estimation images" if on_train else f"{recal:,} re-estimation images"
    )
    logger.warning(
        "the training data has %s images, too few for the default %s: using %s", f"{num_train:,}", before, after
    )
    return (holdout if on_train else args.holdout_samples), recal


class SearchImages:
    """The scored and the re-estimation images, decoded once, resized once per input size.

    From one seeded permutation of the training split: its first ``recalibrate_bn`` images (the
    ones ``stim-hf export --recalibrate-bn`` takes for the same seed) with the training transforms
    under a fixed torch seed, and the next ``holdout_samples`` with the evaluation transforms; or,
    with ``score_split="validation"``, a seeded subset of the validation split.
    """

    def __init__(self, data_args: DataArguments, args: SearchArguments, device: torch.device) -> None:
        with datasets_work_in_lines("loading the images", show=args.progress):
            splits = load_image_datasets(data_args, seed=args.seed)
        train = splits.get("train")  # None: validation data only (check_search_data)
        self.label_names = get_label_names(
            train if train is not None else splits["validation"], data_args.label_column_name
        )
        on_train = args.score_split == "train"
        self.holdout_samples, self.recalibrate_bn = fit_sample_counts(args, len(train) if train is not None else 0)
        needed = self.recalibrate_bn + (self.holdout_samples if on_train else 0)
        order = np.random.default_rng(args.seed).permutation(len(train)).tolist() if train is not None else []
        if on_train:
            scored, rows = train, order[self.recalibrate_bn : needed]
            self.scored_from = f"{len(rows):,} held-out training images (seed {args.seed})"
        else:
            scored = splits["validation"]
            rows = np.random.default_rng(args.seed).permutation(len(scored))[: self.holdout_samples].tolist()
            self.scored_from = f"{len(rows):,} images of the validation split (--score-split validation)"
        self.device = device
        self.full_size = data_args.resolved_eval_image_size()
        view = with_image_transforms(scored, data_args, train=False)
        # In the seeded order, not the file's: successive halving scores its early rounds on the first
        # images, which must be a uniform sample (CIFAR-10's files are sorted by class).
        self.images, labels = self._load(Subset(view, rows), args)
        self.labels = [y.to(device) for y in labels]
        self.recalibration: list[torch.Tensor] = []
        if self.recalibrate_bn:
            with preserved_rng_state():
                torch.manual_seed(args.seed)
                view = with_image_transforms(train, data_args, train=True)
                self.recalibration = self._load(Subset(view, order[: self.recalibrate_bn]), args)[0]
        self.num_scored = sum(int(x.shape[0]) for x in self.images)
        self.num_recalibration = sum(int(x.shape[0]) for x in self.recalibration)
        self._at: dict[int, ScoreBatches] = {}

    def _load(self, dataset, args: SearchArguments) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        loader = DataLoader(
            dataset, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_image_batch
        )
        images, labels = [], []
        for batch in loader:
            images.append(batch["pixel_values"].to(self.device))
            labels.append(batch["labels"])
        return images, labels

    def at(self, size: int) -> ScoreBatches:
        """The batches resized (bilinear, as training resizes sub-network inputs) to ``size``."""
        if size not in self._at:
            probe = Subnet(kept=(), num_blocks=(), input_size=size)
            self._at[size] = ScoreBatches(
                [resize_for_subnet(x, probe) for x in self.recalibration],
                [resize_for_subnet(x, probe) for x in self.images],
                self.labels,
            )
        return self._at[size]
