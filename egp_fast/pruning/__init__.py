"""Pruning: budgets, methods (EGP, IMP, EASIER) as plug-ins, round records, Pruner, prune().

Stage 6 of the package (imports every stage below it; nothing imports it but ``cli``). Its
modules, lowest first: ``budget`` (how a round's budget is shared between layers), ``checks``
(argument checks and the accuracy tolerance), ``records`` (:class:`RoundRecord`,
:class:`PruneResult`, :class:`ModelSnapshot`), ``methods`` (the :class:`PruningMethod`
protocol, the registry that ``method=`` looks up, and EGP, IMP, EASIER), ``pruner``
(:class:`Pruner`, one round at a time) and ``loop`` (:func:`prune`, whole rounds).
"""

from egp_fast.pruning.budget import allocate, allocation_shares, round_budget, round_shares
from egp_fast.pruning.checks import within_tolerance
from egp_fast.pruning.loop import prune
from egp_fast.pruning.methods import (
    EasierMethod,
    EGPMethod,
    IMPMethod,
    MethodContext,
    PruningMethod,
    WeightMethod,
    available_methods,
    choose_sites,
    get_method,
    register_method,
    unregister_method,
)
from egp_fast.pruning.pruner import Pruner
from egp_fast.pruning.records import ModelSnapshot, PruneResult, RoundRecord

__all__ = [
    "EGPMethod",
    "EasierMethod",
    "IMPMethod",
    "MethodContext",
    "ModelSnapshot",
    "PruneResult",
    "Pruner",
    "PruningMethod",
    "RoundRecord",
    "WeightMethod",
    "allocate",
    "allocation_shares",
    "available_methods",
    "choose_sites",
    "get_method",
    "prune",
    "register_method",
    "round_budget",
    "round_shares",
    "unregister_method",
    "within_tolerance",
]
