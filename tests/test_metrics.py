"""The packaged top-k accuracy metric, top-k logits reduction and the Trainer's compute_metrics."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import functools  # noqa: E402

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import EvalPrediction  # noqa: E402

from stim_hf.training.metrics import TOP_K_ACCURACY_DIR, build_compute_metrics, load_top_k_accuracy, top_k_indices  # noqa: E402


@pytest.fixture(scope="module")
def metric():
    return load_top_k_accuracy()


def test_module_loads_offline_from_its_directory(metric):
    assert os.environ["HF_EVALUATE_OFFLINE"] == "1"
    assert (TOP_K_ACCURACY_DIR / "top_k_accuracy.py").is_file()
    assert isinstance(metric, evaluate.Metric)
    assert isinstance(evaluate.load(str(TOP_K_ACCURACY_DIR)), evaluate.Metric)


def test_top1_top5_hand_made(metric):
    predictions = [
        [3, 1, 2, 0, 4],  # label 3: top-1 hit
        [0, 1, 2, 3, 4],  # label 4: top-5 hit only
        [5, 6, 7, 8, 9],  # label 0: miss
        [2, 9, 1, 0, 7],  # label 9: top-2 hit
    ]
    result = metric.compute(predictions=predictions, references=[3, 4, 0, 9])
    assert result == {"accuracy": 0.25, "top5_accuracy": 0.75}
    result = metric.compute(predictions=predictions, references=[3, 4, 0, 9], ks=(1, 2, 3))
    assert result == {"accuracy": 0.25, "top2_accuracy": 0.5, "top3_accuracy": 0.5}


def test_k_beyond_ranked_list_is_clamped(metric):
    # 3 classes: every label is in the 3-long list, so top-5 accuracy is 1
    result = metric.compute(predictions=np.array([[2, 0, 1], [1, 2, 0]]), references=np.array([1, 1]))
    assert result == {"accuracy": 0.5, "top5_accuracy": 1.0}
    ragged = metric.compute(predictions=[[1, 0], [2]], references=[0, 0], ks=(1, 2))
    assert ragged == {"accuracy": 0.0, "top2_accuracy": 0.5}
    with pytest.raises(ValueError, match="ks must be positive"):
        metric.compute(predictions=[[0]], references=[0], ks=(0,))


def test_top_k_indices_with_fewer_classes_than_k():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    indices = top_k_indices(logits, torch.tensor([1, 0]))
    assert indices.dtype == torch.int64
    assert indices.tolist() == [[1, 0, 2], [0, 2, 1]]
    assert top_k_indices((logits, torch.zeros(2, 4)), None, k=1).tolist() == [[1], [0]]
    wide = torch.randn(6, 100)
    assert top_k_indices(wide, None).shape == (6, 5)
    assert functools.partial(top_k_indices, k=10)(wide, None).shape == (6, 10)


def test_build_compute_metrics_on_eval_prediction():
    torch.manual_seed(0)
    logits = torch.randn(200, 10)
    labels = torch.randint(0, 10, (200,))
    compute_metrics = build_compute_metrics()
    ranked = top_k_indices(logits, labels)
    result = compute_metrics(EvalPrediction(predictions=ranked.numpy(), label_ids=labels.numpy()))
    top1 = (logits.argmax(-1) == labels).float().mean().item()
    top5 = (logits.topk(5).indices == labels[:, None]).any(-1).float().mean().item()
    assert set(result) == {"accuracy", "top5_accuracy", "top1_prediction_share"}
    assert result["accuracy"] == pytest.approx(top1) and result["top5_accuracy"] == pytest.approx(top5)
    counts = torch.bincount(logits.argmax(-1), minlength=10)
    assert result["top1_prediction_share"] == pytest.approx(counts.max().item() / 200)
    assert all(type(v) is float for v in result.values())
    # full logits (no preprocess_logits_for_metrics) give the same numbers
    assert compute_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy())) == result
    # -100 (the Trainer's padding) is ignored
    padded = EvalPrediction(
        predictions=np.concatenate([ranked.numpy(), np.zeros((3, 5), dtype=np.int64)]),
        label_ids=np.concatenate([labels.numpy(), [-100, -100, -100]]),
    )
    assert compute_metrics(padded) == result
    custom = build_compute_metrics(ks=(1, 3))
    assert set(custom(EvalPrediction(predictions=ranked.numpy(), label_ids=labels.numpy()))) == {
        "accuracy",
        "top3_accuracy",
        "top1_prediction_share",
    }
