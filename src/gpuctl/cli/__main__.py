"""`python -m gpuctl.cli`: the same as the `gpuctl` console script."""

from gpuctl.cli.main import main

main()
