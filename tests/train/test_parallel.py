"""One per-device MAUM step under plain jit (1 device), jit + shard_map and pmap (4 devices).

The three must give the same parameters, BN statistics and memory banks after several steps
(maumjax.train.parallel). The batch has 4 identities x 2 images per modality, so each of the 4
simulated devices holds one identity: every cross-sample loss (triplets, proxy metrics) and
BatchNorm would differ if the step did not gather features and synchronise statistics.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments.configs import maum as maum_configs
from maumjax import compilation_cache
from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import maum
from maumjax.train import parallel

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


def _run(mode, config, batches):
  pipe = pipeline_lib.PipelineConfig(augment_on="host")
  setup = maum.init(config, num_classes=6, image_shape=(32, 16), steps_per_epoch=1)
  devices = parallel.device_count(mode) if mode != "none" else 1
  step = maum.make_train_step(setup, steps_per_epoch=1, pipeline=pipe,
                              axis_name=None if mode == "none" else parallel.DATA_AXIS,
                              devices=devices, sync_bn=config["model"]["sync_bn"])
  compiled = parallel.CompiledStep(step, mode)
  state = compiled.put_state(setup.state)
  losses = []
  for batch in batches:
    state, metrics = compiled(state, compiled.put_batch(batch))
    losses.append(compiled.get_metrics(metrics)["loss"])
  _run.last = compiled
  return jax.device_get(compiled.get_state(state)), losses


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
  assert jax.device_count() == 4, "tests/conftest.py sets 4 simulated CPU devices"
  config = _config()
  batches = _batches()
  single, loss_single = _run("none", config, batches)
  multi, loss_multi = _run(mode, config, batches)
  np.testing.assert_allclose(loss_multi, loss_single, rtol=1e-4)
  assert int(multi.step) == int(single.step) == STEPS
  _assert_same(multi.params, single.params, "params")
  _assert_same(multi.batch_stats, single.batch_stats, "batch_stats")
  _assert_same(multi.memory, single.memory, "memory")
  _assert_same(multi.opt_state, single.opt_state, "opt_state")
  # The banks were filled at step 1 and written after steps 1 and 2: they moved.
  assert int(single.memory["parts"].ptr) == 0
  assert not np.allclose(single.memory["parts"].rgb[0], single.memory["parts"].rgb[1])


@pytest.mark.parametrize("mode", ["none", "shard_map", "pmap"])
def test_train_step_compiles_once(mode):
  """Five steps (phase switch and bank fill included) trace and compile the step once."""
  batches = _batches(num=5)
  state, _ = _run(mode, _config(), batches[:1])
  compiled = _run.last
  state = compiled.put_state(state)
  with compilation_cache.count_compilations() as seen:
    for batch in batches[1:]:
      state, metrics = compiled(state, compiled.put_batch(batch))
      compiled.get_metrics(metrics)
  assert seen.count == 0
  if mode != "pmap":
    assert compiled.step._cache_size() == 1


def test_compilation_counter_sees_a_retrace():
  """The counter can fail: a new input shape is a new program."""
  f = jax.jit(lambda x: x * 2)
  f(np.ones(3, np.float32))
  with compilation_cache.count_compilations() as seen:
    f(np.ones(3, np.float32))
    assert seen.count == 0
    f(np.ones(4, np.float32))
  assert seen.count == 1


def test_without_gathering_the_result_would_differ():
  """The check above can fail: per-device losses (no gather) give different parameters."""
  config = _config()
  batches = _batches(num=1)
  single, _ = _run("none", config, batches)
  original = parallel.gather
  try:
    parallel.gather = lambda x, axis_name: x  # per-device losses only
    multi, _ = _run("shard_map", config, batches)
  finally:
    parallel.gather = original
  with pytest.raises(AssertionError, match="differs by"):
    _assert_same(multi.params, single.params, "params")


def test_batch_not_divisible_by_devices_is_a_clear_error():
  compiled = parallel.CompiledStep(lambda s, b: (s, {}), "shard_map")
  with pytest.raises(ValueError, match="divisible by the device count"):
    compiled.put_batch({"x": np.zeros((6, 2))})
