"""Searching the sub-networks of trained checkpoints under a budget: ``stim-hf search``.

``stim-hf search CKPT [CKPT ...] --budget flops=0.5 --config RECIPE.yaml --output-dir DIR`` scores
the sub-networks of the training sampling rule (every combination of per-stage depths for the
prefix rule, drawn ones for the subset rule) at a few input sizes, each with its own BatchNorm
statistics (:mod:`stim_hf.analysis.scoring`), reports what each costs (FLOPs counted, parameters, latency
measured on ``--device``: :mod:`stim_hf.analysis.costs`), the Pareto fronts of accuracy against FLOPs and
against latency (:mod:`stim_hf.analysis.pareto`) and the most accurate sub-network under the budget
(with ``--pick-margin M``, the one with the fewest FLOPs within ``M`` paired standard errors of it);
``--export DIR`` writes that one as a standalone model through :func:`stim_hf.tools.export.export_subnet`.

Scores are top-1 accuracies on held-out *training* images (seeded, ``--holdout-samples``), each
sub-network's BatchNorm statistics re-estimated on other training images (``--recalibrate-bn``);
the validation split only when asked for (``--score-split validation``). Every candidate is
scored when there are at most ``--max-enumerate`` (with successive halving: all on few images,
the Pareto layers on more); otherwise an evolutionary search (seeded) explores the space.

Modules: ``arguments`` (settings, where the sampling rule comes from), ``budget``, ``space``
(candidates, evolution), ``run`` (the search), ``results`` (report files), ``exporting``, ``cli``.
"""

from stim_hf.tools.search.arguments import SearchArguments, training_sampling
from stim_hf.tools.search.budget import BudgetLimit, parse_budget
from stim_hf.tools.search.cli import main, parse_search_args
from stim_hf.tools.search.images import SearchImages
from stim_hf.tools.search.results import Candidate, CheckpointSearch, SearchResult, pick_candidate
from stim_hf.tools.search.run import SearchModel, prepare_model, search_subnets
from stim_hf.tools.search.space import CandidateSpace, default_input_sizes, evolve

__all__ = [
    "BudgetLimit",
    "Candidate",
    "CandidateSpace",
    "CheckpointSearch",
    "SearchArguments",
    "SearchImages",
    "SearchModel",
    "SearchResult",
    "default_input_sizes",
    "evolve",
    "main",
    "parse_budget",
    "parse_search_args",
    "pick_candidate",
    "prepare_model",
    "search_subnets",
    "training_sampling",
]
