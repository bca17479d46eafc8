"""Lease providers: where nodes come from and go back to, each behind one `Provider` protocol.

`static` claims nodes from a configured inventory, `command` runs operator scripts (JSON on
stdin/stdout), `catalog` simulates any SKU of `config/catalog.csv`. Only `gpuctl.core` is imported.
"""
