"""gpuctl: a workload-aware GPU job scheduler for mixed training and inference fleets."""

__version__ = "0.1.0"
