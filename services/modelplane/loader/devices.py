"""The devices whose memory the loader budgets, and what each reports about its memory.

Host memory comes from the kernel (psutil). GPU memory comes from Triton's own Prometheus
metrics (`nv_gpu_memory_total_bytes` / `nv_gpu_memory_used_bytes`, one series per GPU UUID):
the loader runs beside Triton, not necessarily with the GPUs visible to it, and Triton reports
what its backends actually hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import psutil
import structlog
from prometheus_client.parser import text_string_to_metric_families

log = structlog.get_logger()

HOST = "cpu"


@dataclass(frozen=True)
class DeviceMemory:
    """One device as it reports itself: `device` is "cpu" or "gpu:<index>"."""

    device: str
    total_bytes: int
    used_bytes: int
    uuid: str = ""

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)


def host_memory() -> DeviceMemory:
    memory = psutil.virtual_memory()
    # `available` is what can be allocated without swapping (page cache counts as free).
    return DeviceMemory(HOST, memory.total, memory.total - memory.available)


def parse_gpu_metrics(text: str) -> list[DeviceMemory]:
    """GPU memory from Triton's metrics text, one entry per GPU, ordered by UUID as Triton lists
    them (Triton lists GPUs in device order)."""
    totals: dict[str, float] = {}
    used: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        target = {"nv_gpu_memory_total_bytes": totals, "nv_gpu_memory_used_bytes": used}.get(family.name)
        if target is None:
            continue
        for sample in family.samples:
            uuid = sample.labels.get("gpu_uuid")
            if uuid:
                target[uuid] = sample.value
    return [
        DeviceMemory(f"gpu:{index}", int(totals[uuid]), int(used.get(uuid, 0.0)), uuid=uuid)
        for index, uuid in enumerate(totals)
    ]


class GpuMemoryReader:
    """Reads GPU memory from Triton's metrics endpoint; no GPUs when it cannot be read."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._warned = False

    async def read(self) -> list[DeviceMemory]:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(self.url)
                response.raise_for_status()
        except httpx.HTTPError as error:
            if not self._warned:
                log.info("triton metrics not readable; budgeting host memory only", url=self.url, error=str(error))
                self._warned = True
            return []
        return parse_gpu_metrics(response.text)
