"""Peak-memory measurement that means the same thing on every run of one device kind."""

from __future__ import annotations

from pathlib import Path

import torch


def status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryMeter:
    """CUDA: max allocated bytes since ``start``. CPU: peak resident set above the baseline
    taken at ``start`` (after imports), via Linux's resettable high-water mark."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.baseline = 0
        self.resettable = False

    def start(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.resettable = True
        except OSError:
            self.resettable = False
        self.baseline = (status_kib("VmRSS") or 0) * 1024

    def peak(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.baseline
            return max(0, peak), "cuda max_memory_allocated above the allocation at start"
        high = (status_kib("VmHWM") or 0) * 1024
        how = "cpu peak RSS (VmHWM) above the RSS at start"
        if not self.resettable:
            how += " (high-water mark not resettable: includes earlier peaks)"
        return max(0, high - self.baseline), how
