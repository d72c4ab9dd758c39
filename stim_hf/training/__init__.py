"""The Hugging Face Trainer and what runs in a training step.

:mod:`~stim_hf.training.config` and :mod:`~stim_hf.training.trainer` (the method's step, with
:mod:`~stim_hf.training.model_setup` checking model and settings before training and
:mod:`~stim_hf.training.subnet_evaluation` scoring sub-networks) sit on
:mod:`~stim_hf.training.reliable_trainer` and :mod:`~stim_hf.training.checkpointing` (crash-safe runs), with
:mod:`~stim_hf.training.integrity` (content hashes, checked by every reader) and
:mod:`~stim_hf.training.write_failures` (a failed write as one line);
:mod:`~stim_hf.training.model_walks`, :mod:`~stim_hf.training.optimizers`, :mod:`~stim_hf.training.pace`
and :mod:`~stim_hf.training.profiling` keep the step fast and measured; :mod:`~stim_hf.training.callbacks`
and :mod:`~stim_hf.training.collapse` watch it. ``docs/architecture.md`` says which measurement pays for each.
Import from the modules; the package itself loads nothing, so importing one module stays cheap.
"""
