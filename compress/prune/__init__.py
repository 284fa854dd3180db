"""Structured channel pruning of RepVGG with Torch-Pruning, to a MAC or latency target or a channel ratio.

Modules: `options` (what a prune is asked for: its target, settings and latency-table settings, as typed options of
this package's own), `slots` (what can be pruned and to which widths), `importance` (the criteria, one table, and
each slot's value per width for the planner), `loss_units` (Taylor and sensitivity: importance as loss changes,
comparable across layers), `cost` (MACs or milliseconds of a planned architecture, behind one protocol), `plan`
(widths by pruning ratio, bisected to a cost fraction), `budget` (widths that keep the most value within a cost
budget), `realize` (Torch-Pruning prunes the model to the plan), `reconstruct` (the pruned layers re-fitted to the
unpruned model's outputs), `latency` (measuring, calibrating and caching the per-layer latency table, from the
one-layer ONNX models of `onnx_layers`) and `latency_table` (the table itself), `measure` (whole planned models
timed against the unpruned one, to check a latency plan), `pruning` (`prune_model`, which runs them in order).
"""

from .errors import PruneError
from .importance import IMPORTANCES, Criterion, criterion, make_importance
from .latency import load_or_build_table, print_latency_table
from .latency_table import LatencyTable
from .options import LATENCY_KINDS, TARGET_KINDS, LatencyOptions, PruneOptions, Target, default_round_to
from .plan import TOLERANCE
from .pruning import prune_model

__all__ = ["IMPORTANCES", "LATENCY_KINDS", "TARGET_KINDS", "TOLERANCE", "Criterion", "LatencyOptions", "criterion", "LatencyTable",
           "PruneError", "PruneOptions", "Target", "default_round_to", "load_or_build_table", "make_importance",
           "print_latency_table", "prune_model"]
