"""The workloads, in the order of the table.  A new workload: a module here with a
``Workload`` subclass (see ``base``) and its line below."""

from __future__ import annotations

from . import (
    acancel,
    art,
    blas,
    cold,
    cpu,
    failfast,
    logs,
    map,
    mem,
    mem8,
    np_in,
    np_out,
    rt,
    submit,
    timeout,
    xrt,
    xsubmit,
)
from .base import Workload

WORKLOADS: list[Workload] = [
    submit.WORKLOAD,
    map.WORKLOAD,
    rt.WORKLOAD,
    cold.WORKLOAD,
    cpu.WORKLOAD,
    failfast.WORKLOAD,
    timeout.WORKLOAD,
    mem.WORKLOAD,
    mem8.WORKLOAD,
    np_in.WORKLOAD,
    np_out.WORKLOAD,
    blas.WORKLOAD,
    logs.WORKLOAD,
    logs.RELAY,
    xsubmit.WORKLOAD,
    xrt.WORKLOAD,
    art.WORKLOAD,
    acancel.WORKLOAD,
]
BY_KEY = {w.key: w for w in WORKLOADS}

__all__ = ["BY_KEY", "WORKLOADS", "Workload"]
