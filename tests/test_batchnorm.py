"""BatchNorm re-estimation: exact pooling over batches and processes, restored state, modes."""

from __future__ import annotations

import copy
import threading

import torch
from conftest import make_tensor_dataset

from stim_hf.method import find_residual_stages, subnet_from_depths
from stim_hf.method.batchnorm import (
    batchnorm_layers,
    recalibrate_batchnorm,
    recalibration_indices,
    subnet_batchnorm_statistics,
)


def _images(n=48, seed=0):
    return make_tensor_dataset(n=n, size=16, seed=seed)[:]["pixel_values"]


def _uneven_batches(images, sizes=(20, 20, 8)):
    batches, start = [], 0
    for size in sizes:
        batches.append({"pixel_values": images[start : start + size]})
        start += size
    return batches


def _record_inputs(model):
    """Forward hooks that keep every BatchNorm layer's inputs (registered before the re-estimation's own)."""
    seen = {layer: [] for layer in batchnorm_layers(model)}
    handles = [layer.register_forward_hook(lambda m, i, _: seen[m].append(i[0].detach())) for layer in seen]
    return seen, handles


def test_reestimated_statistics_are_those_of_all_the_images_together(tiny_cifar_resnet):
    """Uneven batches (20, 20, 8): every layer gets the mean and unbiased variance of all its inputs at once."""
    model = tiny_cifar_resnet()
    images = _images()
    seen, handles = _record_inputs(model)
    assert recalibrate_batchnorm(model, _uneven_batches(images), 48) == 48
    for handle in handles:
        handle.remove()
    for layer, inputs in seen.items():
        assert len(inputs) == 3
        pooled = torch.cat(inputs).transpose(0, 1).flatten(1).double()  # (channels, every activation)
        torch.testing.assert_close(layer.running_mean, pooled.mean(1).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, pooled.var(1).float(), rtol=1e-5, atol=1e-6)
        assert layer.num_batches_tracked.item() == 3

    # The stem's input does not depend on any BatchNorm: its statistics are exactly those of the
    # 48 images in one batch, computed here directly from the convolution.
    stem = model.resnet.stem
    with torch.no_grad():
        activations = stem.conv(images).transpose(0, 1).flatten(1).double()
    torch.testing.assert_close(stem.bn.running_mean, activations.mean(1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stem.bn.running_var, activations.var(1).float(), rtol=1e-5, atol=1e-6)


def test_one_batch_gives_what_batchnorm_itself_records(tiny_cifar_resnet):
    """All images in one batch: the same statistics as a train-mode pass from reset with momentum=None."""
    images = _images(32)
    model = tiny_cifar_resnet()
    reference = copy.deepcopy(model)
    recalibrate_batchnorm(model, [{"pixel_values": images}], 32)
    for layer in batchnorm_layers(reference):
        layer.reset_running_stats()
        layer.momentum = None
    reference.train()
    with torch.no_grad():
        reference(pixel_values=images)
    for ours, theirs in zip(batchnorm_layers(model), batchnorm_layers(reference), strict=True):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


def test_num_samples_cuts_the_batches_and_modes_are_restored(tiny_cifar_resnet):
    model = tiny_cifar_resnet()
    model.train()
    model.resnet.stem.bn.eval()  # a mixed state, kept as it was
    images = _images()
    assert recalibrate_batchnorm(model, _uneven_batches(images), 30) == 30
    assert model.training and not model.resnet.stem.bn.training
    expected = copy.deepcopy(model)
    recalibrate_batchnorm(expected, [{"pixel_values": images[:30]}], 30)
    torch.testing.assert_close(model.resnet.stem.bn.running_var, expected.resnet.stem.bn.running_var)


def test_two_processes_pool_to_the_statistics_of_one(tiny_cifar_resnet):
    """Two "processes" (threads, summing through a barrier) end with the statistics of one process on all images."""
    images = _images(48)
    single = tiny_cifar_resnet()
    recalibrate_batchnorm(single, [{"pixel_values": images[i : i + 16]} for i in range(0, 48, 16)], 48)

    ranks = [tiny_cifar_resnet(), tiny_cifar_resnet()]
    shards = [recalibration_indices(48, 48, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(48)) and len(shards[0]) == 24
    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce_sum(rank):
        def reduce(tensor):
            slots[rank] = tensor
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return reduce

    def work(rank):
        shard = images[shards[rank]]
        batches = [{"pixel_values": shard[i : i + 10]} for i in range(0, 24, 10)]
        recalibrate_batchnorm(ranks[rank], batches, 24, all_reduce_sum=all_reduce_sum(rank))

    threads = [threading.Thread(target=work, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    stem = lambda m: m.resnet.stem.bn  # noqa: E731  the only layer whose input does not depend on the split
    for rank in ranks:
        torch.testing.assert_close(stem(rank).running_mean, stem(single).running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stem(rank).running_var, stem(single).running_var, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(batchnorm_layers(ranks[0]), batchnorm_layers(ranks[1]), strict=True):
        assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)


def test_subnet_statistics_are_put_back_bit_for_bit(tiny_cifar_resnet):
    model = tiny_cifar_resnet()
    stages = find_residual_stages(model)
    subnet = subnet_from_depths(stages, [1, 2, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = stages[0].container[1].bn1
    with subnet_batchnorm_statistics(model, _uneven_batches(_images()), 48, stages, subnet) as seen:
        assert seen == 48
        assert not torch.equal(model.resnet.stem.bn.running_mean, before["resnet.stem.bn.running_mean"])
        assert torch.equal(dropped.running_mean, before["resnet.stages.0.layers.1.bn1.running_mean"])  # not run
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
