"""MAUM as a method: parameter groups, phases, ablation rows, banks, masks, bf16, pretrained."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from experiments.configs import maum as maum_configs
from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import api, maum
from maumjax.models import reid as reid_lib
from maumjax.train import step as step_lib
from tests.losses import naive
from tests.models.test_weights import _torchvision_state_dict

C = 4


def _config(row="maum", **model):
  config = maum_configs.get_config("smoke").to_dict()
  config["loss"].update(maum_configs.ROWS[row])
  config["model"].update(model)
  return config


def _data(steps_per_epoch=1, classes_rgb=None, classes_ir=None):
  every = np.ones(C, bool)
  return api.DataInfo(C, (32, 16), steps_per_epoch,
                      every if classes_rgb is None else np.asarray(classes_rgb, bool),
                      every if classes_ir is None else np.asarray(classes_ir, bool))


def _batch(pairs=8, hw=(32, 16), seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(pairs // 2), 2).astype(np.int32)
  return {m: {"image": rng.standard_normal((pairs, *hw, 3)).astype(np.float32),
              "label": labels} for m in ("rgb", "ir")}


def _setup(config, data=None):
  return maum.init(config, data or _data())


def _step(setup, phase):
  return jax.jit(step_lib.method_step(maum, setup, phase,
                                      pipeline=pipeline_lib.PipelineConfig(augment_on="host"),
                                      ctx=api.StepContext()))


def test_maum_implements_the_method_interface():
  assert api.check_method(maum, "maum") is maum


def test_param_groups_split_backbone_from_heads_and_proxies():
  setup = _setup(_config())
  groups = reid_lib.param_groups(setup.state.params)
  flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(groups)}
  assert flat["['model']['rgb']['conv1']['kernel']"] == "backbone"
  assert flat["['model']['ir']['bn1']['scale']"] == "backbone"
  assert flat["['model']['shared']['layer4_0']['conv1']['kernel']"] == "backbone"
  assert flat["['model']['parts_head']['reduce_kernel']"] == "head"
  assert flat["['proxies']['parts']['rgb']"] == "head"


ROW_TERMS = {
    "baseline": {"shared_parts", "triplet"},
    "ms": {"ms_parts", "triplet"},
    "uni": {"ms_parts", "ir_to_rgb_parts", "rgb_to_ir_parts", "triplet"},
    "maum": {"ms_parts", "ir_to_rgb_parts", "rgb_to_ir_parts", "triplet"},
    "bidir": {"ms_parts", "ir_to_rgb_parts", "rgb_to_ir_parts", "triplet"},
}


@pytest.mark.parametrize("row", sorted(ROW_TERMS))
def test_each_ablation_row_trains_its_own_terms(row):
  """The row's terms are computed and weighted explicitly; switched-off parts get no gradient."""
  setup = _setup(_config(row))
  proxies = setup.state.params["proxies"]["parts"]
  assert set(proxies) == ({"shared"} if row == "baseline" else {"rgb", "ir"})
  assert bool(setup.state.method_state) == (row in ("maum", "bidir"))
  phase = maum.phase(setup, 1)
  parts = maum.step_parts(setup, phase, api.StepContext())
  assert set(parts.weights) == ROW_TERMS[row]
  state = setup.state.replace(step=jnp.asarray(1, jnp.int32))  # epoch 1: past uni_start_epoch
  batch = _batch()
  terms, _ = parts.loss(state.params, state, batch, jax.random.PRNGKey(0))
  assert set(terms) == ROW_TERMS[row]

  @jax.jit
  def grad_norms(params):
    """Per term: the norm of its gradient w.r.t. each proxy set and the part-head kernel."""
    out = {}
    for name in ROW_TERMS[row]:
      g = jax.grad(lambda p, n=name: parts.loss(p, state, batch, jax.random.PRNGKey(0))[0][n])(
          params)
      out[name] = {**{k: jnp.linalg.norm(v) for k, v in g["proxies"]["parts"].items()},
                   "features": jnp.linalg.norm(g["model"]["parts_head"]["reduce_kernel"])}
    return out

  norms = jax.device_get(grad_norms(state.params))
  if row == "baseline":
    assert norms["shared_parts"]["shared"] > 0
  else:
    assert norms["ms_parts"]["rgb"] > 0 and norms["ms_parts"]["ir"] > 0
  if "ir_to_rgb_parts" in terms:
    # With the stop-gradient the cross-modality terms train the features only; the bidir
    # control (no stop-gradient) also moves the counterpart proxies.
    for name, counterpart in (("ir_to_rgb_parts", "rgb"), ("rgb_to_ir_parts", "ir")):
      own = "ir" if counterpart == "rgb" else "rgb"
      assert norms[name][own] == 0 and norms[name]["features"] > 0
      assert (norms[name][counterpart] > 0) == (row == "bidir")
  if row not in ("baseline", "maum"):
    return  # the full step is the shared skeleton's: two rows (one per proxy layout) check it
  # One full step: the total is the weighted sum of exactly these terms.
  _, metrics = _step(setup, phase)(state, batch)
  assert set(metrics) - {"loss", "finite", "grad_norm"} == ROW_TERMS[row]
  np.testing.assert_allclose(float(metrics["loss"]),
                             sum(float(metrics[k]) for k in ROW_TERMS[row]), rtol=1e-5)


