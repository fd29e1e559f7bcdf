"""The method interface: a method the trainer has never seen plugs in through METHODS alone.

`_toy` below is a complete method written only against `maumjax.methods.api`: a triplet loss,
a state counter that its `on_epoch_start` hook bumps, and a relabelling from epoch 1 on (as
MMM's per-epoch clustering does). The loop must run it, apply the hook's state and labels,
checkpoint both and resume to the same parameters. The import-graph test checks that
nothing in `maumjax/train/` names a method and that no modules import each other in a cycle.
"""

from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import maum as maum_configs
from maumjax import losses, methods, models
from maumjax.methods import api
from maumjax.models import reid
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import loop
from maumjax.train import optim
from maumjax.train import state as state_lib
from maumjax.train import writers

PACKAGE = Path(__file__).resolve().parents[2] / "maumjax"


def _relabel(labels: np.ndarray) -> np.ndarray:
  """Pairs of identities merged; every 7th record left out (-1)."""
  out = labels // 2
  out[::7] = -1
  return out


def _toy_module() -> types.ModuleType:
  toy = types.ModuleType("toy")

  def init(config, data, *, seed=0):
    model = models.model_from_config(config["model"])
    dummy = jnp.zeros((2, *data.image_shape, 3))
    variables = model.init(jax.random.PRNGKey(seed), dummy, dummy, train=False)
    tx = optim.make_optimizer(optim.OptimConfig(**config["optim"]), data.steps_per_epoch,
                              reid.param_groups)
    state = state_lib.TrainState.create(
        params={"model": variables["params"]}, batch_stats=variables["batch_stats"], tx=tx,
        method_state={"hook_calls": jnp.zeros((), jnp.int32)}, seed=seed)
    return api.Setup(model=model, tx=tx, state=state, config=None, data=data)

  def phase(setup, epoch):
    return 0

  def step_parts(setup, phase_, ctx):
    model = setup.model.clone(axis_name=ctx.bn_axis_name)

    def loss(params, state, batch, rng):
      out, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats},
                                 batch["rgb"]["image"], batch["ir"]["image"], train=True,
                                 mutable=["batch_stats"])
      feats = ctx.gather(out["parts"]["pre"].reshape(out["parts"]["pre"].shape[0], -1))
      labels = jnp.concatenate([ctx.gather(batch["rgb"]["label"]),
                                ctx.gather(batch["ir"]["label"])]).astype(jnp.int32)
      terms = {"triplet": losses.batch_hard_triplet(feats, labels, margin=0.3),
               "max_label": jnp.max(labels).astype(jnp.float32)}  # logged, weight 0
      return terms, updates["batch_stats"]

    return api.StepParts(loss=loss, weights={"triplet": 1.0, "max_label": 0.0})

  def on_epoch_start(setup, state, epoch, data):
    calls = {"hook_calls": state.method_state["hook_calls"] + 1}
    labels = _relabel(np.asarray(data.metadata["label"])) if epoch >= 1 else None
    assert data.images(0).dtype == np.uint8 and len(data.keep) == len(data.labels)
    return state.replace(method_state=calls), labels

  def embed(setup):
    return jax.jit(lambda v, x, m: setup.model.apply(v, x, m, method=reid.ReidNet.embed))

  def variables_of(state):
    return {"params": state.params["model"], "batch_stats": state.batch_stats}

  for fn in (init, phase, step_parts, on_epoch_start, embed, variables_of):
    setattr(toy, fn.__name__, fn)
  return toy


@pytest.fixture
def toy(monkeypatch, tmp_path_factory):
  monkeypatch.setitem(methods.METHODS, "toy", _toy_module())
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "toy_cache"))


def _config():
  config = maum_configs.get_config("smoke")
  config.method = "toy"
  config.train.update(checkpoint_every_steps=0, eval_every_epochs=0, keep_checkpoints=3)
  # Suite time: 4 images per camera folder (18 steps per epoch instead of 43; the relabelled
  # data's own sampler length still differs from it) and one evaluation setting; the
  # evaluation's numbers are not what this file checks.
  config.data.synthetic.images_per_camera = 4
  config.eval.update(trials=1, modes=("all",), shots=(1,))
  return config


