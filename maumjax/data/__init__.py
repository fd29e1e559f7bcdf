"""Data: synthetic cross-modality re-ID trees, TFDS builders, the identity sampler and pipeline.

Modules:
  synthetic   procedurally drawn SYSU-MM01 / RegDB stand-ins in the real on-disk layouts.
  layouts     scanning and validating extracted SYSU-MM01 and RegDB folders.
  sysu_mm01   TFDS builder (array_record, no TensorFlow).
  regdb       TFDS builder, one config per trial.
  build       programmatic build entry point (`python -m maumjax.data.build`).
  sampler     P identities x K visible + K infrared sampler; modality-imbalance subsets.
  augment     augmentation parameters drawn on the host, applied in NumPy or jitted JAX.
  pipeline    Grain pipeline from a TFDS data source to training batches.
  prepare     from a data config to a prepared dataset (synthetic data generated on demand).
  progress    status lines and a tidy progress count for generation and builds.
"""
