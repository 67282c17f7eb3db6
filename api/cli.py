"""`sluice serve ...` (and `python -m api ...`): load the engine, then serve the OpenAI API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from api.tool_parsers import TOOL_PARSERS
from engine.config import EngineConfig

logger = logging.getLogger("sluice")

# Engine flags: (flag, EngineConfig field, type, help). Every default is None, so that only flags
# the user gave override the --config file (EngineConfig.from_yaml ignores None overrides).
_ENGINE_FLAGS: list[tuple[str, str, Any, str]] = [
    (
        "--model",
        "model",
        str,
        "hub id, local directory, file.gguf, or demo-random (default: smollm2-135m-instruct, built in)",
    ),
    ("--gguf-file", "gguf_file", str, "a .gguf file inside the --model directory"),
    ("--tokenizer", "tokenizer", str, "tokenizer id or directory (default: the model's)"),
    ("--served-model-name", "served_model_name", str, "the name clients pass as 'model'"),
    ("--load-format", "load_format", str, "auto (read the checkpoint) or dummy (random weights)"),
    ("--dtype", "dtype", str, "auto, float32, bfloat16 or float16"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--seed", "seed", int, "seed for dummy weights"),
    ("--block-size", "block_size", int, "tokens per KV cache block"),
    ("--num-kv-blocks", "num_kv_blocks", int, "KV cache blocks (overrides the memory budget)"),
    ("--kv-cache-memory", "kv_cache_memory", int, "bytes for the KV cache on the CPU"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "fraction of GPU memory to use"),
    ("--max-num-seqs", "max_num_seqs", int, "most sequences in the running batch"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
    ("--max-model-len", "max_model_len", int, "context length (default: the model's)"),
    ("--attention-backend", "attention_backend", str, "auto, torch or triton"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="sluicegate: continuous-batching LLM server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    add_serve_arguments(serve)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--api-key",
        default=os.environ.get("SLUICE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $SLUICE_API_KEY; none: open)",
    )
    server.add_argument("--config", help="engine settings YAML (configs/*.yaml); flags override it")
    server.add_argument(
        "--max-waiting-requests", type=int, default=None, help="answer 429 when this many requests wait"
    )
    server.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests"
    )
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    server.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help="the model's tool-call format for tool_choice 'auto' (default: detected from the chat template)",
    )
    engine = parser.add_argument_group("engine")
    for flag, field, kind, help_text in _ENGINE_FLAGS:
        engine.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    engine.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse cached prompt blocks",
    )
    engine.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="never capture CUDA graphs",
    )
    engine.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine's step loop in a child process, so HTTP work never holds the GIL it needs "
        "(default; --no-engine-process keeps it on a thread of the server's process)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    overrides = {field: getattr(args, field) for _, field, _, _ in _ENGINE_FLAGS}
    overrides["enable_prefix_caching"] = args.enable_prefix_caching
    overrides["enforce_eager"] = args.enforce_eager
    if args.config:
        return EngineConfig.from_yaml(args.config, **overrides)
    return EngineConfig(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config_from_args(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        parser.error("--max-waiting-requests must be >= 0")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must be >= 0")

    # Imported here so `sluice --help` answers without loading torch and transformers.
    from api.app import create_app
    from api.server import serve

    if args.engine_process:
        from engine.engine_process import EngineProcess

        engine = EngineProcess(config)
    else:
        from engine.async_llm import AsyncLLM

        engine = AsyncLLM(config)
    app = create_app(
        engine,
        api_key=args.api_key,
        max_waiting_requests=args.max_waiting_requests,
        tool_call_parser=args.tool_call_parser,
    )
    tool_parser = app.state.sluice.tool_call_parser
    logger.info(
        "Serving '%s' on http://%s:%d/v1 (API key %s; tool-call parser %s)",
        engine.model_name,
        args.host,
        args.port,
        "required" if args.api_key else "not required",
        tool_parser.name if tool_parser else "none: tool_choice 'auto' answers with content",
    )
    serve(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    return 0


def module_main(argv: Sequence[str] | None = None) -> int:
    """`python -m api [serve] FLAGS`: the same flags as `sluice serve`, the word 'serve' optional."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        argv = ["serve", *argv]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
