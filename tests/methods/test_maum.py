"""MAUM method glue: parameter groups, ablation rows, pretrained loading, bf16 steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from experiments.configs import maum as maum_configs
from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import maum
from tests.models.test_weights import _torchvision_state_dict


def _config(row="maum", **model):
  config = maum_configs.get_config("smoke").to_dict()
  config["loss"].update(maum_configs.ROWS[row])
  config["model"].update(model)
  return config


def _batch(pairs=8, hw=(32, 16)):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(pairs // 2), 2).astype(np.int32)
  return {m: {"image": rng.standard_normal((pairs, *hw, 3)).astype(np.float32),
              "label": labels} for m in ("rgb", "ir")}


def _step(config, steps_per_epoch=1):
  setup = maum.init(config, num_classes=4, image_shape=(32, 16), steps_per_epoch=steps_per_epoch)
  step = maum.make_train_step(setup, steps_per_epoch=steps_per_epoch,
                              pipeline=pipeline_lib.PipelineConfig(augment_on="host"),
                              axis_name=None, devices=1)
  return setup, jax.jit(step)


def test_param_groups_split_backbone_from_heads_and_proxies():
  setup = maum.init(_config(), num_classes=4, image_shape=(32, 16), steps_per_epoch=1)
  groups = maum.param_groups(setup.state.params)
  flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(groups)}
  assert flat["['model']['rgb']['conv1']['kernel']"] == "backbone"
  assert flat["['model']['ir']['bn1']['scale']"] == "backbone"
  assert flat["['model']['shared']['layer4_0']['conv1']['kernel']"] == "backbone"
  assert flat["['model']['parts_head']['reduce_kernel']"] == "head"
  assert flat["['proxies']['parts']['rgb']"] == "head"


@pytest.mark.parametrize("row,terms", [
    ("baseline", {"shared_parts", "triplet", "loss"}),
    ("ms", {"ms_parts", "triplet", "loss"}),
    ("uni", {"ms_parts", "ir_to_rgb_parts", "rgb_to_ir_parts", "triplet", "loss"}),
    ("maum", {"ms_parts", "ir_to_rgb_parts", "rgb_to_ir_parts", "triplet", "loss"}),
])
def test_each_ablation_row_trains_its_own_terms(row, terms):
  setup, step = _step(_config(row))
  assert set(setup.state.params["proxies"]["parts"]) == (
      {"shared"} if row == "baseline" else {"rgb", "ir"})
  assert bool(setup.state.memory) == (row == "maum")
  state, metrics = step(setup.state, _batch())
  assert set(metrics) - {"finite", "grad_norm"} == terms
  assert int(state.step) == 1 and float(metrics["finite"]) == 1.0


def test_cross_modality_terms_are_weighted_zero_before_uni_start_epoch():
  config = _config()
  config["loss"].update(uni_start_epoch=1, triplet=False)
  setup, step = _step(config, steps_per_epoch=2)
  _, m0 = step(setup.state, _batch())  # epoch 0: L = L_ms only
  np.testing.assert_allclose(float(m0["loss"]), float(m0["ms_parts"]), rtol=1e-6)
  later = setup.state.replace(step=jnp.asarray(2, jnp.int32))  # epoch 1
  _, m1 = step(later, _batch())
  np.testing.assert_allclose(float(m1["loss"]), float(m1["ms_parts"] + m1["ir_to_rgb_parts"]
                                                       + m1["rgb_to_ir_parts"]), rtol=1e-5)


def test_bf16_compute_keeps_float32_parameters():
  setup, step = _step(_config(dtype="bfloat16"))
  state, metrics = step(setup.state, _batch())
  assert np.isfinite(float(metrics["loss"]))
  dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_init_loads_the_pretrained_backbone_into_both_streams(tmp_path):
  sd = _torchvision_state_dict("tiny", seed=3)
  path = tmp_path / "tiny.safetensors"
  save_file(sd, str(path))
  setup = maum.init(_config(pretrained=str(path)), num_classes=4, image_shape=(32, 16),
                    steps_per_epoch=1)
  params = setup.state.params["model"]
  for stream in ("rgb", "ir"):
    np.testing.assert_array_equal(np.asarray(params[stream]["conv1"]["kernel"]),
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(setup.state.batch_stats["shared"]["layer1_0"]["bn1"]
                                           ["mean"]), sd["layer1.0.bn1.running_mean"])
  assert setup.load_report.sha256 and len(setup.load_report.sha256) == 64
