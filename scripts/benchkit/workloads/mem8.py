"""mem8: idle memory of a warm pool of 8 workers, alloter_mp against
ProcessPoolExecutor under the same start methods (issue 15's target)."""

from __future__ import annotations

from ..adapters import PPE, Lib, Ours
from ..config import Config
from .mem import Memory


class PoolMemory(Memory):
    key = "mem8"
    title = "idle memory, warm pool of {pool} workers, parent + workers (USS)"
    log_name = "memory, pool of 8"

    def libs(self) -> list[Lib]:
        return [Ours(), Ours("fork"), PPE("forkserver"), PPE("fork")]

    def workers(self, cfg: Config) -> int:
        return cfg.mem_pool


WORKLOAD = PoolMemory()
