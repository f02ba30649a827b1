"""Pruning: budgets, methods (EGP, IMP, EASIER) as plug-ins, round records, Pruner, prune().

Stage 6 of the package (imports every stage below it; nothing imports it but ``cli``).
"""

from egp_fast.pruning.budget import allocate, allocation_shares, round_budget, round_shares
from egp_fast.pruning.easier import EasierMethod, choose_sites, within_tolerance
from egp_fast.pruning.pruner import Pruner, prune
from egp_fast.pruning.records import ModelSnapshot, PruneResult, RoundRecord

__all__ = [
    "EasierMethod",
    "ModelSnapshot",
    "PruneResult",
    "Pruner",
    "RoundRecord",
    "allocate",
    "allocation_shares",
    "choose_sites",
    "prune",
    "round_budget",
    "round_shares",
    "within_tolerance",
]
