"""gpuctl-agent, the node agent: probes the node, registers it with gpuctld, heartbeats, runs
the ranks it is assigned as process groups and reports their exit and logs.
"""
