"""The `gpuctl` command line: commands in `main`, tables and describe output in `render`.

It reaches gpuctld only through the Python SDK (`gpuctl.client`).
"""
