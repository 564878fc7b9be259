"""pytest-benchmark setup for benchmarks/: the device's name in every saved run's machine_info."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import device_name  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["endokern_cpu"] = device_name(torch.device("cpu"))
    if torch.cuda.is_available():
        machine_info["endokern_gpu"] = device_name(torch.device("cuda"))