def test_loss_weights_are_explicit():
  loss = maum.LossConfig(w_ms=0.5, w_uni=2.0, w_tri=3.0)
  assert maum.loss_weights(loss, ("global", "parts"), cross_modal=True) == {
      "ms_global": 0.5, "ms_parts": 0.5, "ir_to_rgb_global": 2.0, "rgb_to_ir_global": 2.0,
      "ir_to_rgb_parts": 2.0, "rgb_to_ir_parts": 2.0, "triplet": 3.0}
  assert maum.loss_weights(loss, ("parts",), cross_modal=False) == {"ms_parts": 0.5,
                                                                     "triplet": 3.0}


def test_phase_zero_computes_no_cross_modality_term():
  config = _config()
  config["loss"].update(uni_start_epoch=2)
  setup = _setup(config, _data(steps_per_epoch=3))
  assert [maum.phase(setup, e) for e in range(4)] == [0, 0, 1, 1]
  p0 = maum.step_parts(setup, 0, api.StepContext())
  assert p0.before is None and p0.after is None  # no bank fill, no bank write
  state, metrics = _step(setup, 0)(setup.state, _batch())
  assert "ir_to_rgb_parts" not in metrics
  for a, b in zip(jax.tree.leaves(state.method_state), jax.tree.leaves(setup.state.method_state)):
    np.testing.assert_array_equal(a, b)  # banks untouched in phase 0
  no_uni = _config()
  no_uni["loss"].update(uni=False, memory_size=0)
  assert maum.phase(_setup(no_uni), 50) == 0


def _phase1_start(steps_per_epoch=2, every=1, size=3):
  config = _config()
  # Unit-norm proxies: their direction moves visibly in one step (free proxies grow to a norm
  # in the hundreds in the first step, after which a step turns them by ~1e-5).
  config["loss"].update(uni_start_epoch=1, memory_size=size, mem_update_every=every,
                        proxy_unit_norm=True)
  setup = _setup(config, _data(steps_per_epoch=steps_per_epoch))
  # Move the proxies away from their init (one phase-0 step), so that a fill from the initial
  # proxies and a fill from the current ones differ.
  state, _ = _step(setup, 0)(setup.state, _batch(seed=1))
  return setup, state.replace(step=jnp.asarray(steps_per_epoch, jnp.int32))


def test_bank_fill_at_the_phase_switch_copies_the_current_proxies():
  setup, state = _phase1_start()
  parts = maum.step_parts(setup, 1, api.StepContext())
  filled = parts.before(state)["parts"]
  for m in ("rgb", "ir"):
    want = naive.unit(np.asarray(state.params["proxies"]["parts"][m]))
    for k in range(filled.rgb.shape[0]):
      np.testing.assert_allclose(np.asarray(getattr(filled, m)[k]), want, rtol=1e-5, atol=1e-6)
  assert int(filled.ptr) == 0
  # Not on a later step of the phase.
  later = state.replace(step=state.step + 1)
  for a, b in zip(jax.tree.leaves(parts.before(later)), jax.tree.leaves(later.method_state)):
    np.testing.assert_array_equal(a, b)


def test_banks_are_written_from_the_post_update_proxies():
  setup, state = _phase1_start()
  new_state, _ = _step(setup, 1)(state, _batch(seed=2))
  bank = new_state.method_state["parts"]
  after = {m: naive.unit(np.asarray(new_state.params["proxies"]["parts"][m]))
           for m in ("rgb", "ir")}
  before = {m: naive.unit(np.asarray(state.params["proxies"]["parts"][m])) for m in ("rgb", "ir")}
  assert int(bank.ptr) == 1
  for m in ("rgb", "ir"):
    slots = np.asarray(getattr(bank, m))
    np.testing.assert_allclose(slots[0], after[m], rtol=1e-5, atol=1e-6)  # the write
    np.testing.assert_allclose(slots[1], before[m], rtol=1e-5, atol=1e-6)  # the fill
    assert np.abs(after[m] - before[m]).max() > 1e-3  # the two really differ


def test_bank_writes_count_from_the_phase_start():
  """mem_update_every=2 with the phase starting at step 3 (odd): writes at steps 3 and 5."""
  setup, state = _phase1_start(steps_per_epoch=3, every=2)
  step = _step(setup, 1)
  ptrs = []
  for i in range(4):  # global steps 3, 4, 5, 6 = phase steps 0, 1, 2, 3
    state, _ = step(state, _batch(seed=10 + i))
    ptrs.append(int(state.method_state["parts"].ptr))
  assert ptrs == [1, 1, 2, 2]


