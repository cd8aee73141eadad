"""loky's ProcessPoolExecutor (the ProcessPoolExecutor adapter, with loky's shutdown)."""

from __future__ import annotations

from typing import Any

from .. import tasks as T
from .ppe import PPE


class Loky(PPE):
    def __init__(self) -> None:
        self.key = "loky"
        self.name = "loky"
        self.submit_call = "submit"
        self.map_call = "map"
        self.ff_how = "future done-callback"
        self.to_how = "future.result(timeout=); no kill"

    def _mk(self, w: int) -> Any:
        import loky

        return loky.ProcessPoolExecutor(max_workers=w)

    def abort(self) -> None:
        self.ex.shutdown(wait=False, kill_workers=True)

    def cold(self, w: int) -> None:
        ex = self._mk(w)
        fs = [ex.submit(T.noop, 0), ex.submit(T.noop, 1)]
        [f.result() for f in fs]
        ex.shutdown(wait=True)

    def _shutdown_hard(self, ex: Any) -> None:
        ex.shutdown(wait=True, kill_workers=True)

    def _cancel(self, fs: list[Any]) -> None:
        # loky 3.7's manager thread raises InvalidStateError on futures cancelled
        # before shutdown(kill_workers=True); the kill ends them all anyway
        pass
