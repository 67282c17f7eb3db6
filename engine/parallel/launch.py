"""Rank 0's side of a tensor-parallel engine: starts the workers, watches them, stops them.

Ownership and lifetime (the invariants the rest of the engine relies on):
- The `TensorParallelDriver`, made by `LLMEngine` on rank 0, owns the process groups and the
  workers it spawned. `LLMEngine.shutdown()` (so `LLM.shutdown()`, the server's engine stop, and
  interpreter exit or garbage collection through a finalizer) stops them: a STOP header, a bounded
  wait, then a kill, then the process groups are destroyed so a later engine can start new ones.
  torch.distributed allows one default group per process, so starting a second tensor-parallel
  engine in a process stops the first one's workers.
- Spawned workers (`python -m engine.parallel.worker`) rendezvous with rank 0 on 127.0.0.1 through
  a TCPStore on a free port. Each reads its settings from a pipe on stdin and keeps the pipe open:
  when rank 0's process dies however it dies, the pipe closes and the worker exits.
- Under torchrun (RANK, WORLD_SIZE and MASTER_ADDR set, several nodes) torchrun starts every rank;
  rank 0 runs the engine and the others run `engine.parallel.worker.run_worker` (`sluice serve`
  does this by itself on ranks other than 0).
- A worker that dies is an engine failure, never a hang: a watcher thread per spawned worker marks
  the driver dead (every later step raises `WorkerDiedError`) and aborts a NCCL group so a
  collective waiting on the dead rank returns; gloo fails such a collective at once by itself, and
  every other wait on a peer is bounded by the group timeout (`engine.parallel.group`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import torch.distributed as dist
from transformers import AutoConfig

from engine.config import EngineConfig
from engine.execution.loader import check_tensor_parallel, model_path_and_name, resolve_device
from engine.parallel.group import COLLECTIVE_TIMEOUT, ParallelGroup, init_group
from engine.parallel.transport import StepSender

logger = logging.getLogger(__name__)

WORKER_MODULE = "engine.parallel.worker"
_CHECK_IN_TIMEOUT_S = 120.0  # a worker process starting and importing torch and transformers
_STOP_TIMEOUT_S = 15.0


class WorkerDiedError(RuntimeError):
    pass


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def check_in_key(rank: int) -> str:
    return f"sluice/worker-checked-in/{rank}"


class _Workers:
    """What the finalizer and the watcher threads need, without a reference to the driver."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.group: ParallelGroup | None = None
        self.sender: StepSender | None = None
        self.dead: str | None = None
        self.stopping = False
        self.stopped = False

    def watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if self.stopping:
            return
        self.dead = f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code {code}"
        logger.error("%s: the engine cannot run another step", self.dead)
        if self.group is not None and self.group.device.type == "cuda":
            # A NCCL collective waiting on the dead rank would otherwise wait out the group timeout.
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                try:
                    abort()
                except Exception:  # noqa: BLE001 - best effort: the timeout still bounds the wait
                    logger.exception("aborting the process group failed")

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopping = True
        if self.dead is None and self.sender is not None:
            try:
                self.sender.stop()
            except Exception:  # noqa: BLE001 - a worker already gone: the kill below covers it
                logger.warning("could not tell the tensor-parallel workers to stop", exc_info=True)
        # A dead engine's surviving workers cannot be told (the broadcast would include the dead rank).
        deadline = time.monotonic() + (_STOP_TIMEOUT_S if self.dead is None else 0.0)
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("tensor-parallel worker pid %d did not stop; killing it", process.pid)
                process.kill()
                process.wait()
            if process.stdin is not None:
                process.stdin.close()
        if self.group is not None:
            self.group.destroy()
        self.stopped = True
        global _active
        if _active is self:
            _active = None


# The workers of this process's tensor-parallel engine: torch.distributed has one default group per
# process, so there is at most one, and a new engine stops the previous one's.
_active: _Workers | None = None


