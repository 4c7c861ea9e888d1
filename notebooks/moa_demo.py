# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MoA in JAX: compress a long-context model and compare it with dense and uniform attention
#
# MoA (Mixture of Sparse Attention) gives every attention head its own *elastic rule*: besides
# the first 64 tokens (the attention sink), a head at planned length N attends a sliding window
# of `alpha + beta * N` tokens. Which rule suits which head is decided automatically:
#
# 1. **Calibration**: long prompts whose answers come from the dense model itself.
# 2. **Profile**: `jax.grad` of the response loss against every attention map gives, per head
#    and per 64x64 block, how much masking that block would raise the loss.
# 3. **Optimize**: a HiGHS mixed-integer program picks one rule per KV group, at most two rules
#    per layer, under a KV-cache density budget at several lengths (a Pareto front over the
#    profile lengths).
# 4. **Choose** the Pareto plan with the lowest loss at an unseen, longer length.
#
# This notebook runs the pipeline on moa_jax's own reference model (a 13.8M-parameter Llama
# trained by moa_jax on Python source and synthetic retrieval tasks) and compares dense
# attention, a uniform sliding window (StreamingLLM) and MoA at the same KV density on LongEval
# line retrieval. Every method decodes on its own cache: MoA's is a static per-head cache of
# sink + window slots.
#
# On Colab, clone the moa_jax repository, `%cd` into it and `!pip install -e .` first; the
# notebook reads `configs/` relative to the repository root.

# %%
import os

if not os.path.isdir("configs") and os.path.isdir("../configs"):
  os.chdir("..")  # run from notebooks/: work from the repository root

import json
from pathlib import Path

from IPython.display import Image, Markdown, display

from moa_jax import demo, pipeline
from moa_jax.cli import load_config
from moa_jax.plans.plan import uniform_plan

# 'reference' is the full demo (minutes on a laptop CPU); CI runs the notebook with 'tiny'.
VARIANT = os.environ.get("MOA_NOTEBOOK_VARIANT", "reference")
config = load_config(f"configs/demo.py:{VARIANT}")
workdir = Path(os.environ.get("MOA_NOTEBOOK_WORKDIR", f"runs/notebook-{VARIANT}"))
print(config.model, config.optimize.density, config.eval.lengths)

# %% [markdown]
# ## 1-4. Compress: calibration -> profile -> optimize -> choose
# Each stage writes its outputs atomically under `workdir/compress` and is skipped when it is
# already complete, so re-running this cell is cheap.

# %%
compressed = pipeline.compress(config, workdir / "compress")  # loads the model once, hands it on
plan, model, tokenizer = compressed.plan, compressed.model, compressed.tokenizer
for n in (*config.profile.lengths, *config.optimize.constraint_lengths):
  print(
    f"N={n:5d}  KV density {plan.kv_density(n):.3f}  attention density "
    f"{plan.attention_density(n):.3f}"
  )

# %% [markdown]
# The report: densities, predicted loss increases and validation losses of the Pareto plans, the
# chosen plan's spans per (layer, head), and the Pareto front.

# %%
report = (workdir / "compress" / "report.md").read_text()
display(Markdown(report.split("![")[0]))
for figure in ("spans.png", "pareto_front.png"):
  display(Image(str(workdir / "compress" / "choose" / figure)))

# %% [markdown]
# A uniform window at the same KV density, for comparison:

# %%
n = max(config.eval.lengths)
uniform = uniform_plan(model.config, config.optimize.density, n, sink=config.optimize.sink)
print(
  f"uniform at N={n}: window {uniform.windows(n)[0, 0]} tokens for every head, "
  f"KV density {uniform.kv_density(n):.3f}; MoA windows range "
  f"{plan.windows(n).min()}..{plan.windows(n).max()}"
)

# %% [markdown]
# ## 5. Evaluate: dense vs uniform vs MoA on line retrieval

# %%
result = demo.run(config, workdir, command=f"notebooks/moa_demo.ipynb ({VARIANT})")
print(json.dumps(result["summary"], indent=1))

# %%
display(Image(str(workdir / "accuracy_vs_length.png")))
display(Markdown((workdir / "report.md").read_text()))
