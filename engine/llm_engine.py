"""The synchronous engine core: add requests, abort them, step, get outputs."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.execution.loader import load
from engine.execution.model_runner import LaunchedStep, ModelRunner
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling.sampling_params import OutputKind, SamplingParams
from engine.sampling.structured_outputs import GrammarManager
from engine.scheduling.kv_cache import KVCacheManager
from engine.scheduling.request import Request, RequestStatus
from engine.scheduling.scheduler import Scheduler
from engine.speculation.config import SpeculativeConfig
from engine.speculation.speculator import Speculator

logger = logging.getLogger(__name__)

PromptType = str | list[int]


@dataclass
class _Sample:
    """One of the n samples of a user request, with what has been handed out of it so far."""

    sequence: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # released text (held-back stop-string candidates excluded)
    num_sent_tokens: int = 0
    num_sent_text: int = 0
    finish_reported: bool = False


@dataclass
class UserRequest:
    """A validated request, ready to enter the engine (built off the engine thread)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    pending: list[Request] = field(default_factory=list)  # siblings waiting for the prompt's blocks
    # With params.prompt_logprobs: entry i is the logprob of prompt token i + 1 (engine/sampling/prompt_logprobs.py).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(s.sequence.is_finished for s in self.samples)


def check_request_fits(
    num_prompt_tokens: int, max_tokens: int, *, max_model_len: int, num_kv_blocks: int, block_size: int
) -> None:
    """Raises ValueError for a request that could never run, however idle the engine: longer than
    the context, or needing more K/V than the whole cache holds. Pure, so the server can refuse
    such a request (a 400) before queueing it, where it would otherwise wait (or be told 429)."""
    num_tokens = num_prompt_tokens + max_tokens
    if num_tokens > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    # The last sampled token ends the sequence without being fed back, so it never needs K/V.
    blocks = -(-(num_tokens - 1) // block_size)
    if blocks > num_kv_blocks:
        raise ValueError(
            f"Invalid value for 'max_tokens': prompt plus max_tokens needs {blocks} KV blocks but the whole "
            f"cache has {num_kv_blocks}; lower max_tokens or the prompt length"
        )


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # Tensor parallelism: this process is rank 0 and drives; the driver starts and owns the workers.
        self.parallel = None
        if config.tensor_parallel_size > 1:
            from engine.parallel.launch import TensorParallelDriver

            self.parallel = TensorParallelDriver(config)
        speculative = SpeculativeConfig.parse(config.speculative_config)
        try:
            # A draft model first: the target's KV sizing counts the draft's weights and KV blocks.
            draft_runner = None
            if speculative is not None and speculative.method == "draft_model":
                from engine.speculation.draft_model import load_draft_runner

                draft_runner = load_draft_runner(config, speculative)
            loaded = load(config, self.parallel.group if self.parallel is not None else None)
            shared_kv_bytes = draft_runner.bytes_per_block if draft_runner is not None else 0
            self.runner = ModelRunner(loaded, config, shared_kv_bytes_per_block=shared_kv_bytes)
        except BaseException:
            self.shutdown()
            raise
        if self.parallel is not None:
            self.runner.step_sender = self.parallel.sender
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.served_name
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.model.config.get_text_config().vocab_size
        self.device = loaded.device
        self.kv_cache = KVCacheManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        )
        # With async scheduling: the step launched last, whose tokens the next step() reads.
        self._in_flight: LaunchedStep | None = None
        self.speculator = self._make_speculator(speculative, draft_runner)
        self.requests: dict[str, UserRequest] = {}
        self.prompt_tokens_total = 0
        self.num_pending_samples = 0  # n > 1 siblings not yet handed to the scheduler
        self.generation_tokens_total = 0
        # Built on the first constrained request (it needs xgrammar, an optional dependency).
        self._grammar_manager: GrammarManager | None = None
        self._grammar_manager_lock = threading.Lock()

    # ---- requests in -------------------------------------------------------------------------

    def process_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> UserRequest:
        """Tokenize and validate; raises ValueError naming the problem. Touches no engine state."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("This engine was started without a tokenizer: prompts must be token ids")
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            prompt_text, prompt_ids = None, [int(t) for t in prompt]
        if not prompt_ids:
            raise ValueError("Invalid value for 'prompt': the prompt must contain at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"Invalid value for 'prompt': token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if params.prompt_logprobs is not None and self.config.tensor_parallel_size > 1:
            # The LM head is a collective under TP; the workers do not mirror the prompt rows' calls.
            raise ValueError("Invalid value for 'prompt_logprobs': not supported with tensor_parallel_size > 1")
        params = copy.copy(params)
        params.eos_token_ids = self.eos_token_ids
        num_prompt = len(prompt_ids)
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - num_prompt)
        check_request_fits(
            num_prompt,
            params.max_tokens,
            max_model_len=self.max_model_len,
            num_kv_blocks=self.kv_cache.num_blocks,
            block_size=self.kv_cache.block_size,
        )
        # Compiled here, before the request enters the engine, so an invalid constraint is a ValueError.
        compiled_grammar = None
        if params.structured_outputs is not None:
            grammar_manager = self._get_grammar_manager()
            compiled_grammar = grammar_manager.compile(params.structured_outputs)
        user_request = UserRequest(request_id, prompt_text, prompt_ids, params)
        for index in range(params.n):
            sequence = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{index}",
                user_request_id=request_id,
                prompt_token_ids=prompt_ids,
                params=params,
                sample_index=index,
            )
            if params.seed is not None:
                sequence.seed = params.seed + index
            if compiled_grammar is not None:
                # One per sample; a reasoning model's thinking block comes before the constrained answer.
                thinking = params.structured_outputs.thinking
                sequence.grammar = grammar_manager.new_sequence_grammar(compiled_grammar, thinking)
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                )
            user_request.samples.append(_Sample(sequence, detokenizer))
        return user_request

    def add_processed(self, user_request: UserRequest) -> None:
        if user_request.request_id in self.requests:
            raise ValueError(f"Invalid value for 'request_id': {user_request.request_id!r} is already running")
        self.requests[user_request.request_id] = user_request
        self.prompt_tokens_total += len(user_request.prompt_token_ids)
        sequences = [s.sequence for s in user_request.samples]
        # With prefix caching, siblings wait until the first sample has computed the prompt, then
        # reuse its blocks instead of computing the same prompt n times.
        if self.config.enable_prefix_caching and len(sequences) > 1:
            self.scheduler.add(sequences[0])
            user_request.pending = sequences[1:]
            self.num_pending_samples += len(user_request.pending)
        else:
            for sequence in sequences:
                self.scheduler.add(sequence)

    def _make_speculator(self, config: SpeculativeConfig | None, draft_runner: ModelRunner | None) -> Speculator | None:
        if config is None:
            return None
        proposer = None
        if draft_runner is not None:
            from engine.speculation.draft_model import DraftModelProposer

            proposer = DraftModelProposer(config, self.config, draft_runner, self.runner, self.kv_cache)
        return Speculator(
            config,
            self.kv_cache,
            proposer,
            pad_proposals=self.runner.spec_graph_runner is not None,
            device_type=self.device.type,
        )

    def _get_grammar_manager(self) -> GrammarManager:
        with self._grammar_manager_lock:
            if self._grammar_manager is None:
                if self.tokenizer is None:
                    raise ValueError(
                        "Invalid value for 'structured_outputs': this engine was started without a "
                        "tokenizer, which constrained decoding needs"
                    )
                self._grammar_manager = GrammarManager(
                    self.tokenizer,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self.eos_token_ids,
                    max_rows=self.config.max_num_seqs,
                    device=self.device,
                )
            return self._grammar_manager

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        self.add_processed(self.process_request(request_id, prompt, params or SamplingParams()))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        user_request = self.requests.pop(request_id, None)
        if user_request is None:
            return None
        pending = {id(s) for s in user_request.pending}
        for sample in user_request.samples:
            sequence = sample.sequence
            if id(sequence) in pending:  # never reached the scheduler: nothing to free
                sequence.status = RequestStatus.FINISHED
                sequence.finish_reason = "abort"
            elif not sequence.is_finished:
                self._finish(sequence, "abort")
        self.num_pending_samples -= len(user_request.pending)
        user_request.pending = []
        return self._make_output(user_request)

    # ---- the step ----------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the outputs of the tokens that became known.

        Synchronous scheduling reads the step's own tokens before returning. Async scheduling
        queues step N+1's forward pass first, then reads step N's tokens while the GPU computes it,
        then queues N+1's sampling, which by then sees every earlier token on the host (penalties,
        min_tokens and grammars need them). The host's bookkeeping (stop checks, detokenizing,
        outputs, the next schedule) so hides behind the GPU. The costs: outputs come one step
        later, and a sequence that stops at step N has one more token computed in step N+1, thrown
        away.

        A speculating step first reads the step in flight (proposals continue the latest tokens),
        and is read before step() returns (the next proposals continue the tokens it accepts).
        """
        self.check_health()  # a dead tensor-parallel worker fails the step rather than hanging it
        outputs: list[RequestOutput] = []
        proposed = []
        speculator = self.speculator
        if speculator is not None and speculator.active(len(self.scheduler.running), self._in_flight is not None):
            if self._in_flight is not None:
                outputs = self._collect(self._in_flight)
                self._in_flight = None
            proposed = speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if proposed:
            speculator.drop_unscheduled(proposed)
        forward = None
        if batch.requests:
            forward = self.runner.launch_forward(batch)
            self.scheduler.cache_computed_blocks(batch)
        if self._in_flight is not None:
            outputs = self._collect(self._in_flight)
            self._in_flight = None
        if forward is None:
            return outputs
        launched = self.runner.launch_sampling(forward)
        for sequence in launched.sampled_requests:
            sequence.num_inflight_tokens += 1
        if self.async_scheduling and launched.proposed is None:
            self._in_flight = launched
            return outputs
        return outputs + self._collect(launched)

    def _collect(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and hand them to their sequences."""
        result = launched.result()
        block_size = self.kv_cache.block_size
        touched: dict[str, UserRequest] = {}
        for sequence, first_position, entries in result.prompt_logprobs or ():
            user_request = self.requests.get(sequence.user_request_id)
            if user_request is None or sequence.is_finished:
                continue
            known = user_request.prompt_logprobs
            # A recomputed prompt (after a preemption) gives positions already known: keep the first.
            known.extend(entries[len(known) - first_position :] if first_position <= len(known) else ())
        logprobs = result.logprobs or [None] * len(result.token_ids)
        proposals = result.proposed or [()] * len(result.sampled_requests)
        position = 0  # of the sequence's first sampled token in the step's tokens
        for sequence, proposed in zip(result.sampled_requests, proposals, strict=True):
            end = position + 1 + len(proposed)
            token_ids, token_logprobs = result.token_ids[position:end], logprobs[position:end]
            position = end
            sequence.num_inflight_tokens -= 1
            if sequence.is_finished:  # stopped or aborted while this step ran: the token is surplus
                continue
            if proposed:
                token_ids = self.speculator.accept(sequence, proposed, token_ids)
            # In order, so that EOS, a stop string or max_tokens ends the run where plain decoding would.
            for token_id, token_logprob in zip(token_ids, token_logprobs):
                self._append_token(sequence, token_id, token_logprob)
                self.generation_tokens_total += 1
                if sequence.is_finished:
                    break
            if proposed and not sequence.is_finished:
                self.speculator.forget(sequence)  # the rejected proposals' blocks and draft K/V
                self.kv_cache.cache_computed_blocks(sequence)
            # A token that completes a block whose K/V a launched step already computes (async).
            elif sequence.num_tokens % block_size == 0:
                self.kv_cache.cache_computed_blocks(sequence)
            user_request = self.requests[sequence.user_request_id]
            touched[user_request.request_id] = user_request
        outputs = []
        for user_request in touched.values():
            self._release_pending(user_request)
            finished = user_request.finished
            output = self._make_output(user_request, finished)
            if output is not None:
                outputs.append(output)
            if finished:
                del self.requests[user_request.request_id]
        return outputs

    def _append_token(self, sequence: Request, token_id: int, token_logprob) -> None:
        params = sequence.params
        sequence.output_token_ids.append(token_id)
        if token_logprob is not None:
            sequence.logprobs.append(token_logprob)
            sequence.cumulative_logprob += token_logprob.logprob
        sample = self.requests[sequence.user_request_id].samples[sequence.sample_index]
        num_output = len(sequence.output_token_ids)
        grammar = sequence.grammar
        if grammar is not None:
            if not grammar.accept(token_id):
                # The mask allows only grammar tokens, so this is a bug; end this output, not the engine.
                logger.error("Token %d broke the grammar of %s; aborting it", token_id, sequence.request_id)
                self._finish(sequence, "abort")
                return
            # Terminated: the output is complete and the grammar's stop token (an EOS id) was sampled.
            # Ends the output even with ignore_eos or min_tokens, since the grammar allows nothing more.
            if grammar.is_terminated():
                self._finish(sequence, "stop")
                return
        if not params.ignore_eos and token_id in params.eos_token_ids and num_output >= params.min_tokens:
            self._finish(sequence, "stop")
            return
        if token_id in params.stop_token_ids and num_output >= params.min_tokens:
            self._finish(sequence, "stop", stop_reason=token_id)
            return
        if sample.detokenizer is not None:
            stop_string = sample.detokenizer.add_tokens([token_id])
            if stop_string is not None and num_output >= params.min_tokens:
                self._finish(sequence, "stop", stop_reason=stop_string)
                return
        if num_output >= params.max_tokens or sequence.num_tokens >= self.max_model_len:
            self._finish(sequence, "length")

    def _finish(self, sequence: Request, reason: str, stop_reason: str | int | None = None) -> None:
        sequence.finish_reason = reason
        sequence.stop_reason = stop_reason
        sequence.grammar = None  # frees the matcher now rather than with the request
        self.scheduler.finish(sequence)

    def _release_pending(self, user_request: UserRequest) -> None:
        first = user_request.samples[0].sequence
        if user_request.pending and (first.num_computed_tokens >= first.num_prompt_tokens or first.is_finished):
            for sequence in reversed(user_request.pending):
                self.scheduler.add(sequence, front=True)
            self.num_pending_samples -= len(user_request.pending)
            user_request.pending = []

    # ---- outputs -----------------------------------------------------------------------------

    def _make_output(self, user_request: UserRequest, finished: bool | None = None) -> RequestOutput | None:
        kind = user_request.params.output_kind
        if finished is None:
            finished = user_request.finished
        if kind == OutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for sample in user_request.samples:
            sequence = sample.sequence
            done = sequence.is_finished
            if sample.detokenizer is not None:
                sample.text += sample.detokenizer.take_new_text(finished=done)
                # The final flush can complete a stop string (a character cut at max_tokens).
                if done and sequence.finish_reason == "length" and sample.detokenizer.stop_reason is not None:
                    sequence.finish_reason, sequence.stop_reason = "stop", sample.detokenizer.stop_reason
            if kind == OutputKind.DELTA:
                new_tokens = sequence.output_token_ids[sample.num_sent_tokens :]
                new_text = sample.text[sample.num_sent_text :]
                if not new_tokens and not new_text and (not done or sample.finish_reported):
                    continue
                completion = CompletionOutput(
                    index=sequence.sample_index,
                    text=new_text,
                    token_ids=new_tokens,
                    logprobs=sequence.logprobs[sample.num_sent_tokens :]
                    if sequence.params.logprobs is not None
                    else None,
                )
            else:
                completion = CompletionOutput(
                    index=sequence.sample_index,
                    text=sample.text,
                    token_ids=list(sequence.output_token_ids),
                    logprobs=list(sequence.logprobs) if sequence.params.logprobs is not None else None,
                )
            completion.finish_reason = sequence.finish_reason
            completion.stop_reason = sequence.stop_reason
            if sequence.params.logprobs is not None:
                completion.cumulative_logprob = sequence.cumulative_logprob
            sample.num_sent_tokens = len(sequence.output_token_ids)
            sample.num_sent_text = len(sample.text)
            sample.finish_reported = done
            completions.append(completion)
        first = user_request.samples[0].sequence
        prompt_logprobs = None
        complete = len(user_request.prompt_logprobs) == len(user_request.prompt_token_ids) - 1
        if user_request.params.prompt_logprobs is not None and complete:
            if kind != OutputKind.DELTA or not user_request.prompt_logprobs_sent:
                prompt_logprobs = [None, *user_request.prompt_logprobs]
                user_request.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=user_request.request_id,
            prompt=user_request.prompt,
            prompt_token_ids=user_request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            num_generated_tokens=sum(len(s.sequence.output_token_ids) for s in user_request.samples),
            queue_time=None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time,
            prompt_logprobs=prompt_logprobs,
        )

    def check_health(self) -> None:
        """Raises if the engine can no longer step (a tensor-parallel worker died); cheap."""
        if self.parallel is not None:
            self.parallel.check_alive()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any (idempotent). A one-device engine holds nothing
        that needs stopping."""
        if self.parallel is not None:
            self.parallel.shutdown()

    # ---- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, int | list[int]]:
        """Counters and gauges; plain reads, safe to call from another thread. With speculative
        decoding, also spec_num_drafts, spec_num_draft_tokens, spec_num_accepted_tokens and, per
        proposal position, spec_num_draft_tokens_per_pos and spec_num_accepted_tokens_per_pos."""
        free = self.kv_cache.num_free_blocks
        # Requests (not sequences: an n=16 request is one) with a sample in the running batch; the rest wait.
        num_running_requests = len({sequence.user_request_id for sequence in list(self.scheduler.running)})
        return {
            "kv_blocks_total": self.kv_cache.num_blocks,
            "kv_block_size": self.kv_cache.block_size,
            "max_num_seqs": self.scheduler.max_num_seqs,
            "num_requests": len(self.requests),
            "kv_blocks_free": free,
            "kv_blocks_used": self.kv_cache.num_blocks - free,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + self.num_pending_samples,
            "num_running_requests": num_running_requests,
            "num_waiting_requests": max(0, len(self.requests) - num_running_requests),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.scheduler.prefix_cache_hit_tokens,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }
