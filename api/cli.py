"""`sluice serve ...` (and `python -m api ...`): load the engine, then serve the OpenAI API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from api.body_limit import DEFAULT_MAX_REQUEST_BODY_BYTES
from api.options import ALLOW_ALL, ServerOptions
from api.reasoning import REASONING_PARSERS
from api.tool_parsers import TOOL_PARSERS
from api.vllm_flags import (
    DTYPE_ALIASES,
    check_unknown_flags,
    generation_defaults,
    human_readable_int,
    read_chat_template,
    speculative_config,
)
from engine.config import EngineConfig
from engine.sampling.sampling_params import MAX_LOGPROBS

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
    ("--load-format", "load_format", str, "auto (read the checkpoint) or dummy (random weights)"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--seed", "seed", int, "seed for dummy weights"),
    ("--block-size", "block_size", int, "tokens per KV cache block"),
    ("--num-kv-blocks", "num_kv_blocks", int, "KV cache blocks (overrides the memory budget)"),
    ("--kv-cache-memory", "kv_cache_memory", int, "bytes for the KV cache on the CPU"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "fraction of GPU memory to use"),
    ("--max-num-seqs", "max_num_seqs", int, "most sequences in the running batch"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
    ("--max-model-len", "max_model_len", human_readable_int, "context length: 4096, 4k or 4K (default: the model's)"),
    ("--revision", "revision", str, "the model's branch, tag or commit on the hub"),
    ("--attention-backend", "attention_backend", str, "auto, torch or triton"),
    ("--tensor-parallel-size", "tensor_parallel_size", int, "shard the model over N devices (alias -tp)"),
    (
        "--speculative-config",
        "speculative_config",
        speculative_config,
        'speculative decoding, a JSON object as in vLLM: \'{"method": "ngram", "num_speculative_tokens": 3}\' '
        '(prompt_lookup_min/max, disable_by_batch_size), or \'{"method": "draft_model", "model": DIR, '
        '"num_speculative_tokens": 3}\'; answers are unchanged (default: off)',
    ),
]
_FLAG_ALIASES = {"--tensor-parallel-size": ["-tp"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="sluicegate: continuous-batching LLM server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    add_serve_arguments(serve)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # `sluice serve MODEL`, as `vllm serve MODEL`; --model names it too.
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="hub id or local directory")
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
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        help="answer 413 to a larger request body, without reading it (default: 32 MiB)",
    )
    server.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests"
    )
    levels = ["critical", "error", "warning", "info", "debug", "trace"]
    server.add_argument("--log-level", default="info", choices=levels[:-1])
    server.add_argument("--uvicorn-log-level", default=None, choices=levels, help="uvicorn's (default: --log-level)")
    server.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help="the model's tool-call format for tool_choice 'auto' (default: detected from the chat template)",
    )
    add_vllm_server_arguments(server)
    engine = parser.add_argument_group("engine")
    for flag, field, kind, help_text in _ENGINE_FLAGS:
        engine.add_argument(flag, *_FLAG_ALIASES.get(flag, []), dest=field, type=kind, default=None, help=help_text)
    engine.add_argument(
        "--dtype",
        type=lambda value: DTYPE_ALIASES.get(value, value),
        default=None,
        help="auto, float32 (float), bfloat16 or float16 (half)",
    )
    engine.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="let a hub model run its own modeling and tokenizer code",
    )
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
    engine.add_argument(
        "--disable-frontend-multiprocessing",
        dest="engine_process",
        action="store_false",
        help="vLLM's name for --no-engine-process",
    )
    engine.add_argument(
        "--engine-restarts-per-minute",
        type=int,
        default=3,
        help="restart a dead engine process at most this often in any 60 s; past that the server exits 1 "
        "so a supervisor takes over (0: exit at the first death)",
    )


def add_vllm_server_arguments(server: argparse._ArgumentGroup) -> None:
    """Server flags vLLM users already type, with vLLM's meaning and defaults."""
    server.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the names clients may pass as 'model'; the first is the one the server reports",
    )
    server.add_argument("--chat-template", default=None, help="a chat template file, or the template itself")
    server.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        default=None,
        help="split <think> blocks into reasoning_content (default: detected from the chat template)",
    )
    server.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM command lines: tool_choice 'auto' is always on",
    )
    logs = server.add_mutually_exclusive_group()
    logs.add_argument(
        "--enable-log-requests", dest="log_requests", action="store_true", default=False, help="log every request"
    )
    logs.add_argument(
        "--disable-log-requests", dest="log_requests", action="store_false", default=False, help="(the default)"
    )
    server.add_argument(
        "--max-logprobs", type=int, default=MAX_LOGPROBS, help=f"most logprobs a request may ask for (<={MAX_LOGPROBS})"
    )
    server.add_argument("--root-path", default="", help="the URL prefix a proxy in front of the server strips")
    for kind in ("origins", "methods", "headers"):
        server.add_argument(
            f"--allowed-{kind}",
            type=_json_list,
            default=list(ALLOW_ALL),
            help=f'CORS: allowed {kind}, as a JSON list (default ["*"])',
        )
    server.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    server.add_argument(
        "--generation-config",
        default=None,
        help="'auto': sampling defaults from the model's generation_config.json (vLLM's default); a directory: "
        "from that one's; 'vllm' or unset: OpenAI's defaults",
    )


