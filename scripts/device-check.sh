#!/usr/bin/env bash
# Device check for the NVML probe and the HBM copy benchmark, on a machine with a real GPU
# (written for the lent H100/H200 machines: python3 there holds PyTorch, CuPy and nvidia-ml-py;
# nothing can be installed, so gpuctl runs from src/ and needs no install).
#
# Writes under $OUT (default ./device-check-out):
#   profile.json    `gpuctl-agent profile --measure -o json`
#   profile.txt     the same profile as the readable table
#   nvidia-smi.csv  name, memory, max memory clock, max PCIe gen/width, bus id as nvidia-smi sees them
#   log.txt         everything the commands said
#
# What to compare (by hand, or read the CHECK lines at the end of log.txt):
#   - gpus[].hbm_gbps_theoretical is 2 x clocks.max.memory x bus width / 8 within 1%, and within
#     15% of the datasheet: H100 SXM 3352 GB/s (2619 MHz x 5120 bit), H200 4800 (its clock
#     x 6144 bit gives 4917 at 3201 MHz: confirm the clock nvidia-smi shows), A100 80GB 2039.
#   - gpus[].hbm_gbps_measured is a number (not null) and within 15% of the datasheet figure:
#     a device-to-device copy reaches ~90% of peak (about 3.0 TB/s on an H100, 4.3 on an H200).
#   - memory_mib, pcie max gen/width and pci_bus_id match nvidia-smi.csv; gpu_model is the
#     catalog name ("H100 SXM", "H200 SXM"), not NVML's raw name.
#   - nvlink: a single-GPU machine has links_total 0 or links that are all down; on an 8-GPU HGX
#     board expect 18/18 links, version 4, 900 GB/s and nvlink_domain_size 8.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then PY=.venv/bin/python; fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
echo "python: $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,pcie.link.gen.max,pcie.link.width.max,pci.bus_id \
  --format=csv | tee "$OUT/nvidia-smi.csv"

# The agent's entry point needs grpc and the generated protobuf code; if the machine's packages
# cannot load them, the same probe runs without the entry point (nvml.py needs no grpc).
profile() {
  if $PY -m gpuctl.agent.main profile --measure "$@"; then return 0; fi
  echo "gpuctl-agent profile failed; probing without the entry point" >&2
  $PY - "$@" <<'PYEOF'
import json, sys
from gpuctl.agent.membench import load_backend, measure_hbm
from gpuctl.agent.nvml import NvmlProbe
from gpuctl.agent.probe import PsutilProbe, profile_dict, profile_table
facts = NvmlProbe(host=PsutilProbe(), hbm=lambda g: measure_hbm(g, load_backend())).probe()
print(json.dumps(profile_dict(facts), indent=2) if "json" in sys.argv else profile_table(facts))
PYEOF
}
profile -o json > "$OUT/profile.json"
profile > "$OUT/profile.txt"
cat "$OUT/profile.txt"

$PY - "$OUT/profile.json" <<'PYEOF'
import json, sys
from gpuctl.agent.probe import datasheet
p = json.load(open(sys.argv[1]))
print(f"CHECK source={p['source']} gpus={p['gpu_count']} model={p['gpu_model']!r}")
for g in p["gpus"]:
    sheet = datasheet(g["model"], "hbm_gbps")
    theo, meas = g["hbm_gbps_theoretical"], g["hbm_gbps_measured"]
    def rel(x):
        return f"{x / sheet:.1%} of datasheet" if sheet and x else "n/a"
    ok = bool(sheet and meas and abs(meas / sheet - 1) <= 0.15)
    print(f"CHECK gpu {g['index']}: datasheet {sheet} GB/s; theoretical {theo} ({rel(theo)}); "
          f"measured {meas} ({rel(meas)}) -> {'OK' if ok else 'LOOK'}; "
          f"pcie {g['pcie']}; nvlink {g['nvlink']['links_active']}/{g['nvlink']['links_total']} "
          f"v{g['nvlink']['version']}")
PYEOF
