"""A tensor-parallel worker rank: loads its shard, then replays rank 0's forward passes until told to stop.

It has no scheduler, KV-cache manager, sampler state or tokenizer of its own: rank 0 decides every
step and sends its inputs (`engine.parallel.transport`); the worker's KV cache holds its KV heads
at the block ids rank 0 chose (the pool has the same size on every rank: the minimum of theirs).

`python -m engine.parallel.worker` is a worker spawned by `TensorParallelDriver`: its settings
come as one JSON line on stdin, and stdin closing (rank 0's process gone) ends it. Under torchrun,
ranks other than 0 call `run_worker(config)` (`sluice serve` does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.parallel.group import COLLECTIVE_TIMEOUT, ParallelGroup, init_group
from engine.parallel.launch import check_in_key
from engine.parallel.transport import StepReceiver

logger = logging.getLogger(__name__)


def run_worker(config: EngineConfig, store: dist.Store | None = None) -> None:
    """Joins rank 0 (through `store`, or torchrun's environment), then serves its steps."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    from engine.execution.loader import resolve_device

    group = init_group(rank, world_size, local_rank, resolve_device(config.device).type, store=store)
    try:
        serve_steps(config, group)
    finally:
        group.destroy()


def serve_steps(config: EngineConfig, group: ParallelGroup) -> None:
    from engine.execution.loader import load
    from engine.execution.model_runner import ModelRunner, StepInputs, StepLayout, unpack_step

    # The tokenizer only feeds rank 0's detokenizer and grammars.
    config = dataclasses.replace(config, skip_tokenizer_init=True)
    runner = ModelRunner(load(config, group), config)
    receiver = StepReceiver(group)
    num_fields = len(dataclasses.fields(StepLayout))
    with_host_lists = runner.backend == "torch"  # the reference attention loops over host lists
    logger.info("Tensor-parallel worker rank %d of %d ready on %s", group.rank, group.world_size, group.device)
    with torch.inference_mode():
        while (step := receiver.receive()) is not None:
            fields, packed = step
            layout = StepLayout.from_fields(fields)
            graph_code = fields[num_fields]  # 0: eager, 1: the decode graphs, 2: the speculative ones
            # The in-flight rows' ids were filled in on rank 0 before it sent the tensor.
            input_ids, positions, metadata, logits_indices, _ = unpack_step(packed, layout, with_host_lists)
            if graph_code:
                inputs = StepInputs(input_ids, positions, metadata, logits_indices, [], True, layout, packed)
                (runner.graph_runner if graph_code == 1 else runner.spec_graph_runner).run(inputs)
            else:
                runner.forward(input_ids, positions, metadata, logits_indices)
    logger.info("Tensor-parallel worker rank %d stopping", group.rank)


def _exit_when_stdin_closes() -> None:
    """Rank 0's process is gone (killed, crashed) when its end of our stdin closes."""
    while os.read(0, 4096):  # unbuffered: a buffered reader's lock would block interpreter exit
        pass
    os._exit(0)


def _read_line(fd: int) -> bytes:
    """One line from a raw fd, read byte by byte so nothing after it is consumed (the watcher
    thread reads the rest of the stream)."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise SystemExit("tensor-parallel worker: no settings on stdin")
        line += byte
    return bytes(line)


def main() -> None:
    settings = json.loads(_read_line(0))
    logging.basicConfig(
        level=settings["log_level"],
        format=f"%(asctime)s %(levelname)s %(name)s [tp{os.environ['RANK']}]: %(message)s",
    )
    threading.Thread(target=_exit_when_stdin_closes, name="sluice-tp-parent", daemon=True).start()
    config = EngineConfig(**settings["config"])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    store.set(check_in_key(rank), "1")
    run_worker(config, store)


if __name__ == "__main__":
    main()
