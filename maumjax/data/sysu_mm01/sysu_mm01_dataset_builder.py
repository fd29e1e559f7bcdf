"""TFDS builder for SYSU-MM01 (RGB-IR person re-identification), pre-resized with LANCZOS.

Builds without TensorFlow: use `maumjax.data.build` (`file_format='array_record'`) and read
with `tfds.data_source` (protocol.md 7.1).

Splits:
  train:   train + val identities (395 in the release), all six cameras, labels 0..394 in
           ascending original id (AGW).
  query:   every IR image (cams 3, 6) of the 96 test identities, label -1.
  gallery: every RGB image (cams 1, 2, 4, 5) of the test identities, label -1; evaluation
           samples each trial's gallery from this pool (protocol.md 1.9).
Records keep generation order (identity, camera, file), see `layouts.sysu_records`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import tensorflow_datasets as tfds

from maumjax.data import layouts, reid_builder

_CITATION = """\
@inproceedings{wu2017rgb,
  title={RGB-Infrared Cross-Modality Person Re-Identification},
  author={Wu, Ancong and Zheng, Wei-Shi and Yu, Hong-Xing and Gong, Shaogang and Lai, Jianhuang},
  booktitle={ICCV},
  year={2017}
}
@article{wu2020rgb,
  title={RGB-IR Person Re-identification by Cross-Modality Similarity Preservation},
  author={Wu, Ancong and Zheng, Wei-Shi and Gong, Shaogang and Lai, Jianhuang},
  journal={International Journal of Computer Vision},
  volume={128},
  pages={1765--1785},
  year={2020}
}
"""


@dataclasses.dataclass(eq=False)
class SysuMm01Config(reid_builder.ImageConfig):
  """Image size and encoding of a SYSU-MM01 build (see `ImageConfig`)."""


class SysuMm01(reid_builder.ReidBuilder):
  """SYSU-MM01 with train, query and gallery-pool splits."""

  name = "sysu_mm01"
  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = "https://github.com/wuancong/SYSU-MM01"
  CITATION = _CITATION
  ARCHIVE = "SYSU-MM01.zip"
  RELEASE_NOTES = {"1.0.0": "Train (train+val ids), query and gallery pool, LANCZOS resized."}
  BUILDER_CONFIGS = [
      SysuMm01Config(name="288x144", description="AGW family input size (default)."),
      SysuMm01Config(name="384x144", height=384, width=144, description="DEEN input size."),
      SysuMm01Config(name="384x128", height=384, width=128, description="MPANet input size."),
  ]
  DEFAULT_CONFIG_NAME = "288x144"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
SYSU-MM01 is licence-gated. Sign the release agreement (the PDF in the agreement/ folder of
the official repository https://github.com/wuancong/SYSU-MM01) and email it to the dataset
contact named there; they reply with a download link. Extract SYSU-MM01.zip into the manual
directory so that <manual_dir>/SYSU-MM01/cam1 ... cam6 and <manual_dir>/SYSU-MM01/exp/ exist
(the SYSU-MM01 folder itself as manual_dir also works). cam1_2_video.zip is not needed.
For the official gallery sampler, copy rand_perm_cam.mat from evaluation/data_split/ of the
official repository into exp/.
"""

  def _split_records(self, manual_dir: Path) -> tuple[Path, dict[str, list[layouts.Record]]]:
    tree = layouts.scan_sysu_mm01(layouts.find_sysu_root(manual_dir))
    for message in layouts.sysu_count_warnings(tree):
      logging.warning(message)
    return tree.root, {split: layouts.sysu_records(tree, split) for split in layouts.SYSU_SPLITS}
