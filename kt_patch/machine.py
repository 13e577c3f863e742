"""Facts about the host this process runs on: its physical cores and its CPU's identity."""
from __future__ import annotations

import os
import platform


def physical_cores_available() -> int:
    """Physical cores in this process's affinity mask (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                pkg = f.read().strip()
            with open(f"{base}/core_id") as f:
                core = f.read().strip()
            cores.add((pkg, core))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def cpu_info() -> dict:
    """The CPU's model name, family, model and stepping (which tell apart generations that share a model name), the
    logical CPUs and the platform."""
    info = {"platform": platform.platform(), "cpu": platform.processor(), "cores": os.cpu_count()}
    try:  # the first processor's entry
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        info["cpu"] = fields.get("model name", info["cpu"])
        info.update({f"cpu_{key.replace('cpu ', '')}": fields[key] for key in ("cpu family", "model", "stepping")
                     if key in fields})
    except OSError:
        pass
    return info
