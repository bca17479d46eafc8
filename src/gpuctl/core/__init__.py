"""The pure scheduling core: snapshot in, decisions out. Standard library and numpy only."""

from gpuctl.core.cycle import CycleResult, schedule

__all__ = ["CycleResult", "schedule"]
