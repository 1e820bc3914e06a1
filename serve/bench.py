"""Serving benchmark: this project's engine against static batching and Hugging Face `generate`.

    python -m serve.bench --checkpoint=runs/tiny                       # 64 requests, C = 1, 8, 32
    python -m serve.bench --checkpoint=runs/tiny --concurrency=1,8,32 --requests=64 --prompt_len=32:256 \
        --output_len=16:512 --prompts=shakespeare --systems=engine,http,naive,hf   # the defaults + http
    python -m serve.bench --checkpoint=runs/tiny --output_len=64       # every request 64 tokens
    python -m serve.bench --preset=configs/lm.py:125m --prompts=random --systems=engine,naive  # random init

Client-side measurement in the manner of vLLM's `benchmarks/benchmark_serving.py` (closed loop, at most C
requests in flight): one fixed list of requests — prompts of uniformly drawn length cut at random offsets
of real text (Tiny Shakespeare or WikiText-2 in the shared data, tokenized by the checkpoint's tokenizer,
BOS first) or random ids — is served by every system at each concurrency C. Decoding is greedy and every
request gets exactly its output length, `--output_len=N`, or drawn uniformly per request from
`--output_len=LO:HI` (like vLLM's random dataset with a range ratio; chat replies vary in length, and a
static batch runs until its longest request is done while continuous batching frees the slot at once):
EOS is an ordinary token everywhere (our engine and the static
decoder are given eos_id -1, which no sample can equal; `transformers` gets `eos_token_id=None`, not
`min_new_tokens`, whose EOS mask would change the greedy tokens whenever EOS is the argmax).

Systems (same weights, same requests, fp32 unless `--dtype`):
  engine  `serve.engine.Engine` (paged KV cache, continuous batching, chunked prefill) driven by
          `serve.async_engine.AsyncEngine`; one asyncio task per request, token times from its events.
  http    the same engine behind the OpenAI-compatible server (`serve.server`, uvicorn in a thread of this
          process), streamed by the official `openai` client: as in vLLM's benchmark, each text chunk is
          timed as one token and the usage chunk's count settles the total (tokens with empty text —
          a UTF-8 sequence still incomplete — are timed at the end; they rarely occur).
  naive   static batching without cache reuse: requests in batches of C (the last padded), prompts right-
          padded to a power of two, a dense KV cache (`train.sample.generate_ids`' decode: one jitted prefill,
          then a jitted `lax.fori_loop` of one-token steps). A batch starts when the previous one ends. TTFT
          is timed at the prefill's first token; the loop is timed whole and its time spread evenly over
          its tokens (so TPOT = decode time / (output_len - 1)).
  hf      `transformers` `model.generate` on the model written by `model.hf`'s exporter (fp32, CPU,
          `torch.set_num_threads` = available cores, or each of `--hf_threads=2,1` as systems hf-t2,
          hf-t1: on a loaded machine 1 thread can be faster), batches of C, left-padded with a mask;
          token times from a streamer that timestamps every decode step (the first `put` after the prompt's
          is the first token).

Each (system, C) first runs untimed warm-up passes until one compiles nothing (at most 3; transformers
compiles nothing and warms up on one batch), then the timed pass (run again, at most twice, if it still
met a new shape: `timed_passes`), each on a fresh engine, so the prefix cache starts empty.

Prints one JSON line per (system, C): {"bench": "serve", "setup", "device", "jax", "torch", "transformers",
"commit", "system", "concurrency", "request_throughput", "output_tokens_per_s", "ttft_p50_ms",
"ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "latency_p50_s", "wall_s", "output_tokens", "warmup_s",
"load_avg_1m", ...} with vLLM's definitions: TTFT = first token − request sent, TPOT = (latency − TTFT) /
(tokens − 1) per request, throughputs over the timed pass's wall time. Our systems add a `profile`:
compiles and their seconds in the timed pass and, for the engine, decode-only and prefill steps (count,
mean ms), of which Python scheduling (`_schedule`) and array prep + dispatch (`_run`), and the time
outside `step` (driver, idle, the GIL held by the client).
Before timing, a `serve_parity` line checks that the systems that report token ids produce the same
greedy tokens for the first `--parity_requests` requests (fp32 on our side, whatever `--dtype`); at the
end a `serve_speedup` line gives the engine's output tokens/s over the fastest transformers run at each C.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import functools
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.loader import ConfigError, main_guard

SYSTEMS = ("engine", "http", "naive", "hf")
PROMPT_FILES = {"shakespeare": "text/tinyshakespeare.txt", "wikitext2": "text/wikitext2_test.txt"}


# --------------------------------------------------------------------------------------------- workload

def make_prompts(n: int, lengths: tuple[int, int], *, source: str, vocab_size: int, tokenizer=None,
                 seed: int = 0) -> list[list[int]]:
  """`n` prompts of lengths uniform in [lo, hi] (BOS included): cuts of real text at random offsets, or
  random ids in [3, vocab) when `source="random"` (0-2 are pad/BOS/EOS in the project's tokenizers)."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(lengths[0], lengths[1] + 1, n)
  if source == "random":
    return [[1] + rng.integers(3, vocab_size, int(k) - 1).tolist() for k in sizes]
  from data.tasks import shared_data_dir  # pylint: disable=g-import-not-at-top
  if tokenizer is None:
    raise ConfigError(f"--prompts={source} needs a tokenizer: use --checkpoint, or --prompts=random")
  path = shared_data_dir() / PROMPT_FILES[source]
  if not path.is_file():
    raise ConfigError(f"prompt text not found: {path}")
  ids = tokenizer.encode(path.read_text(encoding="utf-8"))
  if len(ids) < lengths[1]:
    raise ConfigError(f"{path} has {len(ids)} tokens, fewer than --prompt_len's maximum {lengths[1]}")
  starts = rng.integers(0, len(ids) - lengths[1], n)
  return [[int(tokenizer.bos_id)] + ids[s:s + int(k) - 1] for s, k in zip(starts, sizes)]


@dataclasses.dataclass
class Trace:
  """One request as its client saw it: when it was sent, when each token arrived, the token ids."""
  sent: float
  times: list[float]
  tokens: list[int | None]


def summarize(traces: Sequence[Trace], wall: float) -> dict:
  """vLLM's serving figures: throughput over the whole run; TTFT, TPOT, latency per request."""
  ttft = np.array([t.times[0] - t.sent for t in traces])
  latency = np.array([t.times[-1] - t.sent for t in traces])
  tpot = np.array([(t.times[-1] - t.times[0]) / (len(t.times) - 1) for t in traces if len(t.times) > 1])
  out_tokens = sum(len(t.times) for t in traces)
  sig = lambda x: float(f"{x:.4g}")  # 4 significant digits, however small the run.
  pct = lambda a, q, scale=1e3: sig(np.percentile(a, q) * scale) if a.size else None
  return dict(request_throughput=sig(len(traces) / wall), output_tokens_per_s=sig(out_tokens / wall),
              ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), tpot_p50_ms=pct(tpot, 50),
              tpot_p99_ms=pct(tpot, 99), latency_p50_s=pct(latency, 50, 1), wall_s=sig(wall),
              output_tokens=out_tokens)


