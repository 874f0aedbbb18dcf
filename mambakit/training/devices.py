"""The --device of every command: "auto" (the default: cuda when there is one, else cpu), cpu,
cuda, cuda:N or mps, checked against what this machine has."""

from __future__ import annotations

import re

import torch

DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_HELP = "auto (cuda if there is one, else cpu), cpu, cuda, cuda:N or mps (default: auto)"


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The device `name` stands for; a ValueError naming `flag` for a name that is not a device
    or a device this machine does not have."""
    if not isinstance(name, str) or DEVICES.fullmatch(name) is None:
        raise ValueError(f"{flag} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name} but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} mps but no MPS device is available")
    return device
