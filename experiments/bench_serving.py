"""Serving benchmark: decode throughput at the largest batch that fits a memory budget.

One command on the GPU machine (one H200; about 8 minutes, every cell time-boxed):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/bench_serving.py

writes benchmarks/serving.json (rewritten after every cell, so a run cut short keeps what it
measured) and prints a markdown table last. CI runs every code path on a tiny model on the CPU:

    python experiments/bench_serving.py --smoke --out /tmp/serving.json

Cells are (model, prompt length P, memory budget, method), each in its own process (a fresh
allocator: its budget is enforced by XLA_PYTHON_CLIENT_MEM_FRACTION / torch's memory fraction,
and its peak is its own):
  * weights: random bf16 parameters initialised on the device (a jitted init / torch's init
    under a CUDA device), never on the host;
  * batch: the largest B whose weights + B x (one row's cache at the planned length
    N = P + 2M) + activations fit the budget, from the cache's exact bytes and the decode
    program's compiled memory analysis (an out-of-memory error retries at 90%);
  * prefill: one row of P tokens in one call, and at `--chunked_lengths` also in chunks of
    `--prefill_chunk` tokens (its logits against the one call's), each timed after a warm-up;
  * decode: the prefilled row's cache copied to B rows, then M new tokens per row (M - 1
    forward steps of the batch) twice, a warm-up and the timed run. Decode tokens/s =
    B x forward steps / time; time per output token = time / forward steps.
Methods: "dense" (JAX, the dense cache, cuDNN attention on GPU), "moa-0.5" and "moa-0.25" (MoA
on its static cache, every layer's KV groups alternating a long and a short window at that KV
density, sink 64), "hf" (transformers' LlamaForCausalLM.generate with attn_implementation
"sdpa" and its DynamicCache, on the same GPU; skipped with a note where torch is missing).
Memory accounting per cell: KV-cache bytes per token (all cache arrays / (B x N)), the ratio
to the dense GQA cache's, weights, the compiled programs' temporaries and the measured peak.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
MODELS = ("llama-3-8b", "llama-3.2-1b")  # LlamaConfig presets
METHODS = ("dense", "moa-0.5", "moa-0.25", "hf")
RESERVE = 0.05  # of the budget, left for what the accounting does not see (workspaces, gaps)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, every code path")
  p.add_argument("--models", default="llama-3-8b,llama-3.2-1b")
  p.add_argument(
    "--lengths",
    default="16384,8192,32768",
    help="prompt lengths, in run order (each for every model)",
  )
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--budgets_gb", default="60", help="memory budgets in GB (1e9), 'card': all")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--prefill_chunk", type=int, default=4096)
  p.add_argument(
    "--chunked_lengths", default="16384", help="prompt lengths also prefilled in chunks"
  )
  p.add_argument("--max_batch", type=int, default=512)
  p.add_argument(
    "--time_limit_s",
    type=float,
    default=510,
    help="for the whole run: later cells are recorded as skipped",
  )
  p.add_argument("--cell_timeout_s", type=float, default=200)
  p.add_argument(
    "--torch_python",
    default=os.environ.get("MOA_TORCH_PYTHON", sys.executable),
    help="interpreter for the hf cells (needs torch and transformers)",
  )
  p.add_argument(
    "--accounting",
    action="store_true",
    help="memory accounting only, from "
    "shapes (no device work): KV bytes per token, MoA / dense, the batch per budget",
  )
  p.add_argument("--out", default="benchmarks/serving.json")
  p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON), print it
  args = p.parse_args(argv)
  unknown = set(args.methods.split(",")) - set(METHODS)
  if unknown:
    p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
  if not args.smoke and set(args.models.split(",")) - set(MODELS):
    p.error(f"unknown models in {args.models!r}; choose from {sorted(MODELS)}")
  return args


# ----------------------------------------------------------------------------- planning


def mixed_windows(
  num_layers: int, num_kv_heads: int, n: int, density: float, sink: int, multiple: int
):
  """[L, K] windows: KV groups alternate a long and a short window, multiples of `multiple`,
  so that the mean cached span min(sink + W, n) is density * n (the short one a quarter of the
  budget's span, the long one the rest)."""
  round_to = lambda x: max(multiple, int(x // multiple) * multiple)
  short = round_to(density * n / 4)
  long = min(round_to(2 * density * n - 2 * sink - short), n - sink)
  row = [long if h % 2 == 0 else short for h in range(num_kv_heads)]
  return [row for _ in range(num_layers)]


def plan_cells(args) -> list[dict]:
  from moa_jax.models.config import LlamaConfig

  if args.smoke:
    models, lengths, budgets = ["tiny"], [192], [0.0009]
    chunked, chunk, new_tokens = {192}, 64, 8
  else:
    models = args.models.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [x if x == "card" else float(x) for x in args.budgets_gb.split(",")]
    chunked = {int(x) for x in args.chunked_lengths.split(",") if x}
    chunk, new_tokens = args.prefill_chunk, args.new_tokens
  cells = []
  for length in lengths:
    for model in models:
      config = LlamaConfig.tiny() if model == "tiny" else LlamaConfig.preset(model)
      for budget in budgets:
        for method in args.methods.split(","):
          cells.append(
            dict(
              model=model,
              prompt=length,
              new_tokens=new_tokens,
              method=method,
              budget_gb=budget,
              chunk=chunk if length in chunked else None,
              max_batch=16 if args.smoke else args.max_batch,
              smoke=args.smoke,
              sink=16 if args.smoke else 64,
              slot_multiple=16 if args.smoke else 64,
              hf_config=config.to_hf_dict(),
            )
          )
  return cells


# ----------------------------------------------------------------------------- JAX cells


def temp_bytes(compiled) -> int:
  """Temporaries of a compiled program (0 where the backend gives no memory analysis)."""
  analysis = compiled.memory_analysis()
  return 0 if analysis is None else int(analysis.temp_size_in_bytes)


def random_weights(config):
  """(graphdef, state) of a Llama with random parameters drawn on the device: N(0, 0.02)
  matrices, unit norm weights. One small jitted draw per distinct shape (one program for the
  whole model took 83 s to compile for Llama-3-8B on the H200)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moa_jax.models import Llama

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  draw = jax.jit(
    lambda key, shape, dtype: (0.02 * jax.random.normal(key, shape)).astype(dtype),
    static_argnums=(1, 2),
  )
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  drawn = [
    draw(key, x.shape, x.dtype) if x.ndim > 1 else jnp.ones(x.shape, x.dtype)
    for key, x in zip(keys, leaves)
  ]
  return graphdef, jax.block_until_ready(jax.tree.unflatten(treedef, drawn))


def run_jax_cell(cell: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moa_jax import generate as gen
  from moa_jax.attention.dense import DenseAttention
  from moa_jax.models import LlamaConfig

  config = LlamaConfig.tiny() if cell["model"] == "tiny" else LlamaConfig.preset(cell["model"])
  p, m = cell["prompt"], cell["new_tokens"]
  n = p + 2 * m  # planned length: the prompt, the warm-up decode, the timed decode
  gpu = jax.default_backend() == "gpu"
  device = jax.devices()[0]
  attention, facts = make_attention(cell, config, n, gpu)
  result = dict(
    device=device.device_kind,
    backend=jax.default_backend(),
    jax=jax.__version__,
    planned_length=n,
    **facts,
  )

  t0 = time.perf_counter()
  graphdef, state = random_weights(config)
  result["init_s"] = time.perf_counter() - t0
  weights = sum(x.nbytes for x in jax.tree.leaves(state))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  row_cache = nbytes(jax.eval_shape(lambda: attention.init_cache(config, 1, n)))
  dense_row = nbytes(jax.eval_shape(lambda: DenseAttention().init_cache(config, 1, n)))
  result.update(
    weights_gb=weights / GB,
    kv_bytes_per_token=row_cache / n,
    dense_kv_bytes_per_token=dense_row / n,
    kv_ratio_vs_dense=row_cache / dense_row,
  )

  def prefill_fn(chunk):
    return jax.jit(
      lambda state, tokens, positions, caches: gen.prefill(
        nnx.merge(graphdef, state), tokens, positions, caches, attention=attention, chunk=chunk
      ),
      donate_argnums=3,
    )

  decode_fn = jax.jit(
    lambda state, logits, lengths, caches: gen.decode(
      nnx.merge(graphdef, state), logits, lengths, caches, m, attention=attention, eos_id=()
    ),
    donate_argnums=3,
  )

  def decode_program(batch):
    t = time.perf_counter()
    # The caches as a prefill of P tokens leaves them (shapes only, nothing runs).
    prompt = jax.ShapeDtypeStruct((batch, p), jnp.int32)
    filled = jax.eval_shape(
      prefill_fn(None),
      state,
      prompt,
      prompt,
      jax.eval_shape(lambda: attention.init_cache(config, batch, n)),
    )[1]
    abstract = (
      jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32),
      jax.ShapeDtypeStruct((batch,), jnp.int32),
      filled,
    )
    compiled = decode_fn.lower(state, *abstract).compile()
    return compiled, temp_bytes(compiled), time.perf_counter() - t

  # The batch: cache bytes first, then the decode program's temporaries.
  budget = cell["budget_bytes"]
  usable = budget * (1 - RESERVE) - weights - row_cache  # the prefilled row stays until copied
  batch = min(cell["max_batch"], int(usable // row_cache))
  if batch < 1:
    return {
      **result,
      "error": f"no row fits: weights {weights / GB:.1f} GB, one row's cache "
      f"{row_cache / GB:.2f} GB, budget {budget / GB:.1f} GB",
    }
  decode, decode_temp, compile_s = decode_program(batch)
  fitted = min(batch, int((usable - decode_temp) // row_cache))
  if fitted < batch:
    batch = fitted
    decode, decode_temp, more_s = decode_program(batch)
    compile_s += more_s
  result.update(decode_compile_s=compile_s, decode_temp_gb=decode_temp / GB)

  key = jax.random.key(1)
  tokens = jax.random.randint(key, (1, p), 3, config.vocab_size, jnp.int32)
  positions = jnp.arange(p, dtype=jnp.int32)[None]

  def timed_prefill(chunk):
    fn = prefill_fn(chunk)
    t = time.perf_counter()
    abstract = jax.eval_shape(lambda: attention.init_cache(config, 1, n))
    compiled = fn.lower(state, tokens, positions, abstract).compile()
    compile_s = time.perf_counter() - t
    for _ in range(2):  # warm-up, timed
      caches = attention.init_cache(config, 1, n)
      jax.block_until_ready(caches)
      t = time.perf_counter()
      logits, caches = compiled(state, tokens, positions, caches)
      jax.block_until_ready(logits)
      seconds = time.perf_counter() - t
    return logits, caches, seconds, compile_s, temp_bytes(compiled)

  logits, caches, seconds, compile_s, temp = timed_prefill(None)
  result.update(prefill_s=seconds, prefill_compile_s=compile_s, prefill_temp_gb=temp / GB)
  if cell["chunk"]:
    try:
      chunked, chunked_caches, seconds, compile_s, temp = timed_prefill(cell["chunk"])
      del chunked_caches  # (kept alive, this row's cache was beyond the budget's accounting)
      result.update(
        chunk=cell["chunk"],
        chunked_prefill_s=seconds,
        chunked_prefill_compile_s=compile_s,
        chunked_prefill_temp_gb=temp / GB,
        chunked_logits_max_abs_diff=float(jnp.abs(chunked - logits).max()),
        logits_max_abs=float(jnp.abs(logits).max()),
      )
      del chunked
    except Exception as error:  # recorded; the decode measurement goes on
      result["chunked_error"] = error_head(error)

  replicate = jax.jit(
    lambda caches, logits, b: (
      jax.tree.map(lambda x: jnp.repeat(x, b, axis=0) if x.ndim else x, caches),
      jnp.repeat(logits, b, axis=0),
    ),
    static_argnums=2,
  )
  while True:
    try:
      big, big_logits = replicate(caches, logits, batch)
      lengths = jnp.full((batch,), p, jnp.int32)
      for _ in ("warm-up", "timed"):
        jax.block_until_ready(big)
        t = time.perf_counter()
        out, big, lengths = decode(state, big_logits, lengths, big)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - t
      break
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error) or batch == 1:
        raise
      big = big_logits = None
      batch = max(1, int(batch * 0.9))
      result["oom_retries"] = result.get("oom_retries", 0) + 1
      decode, decode_temp, _ = decode_program(batch)
  steps = m - 1
  stats = device.memory_stats() or {}
  result.update(
    batch=batch,
    decode_s=seconds,
    decode_tokens_per_s=batch * steps / seconds,
    tpot_ms=1e3 * seconds / steps,
    decode_temp_gb=decode_temp / GB,
    cache_gb=batch * row_cache / GB,
    peak_gb=stats["peak_bytes_in_use"] / GB if "peak_bytes_in_use" in stats else None,
    pool_gb=stats["bytes_limit"] / GB if "bytes_limit" in stats else None,
    first_tokens=[int(x) for x in out[0, :4]],
  )
  return result


def make_attention(cell: dict, config, n: int, gpu: bool):
  """The cell's Attention and its plan facts (windows, KV density) for planned length n."""
  from moa_jax.attention.dense import DenseAttention
  from moa_jax.attention.moa import MoAAttention
  from moa_jax.plans.rules import kv_density

  if cell["method"] in ("dense", "hf"):
    return DenseAttention("cudnn" if gpu else "xla"), {}
  density = float(cell["method"].split("-")[1])
  windows = mixed_windows(
    config.num_layers, config.num_kv_heads, n, density, cell["sink"], cell["slot_multiple"]
  )
  attention = MoAAttention(windows, sink=cell["sink"], slot_multiple=cell["slot_multiple"])
  return attention, dict(
    windows=sorted(set(windows[0])), planned_kv_density=kv_density(windows, cell["sink"], n)
  )


def accounting(cell: dict) -> dict:
  """Bytes from shapes alone: weights, one row's cache at N = P + 2M, MoA / dense, and the
  batch the budget leaves before the decode program's temporaries (`run_jax_cell` then
  compiles it and takes those off too)."""
  import jax
  from flax import nnx

  from moa_jax.attention.dense import DenseAttention
  from moa_jax.models import Llama, LlamaConfig

  config = LlamaConfig.tiny() if cell["model"] == "tiny" else LlamaConfig.preset(cell["model"])
  n = cell["prompt"] + 2 * cell["new_tokens"]
  attention, facts = make_attention(cell, config, n, gpu=False)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  weights = nbytes(nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))))
  row = nbytes(jax.eval_shape(lambda: attention.init_cache(config, 1, n)))
  dense_row = nbytes(jax.eval_shape(lambda: DenseAttention().init_cache(config, 1, n)))
  budget = cell["budget_bytes"]
  return dict(
    planned_length=n,
    weights_gb=weights / GB,
    kv_bytes_per_token=row / n,
    dense_kv_bytes_per_token=dense_row / n,
    kv_ratio_vs_dense=row / dense_row,
    batch_before_temporaries=int((budget * (1 - RESERVE) - weights - row) // row),
    **facts,
  )


# ----------------------------------------------------------------------------- HF cells


def run_hf_cell(cell: dict) -> dict:
  try:
    import torch
    import transformers
  except ImportError as error:
    return {"skipped": f"torch/transformers not importable here ({error})"}
  cuda = torch.cuda.is_available()
  device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
  p, m = cell["prompt"], cell["new_tokens"]
  hf = dict(cell["hf_config"])
  hf.pop("torch_dtype", None)
  config = transformers.LlamaConfig(**hf)
  result = dict(
    device=torch.cuda.get_device_name() if cuda else "cpu",
    torch=torch.__version__,
    transformers=transformers.__version__,
    planned_length=p + 2 * m,
  )
  budget = cell["budget_bytes"]
  if cuda:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  t0 = time.perf_counter()
  torch.manual_seed(0)
  with torch.device(device):  # random init on the device
    model = transformers.LlamaForCausalLM._from_config(
      config, attn_implementation="sdpa", dtype=dtype
    )
  model.eval()
  sync()
  result["init_s"] = time.perf_counter() - t0
  weights = sum(x.numel() * x.element_size() for x in model.parameters())
  per_token = (
    config.num_hidden_layers
    * 2
    * config.num_key_value_heads
    * config.head_dim
    * (torch.finfo(dtype).bits // 8)
  )
  row = per_token * (p + m)  # the DynamicCache holds exactly the tokens fed
  growth = 1 + 1 / config.num_hidden_layers  # torch.cat copies one layer's cache per step
  batch = min(cell["max_batch"], int((budget * (1 - RESERVE) - weights - row) // (row * growth)))
  result.update(
    weights_gb=weights / GB,
    kv_bytes_per_token=per_token,
    dense_kv_bytes_per_token=per_token,
    kv_ratio_vs_dense=1.0,
  )
  if batch < 1:
    return {**result, "error": "no row fits the budget"}

  ids = torch.randint(3, config.vocab_size, (1, p), device=device)
  with torch.no_grad():
    for _ in range(2):  # warm-up, timed
      sync()
      t = time.perf_counter()
      out = model(ids, use_cache=True, logits_to_keep=1)
      sync()
      seconds = time.perf_counter() - t
    result["prefill_s"] = seconds
    cache = out.past_key_values
    following = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    del out
    row_cache = cache
    while True:
      try:
        cache = copy.deepcopy(row_cache)
        cache.batch_repeat_interleave(batch)  # the prefilled row, B times
        inputs = following.repeat(batch, 1)
        for _ in ("warm-up", "timed"):
          if cache.get_seq_length() > p:
            cache.crop(p - cache.get_seq_length())  # drop the warm-up's tokens
          sync()
          t = time.perf_counter()
          new = model.generate(
            inputs,
            past_key_values=cache,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=m,
            min_new_tokens=m,
            do_sample=False,
            pad_token_id=0,
          )
          sync()
          seconds = time.perf_counter() - t
        break
      except torch.cuda.OutOfMemoryError:
        cache = inputs = None
        torch.cuda.empty_cache()
        if batch == 1:
          raise
        batch = max(1, int(batch * 0.9))
        result["oom_retries"] = result.get("oom_retries", 0) + 1
  result.update(
    batch=batch,
    decode_s=seconds,
    decode_tokens_per_s=batch * m / seconds,
    tpot_ms=1e3 * seconds / m,
    cache_gb=batch * per_token * (p + m) / GB,
    peak_gb=torch.cuda.max_memory_allocated() / GB if cuda else None,
    first_tokens=[int(x) for x in new[0, p + 1 : p + 5]],
  )
  return result


# ----------------------------------------------------------------------------- driver


def error_head(error: Exception) -> str:
  """The exception's type and the first lines of its message (where the cause is)."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: " + " | ".join(lines[:4])[:600]


def gpu_memory_bytes() -> int | None:
  """The first GPU's memory from nvidia-smi (never initialise a framework in the driver)."""
  try:
    out = subprocess.run(
      ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    )
    return int(out.stdout.split()[0]) * 2**20
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    return None


def with_budget(cell: dict, total: int | None) -> dict | None:
  """The cell with its budget in bytes ('card': 95% of the GPU's memory; None without one)."""
  if cell["budget_gb"] == "card":
    return None if total is None else {**cell, "budget_bytes": int(total * 0.95)}
  return {**cell, "budget_bytes": int(cell["budget_gb"] * GB)}


def run_cell(cell: dict, args, total: int | None, timeout: float) -> dict:
  """One cell in a fresh process with its memory budget; its result or why there is none."""
  cell = with_budget(cell, total)
  if cell is None:
    return {"error": "budget 'card' needs a GPU (nvidia-smi)"}
  env = dict(os.environ)
  if total is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(0.95, cell['budget_bytes'] / total):.4f}"
    # Cells of one model share programs (the weights' init, prefill across budgets).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/moa_bench_serving_jax_cache")
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
  python = args.torch_python if cell["method"] == "hf" else sys.executable
  command = [python, os.path.abspath(__file__), "--cell", json.dumps(cell)]
  try:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
  return json.loads(lines[-1][len("RESULT ") :])


def write_results(path: Path, payload: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(payload, indent=1) + "\n")
  os.replace(tmp, path)


def fmt(value, spec=".2f", missing="-"):
  return missing if value is None else format(value, spec)


def table(records: list[dict]) -> str:
  rows = [
    "| model | prompt | budget GB | method | batch | prefill s (1 row) | chunked s "
    "| decode tok/s | TPOT ms | peak GB | KV B/token | KV vs dense | weights GB "
    "| decode temp GB | note |",
    "|" + "---|" * 15,
  ]
  for r in records:
    note = r.get("error") or r.get("skipped") or r.get("chunked_error") or ""
    if r.get("chunked_logits_max_abs_diff") is not None:
      note = (
        note + f" chunked vs one call: max abs logit diff "
        f"{r['chunked_logits_max_abs_diff']:.2g} of {r['logits_max_abs']:.3g}"
      ).strip()
    rows.append(
      f"| {r['model']} | {r['prompt']} | {r['budget_gb']} | {r['method']} "
      f"| {r.get('batch', '-')} | {fmt(r.get('prefill_s'), '.3f')} "
      f"| {fmt(r.get('chunked_prefill_s'), '.3f')} | {fmt(r.get('decode_tokens_per_s'), '.0f')} "
      f"| {fmt(r.get('tpot_ms'), '.1f')} | {fmt(r.get('peak_gb'), '.1f')} "
      f"| {fmt(r.get('kv_bytes_per_token'), '.0f')} | {fmt(r.get('kv_ratio_vs_dense'), '.3f')} "
      f"| {fmt(r.get('weights_gb'), '.1f')} | {fmt(r.get('decode_temp_gb'), '.2f')} "
      f"| {note} |"
    )
  return "\n".join(rows)


def accounting_table(records: list[dict]) -> str:
  rows = [
    "| model | prompt | N | budget GB | method | KV B/token | KV vs dense | vs dense / rho "
    "| weights GB | batch (bytes) |",
    "|" + "---|" * 10,
  ]
  for r in records:
    rho = r.get("planned_kv_density")
    rows.append(
      f"| {r['model']} | {r['prompt']} | {r['planned_length']} | {r['budget_gb']} "
      f"| {r['method']} | {r['kv_bytes_per_token']:.0f} | {r['kv_ratio_vs_dense']:.4f} "
      f"| {fmt(None if rho is None else r['kv_ratio_vs_dense'] / rho, '.4f')} "
      f"| {r['weights_gb']:.2f} | {r['batch_before_temporaries']} |"
    )
  return "\n".join(rows)


def targets(records: list[dict]) -> list[str]:
  """The issue's targets where the run has the cells: MoA at 0.5 vs dense and HF, cache bytes."""
  lines = []
  by_key = {}
  for r in records:
    by_key.setdefault((r["model"], r["prompt"], r["budget_gb"]), {})[r["method"]] = r
  for (model, prompt, budget), cells in by_key.items():
    moa = cells.get("moa-0.5", {}).get("decode_tokens_per_s")
    for base, goal in (("dense", 2.0), ("hf", 6.6)):
      other = cells.get(base, {}).get("decode_tokens_per_s")
      if moa and other:
        lines.append(
          f"{model} {prompt} @ {budget} GB: moa-0.5 / {base} decode tokens/s = "
          f"{moa / other:.2f}x (target >= {goal}x)"
        )
    for method in ("moa-0.5", "moa-0.25"):
      r = cells.get(method, {})
      if r.get("kv_ratio_vs_dense") is not None and r.get("planned_kv_density") is not None:
        ratio = r["kv_ratio_vs_dense"] / float(method.split("-")[1])
        lines.append(
          f"{model} {prompt}: {method} cache bytes = {r['kv_ratio_vs_dense']:.3f} x "
          f"dense GQA = {ratio:.3f} x rho (target <= 1.05)"
        )
  return lines


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.cell:
    cell = json.loads(args.cell)
    try:
      result = run_hf_cell(cell) if cell["method"] == "hf" else run_jax_cell(cell)
    except Exception as error:
      result = {"error": error_head(error)}
    print("RESULT " + json.dumps(result), flush=True)
    return 0
  start = time.perf_counter()
  total = None if args.smoke else gpu_memory_bytes()
  cells = plan_cells(args)
  out = Path(args.out)
  if args.accounting:
    records = []
    for cell in cells:
      keep = {k: cell[k] for k in ("model", "prompt", "new_tokens", "method", "budget_gb")}
      if cell["method"] != "hf" and with_budget(cell, total) is not None:
        records.append({**keep, **accounting(with_budget(cell, total))})
    write_results(
      out,
      dict(command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), records=records),
    )
    print(accounting_table(records))
    return 0
  records = []
  meta = dict(
    command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    gpu_memory_gb=None if total is None else total / GB,
    started=time.time(),
  )
  for cell in cells:
    left = args.time_limit_s - (time.perf_counter() - start)
    keep = {k: cell[k] for k in ("model", "prompt", "new_tokens", "method", "budget_gb")}
    if left < 20:
      record = {**keep, "skipped": "time limit of the run reached"}
    else:
      t = time.perf_counter()
      record = {
        **keep,
        **run_cell(cell, args, total, min(args.cell_timeout_s, left)),
        "cell_s": time.perf_counter() - t,
      }
    records.append(record)
    summary = (
      record.get("error")
      or record.get("skipped")
      or (
        f"batch {record.get('batch')}, {fmt(record.get('decode_tokens_per_s'), '.0f')} tok/s, "
        f"compile s: prefill {fmt(record.get('prefill_compile_s'), '.0f')} chunked "
        f"{fmt(record.get('chunked_prefill_compile_s'), '.0f')} decode "
        f"{fmt(record.get('decode_compile_s'), '.0f')}, cell {record['cell_s']:.0f} s"
      )
    )
    print(
      f"[{time.perf_counter() - start:6.0f} s] {keep['model']} P={keep['prompt']} "
      f"{keep['budget_gb']} GB {keep['method']}: {summary}",
      flush=True,
    )
    write_results(out, {**meta, "records": records})
  print("\n" + table(records))
  for line in targets(records):
    print(line)
  print(f"\nwrote {out} ({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
