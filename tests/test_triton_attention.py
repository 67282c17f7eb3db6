"""The Triton KV-store and paged-attention kernels agree with the torch reference.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is
slow: shapes here are small, but each case still crosses page boundaries, tile boundaries, several
query blocks and both the unmasked and the causal key loops.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere in this process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton kernels cannot be checked")

from engine.attention import reference, triton_attention  # noqa: E402
from engine.attention.metadata import AttentionMetadata  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton decides when a @jit function is defined whether it is interpreted, its own helpers
# (tl.max, tl.zeros, ...) included. If triton was imported before TRITON_INTERPRET was set (the
# engine's imports pull it in through torch._dynamo), the interpreter cannot run any kernel.
INTERPRETER_MISSING = DEVICE == "cpu" and type(triton.language.zeros).__name__ != "InterpretedFunction"


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    if INTERPRETER_MISSING:
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its CPU interpreter cannot run "
            "the kernels: set the variable in tests/conftest.py before anything imports the engine, "
            "or run this file on its own"
        )


# Low-precision kernels are compared with the reference run in fp32 on the same rounded inputs.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
}


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    extra_query_len: int = 0,
    extra_seq_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A random query and cache with shuffled, non-contiguous pages; the metadata describing them.

    extra_* loosen max_query_len / max_seq_len into upper bounds above the real maxima.
    """
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_pages = max(pages_per_seq) + 2  # table columns past each sequence's end stay unused
    # Spare pages so the ids in use are scattered across the cache rather than 0..n-1 in order.
    num_blocks = 2 * sum(pages_per_seq) + 3
    page_ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.empty(len(seq_lens), max_pages, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_seq):
        block_tables[b, :n] = page_ids[used : used + n]
        used += n
        # Unused entries name real pages of other sequences: a kernel that read past the end
        # would pick up wrong keys (and fail the comparison) rather than fault.
        block_tables[b, n:] = page_ids[torch.randint(0, num_blocks, (max_pages - n,), generator=gen)]

    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    value_cache = torch.randn(cache_shape, generator=gen).to(dtype)

    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    metadata = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        max_query_len=max(query_lens) + extra_query_len,
        max_seq_len=max(seq_lens) + extra_seq_len,
        query_start_loc_host=starts,
        seq_lens_host=list(seq_lens),
    )
    return query.to(DEVICE), key_cache.to(DEVICE), value_cache.to(DEVICE), metadata


