"""What the SYSU-MM01 and RegDB TFDS builders share: features, info, examples, errors.

A subclass names its homepage, citation and archive, and implements `_split_records`, which
scans the manual dir (raising `LayoutError` before anything is written) and returns the
records of each split. Everything else (the feature schema, keeping generation order, the
LANCZOS re-encode, the missing-manual-dir message, the progress hook) lives here once.
TFDS's "Downloading and preparing dataset ..." and "... downloaded and prepared" lines are
silenced: nothing is downloaded, and `maumjax.data.build` prints its own lines.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from maumjax.data import images, layouts


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that skips the GCS lookup of unprepared datasets.

  The lookup cannot succeed for a licence-gated dataset, and TFDS 4.9.10 leaves an empty
  /tmp/tmp*tfds directory behind on every miss.
  """

  def initialize_from_bucket(self) -> None:
    return


@dataclasses.dataclass(eq=False)
class ImageConfig(tfds.core.BuilderConfig):
  """Image size and encoding of a build.

  Attributes:
    height, width: stored image size (LANCZOS resize of the original, protocol.md 4.1).
    image_format: 'png' (lossless) or 'jpeg' (quality 95, smaller).
  """

  height: int = 288
  width: int = 144
  image_format: str = "png"


class ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the cross-modality re-ID builders (not a dataset itself)."""

  HOMEPAGE: str = ""
  CITATION: str = ""
  ARCHIVE: str = ""  # what to extract into the manual dir, for error messages
  # Set on an instance by `maumjax.data.build`: the caller's manual-dir flag for messages, and
  # a callback counting the examples as they are generated.
  manual_dir_flag: str = layouts.MANUAL_DIR_FLAG
  progress: Callable[[int], None] | None = None

  @abc.abstractmethod
  def _split_records(self, manual_dir: Path) -> tuple[Path, Mapping[str, list[layouts.Record]]]:
    """Scans `manual_dir`; returns the dataset root and the records of every split."""

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return _LocalDatasetInfo(
        builder=self,
        # The builder module's docstring describes its splits.
        description=sys.modules[type(self).__module__].__doc__,
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
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
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
          f"{str(e).split('. ', 1)[0]}; extract {self.ARCHIVE} there or set "
          f"{self.manual_dir_flag} (the README's Data section says how to get it)") from e
    root, splits = self._split_records(Path(manual_dir))
    return {split: self._generate_examples(root, records) for split, records in splits.items()}

  def _generate_examples(self, root: Path,
                         records: Sequence[layouts.Record]) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    for example in images.encoded_examples(
        root, records, height=config.height, width=config.width,
        image_format=config.image_format):
      yield example
      if self.progress is not None:
        self.progress(1)

  def _log_download_bytes(self) -> None:
    """Silences TFDS's "Downloading and preparing dataset ..." line: nothing is downloaded."""

  def _log_download_done(self) -> None:
    """Silences TFDS's "Dataset ... downloaded and prepared" line."""
