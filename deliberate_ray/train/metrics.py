"""Training metrics: MFU against a per-device peak, written to the console and a JSONL file."""

from __future__ import annotations

import json
import logging
from os import PathLike
from typing import Any

from deliberate_ray import storage

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by substring
# of torch.cuda.get_device_name(). Anything else (CPUs included) needs `train.peak_flops`.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}


def peak_flops(device_name: str, configured: float | None) -> float | None:
    """FLOP/s one device can do: the configured value, else the table, else unknown."""
    if configured is not None:
        return configured
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(
    n_params: int, tokens_per_s: float, peak_per_device: float | None, devices: int
) -> float | None:
    """Model FLOPs utilisation: 6·N FLOPs per token (forward + backward) over the peak."""
    if not peak_per_device:
        return None
    return 6 * n_params * tokens_per_s / (peak_per_device * devices)


class MetricsLog:
    """Appends one JSON line per logged step (rank 0 only) and prints a short console line.

    `resumed_at`: the step training resumes from. Rows past it were written by a run that
    died before its next checkpoint; those steps run again, so their old rows are dropped
    and every step appears once in the file."""

    def __init__(self, path: str | PathLike | None, resumed_at: int = 0):
        # A local file or a URI (on an object store each write rewrites the object whole).
        self.path = None if path is None else str(path)
        if self.path is None:
            return
        path = self.path
        if storage.exists(path):
            lines = storage.read_text(path).splitlines()
            keep = [x for x in lines if x.strip() and json.loads(x)["step"] <= resumed_at]
            if len(keep) != len(lines):
                dropped = len(lines) - len(keep)
                log.info("metrics: dropping %d rows past step %d", dropped, resumed_at)
                storage.write_text(path, "".join(x + "\n" for x in keep))  # atomic

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        storage.append_text(self.path, json.dumps(row) + "\n")
        shown_mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  tok/s %.0f  mfu %s",
            row["step"],
            row["total_steps"],
            row["loss"],
            row["lr"],
            row["grad_norm"],
            row["tokens_per_s"],
            shown_mfu,
        )