def test_a_new_method_trains_relabels_and_resumes(toy, tmp_path):
  full = tmp_path / "full"
  result = loop.train_and_evaluate(_config(), full)
  spe, steps = result["run"]["steps_per_epoch"], result["run"]["steps"]
  assert result["run"]["method"] == "toy" and steps == 2 * spe  # the epoch length is kept
  rows = writers.read_log(full, "train")
  num_classes = result["run"]["num_classes"]
  epoch0 = [r["max_label"] for r in rows if r["epoch"] == 0]
  epoch1 = [r["max_label"] for r in rows if r["epoch"] == 1]
  assert max(epoch0) > (num_classes - 1) // 2  # the dataset's labels
  assert max(epoch1) <= (num_classes - 1) // 2  # the hook's merged labels
  for r in rows:
    np.testing.assert_allclose(r["loss"], r["triplet"], rtol=1e-6)  # weight 0 is weight 0
  with checkpoint_lib.Checkpointer(full) as ckpt:
    meta = ckpt.read_meta()
    final = ckpt.restore_arrays()
  assert int(final["method_state"]["hook_calls"]) == 2  # the hook's state was kept
  assert meta["iterator_start_epoch"] == 1
  np.testing.assert_array_equal(meta["labels"], _relabel(_dataset_labels(full)))

  # Stop in the middle of the relabelled epoch, resume: the same parameters.
  part = tmp_path / "part"
  assert loop.train_and_evaluate(_config(), part, max_steps=spe + 3)["stopped_at_step"] == spe + 3
  loop.train_and_evaluate(_config(), part)
  with checkpoint_lib.Checkpointer(part) as ckpt:
    resumed = ckpt.restore_arrays()
  assert int(resumed["method_state"]["hook_calls"]) == 2  # not re-run in mid-epoch
  for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(final["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _dataset_labels(workdir: Path) -> np.ndarray:
  from maumjax.train import inputs

  _, _, pipe, _ = inputs.prepare(json.loads((workdir / "config.json").read_text()))
  return np.asarray(pipe.metadata["label"])


def test_bad_relabelling_is_a_clear_error(toy, monkeypatch, tmp_path):
  monkeypatch.setattr(methods.METHODS["toy"], "on_epoch_start",
                      lambda setup, state, epoch, data: (state, np.zeros(3, np.int64)))
  with pytest.raises(ValueError, match=r"toy.on_epoch_start returned labels of shape \(3,\)"):
    loop.train_and_evaluate(_config(), tmp_path)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown method 'nope'; choose one of \('maum',"):
    methods.get("nope")
  with pytest.raises(ValueError, match=r"model.name='nope'; choose one of \('reid', 'mpanet', 'bdf'\)"):
    models.model_from_config({"name": "nope"})
  with pytest.raises(TypeError, match=r"lacks \['phase'"):
    api.check_method(types.SimpleNamespace(init=print), "half")


def _imports(path: Path, modules) -> set[str]:
  """The maumjax modules `path` imports (module level and inside functions).

  `from pkg import sub` depends on the submodule `pkg.sub`, not on `pkg`'s __init__ (a
  submodule's parent package is always imported first; that is not a dependency).
  """
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        found.add(sub if sub in modules else node.module)
  return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules[name] = path
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_train_names_no_method_and_no_module_imports_in_a_cycle():
  graph = _graph()
  method_modules = {f"maumjax.methods.{name}" for name in methods.METHODS}
  for name, deps in graph.items():
    if name.startswith("maumjax.train"):
      assert not deps & method_modules, f"{name} imports {deps & method_modules}"
  # Depth-first search for a cycle.
  state = {}

  def visit(node, path):
    state[node] = "open"
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        cycle = path[path.index(dep):] + [dep]
        raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
      if dep not in state:
        visit(dep, path + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  # The check can fail: the loop -> evaluation -> loop cycle this interface removed is found.
  graph["maumjax.train.evaluation"].add("maumjax.train.loop")
  state.clear()
  with pytest.raises(AssertionError, match="import cycle"):
    for node in sorted(graph):
      if node not in state:
        visit(node, [node])
