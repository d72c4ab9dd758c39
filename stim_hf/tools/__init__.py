"""Work on saved checkpoints: the loafing study, exporting a sub-network, fine-tuning it, searching sub-networks.

Import from the modules: :mod:`~stim_hf.tools.loafing`, :mod:`~stim_hf.tools.export`,
:mod:`~stim_hf.tools.finetune` (with :mod:`~stim_hf.tools.finetune_config` and
:mod:`~stim_hf.tools.finetune_cli`), :mod:`stim_hf.tools.search`. Each has the ``main`` that ``stim-hf``
dispatches to.
"""
