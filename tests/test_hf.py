"""Hugging Face interop: logits parity with `transformers` per family, export/re-import, tokenizers, CLI.

Each family is a randomly initialized `transformers` model with tiny dims and *all* weights random
(norm scales and biases too, which their init leaves at 1 and 0 and which would hide a mapping error),
compared in fp32 on the same token ids: max-abs logit difference ≤ 1e-4, a tolerance never relaxed.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, require, shared_data

try:
  import torch
  import transformers
except ImportError:  # the `test` extra installs both; a user's machine may not have them.
  torch = transformers = None

TOL = 1e-4
VOCAB = 320


@pytest.fixture(autouse=True)
def _need_transformers():
  require(transformers is not None, "torch/transformers not installed (pip install -e '.[test]')")


def _random_hf(config, seed=0):
  torch.manual_seed(seed)
  config._attn_implementation = "eager"  # the plain reference path (sdpa agrees to ~1e-7 as well).
  m = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0.0, 0.2)
  return m


def _configs():
  T = transformers
  small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)
  return {
      # GQA, untied head, Llama 3.1 RoPE scaling with a short original context so it bites at 24 tokens.
      "llama3": T.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=dict(
          rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=16)),
      "llama2_bias_tied": T.LlamaConfig(**small, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=True),
      "llama_linear_rope": T.LlamaConfig(**small, num_key_value_heads=4, rope_parameters=dict(
          rope_type="linear", rope_theta=10000.0, factor=4.0)),
      # MQA, explicit head_dim, sliding window 5 < sequence length 24.
      "mistral": T.MistralConfig(**small, num_key_value_heads=1, head_dim=16, sliding_window=5),
      "qwen2": T.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True),
      # qk-norm, head_dim 24 ≠ 64/4, YaRN.
      "qwen3": T.Qwen3Config(**small, num_key_value_heads=2, head_dim=24, rope_parameters=dict(
          rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)),
  }


def _ids(batch=2, length=24, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def _hf_logits(m, ids):
  with torch.no_grad():
    return m(torch.tensor(ids)).logits.numpy()


def _our_logits(model, ids):
  import jax.numpy as jnp
  return np.asarray(model(jnp.asarray(ids)))


@pytest.mark.parametrize("family", list(_configs()))
def test_logits_match_transformers(family, tmp_path):
  import model.hf as mh
  hf = _random_hf(_configs()[family])
  hf.save_pretrained(tmp_path)
  for scan in (True, False):
    ours, _ = mh.load_hf(tmp_path, compute_dtype="float32", scan_layers=scan)
    err = np.abs(_our_logits(ours, _ids()) - _hf_logits(hf, _ids())).max()
    assert err <= TOL, f"{family} scan_layers={scan}: max |Δlogit| = {err}"
  cfg = ours.cfg
  assert cfg.sliding_window == (5 if family == "mistral" else 0)
  assert cfg.qk_norm == (family == "qwen3") and cfg.qkv_bias == (family == "qwen2")


def test_export_reimport_exact_and_transformers_reads_export(tmp_path):
  import jax
  from flax import nnx

  import model.hf as mh
  hf = _random_hf(_configs()["qwen3"], seed=1)
  hf.save_pretrained(tmp_path / "src")
  tok = _train_hf_tokenizer(tmp_path)
  mh.import_hf(tmp_path / "src", tmp_path / "run", tokenizer=str(tok), compute_dtype="float32")
  # Small shards force the sharded path (index file + several files) on both write and read.
  mh.export_hf(tmp_path / "run", tmp_path / "out", max_shard_bytes=60_000)
  files = sorted(p.name for p in (tmp_path / "out").iterdir())
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
  assert "tokenizer.json" in files

  first, _ = mh.load_hf(tmp_path / "src", compute_dtype="float32")
  again, _ = mh.load_hf(tmp_path / "out", compute_dtype="float32")
  a = jax.tree.leaves(nnx.to_pure_dict(nnx.state(first, nnx.Param)))
  b = jax.tree.leaves(nnx.to_pure_dict(nnx.state(again, nnx.Param)))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
  assert np.abs(_hf_logits(reloaded, _ids()) - _hf_logits(hf, _ids())).max() == 0.0


def test_export_of_a_trained_run_loads_in_transformers(tiny_run, tmp_path):
  """A model trained here (tied embeddings, project SentencePiece tokenizer) → HF Llama, same logits."""
  from model.hf import export_hf
  from model.load import load_model
  export_hf(tiny_run, tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["model_type"] == "llama" and config["eos_token_id"] == 2
  ours, _ = load_model(tiny_run, compute_dtype="float32")
  m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
  # The exported tokenizer.model + tokenizer_config.json give transformers the project's exact ids.
  from data.tokenizer import Tokenizer
  tok = Tokenizer.load(tiny_run / "tokenizer.model")
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  for text in TEXTS + [(shared_data() / "text" / "tinyshakespeare.txt").read_text()[:5000]]:
    assert hf_tok.encode(text) == [tok.bos_id] + tok.encode(text)
  ids = np.random.default_rng(1).integers(0, ours.cfg.vocab_size, (2, 32))
  with torch.no_grad():
    ref = m(torch.tensor(ids)).logits.numpy()
  assert np.abs(_our_logits(ours, ids) - ref).max() <= TOL


def _train_hf_tokenizer(tmp_path):
  """A byte-level BPE tokenizer.json (GPT-2/Llama 3/Qwen style) trained on Tiny Shakespeare."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  path = shared_data() / "text" / "tinyshakespeare.txt"
  require(path.is_file(), f"shared data not found at {path}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(path.read_text().split("\n\n")[:2000], trainer=trainer)
  out = tmp_path / "tokenizer.json"
  tok.save(str(out))
  assert tok.get_vocab_size() <= VOCAB
  return out


TEXTS = ["To be, or not to be: that is the question.", "  leading spaces\n\tand tabs\n\n",
         "naïve café — 東京 🙂", "", "ROMEO:\nBut, soft! what light through yonder window breaks?"]


def test_hf_tokenizer_json_matches_transformers(tmp_path):
  from data.foreign_tokenizer import HFTokenizer
  path = _train_hf_tokenizer(tmp_path)
  ours = HFTokenizer(path.read_bytes(), dict(eos_token_id=0))
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text  # byte-level BPE is lossless.
  assert ours.bos_id == ours.eos_id == 0  # adds no BOS of its own → end-of-text separates (Qwen style).


def test_foreign_sentencepiece_matches_transformers_llama_tokenizer(tmp_path):
  """A SentencePiece model trained with Llama 2's settings (BPE, byte fallback, split digits, dummy
  prefix, no whitespace collapsing) imported as tokenizer.model; sentencepiece itself (what Meta's
  reference code calls) and transformers' LlamaTokenizer are the references."""
  import sentencepiece as spm

  from data.tokenizer import tokenizer_from_meta
  from model.load import make_meta
  text = (shared_data() / "text" / "tinyshakespeare.txt").read_text()[:200_000]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=VOCAB, model_type="bpe", byte_fallback=True, split_digits=True,
                                 add_dummy_prefix=True, remove_extra_whitespaces=False,
                                 normalization_rule_name="identity", minloglevel=2)
  data = (tmp_path / "sp.model").read_bytes()
  tok = tokenizer_from_meta(make_meta({}, data, VOCAB, tokenizer_special=dict(bos_token_id=1, eos_token_id=2)))
  assert type(tok).__name__ == "SentencePieceTokenizer" and (tok.bos_id, tok.eos_id) == (1, 2)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "tokenizer.model").write_bytes(data)
  ref = transformers.LlamaTokenizer.from_pretrained(tmp_path / "tok")
  for t in TEXTS[:1] + TEXTS[2:]:
    assert tok.encode(t) == sp.encode(t) == ref.encode(t, add_special_tokens=False)
    assert tok.decode(tok.encode(t)) == t


