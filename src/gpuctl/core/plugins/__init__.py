"""Scheduling plugins, after the Kubernetes scheduler framework: a filter says whether one
rank of a job can go on a node, a score ranks the nodes that can take it. One module per
plugin, each readable alone: its per-node form (the reference) and its column form beside it
(`core.framework` declares both, and the contract is in `base`). A `Policy` is a name plus
ordered filters and weighted scores, built by name (`policy`).
"""

from gpuctl.core.plugins.base import (
    BOTH,
    MIX_TYPES,
    SUCCESS,
    Code,
    CycleContext,
    Filter,
    RankRequest,
    Score,
    Status,
    pick_gpus,
    plural,
    replica_share,
)
from gpuctl.core.plugins.best_fit import BestFit
from gpuctl.core.plugins.cpu_memory_fit import CpuMemoryFit
from gpuctl.core.plugins.frag_aware import FragAware
from gpuctl.core.plugins.gpu_fit import GpuFit
from gpuctl.core.plugins.gpu_memory import GpuMemory
from gpuctl.core.plugins.gpu_model import GpuModel
from gpuctl.core.plugins.hbm_floor import HbmFloor
from gpuctl.core.plugins.hbm_per_dollar import HbmPerDollar
from gpuctl.core.plugins.interconnect import Interconnect
from gpuctl.core.plugins.interconnect_thrift import InterconnectThrift
from gpuctl.core.plugins.island_guard import IslandGuard
from gpuctl.core.plugins.node_ready import NodeReady
from gpuctl.core.plugins.policy import (
    DEFAULT_POLICY,
    FILTERS,
    POLICIES,
    SCORES,
    Policy,
    PolicyPreset,
    build_policy,
)
from gpuctl.core.plugins.spread import Spread
from gpuctl.core.plugins.training_fit import TrainingFit
from gpuctl.core.plugins.whole_node import WholeNode

__all__ = [
    "BOTH",
    "DEFAULT_POLICY",
    "FILTERS",
    "MIX_TYPES",
    "POLICIES",
    "SCORES",
    "SUCCESS",
    "BestFit",
    "Code",
    "CpuMemoryFit",
    "CycleContext",
    "Filter",
    "FragAware",
    "GpuFit",
    "GpuMemory",
    "GpuModel",
    "HbmFloor",
    "HbmPerDollar",
    "Interconnect",
    "InterconnectThrift",
    "IslandGuard",
    "NodeReady",
    "Policy",
    "PolicyPreset",
    "RankRequest",
    "Score",
    "Spread",
    "Status",
    "TrainingFit",
    "WholeNode",
    "build_policy",
    "pick_gpus",
    "plural",
    "replica_share",
]
