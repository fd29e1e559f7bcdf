"""maumjax: visible-infrared cross-modality person re-identification in JAX/Flax.

Subpackages:
  maumjax.data   synthetic data, TFDS builders for SYSU-MM01 and RegDB, sampler, input pipeline.
"""

__version__ = "0.1.0.dev0"