@pytest.fixture
def poisoned_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hands the kernel a NaN-filled output so any element it fails to write fails the comparison."""
    monkeypatch.setattr(triton_attention, "_new_output", lambda q: torch.full_like(q, float("nan")))


def check_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    dtype: torch.dtype,
) -> None:
    scale = query.shape[-1] ** -0.5
    out = triton_attention.paged_attention(query, key_cache, value_cache, metadata, scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    expected = reference.paged_attention(query.float(), key_cache.float(), value_cache.float(), metadata, scale)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


# (query_lens, seq_lens): decode rows have query length 1; prefill rows have query == context;
# chunks have a cached prefix before their queries.
PURE_DECODE = ([1, 1, 1, 1], [1, 17, 64, 90])
PURE_PREFILL = ([7, 33, 16], [7, 33, 16])
MIXED = ([1, 20, 1, 9, 40], [45, 20, 16, 70, 41])


@pytest.mark.usefixtures("poisoned_output")
@pytest.mark.parametrize(
    ("lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        # fp32: tight tolerance; GQA 1, 2, 4 and 8; head dims 64, 128, 256; pages of 16 and 32.
        pytest.param(PURE_DECODE, 4, 4, 64, 16, torch.float32, id="decode-gqa1-d64-bs16-fp32"),
        pytest.param(PURE_DECODE, 8, 1, 128, 32, torch.float32, id="decode-gqa8-d128-bs32-fp32"),
        pytest.param(PURE_PREFILL, 4, 2, 64, 16, torch.float32, id="prefill-gqa2-d64-bs16-fp32"),
        pytest.param(MIXED, 8, 2, 128, 16, torch.float32, id="mixed-gqa4-d128-bs16-fp32"),
        pytest.param(MIXED, 8, 1, 64, 32, torch.float32, id="mixed-gqa8-d64-bs32-fp32"),
        pytest.param(MIXED, 2, 1, 256, 32, torch.float32, id="mixed-gqa2-d256-bs32-fp32"),
        # Odd shapes: a group of 3 heads (padded to 4) and head_dim 80 (padded to 128); head_dim 32.
        pytest.param(MIXED, 6, 2, 80, 16, torch.float32, id="mixed-gqa3-d80-bs16-fp32"),
        pytest.param(PURE_DECODE, 4, 2, 32, 16, torch.float32, id="decode-gqa2-d32-bs16-fp32"),
        # Pages larger than a key tile.
        pytest.param(MIXED, 4, 2, 64, 64, torch.float32, id="mixed-gqa2-d64-bs64-fp32"),
        # Half precision, as served.
        pytest.param(MIXED, 8, 2, 128, 16, torch.bfloat16, id="mixed-gqa4-d128-bs16-bf16"),
        pytest.param(PURE_DECODE, 4, 2, 256, 32, torch.bfloat16, id="decode-gqa2-d256-bs32-bf16"),
        pytest.param(MIXED, 4, 2, 256, 16, torch.bfloat16, id="mixed-gqa2-d256-bs16-bf16"),
        pytest.param(PURE_PREFILL, 8, 1, 64, 16, torch.float16, id="prefill-gqa8-d64-bs16-fp16"),
    ],
)
def test_paged_attention_matches_reference(
    lens: tuple[list[int], list[int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    query_lens, seq_lens = lens
    batch = make_batch(
        query_lens,
        seq_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    check_attention(*batch, dtype)


@pytest.mark.usefixtures("poisoned_output")
@pytest.mark.parametrize(
    "lens",
    [pytest.param(PURE_DECODE, id="decode"), pytest.param(MIXED, id="mixed")],
)
def test_paged_attention_with_loose_upper_bounds(lens: tuple[list[int], list[int]]) -> None:
    """max_query_len and max_seq_len only bound the real lengths (as in a captured CUDA graph)."""
    query_lens, seq_lens = lens
    batch = make_batch(
        query_lens,
        seq_lens,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        extra_query_len=37,
        extra_seq_len=100,
    )
    check_attention(*batch, torch.float32)


@pytest.mark.usefixtures("poisoned_output")
def test_paged_attention_reads_strided_query() -> None:
    """The model hands over query[0].transpose(0, 1): a [T, H, D] view with the head stride largest."""
    query, key_cache, value_cache, metadata = make_batch(
        MIXED[0], MIXED[1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    check_attention(strided, key_cache, value_cache, metadata, torch.float32)


def test_paged_attention_skips_sequences_without_queries() -> None:
    """A sequence scheduled with no query rows neither writes nor disturbs its neighbours."""
    query, key_cache, value_cache, metadata = make_batch(
        [3, 0, 1], [10, 20, 30], num_heads=2, num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32
    )
    check_attention(query, key_cache, value_cache, metadata, torch.float32)


@pytest.mark.usefixtures("poisoned_output")
@pytest.mark.parametrize("num_splits", [2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode_matches_reference(
    monkeypatch: pytest.MonkeyPatch, num_splits: int, dtype: torch.dtype
) -> None:
    """Flash-decoding: key ranges attended separately and merged give the same answer, also when
    some splits get no keys (16 splits of sequences a few tiles long, a 1-token sequence)."""
    monkeypatch.setattr(triton_attention, "_num_kv_splits", lambda *_: num_splits)
    batch = make_batch(
        [1, 1, 1],
        [1, 70, 200],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=dtype,
        extra_seq_len=300,
    )
    check_attention(*batch, dtype)


@pytest.mark.usefixtures("poisoned_output")
def test_few_long_decodes_take_the_split_path() -> None:
    """Few sequences with long contexts leave SMs idle unless their keys are split."""
    query_lens, seq_lens = [1, 1], [300, 517]
    num_splits = triton_attention._num_kv_splits(len(seq_lens), 1, 1, max(seq_lens), 64, torch.device(DEVICE))
    assert num_splits > 1
    batch = make_batch(
        query_lens, seq_lens, num_heads=4, num_kv_heads=1, head_dim=128, block_size=32, dtype=torch.float32
    )
    check_attention(*batch, torch.float32)


def test_split_heuristic_leaves_prefill_and_full_grids_alone() -> None:
    device = torch.device(DEVICE)
    assert triton_attention._num_kv_splits(2, 1, 128, 4096, 64, device) == 1  # prefill in the batch
    assert triton_attention._num_kv_splits(2, 1, 1, 64, 64, device) == 1  # contexts too short
    assert triton_attention._num_kv_splits(4096, 8, 1, 4096, 64, device) == 1  # grid already full


def make_store_inputs(
    slots: list[int], *, num_kv_heads: int, head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values as the model gives them ([1, H, T, D] transposed to [T, H, D]: non-contiguous)
    and NaN-poisoned caches of 4 pages of 16 slots."""
    gen = torch.Generator().manual_seed(1)
    num_tokens = len(slots)
    key = torch.randn(1, num_kv_heads, num_tokens, head_dim, generator=gen).to(dtype)[0].transpose(0, 1)
    value = torch.randn(1, num_kv_heads, num_tokens, head_dim, generator=gen).to(dtype)[0].transpose(0, 1)
    cache_shape = (4, 16, num_kv_heads, head_dim)
    key_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype)
    value_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    return tuple(t.to(DEVICE) for t in (key, value, key_cache, value_cache, slot_mapping))


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "dtype", "cache_dtype"),
    [
        (2, 64, torch.float32, torch.float32),
        (8, 128, torch.bfloat16, torch.bfloat16),
        (2, 256, torch.float16, torch.float16),
        (3, 80, torch.float32, torch.bfloat16),  # odd head count and dim; converts to the cache dtype
    ],
)
def test_store_kv_writes_exactly_the_mapped_slots(
    num_kv_heads: int, head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    # Slots scattered over pages and out of order; -1 marks padding tokens that write nothing.
    slots = [17, 3, -1, 63, 32, 0, -1, 48, 31]
    key, value, key_cache, value_cache, slot_mapping = make_store_inputs(
        slots, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, cache_dtype=cache_dtype
    )
    assert not key.is_contiguous()
    triton_attention.store_kv(key, value, key_cache, value_cache, slot_mapping)

    expected_key_cache = key_cache.clone()
    expected_value_cache = value_cache.clone()
    reference.store_kv(key, value, expected_key_cache, expected_value_cache, slot_mapping)
    # Triton's CPU interpreter narrows fp32 to bf16 by truncation rather than to nearest: allow
    # one bf16 ulp there. Same-dtype copies, and everything on a GPU, must be exact.
    rtol = 0.0 if dtype == cache_dtype or DEVICE == "cuda" else 2**-7
    # equal_nan: slots nobody wrote must still hold the poison.
    torch.testing.assert_close(key_cache, expected_key_cache, atol=0, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(value_cache, expected_value_cache, atol=0, rtol=rtol, equal_nan=True)
    written = key_cache.view(-1, num_kv_heads, head_dim).isnan().logical_not().any(-1).any(-1)
    assert written.nonzero().flatten().tolist() == sorted(s for s in slots if s >= 0)


def test_store_kv_with_only_padding_writes_nothing() -> None:
    key, value, key_cache, value_cache, slot_mapping = make_store_inputs(
        [-1, -1], num_kv_heads=2, head_dim=64, dtype=torch.float32, cache_dtype=torch.float32
    )
    triton_attention.store_kv(key, value, key_cache, value_cache, slot_mapping)
    assert key_cache.isnan().all() and value_cache.isnan().all()


@pytest.mark.usefixtures("poisoned_output")
def test_store_then_attend_matches_reference() -> None:
    """A chunked prefill step end to end: store the chunk's keys, then attend over prefix + chunk."""
    block_size, num_kv_heads, head_dim = 16, 2, 64
    query_lens, seq_lens = [1, 12], [25, 30]
    query, key_cache, value_cache, metadata = make_batch(
        query_lens,
        seq_lens,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.float32,
        seed=3,
    )
    # Slots of each sequence's new tokens: the last query_len positions of its context.
    tables = metadata.block_tables.cpu()
    slots = []
    for b, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(tables[b, pos // block_size]) * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    key = torch.randn(len(slots), num_kv_heads, head_dim, device=DEVICE)
    value = torch.randn(len(slots), num_kv_heads, head_dim, device=DEVICE)

    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()
    reference.store_kv(key, value, expected_key_cache, expected_value_cache, slot_mapping)
    triton_attention.store_kv(key, value, key_cache, value_cache, slot_mapping)
    torch.testing.assert_close(key_cache, expected_key_cache, atol=0, rtol=0)
    torch.testing.assert_close(value_cache, expected_value_cache, atol=0, rtol=0)
    check_attention(query, key_cache, value_cache, metadata, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
@pytest.mark.parametrize("num_splits", [None, 4], ids=["one-kernel", "split-kv"])
def test_decode_replays_in_a_cuda_graph(monkeypatch: pytest.MonkeyPatch, num_splits: int | None) -> None:
    """No host synchronisation and no value-dependent allocation: a graph captured for one decode
    step serves the next with new queries and context lengths written into the same tensors."""
    if num_splits is not None:
        monkeypatch.setattr(triton_attention, "_num_kv_splits", lambda *_: num_splits)
    query_lens, seq_lens = PURE_DECODE
    query, key_cache, value_cache, metadata = make_batch(
        query_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16
    )
    scale = 128**-0.5
    triton_attention.paged_attention(query, key_cache, value_cache, metadata, scale)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.paged_attention(query, key_cache, value_cache, metadata, scale)

    new_seq_lens = [max(1, s - 7) for s in seq_lens]  # still within each sequence's pages
    query.copy_(torch.randn_like(query))
    metadata.seq_lens.copy_(torch.tensor(new_seq_lens, dtype=torch.int32))
    metadata.seq_lens_host = new_seq_lens
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.paged_attention(query.float(), key_cache.float(), value_cache.float(), metadata, scale)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[torch.bfloat16])
