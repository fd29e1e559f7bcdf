"""MMM's cluster memory: ClusterNCE and the momentum update against NumPy loops (the order of
samples sharing a label matters), padding rows, outliers, and no gradient into the memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax import memory


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _setup(seed=0, b=7, c=5, d=6):
  rng = np.random.default_rng(seed)
  mem = _unit(rng.normal(size=(c, d))).astype(np.float32)
  feats = (3.0 * rng.normal(size=(b, d))).astype(np.float32)  # raw: not unit norm
  labels = np.array([0, 2, 2, 4, -1, 1, 2])[:b]
  return mem, feats, labels


def test_cluster_nce_is_the_mean_ce_of_normalised_features():
  mem, feats, labels = _setup()
  mem = np.concatenate([mem, np.zeros((2, mem.shape[1]), np.float32)])  # two padding rows
  got = jax.jit(memory.cluster_nce_loss)(feats, labels, mem)
  x = _unit(feats.astype(np.float64))
  logits = x @ mem[:5].T.astype(np.float64) / 0.05  # padding rows are no classes
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  want = np.mean([-logp[i, y] for i, y in enumerate(labels) if y >= 0])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g_mem = jax.grad(lambda m: memory.cluster_nce_loss(feats, labels, m))(mem)
  assert float(jnp.abs(g_mem).max()) == 0.0
  g_x = jax.grad(lambda f: memory.cluster_nce_loss(f, labels, mem))(feats)
  assert float(jnp.abs(g_x[4]).max()) == 0.0 and float(jnp.abs(g_x[0]).max()) > 0  # -1 row


def _numpy_sequential(mem, feats, labels, m):
  mem = mem.astype(np.float64).copy()
  for x, y in zip(_unit(feats.astype(np.float64)), labels):
    if y >= 0:
      mem[y] = _unit(m * mem[y] + (1 - m) * x)
  return mem


def test_sequential_update_follows_batch_order():
  mem, feats, labels = _setup(1)
  got = jax.jit(memory.update_cluster_memory)(mem, feats, labels)
  np.testing.assert_allclose(got, _numpy_sequential(mem, feats, labels, 0.1), atol=1e-6)
  # Label 2 appears three times: reversing the batch gives another row 2 (the last one
  # dominates with m = 0.1), and the same result as the loop on the reversed batch.
  rev = memory.update_cluster_memory(mem, feats[::-1], labels[::-1])
  np.testing.assert_allclose(rev, _numpy_sequential(mem, feats[::-1], labels[::-1], 0.1),
                             atol=1e-6)
  assert np.abs(np.asarray(rev[2]) - np.asarray(got[2])).max() > 1e-2
  np.testing.assert_allclose(rev[0], got[0], atol=1e-6)  # single-sample rows agree
  np.testing.assert_array_equal(got[3], mem[3])  # untouched row
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_per_label_mean_update():
  mem, feats, labels = _setup(2)
  got = memory.update_cluster_memory(mem, feats, labels, momentum=0.3, mode="per_label_mean")
  x = _unit(feats.astype(np.float64))
  want = mem.astype(np.float64).copy()
  for c in set(labels) - {-1}:
    want[c] = _unit(0.3 * mem[c] + 0.7 * x[labels == c].mean(0))
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="unknown cluster-memory update"):
    memory.update_cluster_memory(mem, feats, labels, mode="ema")


def _numpy_mmd(x, y):
  z = np.concatenate([x, y]).astype(np.float64)
  n, b = len(z), len(x)
  sq = ((z[:, None] - z[None]) ** 2).sum(-1)
  bw = sq.sum() / (n * n - n) / 4.0
  k = sum(np.exp(-sq / (bw * 2.0 ** i)) for i in range(5))
  return np.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def test_mmd_against_numpy_and_the_stop_gradients():
  from maumjax import losses

  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 8)).astype(np.float32)
  y = (rng.normal(size=(4, 8)) + 0.5).astype(np.float32)
  np.testing.assert_allclose(jax.jit(losses.mmd_loss)(x, y), _numpy_mmd(x, y), rtol=1e-5)
  assert float(losses.mmd_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
  # The bandwidth carries no gradient: the analytic gradient with bw held fixed matches.
  eps = 1e-3
  g = np.asarray(jax.grad(lambda a: losses.mmd_loss(a, jax.lax.stop_gradient(y)))(x))

  def fixed_bw(a):
    z = np.concatenate([a, y]).astype(np.float64)
    sq = ((z[:, None] - z[None]) ** 2).sum(-1)
    zx = np.concatenate([x, y]).astype(np.float64)
    bw = ((zx[:, None] - zx[None]) ** 2).sum() / 56 / 4.0
    k = sum(np.exp(-sq / (bw * 2.0 ** i)) for i in range(5))
    return np.mean(k[:4, :4] + k[4:, 4:] - k[:4, 4:] - k[4:, :4])

  num = np.zeros_like(x, np.float64)
  for idx in [(0, 0), (2, 5), (3, 7)]:
    d = np.zeros_like(x, np.float64)
    d[idx] = eps
    num[idx] = (fixed_bw(x + d) - fixed_bw(x - d)) / (2 * eps)
    np.testing.assert_allclose(g[idx], num[idx], rtol=2e-2, atol=1e-5)
  # The target's gradient is the caller's to stop.
  gy = jax.grad(lambda b: losses.mmd_loss(x, jax.lax.stop_gradient(b)))(y)
  assert float(jnp.abs(gy).max()) == 0.0


def test_self_mimic_forms():
  from maumjax import losses

  rng = np.random.default_rng(4)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  protos = rng.normal(size=(3, 5)).astype(np.float32)
  labels = np.array([0, 0, 1, 2, 2, 1])
  w = rng.uniform(size=6).astype(np.float32)
  l1 = losses.self_mimic_loss(x, labels, protos, w)
  np.testing.assert_allclose(l1, np.mean(np.abs(x - protos[labels]).mean(1) * w), rtol=1e-6)
  l2 = losses.self_mimic_loss(x, labels, protos, w, form="l2sq")
  np.testing.assert_allclose(l2, np.mean(((x - protos[labels]) ** 2).sum(1)), rtol=1e-6)
  g = jax.grad(lambda p: losses.self_mimic_loss(x, labels, p, w))(protos)
  assert float(jnp.abs(g).max()) == 0.0  # prototypes are targets


def test_inter_modality_mmd_groups_identities():
  from maumjax import losses

  rng = np.random.default_rng(5)
  p, k, d = 3, 4, 6
  v1, v2, r = (rng.normal(size=(p * k, d)).astype(np.float32) for _ in range(3))
  code = losses.inter_modality_mmd([v1, v2], r, num_ids=p)
  want = sum(np.mean([_numpy_mmd(v[c * k:(c + 1) * k], r[c * k:(c + 1) * k]) * 2
                      for c in range(p)]) for v in (v1, v2))
  np.testing.assert_allclose(code, want, rtol=1e-5)
  paper = losses.inter_modality_mmd([v1, v2], r, num_ids=p, norm="paper")
  np.testing.assert_allclose(paper, want / 4, rtol=1e-5)
  # Each side is pulled towards a stop-gradient copy of the other: the gradient of the pair
  # D(a, sg b) + D(b, sg a) is that of D(a, b) (the bandwidth aside) -- both sides get one.
  gv, gr = jax.grad(lambda a, b: losses.inter_modality_mmd([a], b, num_ids=p),
                    argnums=(0, 1))(v1, r)
  assert float(jnp.abs(gv).max()) > 0 and float(jnp.abs(gr).max()) > 0
  with pytest.raises(ValueError, match="num_ids"):
    losses.inter_modality_mmd([v1], r, num_ids=5)


def test_clean_probability_picks_the_low_loss_component():
  from maumjax import cluster

  rng = np.random.default_rng(6)
  clean = rng.normal(0.2, 0.05, 80)
  noisy = rng.normal(2.0, 0.2, 20)
  view1 = np.concatenate([clean, noisy])
  view2 = view1[::-1] * 3.0  # another scale: each vector is normalised on its own
  w1, w2 = cluster.clean_probability(view1, view2)
  assert w1.shape == (100,) and w2.shape == (100,)
  assert w1[:80].min() > 0.9 and w1[80:].max() < 0.1
  assert w2[20:].min() > 0.9 and w2[:20].max() < 0.1
