"""Input-pipeline throughput: training images per second delivered to the host.

  python -m experiments.benchmarks.input_pipeline --workers=0 --threads=2 \
      --height=288 --width=144 --augment_on=host --cache=none

Builds (once, cached) the synthetic SYSU-MM01-layout data at the requested size, or reads
`--manual_dir`, then times `--steps` batches of the P x K sampler after `--warmup` batches.
Each step holds 2*P*K images (P*K visible + P*K infrared). Prints a table and one JSON line.
With `--augment_on=device` the figure excludes the augmentation, which then runs inside the
jitted train step; `--device_apply` adds a jitted `device_augment` call per batch (on the
default JAX device) to the timed loop, so the two placements can be compared end to end.
"""

from __future__ import annotations

import os
import platform
import time

from absl import app, flags

from experiments.benchmarks import report

_WORKERS = flags.DEFINE_integer("workers", 0, "Grain worker processes (0: threads only).")
_THREADS = flags.DEFINE_integer("threads", 2, "Grain read threads.")
_HEIGHT = flags.DEFINE_integer("height", 288, "Stored/training image height.")
_WIDTH = flags.DEFINE_integer("width", 144, "Stored/training image width.")
_AUG_ON = flags.DEFINE_enum("augment_on", "host", ["host", "device"], "Augmentation placement.")
_AUG = flags.DEFINE_string("augment", "agw", "Augmentation preset for both modalities.")
_CACHE = flags.DEFINE_enum("cache", "none", ["none", "ram"], "Decoded-image RAM cache.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps first.")
_P = flags.DEFINE_integer("num_identities", 8, "P identities per step.")
_K = flags.DEFINE_integer("num_instances", 4, "K images per identity per modality.")
_IDS = flags.DEFINE_integer("synthetic_identities", 40, "Identities of the synthetic data.")
_MANUAL = flags.DEFINE_string("manual_dir", "", "Real SYSU-MM01 folder ('' = synthetic).")
_DEVICE_APPLY = flags.DEFINE_bool("device_apply", False,
                                  "With augment_on=device, also run the jitted augmentation.")


def main(argv):
  del argv
  from maumjax.data import pipeline as pipeline_lib
  from maumjax.data import prepare as prepare_lib

  prepared = prepare_lib.prepare_dataset(
      "sysu_mm01", manual_dir=_MANUAL.value or None, height=_HEIGHT.value, width=_WIDTH.value,
      synthetic=prepare_lib.SyntheticSpec(num_identities=_IDS.value))
  source = pipeline_lib.open_train_source(prepared.builder)
  cfg = pipeline_lib.PipelineConfig(
      num_identities=_P.value, num_instances=_K.value, augment_rgb=_AUG.value,
      augment_ir=_AUG.value, augment_on=_AUG_ON.value, cache=_CACHE.value,
      num_threads=_THREADS.value, num_workers=_WORKERS.value, prefetch=max(2, _THREADS.value))
  t0 = time.perf_counter()
  pipe = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1)
  setup_s = time.perf_counter() - t0
  apply = None
  if _DEVICE_APPLY.value and cfg.augment_on == "device":
    import jax
    apply = jax.jit(lambda b: pipeline_lib.device_augment(b, cfg))
  epochs = (_WARMUP.value + _STEPS.value) // pipe.steps_per_epoch + 1
  it = pipe.iterator(num_epochs=epochs)

  def consume():
    batch = next(it)
    if apply is not None:
      import jax
      jax.block_until_ready(apply(batch))

  for _ in range(_WARMUP.value):
    consume()
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    consume()
  elapsed = time.perf_counter() - t0
  it.close()
  per_step = 2 * pipe.local_batch
  result = {
      "benchmark": "input_pipeline",
      "device": f"cpu:{os.cpu_count()} cores ({platform.processor() or platform.machine()})",
      "commit": report.commit(),
      "height": _HEIGHT.value, "width": _WIDTH.value, "batch": per_step,
      "workers": _WORKERS.value, "threads": _THREADS.value, "augment": _AUG.value,
      "augment_on": cfg.augment_on, "device_apply": apply is not None, "cache": cfg.cache,
      "data": "user" if _MANUAL.value else "synthetic", "steps": _STEPS.value,
      "images_per_s": round(_STEPS.value * per_step / elapsed, 1),
      "setup_s": round(setup_s, 2),
  }
  report.emit(result)


if __name__ == "__main__":
  app.run(main)
