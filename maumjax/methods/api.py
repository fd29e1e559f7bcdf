"""The method interface: what a method module gives the shared trainer (`maumjax.train`).

A method is a module listed in `maumjax.methods.METHODS`. The trainer (`train/loop.py`,
`train/step.py`, `train/evaluation.py`) reads `config['method']`, takes the module from that
dict and calls only the functions below; nothing in `train/` names a method. The loop calls
the method; the method never calls the loop.

Required module attributes:

    init(config, data: DataInfo, *, seed: int) -> Setup
        Builds the model, the optimiser and the initial host train state from the plain-dict
        run config (sections model, loss, optim, ...) and the training data's facts. Method
        state that is not optimised (MAUM's proxy banks, MPANet's mean classifiers, MMM's
        cluster memories) goes in `TrainState.method_state`, with fixed shapes (pad to a
        maximum where a count varies, e.g. MMM's clusters), so a checkpoint restores into the
        initial state and the step compiles once per phase.

    phase(setup, epoch: int) -> int
        The training phase of a (0-based) epoch. The trainer compiles one train step per
        distinct phase (`step_parts` is called once per phase), so work that a phase does not
        need (MAUM's cross-modality terms before `uni_start_epoch`, MMM's warm-up) is not
        computed at all. A method with one phase returns 0.

    step_parts(setup, phase: int, ctx: StepContext) -> StepParts
        The method's pieces of the per-device train step for one phase (see `StepParts`);
        `train/step.py` wraps them in the shared skeleton: on-device augmentation, the loss
        and its gradient, the gradient psum over devices, the optax update, the finite guard
        and the metrics.

    embed(setup) -> Callable[[variables, images, modality], features]
        A jitted test-time feature extractor: `images` [B, H, W, 3] float32 (normalised),
        `modality` [B] int (0 visible, 1 infrared) -> [B, D] features for the evaluation
        protocols.

    variables_of(state) -> dict
        The model's inference variables ({'params', 'batch_stats', ...}) from a train state.

Optional:

    on_epoch_start(setup, state, epoch: int, data: EpochData) -> (state, labels | None)
        Host-side work at the start of every epoch, before its first step (MMM re-clusters
        here). `state` is the unreplicated host train state; the returned state replaces it.
        `labels` (int [N] over the train split's records, -1 = not sampled this epoch)
        replaces the training labels from this epoch on: the trainer rebuilds the sampler
        with them, keeps the epoch length (`DataInfo.steps_per_epoch`) and stores them in the
        checkpoint so that a resumed run samples the same batches. None keeps the labels.

    describe_phase(setup, phase: int) -> str | None
        One line the trainer prints when a run enters `phase` (e.g. MAUM: "the
        cross-modality terms join the loss"), so a user who sees the loss jump knows why.

References: the seam sketched in ../shared/STYLE.md §3; fast-reid's dict of named, weighted
losses (`meta_arch/baseline.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import jax
import numpy as np
import optax

from maumjax.train import state as state_lib

REQUIRED = ("init", "phase", "step_parts", "embed", "variables_of")
OPTIONAL = ("on_epoch_start", "describe_phase")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Facts about the training data that a method's `init` may use.

  Attributes:
    num_classes: C, the training identities (labels 0..C-1).
    image_shape: (height, width) of the training images.
    steps_per_epoch: optimiser steps in one epoch (for per-epoch schedules and phases).
    classes_rgb: bool [C], classes with at least one visible training image in use (after
      the modality-imbalance subset).
    classes_ir: bool [C], the same for infrared.
    num_records: N, records of the train split (in use or not): the length of the per-record
      arrays (labels, MMM's per-sample weights).
  """

  num_classes: int
  image_shape: tuple[int, int]
  steps_per_epoch: int
  classes_rgb: np.ndarray
  classes_ir: np.ndarray
  num_records: int = 0

  @classmethod
  def from_labels(cls, labels: np.ndarray, modality: np.ndarray, keep: np.ndarray | None, *,
                  image_shape: tuple[int, int], steps_per_epoch: int) -> DataInfo:
    """From the train split's per-record labels, modalities and in-use mask."""
    labels, modality = np.asarray(labels), np.asarray(modality)
    keep = np.ones(labels.shape, bool) if keep is None else np.asarray(keep, bool)
    num_classes = int(labels[keep].max()) + 1
    present = [np.zeros(num_classes, bool) for _ in range(2)]
    for m in (0, 1):
      chosen = labels[keep & (modality == m)]
      present[m][chosen[chosen >= 0]] = True
    return cls(num_classes, tuple(image_shape), int(steps_per_epoch), present[0], present[1],
               num_records=len(labels))


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a method's `init` builds.

  Attributes:
    model: the Flax module (`maumjax.models.MODELS`).
    tx: the optax transformation.
    state: the initial host train state.
    config: the method's own parsed settings (e.g. MAUM's `LossConfig`), read once.
    data: the `DataInfo` the setup was built for.
    load_report: what loading pretrained weights reported (`models.LoadReport`) or None.
  """

  model: Any
  tx: optax.GradientTransformation
  state: state_lib.TrainState
  config: Any
  data: DataInfo
  load_report: Any = None


@dataclasses.dataclass(frozen=True)
class StepContext:
  """How the per-device step runs: the data axis of its collectives and the device count.

  Attributes:
    axis_name: the mesh / pmap axis of the collectives, or None on one device.
    devices: devices sharing the global batch.
    sync_bn: BatchNorm statistics over the global batch (`bn_axis_name`); False keeps
      per-device batch statistics (the skeleton then averages the running statistics).
  """

  axis_name: str | None = None
  devices: int = 1
  sync_bn: bool = True

  @property
  def bn_axis_name(self) -> str | None:
    """The axis to give BatchNorm layers (None: per-device statistics)."""
    return self.axis_name if self.sync_bn else None

  def gather(self, x: jax.Array) -> jax.Array:
    """All-gathers `x` along axis 0 over devices (identity on one device)."""
    return x if self.axis_name is None else jax.lax.all_gather(x, self.axis_name, axis=0,
                                                               tiled=True)


# loss(params, state, batch, rng) -> ({term: unweighted value}, new batch_stats)
LossFn = Callable[[Any, state_lib.TrainState, Mapping[str, Any], jax.Array],
                  tuple[dict[str, jax.Array], Any]]


@dataclasses.dataclass(frozen=True)
class StepParts:
  """A method's pieces of the train step for one phase.

  Attributes:
    loss: `(params, state, batch, rng) -> (terms, batch_stats)`. `batch` is this device's
      shard after on-device augmentation, `{'rgb': {'image', 'label', ...}, 'ir': {...}}`;
      `state.method_state` is the value `before` returned. The loss gathers what it compares
      across the batch with `StepContext.gather`, so every device computes the loss of the
      global batch. `terms` are the unweighted named terms; `rng` is this step's key
      (`fold_in(state.rng, state.step)`), the same on every device.
    weights: `{term: weight}`, one entry for every term `loss` returns (a term without a
      weight is an error, not a silent default); the total is sum(weight * term).
    before: `state -> method_state`, run before the loss (MAUM's bank fill at the phase
      start, MPANet's mean-classifier EMA); None keeps it.
    after: `(state, new_params, finite) -> (new_params, method_state)`, run after the
      optimiser update with the state as the loss saw it (MAUM's bank write from the updated
      proxies and its optional proxy renormalisation, MMM's memory update); None keeps both.
      `finite` (bool scalar) is False for a step the skeleton will not apply: the method must
      then leave its state as `before` left it (gate its writes with it).
    pixels: the loss also gets each modality's 'raw' (shipped uint8), 'pixels' (augmented
      uint8 before normalisation) and 'aug' (augmentation parameters), for a method that makes
      further inputs on the device (BDF's derivative images; `pipeline.device_augment`).
    aux: the loss returns a third value, `(terms, batch_stats, aux)`, and `after` receives it
      as a fourth argument, `after(state, new_params, finite, aux)`: what the loss computed
      that the state update needs (MMM's memory update from the step's features, computed
      with the pre-update parameters as in the code). `aux` is not differentiated.
  """

  loss: LossFn
  weights: Mapping[str, float]
  before: Callable[[state_lib.TrainState], Any] | None = None
  after: Callable[..., tuple[Any, Any]] | None = None
  pixels: bool = False
  aux: bool = False


@dataclasses.dataclass(frozen=True)
class EpochData:
  """What `on_epoch_start` may read of the training data.

  Attributes:
    metadata: int64 arrays 'label', 'identity', 'camera', 'modality' per train record.
    keep: bool [N] records in use (modality-imbalance subset).
    labels: int [N] the training labels in force (the dataset's, or the last relabelling).
    images: `index -> uint8 [H, W, 3]` decoded train image.
    pipeline: the pipeline config (image normalisation, augmentation presets).
    paths: `() -> str [N]`, the train records' paths in record order (read on first call),
      the key for per-record results stored across runs; None where unknown.
    log: `log(scalars, kind)` writes float scalars to the run's log.jsonl and TensorBoard at
      the current step under `kind` (MMM's pseudo-label diagnostics); None where the process
      writes no log (not the main process, or outside the trainer).
  """

  metadata: Mapping[str, np.ndarray]
  keep: np.ndarray
  labels: np.ndarray
  images: Callable[[int], np.ndarray]
  pipeline: Any
  log: Callable[[Mapping[str, float], str], None] | None = None
  paths: Callable[[], np.ndarray] | None = None


def check_method(module: ModuleType | Any, name: str = "") -> Any:
  """Returns `module` if it has every required function; raises naming the missing ones."""
  missing = [a for a in REQUIRED if not callable(getattr(module, a, None))]
  if missing:
    raise TypeError(f"method {name or module!r} lacks {missing}; a method module defines "
                    f"{REQUIRED} (and optionally {OPTIONAL}), see maumjax/methods/api.py")
  return module


def model_embed(model, embed_method) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """A method's `embed`: jitted `(variables, images [B,H,W,3], modality [B]) -> [B, D]` that
  runs `model.apply(variables, images, modality, method=embed_method)`."""
  return jax.jit(lambda variables, images, modality: model.apply(
      variables, images, modality, method=embed_method))


def model_variables(state: state_lib.TrainState) -> dict[str, Any]:
  """A method's `variables_of` when its model's parameters sit at `state.params['model']`."""
  return {"params": state.params["model"], "batch_stats": state.batch_stats}


def init_model(model, key: jax.Array, inputs: tuple, pretrained: str = "") -> tuple[Any, Any]:
  """A method's model variables: jitted `model.init(key, *inputs, train=False)`, then the
  ImageNet backbone from `pretrained` when given (`weights.load_backbone`).

  Returns:
    (variables, LoadReport or None).
  """
  variables = jax.jit(lambda k: model.init(k, *inputs, train=False))(key)
  if not pretrained:
    return variables, None
  from maumjax.models import weights

  return weights.load_backbone(variables, pretrained, model=model)
