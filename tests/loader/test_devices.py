"""Device memory readings. The GPU text is the GPU section of a real Triton's /metrics output from
a server with four 16 GiB GPUs (as published with a public example); no GPU is here to capture one."""

from __future__ import annotations

from pathlib import Path

import psutil

from modelplane.loader.devices import HOST, host_memory, parse_gpu_metrics

DATA = Path(__file__).parent / "data"


def test_gpu_memory_from_triton_metrics_one_entry_per_gpu_in_order() -> None:
    gpus = parse_gpu_metrics((DATA / "triton_metrics_4gpu.txt").read_text())
    assert [g.device for g in gpus] == ["gpu:0", "gpu:1", "gpu:2", "gpu:3"]
    assert gpus[0].uuid == "GPU-71ce41fd-3ac0-afe7-c995-21119f1e984a"
    assert {g.total_bytes for g in gpus} == {16944988160}
    assert gpus[0].used_bytes == 7451181056
    assert gpus[0].free_bytes == 16944988160 - 7451181056


def test_metrics_without_gpu_series_mean_no_gpus() -> None:
    cpu_only = (
        "# HELP nv_cpu_memory_total_bytes CPU total memory (RAM), in bytes\n"
        "# TYPE nv_cpu_memory_total_bytes gauge\n"
        "nv_cpu_memory_total_bytes 25276502016\n"
    )
    assert parse_gpu_metrics(cpu_only) == []


def test_host_memory_is_what_the_kernel_reports() -> None:
    host = host_memory()
    assert host.device == HOST
    assert host.total_bytes == psutil.virtual_memory().total
    assert 0 < host.used_bytes < host.total_bytes
