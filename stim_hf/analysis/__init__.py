"""Measuring sub-networks: accuracy (evaluation), BatchNorm-scored search candidates, FLOPs, latency, plots.

Layer: above :mod:`stim_hf.method` and :mod:`stim_hf.data`; below :mod:`stim_hf.training`, so the
Trainer's callbacks use these measurements without loading a command module (``docs/architecture.md``).
Import from the modules: :mod:`~stim_hf.analysis.evaluation`, :mod:`~stim_hf.analysis.flops`,
:mod:`~stim_hf.analysis.costs`, :mod:`~stim_hf.analysis.scoring`, :mod:`~stim_hf.analysis.pareto`,
:mod:`~stim_hf.analysis.plotting`.
"""
