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
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from maumjax.data import layouts

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


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that skips the GCS lookup of unprepared datasets.

  The lookup cannot succeed for a licence-gated dataset, and TFDS 4.9.10 leaves an empty
  /tmp/tmp*tfds directory behind on every miss.
  """

  def initialize_from_bucket(self) -> None:
    return


@dataclasses.dataclass(eq=False)
class RegdbConfig(tfds.core.BuilderConfig):
  """Trial, image size and encoding of a RegDB build.

  Attributes:
    trial: 1..10, selects idx/*_{trial}.txt.
    height, width: stored image size (LANCZOS resize of the original).
    image_format: 'png' (lossless) or 'jpeg' (quality 95, smaller).
  """

  trial: int = 1
  height: int = 288
  width: int = 144
  image_format: str = "png"


class Regdb(tfds.core.GeneratorBasedBuilder):
  """RegDB, one trial of Ye et al.'s ten random train/test splits per config."""

  name = "regdb"
  VERSION = tfds.core.Version("1.0.0")
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

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return _LocalDatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(config.height, config.width, 3), encoding_format=config.image_format),
            "identity": np.int32,
            "label": np.int32,
            "camera": np.int32,
            "modality": tfds.features.ClassLabel(names=["visible", "infrared"]),
            "path": tfds.features.Text(),
            "frame": np.int32,
        }),
        homepage="http://dm.dongguk.edu/link.html",
        citation=_CITATION,
        # Without this TFDS shuffles records by key hash at write time (protocol.md 7.4).
        disable_shuffling=True,
    )

  def _split_generators(
      self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[tuple[str, dict]]]:
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:
      # TFDS's message ("Manual directory X does not exist or is empty. ...") names the path.
      raise layouts.LayoutError(
          f"{str(e).split('. ', 1)[0]}; extract RegDB there or set --manual_dir\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from e
    trial = self.builder_config.trial
    tree = layouts.scan_regdb(layouts.find_regdb_root(manual_dir), trials=(trial,))
    for message in layouts.regdb_count_warnings(tree):
      logging.warning(message)
    return {split: self._generate_examples(tree.root, layouts.regdb_records(tree, trial, split))
            for split in layouts.REGDB_SPLITS}

  def _generate_examples(self, root: Path,
                         records: Sequence[layouts.Record]) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    yield from layouts.encoded_examples(
        root, records, height=config.height, width=config.width,
        image_format=config.image_format)