def _json_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = [part.strip() for part in value.split(",") if part.strip()]  # a,b,c as well
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return parsed


def server_options_from_args(args: argparse.Namespace, config: EngineConfig | None = None) -> ServerOptions:
    """Raises ValueError (a flag's value is wrong) or OSError (a file cannot be read).

    `config` (the engine's) locates the model's generation_config.json for --generation-config auto.
    """
    names = args.served_model_name or []
    sampling_defaults = {}
    if args.generation_config not in (None, "vllm"):
        model_path = _model_path(config)
        sampling_defaults = generation_defaults(args.generation_config, model_path, config.revision if config else None)
    return ServerOptions(
        served_model_aliases=tuple(names[1:]),
        chat_template=read_chat_template(args.chat_template) if args.chat_template else None,
        reasoning_parser=args.reasoning_parser,
        max_logprobs=args.max_logprobs,
        log_requests=args.log_requests,
        root_path=args.root_path,
        allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        sampling_defaults=sampling_defaults,
    )


def _model_path(config: EngineConfig | None) -> str:
    """Where the engine's model is on disk (the built-in model when none is given)."""
    from engine.models.builtin_models import resolve_model

    return resolve_model(config.model if config else None, config.gguf_file if config else None).path


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    overrides = {field: getattr(args, field) for _, field, _, _ in _ENGINE_FLAGS}
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} (positional) and --model {args.model!r}")
        overrides["model"] = args.model_tag
    overrides["served_model_name"] = args.served_model_name[0] if args.served_model_name else None
    overrides["dtype"] = args.dtype
    overrides["trust_remote_code"] = args.trust_remote_code
    overrides["enable_prefix_caching"] = args.enable_prefix_caching
    overrides["enforce_eager"] = args.enforce_eager
    if args.config:
        return EngineConfig.from_yaml(args.config, **overrides)
    return EngineConfig(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    problem = check_unknown_flags(unknown)
    if problem:
        parser.error(problem)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config_from_args(args)
        options = server_options_from_args(args, config)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        parser.error("--max-waiting-requests must be >= 0")
    if args.max_request_body_bytes < 1:
        parser.error("--max-request-body-bytes must be >= 1")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must be >= 0")
    if args.engine_restarts_per_minute < 0:
        parser.error("--engine-restarts-per-minute must be >= 0")

    if config.tensor_parallel_size > 1:
        from engine.parallel.launch import launched_by_torchrun

        if launched_by_torchrun() and os.environ["RANK"] != "0":  # several nodes: rank 0 serves, the rest work
            from engine.parallel.worker import run_worker

            run_worker(config)
            return 0

    # Imported here so `sluice --help` answers without loading torch and transformers.
    from api.app import create_app
    from api.server import serve

    if args.engine_process:
        from engine.engine_process import EngineProcess

        engine = EngineProcess(config, max_restarts_per_minute=args.engine_restarts_per_minute)
    else:
        from engine.async_llm import AsyncLLM

        engine = AsyncLLM(config)
    try:
        app = create_app(
            engine,
            api_key=args.api_key,
            max_waiting_requests=args.max_waiting_requests,
            tool_call_parser=args.tool_call_parser,
            max_request_body_bytes=args.max_request_body_bytes,
            options=options,
        )
    except ValueError as error:  # a setting this model cannot have (a reasoning parser without its tokens)
        engine.close()
        parser.error(str(error))
    state = app.state.sluice
    tool_parser = state.tool_call_parser
    logger.info(
        "Serving '%s' on http://%s:%d%s/v1 (API key %s; tool-call parser %s; reasoning parser %s)",
        engine.model_name,
        args.host,
        args.port,
        options.root_path,
        "required" if args.api_key else "not required",
        tool_parser.name if tool_parser else "none: tool_choice 'auto' answers with content",
        state.reasoning_parser.name if state.reasoning_parser else "none",
    )
    return serve(
        app,
        host=args.host,
        port=args.port,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.uvicorn_log_level or args.log_level,
    )


def module_main(argv: Sequence[str] | None = None) -> int:
    """`python -m api [serve] FLAGS`: the same flags as `sluice serve`, the word 'serve' optional."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        argv = ["serve", *argv]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
