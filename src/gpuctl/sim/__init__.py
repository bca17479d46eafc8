"""The simulator: trace readers and replays that drive the pure scheduling core, so every
scheduling claim is measured on the code that schedules (DESIGN.md §4, BENCHMARKS.md)."""
