"""A backbone pretrained on another synthetic population: the synthetic bench's ImageNet.

Every method's paper starts from ImageNet weights; on the built-in synthetic data there is no
ImageNet, and from scratch the unsupervised MMM clusters its tiny network's features by camera,
not by person (README "Training MMM"). This trains a plain torchvision-layout `ResNet` as a
classifier on a synthetic SYSU-MM01 tree drawn with another generator seed (other people: the
bench's data has seed 0), and writes its backbone as a torchvision state dict, which every
method loads through `--config.model.pretrained` like the ImageNet file:

  python -m experiments.pretrain --out=runs/pretrained/tiny.safetensors [--arch=tiny]
      [--num_identities=400] [--seed=1000] [--steps=1500] [--labels=separate] [--nir=0.5]

labels: 'separate' (default) gives each (person, modality) its own class, so the backbone
learns to tell people apart within each modality but is never shown which visible and which
infrared images are the same person (the cross-modal part stays the methods' job); 'visible'
trains on visible images only (closest to ImageNet, which has no infrared images); 'joint'
labels each person across both modalities, so the backbone has seen which visible and infrared
images are the same person, for other people (a labelled source population, more than ImageNet
gives).

The run is a function of its arguments: the same arguments give the same file (on one
machine), and the file is written to a temporary sibling and renamed, so an interrupted run
leaves none. `experiments.compare` calls `pretrain_backbone` once per architecture when its
`pretrained` field is 'synthetic' (its default bench: `labels=joint`, the bench data's `nir`),
into the cache (`cache_file`: a file per config, so later comparisons copy it instead of
training again).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

LABELS = ("separate", "visible", "joint")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """What `pretrain_backbone` trains (defaults: the compare bench's stand-in for ImageNet).

  Attributes:
    arch: a key of `maumjax.models.resnet.ARCHS` (the methods' `model.arch`).
    num_identities: people in the synthetic SYSU-MM01 tree (its train split is used).
    images_per_camera: images per (camera, person) folder.
    seed: the generator seed; not the bench data's (0), so the people differ.
    nir: the generator's near-infrared weight (`maumjax.data.synthetic.write_sysu_mm01`); the
      bench passes its data's, so the cameras are alike while the people differ.
    height, width: the image size the methods train at.
    labels: 'separate' or 'visible' (module docstring).
    steps, batch_size, lr, weight_decay: SGD (Nesterov momentum 0.9) with a cosine decay from
      `lr` to 0 over `steps` steps of `batch_size` images, random horizontal flips.
  """

  arch: str = "tiny"
  num_identities: int = 400
  images_per_camera: int = 10
  seed: int = 1000
  nir: float = 0.0
  height: int = 64
  width: int = 32
  labels: str = "separate"
  steps: int = 1500
  batch_size: int = 64
  lr: float = 0.05
  weight_decay: float = 5e-4

  def check(self) -> None:
    from maumjax.errors import UserError
    from maumjax.models.resnet import ARCHS

    if self.arch not in ARCHS:
      raise UserError(f"arch={self.arch!r} is not a ResNet arch; use one of {sorted(ARCHS)}")
    if self.labels not in LABELS:
      raise UserError(f"labels={self.labels!r}; use one of {LABELS}")
    if self.seed == 0:
      raise UserError("seed=0 draws the bench's own people (the synthetic data's default "
                      "seed); pretrain on another population, e.g. seed=1000")
    if min(self.num_identities, self.steps, self.batch_size) <= 0:
      raise UserError(f"num_identities, steps and batch_size must be positive, got "
                      f"{self.num_identities}, {self.steps}, {self.batch_size}")


def _training_images(config: PretrainConfig):
  """(uint8 images [N, H, W, 3], class per image [N]) of the synthetic tree's train split."""
  import numpy as np

  from maumjax.data import pipeline, prepare

  spec = prepare.SyntheticSpec(num_identities=config.num_identities,
                               images_per_camera=config.images_per_camera,
                               height=2 * config.height, width=2 * config.width,
                               seed=config.seed, nir=config.nir)
  ds = prepare.prepare_dataset("sysu_mm01", height=config.height, width=config.width,
                               synthetic=spec)
  source = pipeline.open_train_source(ds.builder)
  meta = pipeline.read_metadata(source)
  keep = np.ones(len(source), bool) if config.labels != "visible" else meta["modality"] == 0
  index = np.flatnonzero(keep)
  store = pipeline.ImageStore(source, cache_indices=index)
  images = np.stack([store[i] for i in index])
  # 'separate': (person, modality) pairs are the classes; 'visible', 'joint': persons.
  key = meta["label"][index] * 2 + (meta["modality"][index] if config.labels == "separate" else 0)
  return images, np.unique(key, return_inverse=True)[1].astype(np.int32)


def cache_file(config: PretrainConfig) -> Path:
  """Where the backbone of `config` is kept for reuse: `<cache>/pretrained/<arch>_<H>x<W>-<key>
  .safetensors`, the key a hash of every field (a run is a function of its config)."""
  import hashlib

  from maumjax.data import prepare

  blob = json.dumps(dataclasses.asdict(config), sort_keys=True)
  key = hashlib.sha1(blob.encode()).hexdigest()[:10]
  return (prepare.cache_root() / "pretrained"
          / f"{config.arch}_{config.height}x{config.width}-{key}.safetensors")


def pretrain_backbone(out: str | Path, config: PretrainConfig = PretrainConfig()) -> dict[str, Any]:
  """Trains the classifier and writes its backbone (torchvision keys) to `out`.

  Args:
    out: a `.safetensors` or `.npz` path; `<out>.json` receives the summary.

  Returns:
    {'path', 'config', 'images', 'classes', 'train_accuracy' (last 100 steps), 'seconds'}.

  Raises:
    UserError: a bad config field.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from maumjax.data import augment
  from maumjax.models import weights
  from maumjax.models.resnet import ResNet

  config.check()
  out = Path(out)
  if out.suffix not in (".safetensors", ".npz"):
    from maumjax.errors import UserError

    raise UserError(f"--out={out}: write a .safetensors or .npz file")
  start = time.perf_counter()
  images, labels = _training_images(config)
  num_classes = int(labels.max()) + 1
  net = ResNet(config.arch, num_classes=num_classes, last_stride=1)
  mean = jnp.asarray(augment.IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(augment.IMAGENET_STD, jnp.float32) * 255.0
  variables = net.init(jax.random.key(config.seed), jnp.zeros((1, config.height, config.width, 3)),
                       train=False)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(optax.cosine_decay_schedule(config.lr, config.steps),
                             momentum=0.9, nesterov=True))
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y, key):
    x = (x.astype(jnp.float32) - mean) / std
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)

    def loss_fn(p):
      logits, new = net.apply({"params": p, "batch_stats": stats}, x, train=True,
                              mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (new["batch_stats"], jnp.mean(logits.argmax(-1) == y))

    (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, acc

  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  accuracy = []
  for i in range(config.steps):
    batch = rng.integers(0, len(images), config.batch_size)
    key, sub = jax.random.split(key)
    params, stats, opt_state, loss, acc = step(params, stats, opt_state, images[batch],
                                               labels[batch], sub)
    accuracy.append(acc)
    if i % 100 == 0 and not np.isfinite(float(loss)):
      raise FloatingPointError(f"pretraining loss is {float(loss)} at step {i}; lower lr "
                               f"(now {config.lr})")
  state_dict = weights.flax_to_torchvision(jax.device_get({"params": params,
                                                           "batch_stats": stats}))
  out.parent.mkdir(parents=True, exist_ok=True)
  weights.save_state_dict(out, state_dict)
  summary = {"path": str(out), "config": dataclasses.asdict(config), "images": len(images),
             "classes": num_classes,
             "train_accuracy": float(np.mean(jax.device_get(accuracy[-100:]))),
             "seconds": round(time.perf_counter() - start, 1), "sha256": weights.sha256(out)}
  Path(f"{out}.json").write_text(json.dumps(summary, indent=1))
  return summary


def main() -> None:
  from absl import flags

  from experiments import cli

  out_flag = flags.DEFINE_string("out", None, ".safetensors or .npz file to write",
                                 required=True)
  define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
  field_flags = {f.name: define[type(f.default)](f.name, f.default, f"PretrainConfig.{f.name}")
                 for f in dataclasses.fields(PretrainConfig)}

  def _main(argv):
    from absl import app

    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; flags are --name=value")
    config = PretrainConfig(**{name: flag.value for name, flag in field_flags.items()})
    config.check()  # before JAX is imported
    from maumjax import compilation_cache

    compilation_cache.enable()
    print(json.dumps(pretrain_backbone(out_flag.value, config), indent=1))

  cli.run(_main)


if __name__ == "__main__":
  main()
