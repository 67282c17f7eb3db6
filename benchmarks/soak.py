"""Soak and chaos harness: drives a running server through phases of bounded, seeded load and checks,
after each, that nothing leaked and nothing broke.

    python -m benchmarks.soak --launch "--num-kv-blocks 64"            # start (and stop) its own server
    python -m benchmarks.soak --base-url http://127.0.0.1:8000 --server-pid PID
    python -m benchmarks.soak --launch "--num-kv-blocks 64" --short    # the CI form, a minute or two

Phases, in order: abort storm (streams cut early), mixed soak (chat and completions, streamed or
not, n 1-3, stop strings, JSON mode, tools), overload against a small KV pool (greedy outputs must
equal the same prompts run one at a time), hostile-input corpus (benchmarks/hostile_inputs.py),
engine kill (SIGKILL the engine child: in-flight requests get 503 / an error event, the server
restarts it and serves again; the time to serving is reported), SIGTERM mid-stream (last: running
streams drain to [DONE], the server exits 0). The engine kill and SIGTERM phases need the server's
pid (given, or launched here) and run on this machine only: loopback, never anything remote.

After each phase: no 5xx (except the 503s the engine kill causes), every error OpenAI-shaped, every
stream ended by [DONE], /metrics back to running = waiting = 0 and KV blocks used at the idle
baseline, server and engine RSS growth under a bound, the server still answering. Prints one table
and exits 1 on any breach.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serving import launched_server

# /metrics names: ours, and the vLLM-style names the server may expose instead (labels ignored).
RUNNING = ("sluice_requests_running", "vllm:num_requests_running", "sluice:num_requests_running")
WAITING = ("sluice_requests_waiting", "vllm:num_requests_waiting", "sluice:num_requests_waiting")
KV_USED = ("sluice_kv_blocks_used", "vllm:kv_cache_usage_perc", "sluice:kv_cache_usage_perc")
RESTARTS = ("sluice_engine_restarts_total", "sluice:engine_restarts_total", "vllm:engine_restarts_total")
PREEMPTIONS = ("sluice_preemptions_total", "vllm:num_preemptions_total", "sluice:num_preemptions_total")

WORDS = "river engine token block cache stream batch model prompt answer story robot bridge evening".split()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
            },
        },
    }
]


@dataclass
class Sizes:
    """How much each phase sends: the long form, or the short one CI runs."""

    storm: int = 300
    storm_concurrency: int = 64
    soak: int = 1000
    soak_concurrency: int = 32
    overload: int = 24
    overload_tokens: int = 48
    kill_streams: int = 8
    sigterm_streams: int = 4
    structured_tokens: int = 64  # max_tokens of JSON-mode and tool requests (grammar steps cost more)

    @classmethod
    def short(cls) -> Sizes:
        return cls(storm=30, storm_concurrency=16, soak=24, soak_concurrency=8, overload=6, overload_tokens=32,
                   kill_streams=4, sigterm_streams=3, structured_tokens=24)  # fmt: skip


@dataclass
class Outcome:
    status: int  # 0: the connection failed
    error: dict[str, Any] | None = None  # the OpenAI error object (a body's, or a stream event's)
    shaped: bool = True  # the error, if any, had the OpenAI shape
    in_stream: bool = False  # the error came as an event after a 200
    stream: bool = False
    done: bool = False  # a stream ended with [DONE]
    cut: bool = False  # we closed the stream early on purpose
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    tool_calls: list[Any] = field(default_factory=list)
    transport: str = ""


@dataclass
class PhaseResult:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    idle: str = ""
    server_rss: str = ""
    engine_rss: str = ""


def is_openai_error(payload: Any) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "param" in error
        and "code" in error
    )


async def call(client: httpx.AsyncClient, path: str, body: dict[str, Any], cut_after: int | None = None) -> Outcome:
    """One request; a stream is read to its end (or closed after `cut_after` events)."""
    try:
        if not body.get("stream"):
            response = await client.post(path, json=body)
            return _whole(response)
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return _whole(response)
            outcome = Outcome(200, stream=True)
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    outcome.done = True
                    break
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    outcome.error, outcome.shaped, outcome.in_stream = chunk["error"], is_openai_error(chunk), True
                    continue
                _read_choices(outcome, chunk.get("choices") or [], delta=True)
                events += 1
                if cut_after is not None and events >= cut_after:
                    outcome.cut = True
                    break
            return outcome
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return Outcome(0, transport=f"{type(error).__name__}: {error}")


def _whole(response: httpx.Response) -> Outcome:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    outcome = Outcome(response.status_code)
    if response.status_code != 200:
        outcome.error = (payload or {}).get("error") if isinstance(payload, dict) else {"raw": response.text[:200]}
        outcome.shaped = is_openai_error(payload)
        return outcome
    _read_choices(outcome, payload.get("choices") or [], delta=False)
    return outcome


def _read_choices(outcome: Outcome, choices: list[dict[str, Any]], delta: bool) -> None:
    for choice in choices:
        index = choice.get("index", 0)
        part = choice.get("delta") if delta else choice.get("message")
        text = choice.get("text") if "text" in choice else (part or {}).get("content")
        outcome.texts[index] = outcome.texts.get(index, "") + (text or "")
        outcome.tool_calls.extend((part or {}).get("tool_calls") or [])
        if choice.get("finish_reason") is not None:
            outcome.finish[index] = choice["finish_reason"]


# ---- observing the server ------------------------------------------------------------------------


def read_metrics(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def pick(metrics: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((metrics[name] for name in names if name in metrics), None)


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def engine_pid(server_pid: int | None) -> int | None:
    """The engine child of a server process (multiprocessing's spawn child, not its resource tracker)."""
    if server_pid is None:
        return None
    for pid in child_pids(server_pid):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "spawn_main" in command and "resource_tracker" not in command:
                return pid
    return None


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


PHASE_NAMES = {
    "storm": "abort storm",
    "soak": "mixed soak",
    "overload": "overload",
    "hostile": "hostile inputs",
    "kill": "engine kill",
    "sigterm": "SIGTERM mid-stream",
}


class Harness:
    def __init__(self, args: argparse.Namespace, url: str, server_pid: int | None, launched: Any | None) -> None:
        self.args = args
        self.url = url
        self.server_pid = server_pid
        self.launched = launched  # the Popen of a server we started: SIGTERM is ours to send
        self.sizes = Sizes.short() if args.short else Sizes()
        self.rng = random.Random(args.seed)
        self.model = ""
        self.kv_baseline = 0.0
        self.rss_baseline: dict[str, tuple[int | None, float]] = {}
        self.restart_s: float | None = None

    def client(self, concurrency: int) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        return httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits, timeout=self.args.request_timeout)

    async def run(self) -> list[PhaseResult]:
        async with self.client(4) as client:
            self.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        self.kv_baseline = pick(read_metrics(self.url), KV_USED) or 0.0
        phases = [
            ("storm", self.abort_storm),
            ("soak", self.mixed_soak),
            ("overload", self.overload),
            ("hostile", self.hostile_inputs),
            ("kill", self.engine_kill),
            ("sigterm", self.sigterm),
        ]
        if self.args.phases:
            unknown = set(self.args.phases) - {key for key, _ in phases}
            if unknown:
                raise SystemExit(f"unknown phase(s) {sorted(unknown)}; the phases are {[key for key, _ in phases]}")
            phases = [(key, phase) for key, phase in phases if key in self.args.phases]
        results = []
        for key, phase in phases:
            name = PHASE_NAMES[key]
            result = PhaseResult(name)
            started = time.monotonic()
            await phase(result)
            result.seconds = time.monotonic() - started
            if name != "SIGTERM mid-stream" and "skipped" not in " ".join(result.notes):
                await self.check_after(result, allow_503=name == "engine kill")
            else:
                self.check_outcomes(result, allow_503=False)
            results.append(result)
            print(f"[soak] {name}: {'BREACH ' + '; '.join(result.breaches) if result.breaches else 'ok'}",
                  file=sys.stderr, flush=True)  # fmt: skip
        return results

    # ---- checks ------------------------------------------------------------------------------

    def check_outcomes(self, result: PhaseResult, allow_503: bool) -> None:
        for outcome in result.outcomes:
            if outcome.status == 0:
                result.breaches.append(f"connection failed: {outcome.transport[:120]}")
            elif outcome.status >= 500 and not (allow_503 and outcome.status == 503):
                result.breaches.append(f"HTTP {outcome.status}: {str(outcome.error)[:160]}")
            if outcome.error is not None and not outcome.shaped:
                result.breaches.append(f"error not OpenAI-shaped: {str(outcome.error)[:160]}")
            if outcome.in_stream and not allow_503:
                result.breaches.append(f"error event in a stream: {str(outcome.error)[:160]}")
            if outcome.stream and outcome.status == 200 and not outcome.cut and not outcome.done:
                result.breaches.append("a stream ended without [DONE]")

    async def check_after(self, result: PhaseResult, allow_503: bool) -> None:
        self.check_outcomes(result, allow_503)
        deadline = time.monotonic() + self.args.idle_timeout
        while True:
            metrics = read_metrics(self.url)
            running, waiting, used = pick(metrics, RUNNING), pick(metrics, WAITING), pick(metrics, KV_USED)
            if running == 0 and waiting == 0 and used == self.kv_baseline:
                result.idle = "yes"
                break
            if time.monotonic() > deadline:
                result.idle = f"running {running} waiting {waiting} kv {used}"
                result.breaches.append(f"not idle after {self.args.idle_timeout:.0f} s: {result.idle}")
                break
            await asyncio.sleep(0.1)
        result.server_rss = self.rss_check(result, "server", self.server_pid)
        result.engine_rss = self.rss_check(result, "engine", engine_pid(self.server_pid))
        async with self.client(2) as client:
            health = await client.get("/health")
            probe = await call(client, "/v1/completions", {"model": self.model, "prompt": "Hi", "max_tokens": 2})
        if health.status_code != 200 or probe.status != 200:
            result.breaches.append(f"server not answering: /health {health.status_code}, completion {probe.status}")

    def rss_check(self, result: PhaseResult, which: str, pid: int | None) -> str:
        now = rss_mb(pid)
        if now is None:
            return "n/a"
        base_pid, base = self.rss_baseline.get(which, (None, 0.0))
        if base_pid != pid:  # first look, or a new engine process after a restart: a new baseline
            self.rss_baseline[which] = (pid, now)
            return f"{now:.0f}"
        growth = now - base
        if growth > self.args.rss_growth_mb:
            result.breaches.append(f"{which} RSS grew {growth:.0f} MB (bound {self.args.rss_growth_mb:.0f})")
        return f"{now:.0f} ({growth:+.0f})"

    # ---- phases ------------------------------------------------------------------------------

    async def gather_limited(
        self, concurrency: int, jobs: list[tuple[str, dict[str, Any], int | None]]
    ) -> list[Outcome]:
        semaphore = asyncio.Semaphore(concurrency)
        async with self.client(concurrency) as client:

            async def one(path: str, body: dict[str, Any], cut_after: int | None) -> Outcome:
                async with semaphore:
                    return await call(client, path, body, cut_after)

            return list(await asyncio.gather(*(one(*job) for job in jobs)))

    def words(self, count: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(count))

    async def abort_storm(self, result: PhaseResult) -> None:
        jobs = []
        for i in range(self.sizes.storm):
            cut = i % 3 == 0  # a third are cut early, after 1-3 events
            body = {"model": self.model, "stream": True, "ignore_eos": True, "max_tokens": 400 if cut else 16}
            if i % 2:
                path, body["prompt"] = "/v1/completions", self.words(8)
            else:
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": self.words(8)}]
            jobs.append((path, body, self.rng.randint(1, 3) if cut else None))
        result.outcomes = await self.gather_limited(self.sizes.storm_concurrency, jobs)
        result.notes.append(f"{sum(o.cut for o in result.outcomes)} cut early")
        for outcome in result.outcomes:
            if outcome.status != 200:
                result.breaches.append(f"storm request answered {outcome.status}: {str(outcome.error)[:120]}")

    def mixed_request(self) -> tuple[str, dict[str, Any], str]:
        rng = self.rng
        kind = rng.choice(["chat", "chat", "completion", "json", "tools"])
        body: dict[str, Any] = {
            "model": self.model,
            "stream": rng.random() < 0.5,
            "n": rng.randint(1, 3),
            "max_tokens": rng.randint(4, 32),
            "temperature": rng.choice([0.0, 0.7, 1.0]),
            "seed": rng.randrange(1000),
        }
        if rng.random() < 0.3:
            body["stop"] = [rng.choice(WORDS), "\n"]
        if kind == "completion":
            body["prompt"] = self.words(rng.randint(1, 40))
            return "/v1/completions", body, kind
        body["messages"] = [{"role": "user", "content": self.words(rng.randint(1, 40))}]
        if kind == "json":
            body["response_format"] = {"type": "json_object"}
            body["max_tokens"] = self.sizes.structured_tokens
            body.pop("stop", None)
        elif kind == "tools":
            body["tools"] = TOOLS
            body["tool_choice"] = rng.choice(["auto", "required"])
            body["max_tokens"] = self.sizes.structured_tokens
            body["n"] = 1
            body.pop("stop", None)
        return "/v1/chat/completions", body, kind

    async def mixed_soak(self, result: PhaseResult) -> None:
        requests = [self.mixed_request() for _ in range(self.sizes.soak)]
        outcomes = await self.gather_limited(self.sizes.soak_concurrency, [(p, b, None) for p, b, _ in requests])
        result.outcomes = outcomes
        kinds: dict[str, int] = {}
        for (_, body, kind), outcome in zip(requests, outcomes):
            kinds[kind] = kinds.get(kind, 0) + 1
            if outcome.status != 200:
                result.breaches.append(f"{kind} request answered {outcome.status}: {str(outcome.error)[:120]}")
                continue
            if len(outcome.finish) != body["n"]:
                result.breaches.append(f"{kind}: {len(outcome.finish)} finished choices of n={body['n']}")
            for index, text in outcome.texts.items():
                if any(stop in text for stop in body.get("stop", [])):
                    result.breaches.append(f"{kind}: a stop string is in the output {text[:60]!r}")
                if kind == "json" and outcome.finish.get(index) == "stop":
                    try:
                        json.loads(text)
                    except ValueError:
                        result.breaches.append(f"JSON mode answered invalid JSON: {text[:60]!r}")
            if kind == "tools" and body["tool_choice"] == "required" and outcome.finish.get(0) == "tool_calls":
                if not outcome.tool_calls:
                    result.breaches.append("finish_reason tool_calls without tool_calls")
        result.notes.append(" ".join(f"{k} {v}" for k, v in sorted(kinds.items())))

    async def overload(self, result: PhaseResult) -> None:
        """Greedy outputs under preemption must equal the same prompts run one at a time."""
        rng = random.Random(self.args.seed + 7)
        prompts = [[rng.randrange(16, 256) for _ in range(rng.randint(40, 120))] for _ in range(self.sizes.overload)]
        jobs = [
            ("/v1/completions",
             {"model": self.model, "prompt": p, "max_tokens": self.sizes.overload_tokens, "temperature": 0.0,
              "ignore_eos": True, "stream": i % 2 == 1}, None)
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        before = pick(read_metrics(self.url), PREEMPTIONS) or 0.0
        alone = await self.gather_limited(1, jobs)
        together = await self.gather_limited(len(jobs), jobs)
        preempted = (pick(read_metrics(self.url), PREEMPTIONS) or 0.0) - before
        result.outcomes = alone + together
        mismatches = sum(a.status == t.status == 200 and a.texts != t.texts for a, t in zip(alone, together))
        if mismatches:
            result.breaches.append(f"{mismatches} greedy outputs differ under load from the same prompt alone")
        result.notes.append(f"{len(jobs)} at once, {preempted:.0f} preemptions, outputs equal: {not mismatches}")

    async def hostile_inputs(self, result: PhaseResult) -> None:
        try:
            from benchmarks.hostile_inputs import CASES, with_model
        except ImportError:
            result.notes.append("skipped: benchmarks/hostile_inputs.py is not in this tree")
            return
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        async with self.client(4) as client:
            for case in CASES:
                case = with_model(case, self.model)
                try:
                    response = await client.request(
                        case.method, case.path, content=case.body, headers={**case.headers, **headers}
                    )
                except httpx.HTTPError as error:
                    result.outcomes.append(Outcome(0, transport=f"{case.name}: {type(error).__name__}: {error}"))
                    continue
                outcome = _whole(response)
                result.outcomes.append(outcome)
                if not 400 <= response.status_code < 500:
                    result.breaches.append(f"{case.name}: HTTP {response.status_code}, not a 4xx")
                elif not outcome.shaped:
                    result.breaches.append(f"{case.name}: error not OpenAI-shaped")
        result.notes.append(f"{len(result.outcomes)} cases")

    async def engine_kill(self, result: PhaseResult) -> None:
        pid = engine_pid(self.server_pid)
        if pid is None:
            result.notes.append("skipped: no engine child to kill (give --server-pid, or --launch)")
            return
        body = {"model": self.model, "prompt": self.words(8), "max_tokens": 400, "ignore_eos": True}
        jobs = [("/v1/completions", {**body, "stream": i % 2 == 0}, None) for i in range(self.sizes.kill_streams)]
        task = asyncio.ensure_future(self.gather_limited(len(jobs), jobs))
        deadline = time.monotonic() + 30
        while (pick(read_metrics(self.url), RUNNING) or 0) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        result.outcomes = await task
        for outcome in result.outcomes:
            if outcome.status == 200 and not outcome.in_stream:
                result.breaches.append("a request in flight when the engine died ended as if nothing happened")
            if outcome.status not in (200, 503):
                result.breaches.append(f"in-flight request answered {outcome.status}, not 503")
            if outcome.in_stream and (outcome.error or {}).get("code") != "engine_dead":
                result.breaches.append(f"stream error event is not engine_dead: {outcome.error}")
        async with self.client(2) as client:
            while (await client.get("/health")).status_code != 200:
                if time.monotonic() - killed_at > self.args.restart_timeout:
                    result.breaches.append(f"not serving {self.args.restart_timeout:.0f} s after the engine died")
                    return
                await asyncio.sleep(0.05)
            self.restart_s = time.monotonic() - killed_at
            after = await call(client, "/v1/completions", {"model": self.model, "prompt": "Hi", "max_tokens": 4})
        if after.status != 200:
            result.breaches.append(f"first request after the restart answered {after.status}")
        new_pid = engine_pid(self.server_pid)
        restarts = pick(read_metrics(self.url), RESTARTS)
        result.notes.append(f"serving again {self.restart_s:.1f} s after SIGKILL; engine pid {pid} -> {new_pid}")
        if restarts is not None:
            result.notes.append(f"restarts counter {restarts:.0f}")
        if new_pid == pid or new_pid is None:
            result.breaches.append(f"engine pid after the restart: {new_pid}")

    async def sigterm(self, result: PhaseResult) -> None:
        if self.launched is None:
            result.notes.append("skipped: only a server launched here is sent SIGTERM")
            return
        body = {"model": self.model, "prompt": self.words(8), "max_tokens": 40, "ignore_eos": True, "stream": True}
        async with self.client(self.sizes.sigterm_streams) as client:
            started = [asyncio.Event() for _ in range(self.sizes.sigterm_streams)]

            async def stream(event: asyncio.Event) -> Outcome:
                outcome = Outcome(0, stream=True)
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        outcome.status = response.status_code
                        async for line in response.aiter_lines():
                            event.set()
                            if line == "data: [DONE]":
                                outcome.done = True
                            elif line.startswith("data: "):
                                chunk = json.loads(line[len("data: ") :])
                                if "error" in chunk:
                                    outcome.error, outcome.in_stream = chunk["error"], True
                                    outcome.shaped = is_openai_error(chunk)
                                else:
                                    _read_choices(outcome, chunk.get("choices") or [], delta=True)
                except httpx.HTTPError as error:
                    outcome.transport = f"{type(error).__name__}: {error}"
                    event.set()
                return outcome

            tasks = [asyncio.ensure_future(stream(event)) for event in started]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
            self.launched.send_signal(signal.SIGTERM)
            result.outcomes = list(await asyncio.wait_for(asyncio.gather(*tasks), self.args.request_timeout))
        for outcome in result.outcomes:
            if not outcome.done or outcome.finish.get(0) != "length":
                result.breaches.append(f"a stream did not drain to its end: {outcome.finish} {outcome.transport}")
        try:
            code = await asyncio.to_thread(self.launched.wait, 90)
        except Exception:
            result.breaches.append("the server did not exit within 90 s of SIGTERM")
            return
        result.notes.append(f"{len(result.outcomes)} streams drained; exit code {code}")
        if code != 0:
            result.breaches.append(f"exit code {code} after SIGTERM")


def format_table(results: list[PhaseResult], restart_s: float | None) -> str:
    header = f"| {'phase':<19} | {'s':>5} | {'requests':>8} | {'2xx':>5} | {'4xx':>5} | {'5xx':>4} | {'idle':<4} | " \
             f"{'server RSS MB':<13} | {'engine RSS MB':<13} | {'result':<6} | notes |"  # fmt: skip
    lines = [header, "|" + "|".join("-" * (len(part) + 0) for part in header.split("|")[1:-1]) + "|"]
    for r in results:
        statuses = [o.status for o in r.outcomes]
        ok = sum(200 <= s < 300 for s in statuses)
        client_errors = sum(400 <= s < 500 for s in statuses)
        server_errors = sum(s >= 500 for s in statuses)
        verdict = "BREACH" if r.breaches else "ok"
        notes = "; ".join(r.notes + r.breaches[:3])
        lines.append(
            f"| {r.name:<19} | {r.seconds:>5.1f} | {len(statuses):>8} | {ok:>5} | {client_errors:>5} | "
            f"{server_errors:>4} | {r.idle or '-':<4} | {r.server_rss or '-':<13} | {r.engine_rss or '-':<13} | "
            f"{verdict:<6} | {notes} |"
        )
    if restart_s is not None:
        lines.append(f"\nengine SIGKILL -> /health 200: {restart_s:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--server-pid", type=int, default=None, help="the server's pid (for the engine kill)")
    parser.add_argument(
        "--launch",
        default=None,
        metavar="SERVE_FLAGS",
        help="start `python -m api serve SERVE_FLAGS` on a free loopback port and run every phase against it",
    )
    parser.add_argument("--launch-timeout", type=float, default=600.0)
    parser.add_argument("--api-key", default=os.environ.get("SLUICE_API_KEY"))
    parser.add_argument("--short", action="store_true", help="the CI form: small counts, a minute or two")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--phases", type=lambda text: text.split(","), default=None, help=f"a subset, in order: {','.join(PHASE_NAMES)}"
    )
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--idle-timeout", type=float, default=15.0, help="seconds for /metrics to return to idle")
    parser.add_argument("--restart-timeout", type=float, default=180.0, help="seconds for a killed engine to serve")
    parser.add_argument("--rss-growth-mb", type=float, default=300.0, help="bound on RSS growth per process")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.launch is not None:
        with launched_server(args.launch, args.launch_timeout) as (url, process):
            harness = Harness(args, url, process.pid, process)
            results = asyncio.run(harness.run())
    else:
        host = httpx.URL(args.base_url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"--base-url must be a loopback address, got {host}", file=sys.stderr)
            return 2
        harness = Harness(args, args.base_url, args.server_pid, None)
        results = asyncio.run(harness.run())
    print(format_table(results, harness.restart_s))
    if args.json:
        summary = [
            {"phase": r.name, "seconds": r.seconds, "requests": len(r.outcomes), "breaches": r.breaches,
             "notes": r.notes, "idle": r.idle, "server_rss": r.server_rss, "engine_rss": r.engine_rss}
            for r in results
        ]  # fmt: skip
        Path(args.json).write_text(json.dumps({"phases": summary, "restart_s": harness.restart_s}, indent=2))
    return 1 if any(r.breaches for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
