"""BatchNorm estimation and sub-network scoring: the parts of the trainer that score networks rather than train them.

:class:`SubnetEvaluationMixin` gives :class:`~stim_hf.training.trainer.StimulativeTrainer` its fixed
sub-networks (:meth:`~SubnetEvaluationMixin.fixed_subnets`), their scoring with BatchNorm statistics
re-estimated for each and with the full network's (:meth:`~SubnetEvaluationMixin.evaluate_subnets`,
:meth:`~SubnetEvaluationMixin.subnet_bn_statistics`), and the full network's own re-estimation
(:meth:`~SubnetEvaluationMixin.recalibrate_bn`, ``bn_policy: recalibrate``). Every estimation draws its
training images with a seed, deals them out over the processes, pools the statistics exactly and
leaves the random states and the full network's statistics as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from stim_hf.errors import ConfigError
from stim_hf.method import EVAL_SUBNET_STREAM, ResidualStage, Subnet, use_subnet
from stim_hf.method.batchnorm import (
    preserved_rng_state,
    recalibrate_batchnorm,
    recalibration_indices,
    subnet_batchnorm_statistics,
)
from stim_hf.training.config import StimulativeTrainingArguments

logger = logging.getLogger(__name__)


class SubnetEvaluationMixin:
    """Scoring sub-networks and re-estimating BatchNorm statistics, for a ``transformers.Trainer`` subclass.

    Mixed into :class:`~stim_hf.training.trainer.StimulativeTrainer`, which provides what is declared
    below, its ``_build_sampler`` and the Trainer's own ``accelerator``, ``state``, ``predict``,
    ``compute_metrics``, ``train_dataset``, ... .
    """

    args: StimulativeTrainingArguments
    stages: list[ResidualStage] | None
    _bn_recalibrated_at: int | None
    _warned_no_estimation_data: bool

    # ----------------------------------------------------------------------------------------------
    # BatchNorm recalibration
    # ----------------------------------------------------------------------------------------------

    def recalibrate_bn(self, num_samples: int | None = None) -> int:
        """Re-estimate the full network's BatchNorm statistics on training images.

        Uses ``num_samples`` (default ``bn_recalibration_samples``) images drawn with a seed that
        depends on the step, as many on every process, and pools the statistics over the
        processes exactly (:func:`~stim_hf.method.batchnorm.recalibrate_batchnorm`). Random states are
        restored afterwards so training continues unchanged.
        """
        if self.train_dataset is None:
            raise ConfigError("bn_policy='recalibrate' needs a train_dataset to re-estimate BatchNorm statistics")
        num_samples = num_samples or self.args.bn_recalibration_samples
        model = self.accelerator.unwrap_model(self.model)
        batches = self.bn_estimation_batches(num_samples, seed=[self.args.seed, self.state.global_step])
        with preserved_rng_state(), self.compute_loss_context_manager():
            seen = recalibrate_batchnorm(model, batches, batches.num_samples, all_reduce_sum=self._all_reduce_sum())
        self._bn_recalibrated_at = self.state.global_step
        logger.info("re-estimated BatchNorm statistics on %d images at step %d", seen, self.state.global_step)
        return seen

    def bn_estimation_batches(self, num_samples: int, seed: int | list[int]) -> EstimationBatches:
        """This process's share of ``num_samples`` training images drawn with ``seed``, as prepared batches.

        Re-iterable, and every pass yields the same images with the same augmentation (the data
        loader runs under a fixed seed), so each sub-network is re-estimated on the same inputs.
        The images are dealt out equally over the processes
        (:func:`~stim_hf.method.batchnorm.recalibration_indices`); iterate inside ``preserved_rng_state``.
        """
        shard = recalibration_indices(
            len(self.train_dataset), num_samples, seed, self.args.process_index, self.args.world_size
        )
        return EstimationBatches(self, shard, int(np.random.default_rng(seed).integers(2**62)))

    def _all_reduce_sum(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.accelerator.num_processes == 1:
            return None
        return lambda tensor: self.accelerator.reduce(tensor, reduction="sum")

    # ----------------------------------------------------------------------------------------------
    # Sub-network evaluation
    # ----------------------------------------------------------------------------------------------

    def fixed_subnets(self, num_subnets: int, seed: int | None = None) -> list[Subnet]:
        """``num_subnets`` distinct sub-networks (never the full one) from the training sampling rule.

        The same seed gives the same sub-networks for any checkpoint of the same architecture,
        which makes runs (CT against ST++, epochs of one run) comparable.
        """
        if self.stages is None:
            return []
        sampler = self._build_sampler(self.args.seed if seed is None else seed, 1.0, stream=EVAL_SUBNET_STREAM)
        return sampler.distinct_subnets(num_subnets)

    @contextmanager
    def _accuracy_metrics(self) -> Iterator[None]:
        """Top-1 / top-5 accuracy for the predictions made inside, where the trainer was given no metrics."""
        if self.compute_metrics is not None:
            yield
            return
        from stim_hf.training.metrics import build_compute_metrics, top_k_indices

        self.compute_metrics, self.preprocess_logits_for_metrics = build_compute_metrics(), top_k_indices
        try:
            yield
        finally:
            self.compute_metrics, self.preprocess_logits_for_metrics = None, None

    def evaluate_subnets(
        self,
        eval_dataset: Dataset | None = None,
        subnets: list[Subnet] | None = None,
        num_subnets: int | None = None,
        bn_recalibration_samples: int | None = None,
    ) -> list[dict[str, Any]]:
        """Evaluate sub-networks at full resolution, each with BatchNorm statistics re-estimated for it.

        Each sub-network is scored with its BatchNorm statistics re-estimated on
        ``bn_recalibration_samples`` training images (default ``subnet_bn_recalibration_samples``; the
        same images for each, drawn with ``seed``; :meth:`subnet_bn_statistics`) and, beside it, with
        the full network's statistics, the papers' measure of loafing. Returns one dict per
        sub-network: its depths, kept blocks, depth fraction, ``accuracy``, ``top5_accuracy`` and
        ``loss`` with re-estimated statistics, the same with the suffix ``_inherited_bn``, and
        ``bn_recalibration_samples`` (0: the statistics are the full network's in both). The full
        network's statistics are restored bit for bit after each sub-network.
        """
        if subnets is None:
            subnets = self.fixed_subnets(self.args.num_eval_subnets if num_subnets is None else num_subnets)
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if bn_recalibration_samples is None:
            bn_recalibration_samples = self.args.subnet_bn_recalibration_samples
        batches = self._subnet_estimation_batches(bn_recalibration_samples)
        used = batches.num_samples * self.args.world_size if batches is not None else 0
        results = []
        with self._accuracy_metrics():
            for subnet in subnets:
                with use_subnet(self.stages, subnet):
                    inherited = self._subnet_metrics(eval_dataset)
                own = inherited
                if batches is not None:
                    with self.subnet_bn_statistics(subnet, batches), use_subnet(self.stages, subnet):
                        own = self._subnet_metrics(eval_dataset)
                results.append(
                    {
                        "depths": list(subnet.depths),
                        "kept": [list(k) for k in subnet.kept],
                        "depth_fraction": subnet.depth_fraction,
                        **own,
                        **{f"{key}_inherited_bn": value for key, value in inherited.items()},
                        "bn_recalibration_samples": used,
                    }
                )
        return results

    def _subnet_metrics(self, eval_dataset: Dataset) -> dict[str, float]:
        output = self.predict(eval_dataset, metric_key_prefix="subnet")
        metrics = {k.removeprefix("subnet_"): v for k, v in output.metrics.items()}
        return {k: v for k, v in metrics.items() if k in ("accuracy", "top5_accuracy", "loss")}

    def _subnet_estimation_batches(self, num_samples: int) -> EstimationBatches | None:
        """The batches sub-networks are re-estimated on (``None`` for 0, or without usable training data)."""
        if not num_samples or self.stages is None:
            return None
        if self.train_dataset is None or isinstance(self.train_dataset, IterableDataset):
            if not self._warned_no_estimation_data:
                self._warned_no_estimation_data = True
                logger.warning(
                    "sub-networks are scored with the full network's BatchNorm statistics: re-estimating them "
                    "(subnet_bn_recalibration_samples=%d) needs a map-style train_dataset; pass one to the trainer, "
                    "or set subnet_bn_recalibration_samples=0",
                    num_samples,
                )
            return None
        return self.bn_estimation_batches(num_samples, seed=self.args.seed)

    @contextmanager
    def subnet_bn_statistics(self, subnet: Subnet | None, batches: EstimationBatches) -> Iterator[int]:
        """Inside the block, the model's BatchNorm statistics are re-estimated for ``subnet`` on ``batches``.

        ``batches`` come from :meth:`bn_estimation_batches`; every process runs its share and the
        statistics are pooled over the processes exactly. The estimation runs under the training's
        autocast and leaves the random states unchanged; the full network's statistics are put back
        bit for bit on exit. Yields the number of images this process used.
        """
        model = self.accelerator.unwrap_model(self.model)
        with ExitStack() as restore:
            with preserved_rng_state(), self.compute_loss_context_manager():
                seen = restore.enter_context(
                    subnet_batchnorm_statistics(
                        model,
                        batches,
                        batches.num_samples,
                        self.stages,
                        subnet,
                        all_reduce_sum=self._all_reduce_sum(),
                    )
                )
            yield seen


class EstimationBatches:
    """The batches of :meth:`SubnetEvaluationMixin.bn_estimation_batches`: re-read, the same, at every pass."""

    def __init__(self, trainer: Any, indices: list[int], seed: int) -> None:
        self.trainer, self.indices, self.seed = trainer, indices, seed
        self.num_samples = len(indices)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        trainer = self.trainer
        loader = DataLoader(
            Subset(trainer.train_dataset, self.indices),
            batch_size=trainer.args.per_device_train_batch_size,
            collate_fn=trainer.data_collator,
            num_workers=trainer.args.dataloader_num_workers,
        )
        torch.manual_seed(self.seed)  # the augmentation, in this process and in the workers it starts
        for batch in loader:
            yield trainer._prepare_inputs(batch)