def test_imported_run_generates_like_transformers(tmp_path):
  """Import with its tokenizer.json, then greedy text generation through train.sample equals HF generate."""
  from train.sample import generate, generate_ids, load_for_inference

  import model.hf as mh
  hf = _random_hf(_configs()["llama3"], seed=2)
  for c in (hf.config, hf.generation_config):  # the tokenizer's <|im_end|> (id 1) ends text; no BOS.
    c.bos_token_id, c.eos_token_id, c.pad_token_id = None, 1, 0
  hf.save_pretrained(tmp_path / "src")
  (tmp_path / "src" / "tokenizer.json").write_bytes(_train_hf_tokenizer(tmp_path).read_bytes())
  mh.import_hf(tmp_path / "src", tmp_path / "run", compute_dtype="float32")
  model, tok, meta = load_for_inference(tmp_path / "run")
  assert meta["tokenizer_kind"] == "hf_tokenizers" and tok.bos_id == 1  # no BOS of its own → eos.
  prompts = ["ROMEO:", "What light through"]
  texts = generate(model, tok, prompts, max_new_tokens=12, temperature=0.0)
  ref_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "src" / "tokenizer.json"))
  encoded = [[1] + ref_tok.encode(p, add_special_tokens=False) for p in prompts]
  rows = generate_ids(model, encoded, eos_id=1, max_new_tokens=12, temperature=0.0)
  for ids, row, text in zip(encoded, rows, texts):
    with torch.no_grad():
      out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(1)] if 1 in new else new
    assert row == new  # token for token, batched (two prompt lengths) against one-at-a-time HF.
    assert text == ref_tok.decode(new)


def test_cli_errors_are_one_line(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, "-m", "model.hf", *args], cwd=REPO, capture_output=True, text=True)

  r = run("import", f"--src={tmp_path}", f"--out={tmp_path / 'o'}")
  assert r.returncode == 2 and "no tokenizer.json or tokenizer.model" in r.stderr
  (tmp_path / "tokenizer.json").write_text("{}")
  r = run("import", f"--src={tmp_path}", f"--out={tmp_path / 'o'}")
  assert r.returncode == 2 and "no config.json" in r.stderr
  (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gpt2")))
  r = run("import", f"--src={tmp_path}", f"--out={tmp_path / 'o'}")
  assert r.returncode == 2 and "model_type='gpt2' is not supported" in r.stderr
  r = run("export", f"--checkpoint={tmp_path / 'nope'}", f"--out={tmp_path / 'x'}")
  assert r.returncode == 2 and "checkpoint not found" in r.stderr
  assert all(len(x.stderr.strip().splitlines()) == 1 for x in [r])


def test_mismatched_weights_are_named(tmp_path):
  import model.hf as mh
  from model.hf.weights import WeightsError
  hf = _random_hf(_configs()["qwen2"])
  hf.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(WeightsError, match=r"shape .* does not fit config.json"):
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    mh.load_hf(tmp_path)
  with pytest.raises(WeightsError, match="lacks .*lm_head.weight"):
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))
    mh.load_hf(tmp_path)
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_act="gelu")))
    mh.load_hf(tmp_path)
  with pytest.raises(ValueError, match="only some layers"):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        cfg, layer_types=["full_attention", "sliding_attention"], sliding_window=8)))
    mh.load_hf(tmp_path)
