"""The footer every benchmark report ends with, and how it is written.

`footer(started)` says what produced the figures and on what: the exact command, the date, the
run's wall time, and the machine (CPU count, torch threads, load average at the end — a busy
machine slows every side of a comparison, so the load says how quiet the run was — and the
versions that matter). `write_report` writes the JSON atomically (earful's one atomic writer).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path


def machine(**extra) -> dict:
    import torch
    import transformers

    return {"device": "cpu" + (f" + {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, **extra}


def footer(started: float, **machine_extra) -> dict:
    """`machine`, `date`, `command` and `runtime_seconds` (since `started`, a time.perf_counter())."""
    return {"machine": machine(**machine_extra),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "runtime_seconds": round(time.perf_counter() - started, 1)}


def write_report(path: str | Path, report: dict) -> Path:
    from earful.atomic import write_json

    path = Path(path)
    write_json(path, report)
    return path
