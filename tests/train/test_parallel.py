"""One per-device MAUM step under plain jit (1 device), jit + shard_map and pmap (4 devices).

The three must give the same parameters, BN statistics and memory banks after several steps
(maumjax.train.parallel). The batch has 4 identities x 2 images per modality, so each of the 4
simulated devices holds one identity: every cross-sample loss (triplets, proxy metrics) and
BatchNorm would differ if the step did not gather features and synchronise statistics.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from experiments.configs import maum as maum_configs
from maumjax import compilation_cache
from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import api, maum
from maumjax.train import parallel
from maumjax.train import step as step_lib

STEPS = 3


def _config(**loss):
  config = maum_configs.get_config("smoke").to_dict()
  config["loss"].update(uni_start_epoch=1, memory_size=2, **loss)
  config["optim"].update(warmup_epochs=0, lr=0.02, backbone_lr_mult=0.1)
  return config


def _batches(num=STEPS, pairs=8, hw=(32, 16)):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(pairs // 2), 2) + 1  # 4 identities, classes 1..4 of 6
  out = []
  for _ in range(num):
    out.append({m: {"image": rng.standard_normal((pairs, *hw, 3)).astype(np.float32)
                    + (0.5 if m == "ir" else 0.0),
                    "label": labels.astype(np.int32)} for m in ("rgb", "ir")})
  return out


def _data(num_classes=6, steps_per_epoch=1):
  every = np.ones(num_classes, bool)
  return api.DataInfo(num_classes, (32, 16), steps_per_epoch, every, every)


def _ctx(mode, config):
  return api.StepContext(axis_name=None if mode == "none" else parallel.DATA_AXIS,
                         devices=parallel.device_count(mode), sync_bn=config["model"]["sync_bn"])


def _compiled(mode, config):
  """The setup and one compiled step per phase (0 and 1) for `mode`."""
  pipe = pipeline_lib.PipelineConfig(augment_on="host")
  setup = maum.init(config, _data())
  ctx = _ctx(mode, config)
  return setup, {p: parallel.CompiledStep(step_lib.method_step(maum, setup, p, pipeline=pipe,
                                                               ctx=ctx), mode) for p in (0, 1)}


@functools.lru_cache(maxsize=None)
def _shared_compiled(mode):
  """`_compiled(mode, _config())`, built once per module: the tests below that run the default
  config share its traced and compiled steps (a rebuilt step is traced and lowered again)."""
  return _compiled(mode, _config())


@functools.lru_cache(maxsize=None)
def _single_reference():
  """The one-device run of `_batches()` with the default config: (states, losses)."""
  return _run("none", _config(), _batches(), built=_shared_compiled("none"))


def _run(mode, config, batches, start=None, built=None):
  """Trains `batches` in `mode` from `start` (default: the initial state).

  Each step runs the compiled step of its phase (steps_per_epoch=1 and uni_start_epoch=1:
  phase 0 for step 0, phase 1 after). `built` reuses `_compiled(mode, config)`. Returns the
  host state after every step and the losses.
  """
  setup, compiled = built or _compiled(mode, config)
  state = compiled[0].put_state(setup.state if start is None else start)
  states, losses = [], []
  for batch in batches:
    step = compiled[maum.phase(setup, int(compiled[0].get_state(state).step))]
    state, metrics = step(state, step.put_batch(batch))
    losses.append(step.get_metrics(metrics)["loss"])
    states.append(jax.device_get(compiled[0].get_state(state)))
  _run.last = compiled
  return states, losses


def _assert_same(a, b, what):
  """Equal up to float32 reduction order, relative to each leaf's magnitude.

  The proxies start at norm ~1e-3 and the cosine metric's gradient scales with 1/norm, so
  after one step they are in the hundreds; a per-leaf scale keeps one tolerance for all.
  """
  other = dict(jax.tree_util.tree_leaves_with_path(b))
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    x, y = np.asarray(x, np.float64), np.asarray(other[path], np.float64)
    scale = max(float(np.max(np.abs(y))), 1e-3) if y.size else 1.0
    err = float(np.max(np.abs(x - y))) / scale if y.size else 0.0
    assert err < 1e-4, f"{what}: {jax.tree_util.keystr(path)} differs by {err:.1e} x {scale:.1e}"


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_four_devices_match_one_device(mode):
  """Every step on 4 devices equals the same step on one device, from the same state.

  Each step starts from the single-device state before it, so float32 rounding (reduction
  order differs between the modes) is compared at its one-step size instead of amplified
  over steps, whose growth depends on the CPU. The three steps cover phase 0, the phase
  switch with the bank fill, and a bank write.
  """
  assert jax.device_count() == 4, "tests/conftest.py sets 4 simulated CPU devices"
  config = _config()
  batches = _batches()
  single, loss_single = _single_reference()
  assert int(single[-1].step) == STEPS
  built = _shared_compiled(mode)
  for k in range(STEPS):
    [multi], [loss_multi] = _run(mode, config, batches[k:k + 1],
                                 start=single[k - 1] if k else None, built=built)
    np.testing.assert_allclose(loss_multi, loss_single[k], rtol=1e-5)
    assert int(multi.step) == k + 1
    for part in ("params", "batch_stats", "method_state", "opt_state"):
      _assert_same(getattr(multi, part), getattr(single[k], part), f"{part} after step {k + 1}")
  # The banks were filled at step 1 and written after steps 1 and 2: they moved.
  banks = single[-1].method_state["parts"]
  assert int(banks.ptr) == 0
  assert not np.allclose(banks.rgb[0], banks.rgb[1])


@pytest.mark.parametrize("mode", ["none", "shard_map", "pmap"])
def test_train_step_compiles_once_per_phase(mode):
  """Phase 0 and phase 1 (bank fill, then bank writes) each compile once, then never again."""
  batches = _batches(num=5)
  # step 0 in phase 0, step 1 in phase 1
  states, _ = _run(mode, _config(), batches[:2], built=_shared_compiled(mode))
  state, compiled = states[-1], _run.last
  state = compiled[1].put_state(state)
  with compilation_cache.count_compilations() as seen:
    for batch in batches[2:]:
      state, metrics = compiled[1](state, compiled[1].put_batch(batch))
      compiled[1].get_metrics(metrics)
  assert seen.count == 0
  if mode != "pmap":
    assert compiled[0].step._cache_size() == 1 and compiled[1].step._cache_size() == 1


def test_compilation_counter_sees_a_retrace():
  """The counter can fail: a new input shape is a new program."""
  f = jax.jit(lambda x: x * 2)
  f(np.ones(3, np.float32))
  with compilation_cache.count_compilations() as seen:
    f(np.ones(3, np.float32))
    assert seen.count == 0
    f(np.ones(4, np.float32))
  assert seen.count == 1


def test_without_gathering_the_result_would_differ(monkeypatch):
  """The check above can fail: per-device losses (no gather) give different parameters."""
  config = _config()
  batches = _batches(num=1)
  [single], _ = _run("none", config, batches, built=_shared_compiled("none"))
  monkeypatch.setattr(api.StepContext, "gather", lambda self, x: x)  # per-device losses only
  [multi], _ = _run("shard_map", config, batches)
  with pytest.raises(AssertionError, match="differs by"):
    _assert_same(multi.params, single.params, "params")


def test_batch_not_divisible_by_devices_is_a_clear_error():
  compiled = parallel.CompiledStep(lambda s, b: (s, {}), "shard_map")
  with pytest.raises(ValueError, match="divisible by the device count"):
    compiled.put_batch({"x": np.zeros((6, 2))})
