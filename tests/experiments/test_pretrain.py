"""experiments.pretrain: the synthetic bench's stand-in for ImageNet weights, and its use by
experiments.compare (`pretrained='synthetic'`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compare
from experiments import pretrain
from experiments.configs import compare as compare_configs
from maumjax.errors import UserError

TINY = dict(num_identities=16, images_per_camera=2, steps=4, batch_size=8, height=32, width=16)


def _train_split(config: pretrain.PretrainConfig) -> dict[str, np.ndarray]:
  from maumjax.data import pipeline, prepare

  spec = prepare.SyntheticSpec(num_identities=config.num_identities,
                               images_per_camera=config.images_per_camera,
                               height=2 * config.height, width=2 * config.width,
                               seed=config.seed)
  ds = prepare.prepare_dataset("sysu_mm01", height=config.height, width=config.width,
                               synthetic=spec)
  return pipeline.read_metadata(pipeline.open_train_source(ds.builder))


def test_the_labels_choose_images_and_classes(tmp_path, monkeypatch):
  """Counted here from the train split's metadata: 'separate' has a class per (person,
  modality), 'joint' one per person, 'visible' one per person and only visible images."""
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  meta = _train_split(pretrain.PretrainConfig(**TINY))
  persons, visible = len(np.unique(meta["label"])), meta["modality"] == 0
  expected = {"separate": (len(visible), 2 * persons), "joint": (len(visible), persons),
              "visible": (int(visible.sum()), persons)}
  for labels, (images, classes) in expected.items():
    x, y = pretrain._training_images(pretrain.PretrainConfig(labels=labels, **TINY))  # noqa: SLF001
    assert (len(x), int(y.max()) + 1, len(np.unique(y))) == (images, classes, classes), labels
    assert x.shape[1:] == (32, 16, 3) and x.dtype == np.uint8
  # 'joint': an infrared and a visible image of one person share a class.
  x, y = pretrain._training_images(pretrain.PretrainConfig(labels="joint", **TINY))  # noqa: SLF001
  same = meta["label"] == meta["label"][0]
  assert len(np.unique(y[same])) == 1 and len(np.unique(meta["modality"][same])) == 2


def test_the_backbone_file_loads_into_a_method_model(tmp_path, monkeypatch):
  """The file is a strict torchvision backbone for the methods' ReidNet, trained away from
  its init."""
  from maumjax.models import ReidNet, load_backbone
  from maumjax.models.resnet import ResNet

  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  config = pretrain.PretrainConfig(**TINY)
  summary = pretrain.pretrain_backbone(tmp_path / "tiny.safetensors", config)
  assert summary["images"] == len(_train_split(config)["label"])
  assert (tmp_path / "tiny.safetensors.json").is_file()

  model = ReidNet(arch="tiny", specific_stages=1, head="global")
  x = jnp.zeros((1, 32, 16, 3))
  variables = model.init(jax.random.key(0), x, x, train=False)
  loaded, report = load_backbone(variables, tmp_path / "tiny.safetensors", model=model)
  assert report.sha256 == summary["sha256"]
  init = ResNet("tiny", num_classes=summary["classes"]).init(
      jax.random.key(config.seed), x, train=False)
  trained = loaded["params"]["rgb"]["conv1"]["kernel"]
  np.testing.assert_array_equal(trained, loaded["params"]["ir"]["conv1"]["kernel"])
  assert not np.allclose(trained, init["params"]["conv1"]["kernel"])  # four SGD steps


def test_bad_settings_are_refused_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(UserError, match="seed=0 draws the bench's own people"):
    pretrain.pretrain_backbone(tmp_path / "a.npz", pretrain.PretrainConfig(seed=0))
  with pytest.raises(UserError, match="labels='both'"):
    pretrain.pretrain_backbone(tmp_path / "a.npz", pretrain.PretrainConfig(labels="both"))
  with pytest.raises(UserError, match="a.pth: write a .safetensors or .npz"):
    pretrain.pretrain_backbone(tmp_path / "a.pth", pretrain.PretrainConfig(**TINY))
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_compare_makes_one_backbone_per_arch_once(tmp_path, monkeypatch, capsys):
  made = []

  def stand_in(out, config):  # pretraining itself is tested above
    made.append((config.arch, config.height, config.width, config.labels, config.nir))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"weights")
    return {"classes": 2, "train_accuracy": 1.0, "seconds": 0.0}

  monkeypatch.setattr(pretrain, "pretrain_backbone", stand_in)
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  config = compare_configs.get_config("smoke")
  config.methods, config.seeds, config.pretrained = "maum,mpanet", "0,1", "synthetic"
  config.pretrain.labels = "joint"
  config.data.synthetic.nir = 0.25  # the bench data's camera model, other people
  runs = compare.plan(config)
  assert {r.config.model.pretrained for r in runs} == {""}  # set once the workdir is known
  paths = compare.synthetic_backbones(config, runs, tmp_path)
  assert made == [("tiny", 32, 16, "joint", 0.25)]  # both smoke presets: a tiny ResNet at 32x16
  assert {r.config.model.pretrained for r in runs} == {str(paths["tiny_32x16.safetensors"])}
  assert paths["tiny_32x16.safetensors"].read_bytes() == b"weights"
  compare.synthetic_backbones(config, compare.plan(config), tmp_path)
  assert len(made) == 1 and "made earlier" in capsys.readouterr().out
  # Another comparison with the same pretrain fields copies the cached file; other fields
  # (here the generator's near-infrared weight) train their own.
  other = compare.synthetic_backbones(config, compare.plan(config), tmp_path / "other")
  assert len(made) == 1 and other["tiny_32x16.safetensors"].read_bytes() == b"weights"
  assert "from " in capsys.readouterr().out
  config.data.synthetic.nir = 0.5
  compare.synthetic_backbones(config, compare.plan(config), tmp_path / "third")
  assert made[-1] == ("tiny", 32, 16, "joint", 0.5) and len(made) == 2