class TensorParallelDriver:
    """Rank 0 of a tensor-parallel engine: its process group, its workers, its step sender."""

    def __init__(self, config: EngineConfig) -> None:
        global _active
        size = config.tensor_parallel_size
        model_path, _ = model_path_and_name(config)
        check_tensor_parallel(AutoConfig.from_pretrained(model_path), size)  # before any process starts
        device_type = resolve_device(config.device).type
        if _active is not None:
            logger.warning("Stopping the previous tensor-parallel engine of this process (one per process)")
            _active.stop()
        self._workers = workers = _Workers()
        _active = workers
        self._finalizer = weakref.finalize(self, workers.stop)
        try:
            if launched_by_torchrun():
                workers.group = self._join_torchrun(size, device_type)
            else:
                workers.group = self._spawn(config, size, device_type)
        except BaseException:
            self._finalizer()
            raise
        workers.sender = StepSender(workers.group)
        for rank, process in enumerate(workers.processes, start=1):
            threading.Thread(
                target=workers.watch, args=(rank, process), name=f"sluice-tp-watch-{rank}", daemon=True
            ).start()

    @property
    def group(self) -> ParallelGroup:
        assert self._workers.group is not None
        return self._workers.group

    @property
    def sender(self) -> StepSender:
        assert self._workers.sender is not None
        return self._workers.sender

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers.processes]

    def check_alive(self) -> None:
        """Raises WorkerDiedError once a worker has died: the engine must not start another step."""
        if self._workers.dead is not None:
            raise WorkerDiedError(self._workers.dead)
        if self._workers.stopped:
            raise WorkerDiedError(
                "this tensor-parallel engine was shut down (by shutdown(), or by a newer one in this process)"
            )

    def shutdown(self) -> None:
        """Stops every worker and leaves the process groups; idempotent."""
        self._finalizer()

    @staticmethod
    def _join_torchrun(size: int, device_type: str) -> ParallelGroup:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world_size != size:
            raise ValueError(
                f"Invalid value for 'tensor_parallel_size': {size}, but torchrun started {world_size} processes"
            )
        if rank != 0:
            raise RuntimeError(
                f"rank {rank} of a torchrun launch is a worker: run engine.parallel.worker.run_worker(config) there "
                "(sluice serve does so by itself)"
            )
        logger.info("Tensor parallelism: rank 0 of %d, joined through torchrun's environment", size)
        return init_group(0, size, int(os.environ.get("LOCAL_RANK", "0")), device_type)

    def _spawn(self, config: EngineConfig, size: int, device_type: str) -> ParallelGroup:
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        for rank in range(1, size):
            process = _spawn_worker(config, rank, size, store.port)
            self._workers.processes.append(process)
            logger.info("Tensor-parallel worker rank %d started (pid %d)", rank, process.pid)
        self._wait_for_check_in(store)
        return init_group(0, size, 0, device_type, store=store)

    def _wait_for_check_in(self, store: dist.TCPStore) -> None:
        """Bounded, and fails as soon as a worker exits (a bad install, a crash at import)."""
        deadline = time.monotonic() + _CHECK_IN_TIMEOUT_S
        for rank, process in enumerate(self._workers.processes, start=1):
            while not store.check([check_in_key(rank)]):
                what = f"tensor-parallel worker rank {rank}"
                if process.poll() is not None:
                    raise RuntimeError(f"{what} exited at start (code {process.returncode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start within {_CHECK_IN_TIMEOUT_S} s")
                time.sleep(0.02)


def _spawn_worker(config: EngineConfig, rank: int, size: int, port: int) -> subprocess.Popen:
    # A plain subprocess, not multiprocessing: the server's engine runs in a daemonic child process,
    # which multiprocessing does not let have children.
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the engine package
    env = dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),  # transformers puts rank r's shard on cuda:LOCAL_RANK
        WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    process = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE, env=env)
    settings = {"config": dataclasses.asdict(config), "log_level": logging.getLogger().getEffectiveLevel()}
    assert process.stdin is not None
    process.stdin.write(json.dumps(settings).encode() + b"\n")
    process.stdin.flush()
    return process
