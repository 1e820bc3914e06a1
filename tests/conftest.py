"""Test setup: 8 fake CPU devices (set before JAX is imported) and the shared-data locator.

Under CI (env CI set) a missing dataset or dependency fails the test instead of skipping it, so a green
run means every test really ran.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))


def require(condition: bool, reason: str) -> None:
  """Skip on a user's machine, fail under CI, when something a test needs is absent."""
  if condition:
    return
  if os.environ.get("CI"):
    pytest.fail(f"required under CI: {reason}")
  pytest.skip(reason)


def flash_mask(qp, kp, qs, ks, *, window: int, causal: bool):
  """[B, 1, T, S] visibility under the flash kernels' rule (`model.layers.attention.make_mask`, without its
  causal term when causal=False): a negative position or segment id is padding, seeing and seen by nothing."""
  import jax.numpy as jnp

  from model.layers.attention import make_mask
  if causal:
    mask = make_mask(qp, kp, qs, ks, sliding_window=window)
  else:
    mask = jnp.ones((qp.shape[0], 1, qp.shape[1], kp.shape[1]), bool)
    if window:
      mask &= (kp[:, None, :] > qp[:, :, None] - window)[:, None]
    if qs is not None:
      mask &= (qs[:, :, None] == ks[:, None, :])[:, None]
  qreal = (qp >= 0) if qs is None else (qp >= 0) & (qs >= 0)
  kreal = (kp >= 0) if ks is None else (kp >= 0) & (ks >= 0)
  return mask & qreal[:, None, :, None] & kreal[:, None, None, :]


def flash_reference(q, k, v, qp, kp, qs, ks, *, window: int, causal: bool):
  """The flash kernels' reference: XLA attention in fp32 under `flash_mask`, in q's dtype; rows that see
  no key are 0 (XLA would average all values there)."""
  import jax
  import jax.numpy as jnp
  mask = flash_mask(qp, kp, qs, ks, window=window, causal=causal)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  out = jax.nn.dot_product_attention(f32(q), f32(k), f32(v), mask=mask, implementation="xla")
  return jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0.0).astype(q.dtype)


def random_transformer(cfg, seed: int):
  """A random `Transformer(cfg)`: N(0, init_std) weights and unit norm scales drawn by NumPy (the
  initializers' per-shape XLA compiles take ~0.4 s each on a loaded 2-core machine; this needs none)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from model.transformer import Transformer
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw_leaf(path, s):
    value = np.ones(s.shape) if path[-1].key == "scale" else rng.normal(0, cfg.init_std, s.shape)
    return jnp.asarray(value, s.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw_leaf, nnx.to_pure_dict(state)))


def packed_batch(b: int, t: int, vocab: int, seed: int) -> dict:
  """A random [b, t] training batch with two packed documents per row: segment ids 1 | 2, positions
  restarting at the boundary, no loss across it (the layout tests' common input)."""
  import numpy as np
  r = np.random.default_rng(seed)
  x = r.integers(0, vocab, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0).astype(np.int32)
  mask = np.ones((b, t), np.float32)
  mask[:, t // 2 - 1] = 0
  return dict(inputs=x[:, :-1], targets=x[:, 1:], segment_ids=seg, positions=pos, loss_mask=mask)


def train_on_mesh(mesh: dict, *, preset: str = "tiny,smoke", steps: int = 3, batch=(8, 32), overrides=()) -> dict:
  """`steps` jitted train steps of `configs/lm.py:<preset>` (vocab 500) on a mesh {axis: size} (axes not
  named are 1) over the first devices, on `packed_batch(*batch, vocab, step)`: losses, params (NumPy),
  the final state and metrics, the setup and the step function (for sharding and HLO checks)."""
  import jax
  import numpy as np

  from train import sharding
  from train.config import model_config, parse_args, resolve
  from train.state import init_state, make_setup
  from train.step import make_train_step
  cfg, _ = parse_args([f"--config=configs/lm.py:{preset}", "--config.mesh.data=1",
                       *[f"--config.mesh.{k}={v}" for k, v in mesh.items()], *overrides])
  resolve(cfg, 500)
  n = int(np.prod([cfg.mesh[a] for a in sharding.MESH_AXES]))
  setup = make_setup(cfg, model_config(cfg), sharding.make_mesh(cfg.mesh, jax.devices()[:n]))
  state = init_state(setup, 0)
  fn = make_train_step(setup, cfg, tuple(batch))
  losses = []
  for i in range(steps):
    state, metrics = fn(state, packed_batch(*batch, setup.model_cfg.vocab_size, i))
    losses.append(float(metrics["loss"]))
  return dict(losses=losses, params=jax.tree.map(np.asarray, state["params"]), state=state, metrics=metrics,
              setup=setup, cfg=cfg, fn=fn)


@pytest.fixture
def shared_data_dir() -> pathlib.Path:
  path = shared_data()
  require(path.is_dir(), f"shared data not found at {path} (set SHARED_DATA)")
  return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
  """A run directory of the `tiny,smoke` preset (seq 64, max_seq_len 256) trained 100 steps on Tiny
  Shakespeare paragraphs, once per pytest worker (~20 s on 2 cores): for tests that need a real
  checkpoint + tokenizer (scoring, evaluation, lm-eval, export)."""
  import json

  from train.config import parse_args
  from train.loop import run
  src = shared_data() / "text" / "tinyshakespeare.txt"
  require(src.exists(), f"shared data not found at {src} (set SHARED_DATA)")
  root = tmp_path_factory.mktemp("tiny_run")
  corpus = root / "shakespeare.jsonl"
  with open(corpus, "w") as f:
    for i, p in enumerate(p for p in src.read_text().split("\n\n") if p.strip()):
      f.write(json.dumps({"id": f"p{i}", "text": p}) + "\n")
  cfg, _ = parse_args(["--config=configs/lm.py:tiny,smoke", f"--config.data.sources=text={corpus}",
                       f"--config.run.dir={root / 'run'}", f"--config.data.cache_dir={root / 'cache'}",
                       "--config.train.progress=false", "--config.checkpoint.async_save=false",
                       "--config.train.steps=100", "--config.checkpoint.every=100",
                       "--config.train.eval_every=100", "--config.sample.max_new_tokens=4"])
  run(cfg)
  return root / "run"


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
  """A project SentencePiece tokenizer (vocab 1024, chat control tokens) trained in under a second on
  200 KB of Tiny Shakespeare and ~200 KB of GSM8K: for chat-format and SFT data tests."""
  import json

  from data.tokenizer import Tokenizer, train_tokenizer
  root = shared_data()
  shakespeare, gsm = root / "text" / "tinyshakespeare.txt", root / "math" / "gsm8k_train.jsonl"
  require(shakespeare.exists() and gsm.exists(), f"shared data not found at {root} (set SHARED_DATA)")
  texts = [shakespeare.read_text()[:200_000]]
  with open(gsm) as f:
    for line in f:
      row = json.loads(line)
      texts.append(f"{row['question']}\n{row['answer']}")
      if sum(map(len, texts)) > 400_000:
        break
  path = train_tokenizer(texts, 1024, tmp_path_factory.mktemp("tok") / "tok.model", seed=0,
                         num_threads=1)
  return Tokenizer.load(path)
