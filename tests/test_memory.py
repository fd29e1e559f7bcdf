"""Proxy memory banks (spec maum.md §5.4, §12): FIFO order, intervals, EMA, jit, no gradient."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax import losses, memory

H, C, D = 2, 3, 4

_update = jax.jit(memory.update_bank, static_argnames=("mode", "every", "momentum"))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _proxies(seed):
  rng = np.random.default_rng(seed)
  return (3 * rng.normal(size=(H, C, D))).astype(np.float32), rng.normal(size=(H, C, D)).astype(
    np.float32
  )


def test_init_fills_every_slot_with_unit_rows():
  p_rgb, p_ir = _proxies(0)
  bank = memory.init_bank(p_rgb, p_ir, 4)
  assert bank.rgb.shape == bank.ir.shape == (4, H, C, D)
  assert bank.ptr.dtype == jnp.int32 and int(bank.ptr) == 0
  np.testing.assert_allclose(np.linalg.norm(bank.rgb, axis=-1), 1.0, rtol=1e-6)
  for k in range(4):
    np.testing.assert_allclose(bank.rgb[k], _unit(p_rgb), rtol=1e-6)
    np.testing.assert_allclose(bank.ir[k], _unit(p_ir), rtol=1e-6)
  assert memory.init_bank(p_rgb, p_ir, 0) is None
  assert memory.update_bank(None, p_rgb, p_ir, step=1) is None
  assert memory.fill_bank(None, p_rgb, p_ir) is None
  assert memory.bank_bytes(bank) == 2 * 4 * H * C * D * 4 + 4
  with pytest.raises(ValueError, match="size to 1"):
    memory.init_bank(p_rgb, p_ir, 2, mode="ema")
  with pytest.raises(ValueError, match=r"'lru'.*\['fifo', 'ema'\]"):
    memory.init_bank(p_rgb, p_ir, 2, mode="lru")


def test_fifo_order_and_wraparound():
  k = 3
  bank = memory.init_bank(*_proxies(0), k)
  written = {}
  for step in range(1, 6):  # five writes into three slots
    p_rgb, p_ir = _proxies(step)
    bank = _update(bank, p_rgb, p_ir, step=step)
    written[step] = (_unit(p_rgb), _unit(p_ir))
    assert int(bank.ptr) == step % k
    slot = (step - 1) % k
    np.testing.assert_allclose(bank.rgb[slot], written[step][0], rtol=1e-6)
    np.testing.assert_allclose(bank.ir[slot], written[step][1], rtol=1e-6)
  # After steps 1..5 the slots hold steps [4, 5, 3]: the last K snapshots.
  for slot, step in enumerate([4, 5, 3]):
    np.testing.assert_allclose(bank.rgb[slot], written[step][0], rtol=1e-6)
    np.testing.assert_allclose(bank.ir[slot], written[step][1], rtol=1e-6)


def test_every_skips_steps():
  bank = memory.init_bank(*_proxies(0), 2)
  history = [np.asarray(bank.rgb)]
  for step in range(1, 7):
    bank = _update(bank, *_proxies(step), step=step, every=3)
    history.append(np.asarray(bank.rgb))
  # Writes at steps 3 (slot 0) and 6 (slot 1) only.
  for step in (1, 2, 4, 5):
    np.testing.assert_array_equal(history[step], history[step - 1])
  np.testing.assert_allclose(history[3][0], _unit(_proxies(3)[0]), rtol=1e-6)
  np.testing.assert_allclose(history[6][1], _unit(_proxies(6)[0]), rtol=1e-6)
  np.testing.assert_array_equal(history[6][0], history[3][0])
  assert int(bank.ptr) == 0


def test_ema_formula():
  mu = 0.9
  bank = memory.init_bank(*_proxies(0), 1, mode="ema")
  expected = _unit(_proxies(0)[1].astype(np.float64))
  for step in range(1, 4):
    p_rgb, p_ir = _proxies(step)
    bank = _update(bank, p_rgb, p_ir, step=step, mode="ema", momentum=mu)
    expected = _unit(mu * expected + (1 - mu) * _unit(p_ir.astype(np.float64)))
    np.testing.assert_allclose(bank.ir[0], expected, rtol=1e-5, atol=1e-6)
    assert int(bank.ptr) == 0
  with pytest.raises(ValueError, match="size to 1"):
    memory.update_bank(memory.init_bank(*_proxies(0), 2), *_proxies(1), step=1, mode="ema")


def test_fill_resets_and_keeps_shapes():
  bank = memory.init_bank(*_proxies(0), 3)
  bank = _update(bank, *_proxies(1), step=1)
  refilled = jax.jit(memory.fill_bank)(bank, *_proxies(7))
  assert int(refilled.ptr) == 0
  chex.assert_trees_all_equal_shapes_and_dtypes(refilled, bank)
  chex.assert_trees_all_close(refilled, memory.init_bank(*_proxies(7), 3), rtol=1e-6)


def test_traced_step_compiles_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step_fn(bank, p_rgb, p_ir, step):
    return memory.update_bank(bank, p_rgb, p_ir, step=step, every=2)

  bank = memory.init_bank(*_proxies(0), 2)
  for step in range(1, 6):
    bank = step_fn(bank, *_proxies(step), jnp.asarray(step, jnp.int32))
  # Writes at steps 2 and 4: slots 0 and 1.
  np.testing.assert_allclose(bank.rgb[0], _unit(_proxies(2)[0]), rtol=1e-6)
  np.testing.assert_allclose(bank.rgb[1], _unit(_proxies(4)[0]), rtol=1e-6)


@pytest.mark.parametrize("mode,size", [("fifo", 2), ("ema", 1)])
def test_no_gradient_reaches_proxies_through_the_bank(mode, size):
  p_rgb, p_ir = _proxies(0)
  bank = memory.init_bank(p_rgb, p_ir, size, mode=mode)

  def total(p_rgb, p_ir):
    new = memory.update_bank(bank, p_rgb, p_ir, step=1, mode=mode)
    init = memory.init_bank(p_rgb, p_ir, size, mode=mode)
    return jnp.sum(new.rgb) + jnp.sum(new.ir) + jnp.sum(init.rgb) + jnp.sum(init.ir)

  grads = jax.jit(jax.grad(total, argnums=(0, 1)))(p_rgb, p_ir)
  np.testing.assert_array_equal(grads[0], 0.0)
  np.testing.assert_array_equal(grads[1], 0.0)


def test_bank_feeds_the_unidirectional_loss():
  """A bank holding distinct snapshots feeds both directions as the NumPy reference says.

  The bank is filled from one set of proxies and then written with another, so its slots
  differ from each other and from the current proxies; the references are checked against the
  loop-based formula of tests/losses/naive.py (spec §5.4: current proxies plus K snapshots).
  """
  from tests.losses import naive

  p_rgb, p_ir = _proxies(0)
  bank = memory.init_bank(p_rgb, p_ir, 2)
  bank = _update(bank, *_proxies(1), step=0)  # slot 0 now holds other proxies
  cur_rgb, cur_ir = _proxies(2)  # and the current proxies are a third set
  rng = np.random.default_rng(5)
  feats_rgb, feats_ir = rng.normal(size=(2, 4, H, D)).astype(np.float32)
  labels_rgb, labels_ir = np.array([0, 1, 2, 0]), np.array([2, 1, 0, 1])

  @jax.jit
  def loss(bank):
    return losses.unidirectional_loss(feats_rgb, labels_rgb, feats_ir, labels_ir, cur_rgb, cur_ir,
                                      bank.rgb, bank.ir)

  got = loss(bank)
  bank_rgb, bank_ir = np.asarray(bank.rgb), np.asarray(bank.ir)
  assert not np.allclose(bank_rgb[0], bank_rgb[1])
  refs_rgb = [naive.memory_list(cur_rgb[h], bank_rgb[:, h]) for h in range(H)]
  refs_ir = [naive.memory_list(cur_ir[h], bank_ir[:, h]) for h in range(H)]
  np.testing.assert_allclose(got["ir_to_rgb"], naive.proxy_term(feats_ir, labels_ir, refs_rgb),
                             rtol=1e-4)
  np.testing.assert_allclose(got["rgb_to_ir"], naive.proxy_term(feats_rgb, labels_rgb, refs_ir),
                             rtol=1e-4)
  # Without the bank the value differs (the snapshots really are references).
  plain = [naive.memory_list(cur_rgb[h], None) for h in range(H)]
  assert abs(float(got["ir_to_rgb"]) - naive.proxy_term(feats_ir, labels_ir, plain)) > 1e-3
