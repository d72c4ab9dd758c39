"""Top-k accuracy, an ``evaluate`` metric module shipped with stim_hf (loads offline).

Load it with ``evaluate.load(<this directory>)`` or ``stim_hf.training.metrics.load_top_k_accuracy()``.
evaluate copies this file into its modules cache and imports it alone: keep one import per line
and import nothing from stim_hf.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of samples whose true class is among the k highest-ranked predicted
classes. Predictions are ranked lists of class ids (best first), e.g. the output of
`torch.topk(logits, k).indices`, so that the full logits never need to be gathered.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): for each sample, the predicted class ids ranked from the
        most to the least likely (at least one id; usually the top 5).
    references (`list` of `int`): the true class id of each sample.
    ks (`tuple` of `int`, *optional*, defaults to `(1, 5)`): the values of k to report. A k larger
        than a sample's ranked list counts the whole list (with fewer classes than k, top-k
        accuracy is 1).

Returns:
    `accuracy` (`float`): top-1 accuracy, when 1 is in `ks`.
    `top{k}_accuracy` (`float`): top-k accuracy for every other k in `ks`.

Examples:
    >>> metric = evaluate.load("stim_hf/training/metric_modules/top_k_accuracy")
    >>> metric.compute(predictions=[[0, 1], [2, 1]], references=[0, 1], ks=(1, 2))
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    """Top-k accuracy over ranked lists of predicted class ids."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5)):
        ks = [ks] if isinstance(ks, int) else list(ks)
        if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks!r}")
        references = np.asarray(references, dtype=np.int64).reshape(-1)
        if references.size == 0:
            raise ValueError("top-k accuracy of zero samples is undefined; pass at least one prediction")
        lengths = {len(ranked) for ranked in predictions}
        if 0 in lengths:
            raise ValueError("every prediction must rank at least one class id")
        results = {}
        if len(lengths) == 1:
            ranked = np.asarray(predictions, dtype=np.int64).reshape(len(references), -1)
            hits = ranked == references[:, None]
            for k in ks:
                results[_key(k)] = float(hits[:, : int(k)].any(axis=1).mean())
        else:  # ragged lists: one sample at a time
            for k in ks:
                correct = sum(
                    int(ref) in list(ranked)[: int(k)] for ranked, ref in zip(predictions, references, strict=True)
                )
                results[_key(k)] = correct / len(references)
        return results


def _key(k):
    return "accuracy" if int(k) == 1 else f"top{int(k)}_accuracy"