async def _closed_loop(n: int, concurrency: int, stream: Callable) -> list[Trace]:
  """Requests 0..n-1, at most `concurrency` in flight; `stream(i)` yields the token ids (None: unknown)
  that each arrival brings."""
  gate = asyncio.Semaphore(concurrency)

  async def one(i: int) -> Trace:
    async with gate:
      trace = Trace(time.perf_counter(), [], [])
      async for tokens in stream(i):
        now = time.perf_counter()
        trace.times += [now] * len(tokens)
        trace.tokens += tokens
      return trace

  return list(await asyncio.gather(*(one(i) for i in range(n))))


# --------------------------------------------------------------------------------------------- systems

class EngineSystem:
  """`serve.engine.Engine` behind `AsyncEngine` (or, with `http=True`, behind the OpenAI server)."""

  def __init__(self, model, *, max_slots: int, max_len: int, block_size: int = 16, prefill_chunk: int = 256,
               tokenizer=None, http: bool = False):
    if http and tokenizer is None:
      raise ConfigError("the http system needs a tokenizer (the server detokenizes): use --checkpoint")
    self.model, self.tokenizer, self.http = model, tokenizer, http
    # Pages for every slot at its longest request: nothing is ever preempted, as in the other systems.
    self.kw = dict(block_size=block_size, max_slots=max_slots, prefill_chunk=prefill_chunk,
                   num_blocks=max_slots * -(-max_len // block_size))
    self.profile: dict = {}

  def run(self, prompts: list[list[int]], output_lens: list[int], concurrency: int
          ) -> tuple[list[Trace], float]:
    from serve.api import Request, SamplingParams  # pylint: disable=g-import-not-at-top
    from serve.async_engine import AsyncEngine  # pylint: disable=g-import-not-at-top
    from serve.engine import Engine  # pylint: disable=g-import-not-at-top
    engine = Engine(self.model, eos_id=-1, **self.kw)  # fresh: an empty prefix cache every pass.
    times = _instrument(engine)
    compiles = _COMPILES.snapshot()
    driver = AsyncEngine(engine, max_queue=len(prompts), max_slots=self.kw["max_slots"])
    if self.http:
      traces, wall = self._run_http(driver, prompts, output_lens, concurrency)
    else:
      async def stream(i):
        params = SamplingParams(max_tokens=output_lens[i], temperature=0.0)
        async for ev in driver.stream(Request(f"r{i}", tuple(prompts[i]), params)):
          yield [ev.token_id]

      async def main():
        t0 = time.perf_counter()
        traces = await _closed_loop(len(prompts), concurrency, stream)
        return traces, time.perf_counter() - t0

      driver.start()
      try:
        traces, wall = asyncio.run(main())
      finally:
        driver.close()
    # Where the engine thread's time went: decode-only steps and steps with a prompt chunk (host and
    # XLA), of which Python scheduling and array prep + dispatch; outside `step`: driver, idle, the GIL.
    ms = lambda v: round(1e3 * sum(v) / max(len(v), 1), 2)
    step_s = sum(times["decode"]) + sum(times["prefill"]) + sum(times["idle"])
    self.profile = dict(decode_steps=len(times["decode"]), decode_step_ms=ms(times["decode"]),
                        prefill_steps=len(times["prefill"]), prefill_step_ms=ms(times["prefill"]),
                        schedule_s=round(sum(times["_schedule"]), 3), dispatch_s=round(sum(times["_run"]), 3),
                        outside_step_s=round(wall - step_s, 3), **_compiles_since(compiles))
    return traces, wall

  def _run_http(self, driver, prompts, output_lens, concurrency):
    import openai  # pylint: disable=g-import-not-at-top

    from serve.server import BackgroundServer, create_app  # pylint: disable=g-import-not-at-top
    app = create_app(driver, self.tokenizer, model_name="bench", context_len=self.model.cfg.max_seq_len)
    with BackgroundServer(app) as url:
      async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=3600)

        async def stream(i):
          chunks = await client.completions.create(
              model="bench", prompt=prompts[i], max_tokens=output_lens[i], temperature=0.0, stream=True,
              stream_options={"include_usage": True})
          seen = 0
          async for chunk in chunks:
            if any(c.text for c in chunk.choices):
              seen += 1
              yield [None]
            if chunk.usage is not None:  # tokens whose text was empty (held back or merged) end here.
              yield [None] * (chunk.usage.completion_tokens - seen)

        t0 = time.perf_counter()
        traces = await _closed_loop(len(prompts), concurrency, stream)
        wall = time.perf_counter() - t0
        await client.close()
        return traces, wall
      return asyncio.run(main())


def _instrument(engine) -> dict[str, list[float]]:
  """Times the engine's steps (wrapping `step`, `_schedule`, `_run` on the instance): "decode" steps
  (one token per running sequence) apart from "prefill" steps (a prompt chunk too), and the host parts."""
  times = {"decode": [], "prefill": [], "idle": [], "_schedule": [], "_run": []}
  kind = []

  def timed(name, fn):
    def wrapper(*a, **k):
      t0 = time.perf_counter()
      try:
        out = fn(*a, **k)
        if name == "_schedule":
          kind.append("prefill" if any(n > 1 for _, n in out) else "decode" if out else "idle")
        return out
      finally:
        times[kind.pop() if name == "step" else name].append(time.perf_counter() - t0)
    return wrapper

  for name in ("step", "_schedule", "_run"):
    setattr(engine, name, timed(name, getattr(engine, name)))
  return times


class _CompileClock:
  """Counts XLA compiles and their seconds (tracing, lowering, backend) through `jax.monitoring`."""
  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_):
    if event in self.EVENTS:
      self.seconds += duration
      self.count += event == self.EVENTS[-1]

  def snapshot(self) -> tuple[int, float]:
    return self.count, self.seconds


