"""What the Python benchmarks in bench/ share: a free port for their server
and the CPU line every speed figure is printed beside. (A script run as
`python3 bench/X.py` finds this module beside it.)"""

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    """`lscpu`'s model name, the CPU count and the AMX flags, in one line."""
    model, flags = "?", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    amx = [f for f in ("amx_bf16", "amx_tile", "amx_int8") if f in flags.split()]
    return f"{model}, {os.cpu_count()} CPUs, AMX: {' '.join(amx) or 'none'}"
