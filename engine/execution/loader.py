"""Loads a model and its tokenizer: hub id, local directory, GGUF file, built-in model, or dummy weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from engine.attention import hf_integration
from engine.config import EngineConfig
from engine.models.builtin_models import resolve_model

if TYPE_CHECKING:
    from engine.parallel.group import ParallelGroup

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object  # a transformers tokenizer
    model_path: str
    served_name: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_model_len: int
    parallel: ParallelGroup | None = None  # this process's tensor-parallel group; None: one device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    checkpoint_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = _DTYPES.get(checkpoint_dtype)
    # Half-precision checkpoints keep their dtype; float32 ones run in bf16 on a GPU, as in vLLM.
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def check_supported(hf_config, max_model_len: int) -> None:
    """Refuse at load what our attention does not implement, instead of silently ignoring it."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:  # transformers 5 lists each layer's kind
        uses_window = "sliding_attention" in layer_types
    else:
        uses_window = getattr(text_config, "use_sliding_window", True)
    uses_window = uses_window and window is not None
    if uses_window and window < max_model_len:
        raise ValueError(
            f"This model uses sliding-window attention (window {window}) shorter than max_model_len "
            f"{max_model_len}; sluicegate does not implement sliding windows yet. Pass max_model_len <= {window}."
        )
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(text_config, name, None):
            raise ValueError(f"This model uses {name}, which sluicegate does not implement yet.")
    for name in ("logits_scaling", "logit_scale"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"This model scales its logits ({name}), which sluicegate does not implement yet.")
    if getattr(text_config, "is_encoder_decoder", False):
        raise ValueError("sluicegate runs decoder-only models; this one is an encoder-decoder.")


def check_tensor_parallel(hf_config, tensor_parallel_size: int) -> None:
    """Refuse a size that does not divide the heads: transformers would split a head across ranks
    and fail deep inside attention at the first forward."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    for name, count in (("attention heads", num_heads), ("KV heads", num_kv_heads)):
        if count % tensor_parallel_size:
            raise ValueError(
                f"Invalid value for 'tensor_parallel_size': {tensor_parallel_size} does not divide the model's "
                f"{count} {name}; use a divisor of {count}"
            )


def model_path_and_name(config: EngineConfig) -> tuple[str, str]:
    """The directory or hub id to load, and the name clients use (the built-in model when none is
    given). A GGUF file is converted into a checkpoint directory on its first use."""
    source = resolve_model(config.model, config.gguf_file)
    return source.path, config.served_model_name or source.served_name


def load(config: EngineConfig, parallel: ParallelGroup | None = None) -> LoadedModel:
    """The model on this process's device; with `parallel`, this rank's shard of it."""
    hf_integration.register()
    model_path, served_name = model_path_and_name(config)
    device = parallel.device if parallel is not None else resolve_device(config.device)
    # Where the checkpoint comes from and whether its own code may run: every from_pretrained below.
    hub = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    hf_config = AutoConfig.from_pretrained(model_path, **hub)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    max_model_len = _max_model_len(hf_config, config.max_model_len)
    check_supported(hf_config, max_model_len)

    if parallel is not None:
        model = _sharded_model(model_path, hf_config, dtype, config, parallel)
    elif config.load_format == "dummy":
        model = _dummy_model(hf_config, dtype, device, config.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=hf_integration.ATTN_IMPLEMENTATION, **hub
        ).to(device)
    model.config._attn_implementation = hf_integration.ATTN_IMPLEMENTATION
    model.eval().requires_grad_(False)

    tokenizer = None
    if not config.skip_tokenizer_init:
        # A separate --tokenizer is its own repository: the model's revision does not apply to it.
        tokenizer_hub = hub if config.tokenizer is None else {"trust_remote_code": config.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_path, **tokenizer_hub)
    logger.info("Loaded %s on %s in %s (max_model_len %d)", model_path, device, dtype, max_model_len)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_path=model_path,
        served_name=served_name,
        device=device,
        dtype=dtype,
        eos_token_ids=_eos_token_ids(model_path, tokenizer, hf_config, config.revision),
        max_model_len=max_model_len,
        parallel=parallel,
    )


def _max_model_len(hf_config, requested: int | None) -> int:
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    limit = getattr(text_config, "max_position_embeddings", None)
    if requested is None:
        if limit is None:
            raise ValueError("The model config has no max_position_embeddings; pass max_model_len.")
        return limit
    if limit is not None and requested > limit:
        raise ValueError(f"Invalid value for 'max_model_len': {requested} exceeds the model's limit of {limit}")
    return requested


def _dummy_model(hf_config, dtype: torch.dtype, device: torch.device, seed: int) -> PreTrainedModel:
    """The architecture from its config with transformers' own random init; reads no checkpoint."""
    torch.manual_seed(seed)
    hf_config._attn_implementation = hf_integration.ATTN_IMPLEMENTATION
    # Built directly on the device so an 8B model never passes through host memory.
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _sharded_model(
    model_path: str, hf_config, dtype: torch.dtype, config: EngineConfig, parallel: ParallelGroup
) -> PreTrainedModel:
    """This rank's shard, cut by transformers' own tensor-parallel plan for the architecture
    (`base_model_tp_plan`): the model's forward then holds its all-reduces, and our attention sees
    this rank's heads only. transformers puts it on `cuda:$LOCAL_RANK` (or the CPU)."""
    from transformers.distributed import DistributedConfig

    check_tensor_parallel(hf_config, parallel.world_size)
    accelerator = torch._C._get_accelerator().type  # the device type transformers shards onto
    if accelerator != parallel.device.type:
        raise ValueError(
            f"Invalid value for 'device': tensor parallelism on {parallel.device.type} on a machine with "
            f"{accelerator}; for the CPU, hide the GPUs (CUDA_VISIBLE_DEVICES='')"
        )
    distributed = DistributedConfig(tp_size=parallel.world_size)
    if config.load_format == "dummy":
        # from_config cannot shard. Each rank initialises its own shard at random; the same seed on
        # every rank keeps the replicated weights (norms, biases of row-parallel layers) equal.
        torch.manual_seed(config.seed)
        hf_config._attn_implementation = hf_integration.ATTN_IMPLEMENTATION
        model_class = AutoModelForCausalLM._model_mapping[type(hf_config)]
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report would list every weight as missing, by design
        try:
            return model_class.from_pretrained(
                None, config=hf_config, state_dict={}, dtype=dtype, distributed_config=distributed
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    return AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        attn_implementation=hf_integration.ATTN_IMPLEMENTATION,
        distributed_config=distributed,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )


def _eos_token_ids(model_path: str, tokenizer, hf_config, revision: str | None = None) -> frozenset[int]:
    """EOS ids from the tokenizer and generation_config (either may hold a list)."""
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)]
    try:
        candidates.append(GenerationConfig.from_pretrained(model_path, revision=revision).eos_token_id)
    except OSError:
        pass
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
