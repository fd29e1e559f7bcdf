"""End-to-end data preparation: synthetic tree -> TFDS build -> pipeline -> one batch."""

from __future__ import annotations

import pickle
import sys

import numpy as np

from maumjax.data import images
from maumjax.data import pipeline as pipeline_lib
from maumjax.data import prepare as prepare_lib
from maumjax.data import summary

_SPEC = {"num_identities": 10, "images_per_camera": 2, "images_per_modality": 4, "height": 32,
         "width": 16, "seed": 3}


def _data(name="sysu_mm01"):
  return {"name": name, "manual_dir": "", "data_dir": "", "height": 32, "width": 16,
          "trial": 2, "image_format": "png", "synthetic": dict(_SPEC),
          "pipeline": {"num_identities": 2, "num_instances": 2, "num_threads": 1}}


def test_synthetic_sysu_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path))
  text = summary.prepare_and_describe(_data())
  assert "sysu_mm01 (synthetic) config 32x16" in text
  assert "rgb image (4, 32, 16, 3) float32" in text and "ir  image (4, 32, 16, 3)" in text
  prepared = prepare_lib.prepare_from_config(_data())  # second call reuses the cache
  assert prepared.synthetic and prepared.manual_dir.parent == tmp_path / "synthetic"
  n_files = sum(1 for _ in prepared.manual_dir.glob("cam*/*/*.jpg"))
  splits = prepared.builder.info.splits
  # The splits hold every split-listed image; the generator adds unlisted RGB-only folders.
  assert 0 < sum(s.num_examples for s in splits.values()) < n_files
  source = pipeline_lib.open_train_source(prepared.builder)
  meta = pipeline_lib.read_metadata(source)
  np.testing.assert_array_equal(np.unique(meta["label"]), np.arange(meta["label"].max() + 1))
  # Worker processes receive the source pickled: it reopens from the builder folder.
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == len(source) == splits["train"].num_examples
  assert isinstance(clone[5]["image"], bytes) and clone[5]["image"] == source[5]["image"]
  assert images.decode_image(clone[5]["image"]).shape == (32, 16, 3)
  assert "tensorflow" not in sys.modules


def test_synthetic_regdb_trial(tmp_path, monkeypatch):
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path))
  prepared = prepare_lib.prepare_from_config(_data("regdb"))
  assert prepared.builder.builder_config.trial == 2
  splits = prepared.builder.info.splits
  # 10 identities, half train: 5 ids x 4 images x 2 modalities; each test side 5 x 4.
  assert splits["train"].num_examples == 40
  assert splits["test_visible"].num_examples == splits["test_thermal"].num_examples == 20


def test_spec_key_changes_with_parameters():
  a = prepare_lib.SyntheticSpec(**_SPEC)
  b = prepare_lib.SyntheticSpec(**{**_SPEC, "seed": 4})
  assert a.key("sysu_mm01") != b.key("sysu_mm01") != a.key("regdb")


def test_spec_key_of_the_thermal_default_is_unchanged_and_nir_is_checked(tmp_path):
  """nir = 0 keeps the key every tree had before the field existed (caches stay valid); another
  weight gets its own tree; a bad weight, or one for the thermal RegDB, is refused up front."""
  import hashlib
  import json

  import pytest

  blob = json.dumps({"name": "sysu_mm01", **_SPEC, "images_per_modality": 4}, sort_keys=True)
  old_key = f"sysu_mm01-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"
  assert prepare_lib.SyntheticSpec(**_SPEC).key("sysu_mm01") == old_key
  nir = prepare_lib.SyntheticSpec(**_SPEC, nir=0.5)
  assert nir.key("sysu_mm01") != old_key
  with pytest.raises(ValueError, match=r"data.synthetic.nir=1.2 must be in \[0, 1\]"):
    prepare_lib.SyntheticSpec(**_SPEC, nir=1.2)
  with pytest.raises(ValueError, match="SYSU-MM01 layout only"):
    prepare_lib.write_synthetic("regdb", nir, root=tmp_path)
  assert not any(tmp_path.iterdir())
