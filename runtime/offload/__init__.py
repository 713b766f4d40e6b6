"""Expert offloading: host store, device cache, miss policy, prefetch (see apply.py for the flow)."""

from .apply import MemoryLedger, OffloadEngine, apply_offload
from .cache import DEFAULT_DECAY, ExpertCache
from .codec import ExpertCodec, FloatExpertCodec, QuantizedExpertCodec, codec_for
from .experts import OffloadedExperts
from .host_store import HostStore, PayloadLayout
from .policy import Costs, MissPolicy, measure_costs
from .stats import OffloadStats, PhaseStats

__all__ = [
    "DEFAULT_DECAY",
    "Costs",
    "ExpertCache",
    "ExpertCodec",
    "FloatExpertCodec",
    "HostStore",
    "MemoryLedger",
    "MissPolicy",
    "OffloadEngine",
    "OffloadStats",
    "OffloadedExperts",
    "PayloadLayout",
    "PhaseStats",
    "QuantizedExpertCodec",
    "apply_offload",
    "codec_for",
    "measure_costs",
]