_COMPILES = _CompileClock()


def _compiles_since(snapshot: tuple[int, float]) -> dict:
  count, seconds = _COMPILES.snapshot()
  return dict(compiles=count - snapshot[0], compile_s=round(seconds - snapshot[1], 3))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(state, prompts, lengths, *, graphdef, cache_len):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompts.shape[0], cache_len)
  positions = jnp.broadcast_to(jnp.arange(prompts.shape[1]), prompts.shape)
  logits, cache = model.decode(prompts, positions=positions, cache=cache, logits_at=lengths - 1)
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "width"))
def _decode(state, cache, token, lengths, steps, *, graphdef, width):
  """`steps` (≤ `width`) greedy one-token steps after the prefill's token (positions continue each row's
  prompt). `steps` is traced, so batches of different output lengths share one program per width."""
  model = nnx.merge(graphdef, state)

  def body(t, carry):
    token, cache, out = carry
    logits, cache = model.decode(token[:, None], positions=(lengths + t)[:, None], cache=cache)
    token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return token, cache, out.at[:, t].set(token)

  out = jnp.zeros((token.shape[0], width), jnp.int32)
  return jax.lax.fori_loop(0, steps, body, (token, cache, out))[2]


class NaiveSystem:
  """Static batches of C with a dense KV cache: `train.sample.generate_ids`' decode, timed in two parts."""

  def __init__(self, model):
    self.max_len = model.cfg.max_seq_len
    self.graphdef, self.state = nnx.split(model)
    self.profile: dict = {}

  def run(self, prompts: list[list[int]], output_lens: list[int], concurrency: int
          ) -> tuple[list[Trace], float]:
    traces, t_start, compiles = [], time.perf_counter(), _COMPILES.snapshot()
    for b0 in range(0, len(prompts), concurrency):
      batch, lens = prompts[b0:b0 + concurrency], output_lens[b0:b0 + concurrency]
      output_len = max(lens)  # a static batch runs until its longest request is done.
      rows = batch + [batch[0]] * (concurrency - len(batch))  # one compiled batch size.
      lengths = np.array([len(p) for p in rows], np.int32)
      width = min(1 << int(lengths.max() - 1).bit_length(), self.max_len - output_len)
      ids = np.zeros((concurrency, width), np.int32)
      for r, p in enumerate(rows):
        ids[r, :len(p)] = p
      sent = time.perf_counter()
      # Cache length rounded up to 64: per-request output lengths would otherwise compile a program per batch.
      cache_len = min(width + -(-output_len // 64) * 64, self.max_len)
      first, cache = _prefill(self.state, ids, lengths, graphdef=self.graphdef, cache_len=cache_len)
      first = np.asarray(first)
      t_first = time.perf_counter()
      rest = np.zeros((concurrency, 0), np.int32)
      if output_len > 1:
        rest = np.asarray(_decode(self.state, cache, first, lengths, output_len - 1, graphdef=self.graphdef,
                                  width=1 << (output_len - 2).bit_length()))
      t_end = time.perf_counter()
      step = (t_end - t_first) / max(output_len - 1, 1)
      times = [t_first + k * step for k in range(output_len)]
      for r, n in enumerate(lens):
        traces.append(Trace(sent, times[:n], ([int(first[r])] + rest[r].tolist())[:n]))
    self.profile = _compiles_since(compiles)
    return traces, t_end - t_start


def write_hf(model, out: pathlib.Path) -> pathlib.Path:
  """`model`'s params as a Hugging Face checkpoint (`model.hf`'s exporter: config.json + safetensors)."""
  from model.hf import config as hf_config  # pylint: disable=g-import-not-at-top
  from model.hf import weights  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  out.mkdir(parents=True, exist_ok=True)
  weights.write_safetensors(weights.params_to_hf(params, model.cfg, dtype="float32"), out)
  hf = hf_config.to_hf(model.cfg, dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)
  (out / "config.json").write_text(json.dumps(hf, indent=2))
  return out


class HFSystem:
  """`transformers` `generate` on the exported weights: static, left-padded batches of C, greedy."""

  def __init__(self, model, *, threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch, self.threads = torch, threads
    with tempfile.TemporaryDirectory() as tmp:
      self.model = transformers.AutoModelForCausalLM.from_pretrained(
          write_hf(model, pathlib.Path(tmp)), dtype=torch.float32).eval()
    # eos None: nothing stops a row early and no logits processor masks EOS, so every row decodes
    # exactly max_new_tokens of plain argmax, as our systems do.
    self.gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=1)
    self.profile: dict = {}

  def run(self, prompts: list[list[int]], output_lens: list[int], concurrency: int
          ) -> tuple[list[Trace], float]:
    import transformers  # pylint: disable=g-import-not-at-top
    torch = self.torch
    torch.set_num_threads(self.threads)  # process-wide: set per run, as several HFSystems may share it.
    traces, t_start = [], time.perf_counter()
    for b0 in range(0, len(prompts), concurrency):
      batch, lens = prompts[b0:b0 + concurrency], output_lens[b0:b0 + concurrency]
      output_len = max(lens)  # one max_new_tokens per generate call: the batch's longest request.
      config = transformers.GenerationConfig(max_new_tokens=output_len, **self.gen)
      width = max(map(len, batch))
      ids = torch.zeros((len(batch), width), dtype=torch.long)
      mask = torch.zeros((len(batch), width), dtype=torch.long)
      for r, p in enumerate(batch):  # left padding: every row's last prompt token in the last column.
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
      clock = _StepClock()
      sent = time.perf_counter()
      with torch.inference_mode():
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  streamer=clock)
      new = out[:, width:].tolist()
      if len(clock.times) != output_len or any(len(row) != output_len for row in new):
        raise RuntimeError(f"transformers generated {len(clock.times)} steps, expected {output_len}")
      for row, n in zip(new, lens):
        traces.append(Trace(sent, clock.times[:n], row[:n]))
    return traces, time.perf_counter() - t_start


class _StepClock:
  """A `transformers` streamer that only timestamps: `generate` puts the prompt, then each step's tokens."""

  def __init__(self):
    self.times: list[float] = []
    self._prompt_seen = False

  def put(self, value):
    del value
    if self._prompt_seen:
      self.times.append(time.perf_counter())
    self._prompt_seen = True

  def end(self):
    pass


# --------------------------------------------------------------------------------------------- driver

def build_systems(names: Sequence[str], model, *, tokenizer, max_slots: int, max_len: int,
                  hf_threads: Sequence[int]) -> dict:
  """name → system; `hf` becomes one system per torch thread count (`hf-t1`, `hf-t2`, ... if several)."""
  out = {}
  for name in names:
    if name == "engine":
      out[name] = EngineSystem(model, max_slots=max_slots, max_len=max_len)
    elif name == "http":
      out[name] = EngineSystem(model, max_slots=max_slots, max_len=max_len, tokenizer=tokenizer, http=True)
    elif name == "naive":
      out[name] = NaiveSystem(model)
    elif name == "hf":
      shared = HFSystem(model, threads=hf_threads[0])
      for t in hf_threads:
        out["hf" if len(hf_threads) == 1 else f"hf-t{t}"] = system = copy.copy(shared)  # same torch model.
        system.threads = t
    else:
      raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")
  return out


def parity(systems: dict, prompts: list[list[int]], output_lens: list[int]) -> dict:
  """Greedy tokens of every system that reports ids, on the same prompts, against the first system's."""
  outs = {name: [t.tokens for t in s.run(prompts, output_lens, len(prompts))[0]]
          for name, s in systems.items()}
  outs = {name: o for name, o in outs.items() if all(None not in row for row in o)}
  ref_name, ref = next(iter(outs.items()))
  first_diff = {}
  for name, rows in outs.items():
    # Index of the first differing token per request (None: identical).
    first_diff[name] = [next((k for k, (a, b) in enumerate(zip(r, s)) if a != b), None)
                        for r, s in zip(ref, rows)]
  return dict(bench="serve_parity", reference=ref_name, systems=list(outs), requests=len(prompts),
              output_lens=list(output_lens), parity=all(d is None for v in first_diff.values() for d in v),
              first_mismatch=first_diff)


def run_bench(model, prompts: list[list[int]], *, output_len: int | Sequence[int], concurrency: Sequence[int],
              systems: Sequence[str] = ("engine", "naive", "hf"), tokenizer=None, parity_requests: int = 4,
              parity_model=None, warmup: bool = True, hf_threads: Sequence[int] = (),
              setup: str = "", emit: Callable[[dict], None] = lambda row: None) -> list[dict]:
  """Benchmarks `systems` on `prompts` at each concurrency; returns (and `emit`s) the JSON rows.

  `output_len`: tokens per request, one number for all or one per request.
  `parity_model`: the fp32 model for the parity check when `model` computes in another dtype.
  `hf_threads`: torch thread counts to run `hf` with (default: the available cores).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from train.loop import provenance  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  lens = [output_len] * len(prompts) if isinstance(output_len, int) else [int(n) for n in output_len]
  if len(lens) != len(prompts):
    raise ConfigError(f"{len(prompts)} prompts but {len(lens)} output lengths")
  max_len = max(len(p) + n for p, n in zip(prompts, lens))
  if max_len > model.cfg.max_seq_len:
    raise ConfigError(f"a prompt + its output_len ({max_len} tokens) exceeds the "
                      f"model's context ({model.cfg.max_seq_len})")
  kw = dict(tokenizer=tokenizer, max_slots=max(concurrency), max_len=max_len,
            hf_threads=tuple(hf_threads) or (cores,))
  rows = []

  def out(row):
    rows.append(row)
    emit(row)

  prov = provenance()
  base = dict(setup=setup, device=f"{jax.devices()[0].device_kind} ({cores} cores)", jax=jax.__version__,
              torch=torch.__version__, transformers=transformers.__version__, commit=prov["commit"],
              dirty=prov["dirty"])
  built = build_systems(systems, model, **kw)
  if parity_requests:
    check = built if parity_model is None else build_systems(systems, parity_model, **kw)
    check = {n: s for n, s in check.items() if not n.startswith("hf-t") or n == f"hf-t{kw['hf_threads'][0]}"}
    out(dict(parity(check, prompts[:parity_requests], lens[:parity_requests]), **base))
  for c in concurrency:
    for name, system in built.items():
      row = dict(bench="serve", **base, system=name, concurrency=c, requests=len(prompts))
      if warmup:
        # Until a pass compiles nothing (at most 3): the engine's shapes depend on timing, so a second
        # pass can meet a batch / chunk / table bucket the first did not.
        t0, compiles = time.perf_counter(), _COMPILES.snapshot()
        for _ in range(3):
          before = _COMPILES.snapshot()
          # transformers compiles nothing: one batch warms its allocator and kernels.
          hf = isinstance(system, HFSystem)
          system.run(prompts[:c] if hf else prompts, lens[:c] if hf else lens, c)
          if _COMPILES.snapshot()[0] == before[0]:
            break
        row.update(warmup_s=round(time.perf_counter() - t0, 2),
                   **{f"warmup_{k}": v for k, v in _compiles_since(compiles).items()})
      for attempt in range(3):  # a timed pass that met a new shape (and compiled it) is run again.
        row["load_avg_1m"] = round(os.getloadavg()[0], 2)
        before = _COMPILES.snapshot()
        traces, wall = system.run(prompts, lens, c)
        if not warmup or _COMPILES.snapshot()[0] == before[0]:
          break
      row["timed_passes"] = attempt + 1
      if [len(t.times) for t in traces] != lens:
        raise RuntimeError(f"{name}: not every request got its output_len tokens")
      row.update(summarize(traces, wall), prompt_tokens=sum(map(len, prompts)))
      if isinstance(system, HFSystem):
        row["torch_threads"] = system.threads
      if system.profile:
        row["profile"] = system.profile
      out(row)
  tput = {(r["system"], r["concurrency"]): r["output_tokens_per_s"] for r in rows if r["bench"] == "serve"}
  hf = [n for n in built if n == "hf" or n.startswith("hf-t")]
  for name in ("engine", "http"):
    if name in built and hf:
      # Against the fastest transformers setting at each C: the conservative ratio.
      best = {c: max(hf, key=lambda n: tput[n, c]) for c in concurrency}
      out(dict(bench="serve_speedup", **base, system=name, baseline={str(c): b for c, b in best.items()},
               throughput_ratio={str(c): round(tput[name, c] / tput[best[c], c], 2) for c in concurrency}))
  return rows


def random_model(cfg, seed: int = 0):
  """A model of `cfg` with N(0, init_std²) weights (norm scales 1) drawn by numpy: no per-shape compiles."""
  from model.transformer import Transformer  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      shape = var.get_value().shape
      value = np.ones(shape) if path[-1] == "scale" else cfg.init_std * rng.standard_normal(shape)
      var.set_value(jnp.asarray(value, jnp.dtype(cfg.param_dtype)))
  return model


def _ints(text: str, name: str) -> list[int]:
  try:
    values = [int(v) for v in text.replace(":", ",").split(",")]
  except ValueError:
    raise ConfigError(f"--{name}={text!r}: expected integers") from None
  if not values or min(values) < 1:
    raise ConfigError(f"--{name}={text!r}: values must be ≥ 1")
  return values


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="run directory or checkpoint step directory")
  src.add_argument("--preset", help="configs/<file>.py:<args>: random weights of that model")
  p.add_argument("--concurrency", default="1,8,32", help="comma-separated C values (max in flight)")
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--prompt_len", default="32:256", help="LO:HI (uniform, BOS included) or one length")
  p.add_argument("--output_len", default="16:512",
                 help="tokens generated per request (EOS ignored): N, or LO:HI drawn uniformly per request")
  p.add_argument("--prompts", default="shakespeare", choices=[*PROMPT_FILES, "random"])
  p.add_argument("--systems", default="engine,naive,hf", help=f"comma-separated, of {','.join(SYSTEMS)}")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
  p.add_argument("--parity_requests", type=int, default=4, help="requests checked for equal tokens (0: off)")
  p.add_argument("--hf_threads", default="", help="torch thread counts for hf, e.g. 2,1 (default: cores)")
  p.add_argument("--no_warmup", action="store_true", help="time the first pass (compiles included)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  def go() -> int:
    concurrency = _ints(args.concurrency, "concurrency")
    lengths = _ints(args.prompt_len, "prompt_len")
    if len(lengths) == 1 or len(lengths) > 2 or lengths[0] > lengths[-1]:
      lengths = lengths[:1] * 2 if len(lengths) == 1 else None
    if lengths is None:
      raise ConfigError(f"--prompt_len={args.prompt_len!r}: expected LO:HI with LO ≤ HI, or one length")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
      raise ConfigError(f"--systems: unknown {bad or systems}; choose from {', '.join(SYSTEMS)}")
    if args.requests < 1:
      raise ConfigError(f"--requests must be ≥ 1, got {args.requests}")
    out_range = _ints(args.output_len, "output_len")
    if len(out_range) > 2 or out_range[0] > out_range[-1]:
      raise ConfigError(f"--output_len={args.output_len!r}: expected N, or LO:HI with LO ≤ HI")
    model, tokenizer, name = _load(args, args.dtype)
    prompts = make_prompts(args.requests, tuple(lengths), source=args.prompts, tokenizer=tokenizer,
                           vocab_size=model.cfg.vocab_size, seed=args.seed)
    from model.params import count_params  # pylint: disable=g-import-not-at-top
    mean = np.mean([len(q) for q in prompts])
    setup = (f"{name} {count_params(model.cfg)['total'] / 1e6:.2f}M {args.dtype} {args.requests} req prompts "
             f"{args.prompts} {lengths[0]}-{lengths[1]} (mean {mean:.0f}) out {args.output_len}")
    # Its own stream (seed + 1): the prompts stay those of a fixed-length run with the same seed.
    output_lens = np.random.default_rng(args.seed + 1).integers(out_range[0], out_range[-1] + 1,
                                                                args.requests).tolist()
    run_bench(model, prompts, output_len=output_lens, concurrency=concurrency, systems=systems,
              tokenizer=tokenizer, parity_requests=min(args.parity_requests, args.requests),
              parity_model=None if args.dtype == "float32" else _load(args, "float32")[0],
              warmup=not args.no_warmup, setup=setup,
              hf_threads=_ints(args.hf_threads, "hf_threads") if args.hf_threads else (),
              emit=lambda row: print(json.dumps(row), flush=True))
    return 0

  return main_guard(go)


def _load(args, dtype: str):
  """(model computing in `dtype`, tokenizer or None, name) from --checkpoint or --preset."""
  if args.checkpoint:
    from data.tokenizer import tokenizer_from_meta  # pylint: disable=g-import-not-at-top
    from model.load import load_model  # pylint: disable=g-import-not-at-top
    try:
      model, meta = load_model(args.checkpoint, compute_dtype=dtype)
      tokenizer = tokenizer_from_meta(meta)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ConfigError(f"cannot load --checkpoint={args.checkpoint}: {e}") from None
    if tokenizer.vocab_size > model.cfg.vocab_size:
      raise ConfigError(f"--checkpoint={args.checkpoint}: the tokenizer's vocabulary "
                        f"({tokenizer.vocab_size}) exceeds the model's ({model.cfg.vocab_size})")
    return model, tokenizer, args.checkpoint
  from configs.loader import load_preset  # pylint: disable=g-import-not-at-top
  from train.config import model_config, resolve  # pylint: disable=g-import-not-at-top
  cfg = load_preset(args.preset)
  resolve(cfg, 4096)  # vocab 0 (a tokenizer-sized preset): the tiny tokenizer's 4096.
  cfg = dataclasses.replace(model_config(cfg), compute_dtype=dtype, remat="none")
  return random_model(cfg, args.seed), None, args.preset


if __name__ == "__main__":
  sys.exit(main())