def test_absent_classes_are_masked_out_of_the_references():
  """Class 3 has no infrared image: it is no infrared reference (positive or negative)."""
  config = _config()
  config["loss"].update(triplet=False)
  absent = _data(classes_ir=[True, True, True, False])
  setup = _setup(config, absent)
  batch = _batch()
  batch["rgb"]["label"] = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
  batch["ir"]["label"] = np.array([0, 0, 1, 1, 2, 2, 0, 1], np.int32)
  state = setup.state.replace(step=jnp.asarray(1, jnp.int32))
  parts = maum.step_parts(setup, 1, api.StepContext())
  terms, _ = parts.loss(state.params, state, batch, jax.random.PRNGKey(0))
  out = setup.model.apply({"params": state.params["model"], "batch_stats": state.batch_stats},
                          batch["rgb"]["image"], batch["ir"]["image"], train=True,
                          mutable=["batch_stats"])[0]["parts"]["bn"]
  feats_rgb = np.asarray(out[:8])
  proxies = {m: np.asarray(state.params["proxies"]["parts"][m]) for m in ("rgb", "ir")}
  bank = state.method_state["parts"]
  valid_ir = np.array([True, True, True, False])
  refs_ir = [naive.memory_list(proxies["ir"][h], np.asarray(bank.ir)[:, h])
             for h in range(proxies["ir"].shape[0])]
  want = naive.proxy_term(feats_rgb, batch["rgb"]["label"], refs_ir, ref_valid=valid_ir)
  np.testing.assert_allclose(float(terms["rgb_to_ir_parts"]), want, rtol=2e-4)
  unmasked = naive.proxy_term(feats_rgb, batch["rgb"]["label"], refs_ir)
  assert abs(unmasked - want) > 1e-2  # the mask changes the value
  # Switched off, the untrained infrared proxies are references again.
  config["loss"]["mask_absent_classes"] = False
  off = _setup(config, absent)
  terms_off, _ = maum.step_parts(off, 1, api.StepContext()).loss(
      off.state.params, state, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(terms_off["rgb_to_ir_parts"]), unmasked, rtol=2e-4)
  # With every class present no mask is built at all.
  assert maum.class_masks(maum.LossConfig(), _data()) == (None, None)


def test_unit_norm_proxies_stay_on_the_sphere():
  config = _config()
  config["loss"].update(proxy_unit_norm=True)
  setup = _setup(config)
  norms = np.linalg.norm(np.asarray(setup.state.params["proxies"]["parts"]["rgb"]), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  state, _ = _step(setup, 0)(setup.state, _batch())
  for m in ("rgb", "ir"):
    proxies = np.asarray(state.params["proxies"]["parts"][m])
    np.testing.assert_allclose(np.linalg.norm(proxies, axis=-1), 1.0, rtol=1e-5)
    assert np.abs(proxies - np.asarray(setup.state.params["proxies"]["parts"][m])).max() > 1e-4


def test_bf16_step_matches_the_float32_step():
  """bf16 compute keeps float32 parameters and follows the float32 step within bf16 rounding."""
  results = {}
  for dtype in ("float32", "bfloat16"):
    setup = _setup(_config(dtype=dtype))
    state, metrics = _step(setup, 0)(setup.state, _batch())
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    results[dtype] = (setup.state, state, metrics)
  (s0, s32, m32), (_, s16, m16) = results["float32"], results["bfloat16"]
  # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%); through a tiny ResNet the
  # loss moves by a few percent at most, the parameter updates point the same way.
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.05)
  upd32 = jax.tree.map(lambda a, b: np.asarray(a - b).ravel(), s32.params, s0.params)
  upd16 = jax.tree.map(lambda a, b: np.asarray(a - b).ravel(), s16.params, s0.params)
  u32, u16 = np.concatenate(jax.tree.leaves(upd32)), np.concatenate(jax.tree.leaves(upd16))
  cosine = float(u32 @ u16 / (np.linalg.norm(u32) * np.linalg.norm(u16)))
  assert cosine > 0.95, cosine


def test_init_loads_the_pretrained_backbone_into_both_streams(tmp_path):
  sd = _torchvision_state_dict("tiny", seed=3)
  path = tmp_path / "tiny.safetensors"
  save_file(sd, str(path))
  setup = _setup(_config(pretrained=str(path)))
  params = setup.state.params["model"]
  for stream in ("rgb", "ir"):
    np.testing.assert_array_equal(np.asarray(params[stream]["conv1"]["kernel"]),
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(setup.state.batch_stats["shared"]["layer1_0"]["bn1"]
                                           ["mean"]), sd["layer1.0.bn1.running_mean"])
  assert setup.load_report.sha256 and len(setup.load_report.sha256) == 64

