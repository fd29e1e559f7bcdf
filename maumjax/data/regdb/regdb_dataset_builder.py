"""TFDS builder for RegDB (visible-thermal person re-identification), one config per trial.

Builds without TensorFlow: use `maumjax.data.build` (`file_format='array_record'`) and read
with `tfds.data_source` (protocol.md 7.1). The protocol trains one model per trial (2.5), so
each trial is its own small dataset.

Splits of trial t (from idx/*_{t}.txt, in file order):
  train:        train_visible lines, then train_thermal lines; `label` is the idx label
                (0..205 in the release), the same for both modalities of an identity.
  test_visible: test_visible lines.
  test_thermal: test_thermal lines.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import tensorflow_datasets as tfds

from maumjax.data import layouts, reid_builder

_CITATION = """\
@article{nguyen2017person,
  title={Person Recognition System Based on a Combination of Body Images from Visible Light
         and Thermal Cameras},
  author={Nguyen, Dat Tien and Hong, Hyung Gil and Kim, Ki Wan and Park, Kang Ryoung},
  journal={Sensors},
  volume={17},
  number={3},
  pages={605},
  year={2017}
}
"""


@dataclasses.dataclass(eq=False)
class RegdbConfig(reid_builder.ImageConfig):
  """Trial, image size and encoding of a RegDB build.

  Attributes:
    trial: 1..10, selects idx/*_{trial}.txt.
    height, width, image_format: see `ImageConfig`.
  """

  trial: int = 1


class Regdb(reid_builder.ReidBuilder):
  """RegDB, one trial of Ye et al.'s ten random train/test splits per config."""

  name = "regdb"
  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = "http://dm.dongguk.edu/link.html"
  CITATION = _CITATION
  ARCHIVE = "RegDB"
  RELEASE_NOTES = {"1.0.0": "One config per trial; train, test_visible, test_thermal."}
  BUILDER_CONFIGS = [
      RegdbConfig(name=f"trial_{t}", trial=t, description=f"Trial {t} at 288x144.")
      for t in layouts.REGDB_TRIALS
  ]
  DEFAULT_CONFIG_NAME = "trial_1"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
RegDB is the Dongguk Body-based Person Recognition Database (DBPerson-Recog-DB1). Request it
from Dongguk University with the copyright form (http://dm.dongguk.edu/link.html). The idx/
split files of Ye et al.'s protocol come from the community distribution (the AGW author
shares them on request). Extract so that the manual directory (or its RegDB/ subfolder) holds
  Visible/<pid>/*.bmp   Thermal/<pid>/*.bmp
  idx/train_visible_{t}.txt  idx/train_thermal_{t}.txt
  idx/test_visible_{t}.txt   idx/test_thermal_{t}.txt   for each trial t = 1..10.
"""

  def _split_records(self, manual_dir: Path) -> tuple[Path, dict[str, list[layouts.Record]]]:
    trial = self.builder_config.trial
    tree = layouts.scan_regdb(layouts.find_regdb_root(manual_dir), trials=(trial,))
    for message in layouts.regdb_count_warnings(tree):
      logging.warning(message)
    return tree.root, {split: layouts.regdb_records(tree, trial, split)
                       for split in layouts.REGDB_SPLITS}
