"""The train-step benchmark and the PyTorch reference: helpers, and tiny runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import torch_reference, train_step

REPO = Path(__file__).resolve().parents[2]
TINY = ["--arch=tiny", "--height=32", "--width=16", "--num_parts=2", "--part_dim=16",
        "--num_classes=8", "--num_instances=2", "--batches=16", "--steps=2", "--warmup=1",
        "--compilation_cache"]


def _run(args: list[str], tmp_path: Path) -> dict:
  """Runs the benchmark in a subprocess; returns the JSON of its last output line.

  Torch gets one thread: its OpenMP threads stall for whole time slices when another process
  holds one of the CI machine's two cores.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.train_step", *TINY,
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flops_of_matches_hand_counts():
  m, k, n = 32, 48, 16
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert train_step.flops_of(compiled.cost_analysis()) == 2 * m * n * k
  # A VALID conv: every output element is kh*kw*c_in multiply-adds.
  x, w = jnp.ones((2, 9, 7, 3)), jnp.ones((3, 3, 3, 5))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  assert train_step.flops_of(conv.lower(x, w).compile().cost_analysis()) == (
      2 * 2 * 7 * 5 * 5 * 3 * 3 * 3)
  assert train_step.flops_of([{"flops": 3.0}, {"flops": 4.0}]) == 7.0
  assert train_step.flops_of(None) is None and train_step.flops_of({"flops": 0.0}) is None


def test_peak_table_states_its_source():
  peak, source = train_step.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")
  assert peak == 989.4 and "H100 SXM" in source
  assert train_step.peak_tflops("NVIDIA H200", "float32")[0] == 494.7
  assert train_step.peak_tflops("NVIDIA H100 PCIe", "bfloat16")[0] == 756.0
  assert train_step.peak_tflops("cpu", "bfloat16") == (None, None)


def test_synthetic_batch_has_the_sampler_structure():
  batch = train_step.synthetic_batch(8, 16, 8, num_instances=4, num_classes=10,
                                     augment_on="device")
  labels = batch["rgb"]["label"]
  np.testing.assert_array_equal(labels, batch["ir"]["label"])
  assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]
  assert batch["ir"]["image"].dtype == np.uint8 and batch["ir"]["image"].shape == (8, 16, 8, 3)
  assert set(batch["rgb"]["aug"]) >= {"crop_y", "crop_x", "flip"}
  with pytest.raises(ValueError, match="multiple"):
    train_step.synthetic_batch(6, 16, 8, num_instances=4, num_classes=10, augment_on="host")


@pytest.mark.torch
def test_torch_reference_matches_the_maumjax_model_and_runs():
  torch = pytest.importorskip("torch", exc_type=ImportError)
  from maumjax.models import reid, resnet
  from maumjax.train import state as state_lib

  for name, spec in resnet.ARCHS.items():
    assert torch_reference.ARCHS[name] == (spec.block, spec.layers, spec.width)
  model = reid.ReidNet(arch="tiny", num_parts=2, part_dim=16)
  image = jnp.zeros((2, 32, 16, 3))
  variables = jax.eval_shape(lambda k: model.init(k, image, image, train=False),
                             jax.random.PRNGKey(0))
  net, loss = torch_reference.build_model("tiny", num_parts=2, part_dim=16, num_classes=8)
  trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
  assert trainable == state_lib.num_params(variables["params"])
  assert loss.bank_rgb.shape == (8, 2, 8, 16)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # see _run
  try:
    result = torch_reference.run("tiny", 16, 32, 16, "bfloat16", compile=False, steps=2,
                                 warmup=1, num_classes=8, device="cpu", num_parts=2,
                                 part_dim=16, num_instances=2)
  finally:
    torch.set_num_threads(threads)
  assert result["benchmark"] == "torch_reference" and result["images_per_s"] > 0
  assert np.isfinite(result["loss"]) and result["torch_version"] == torch.__version__


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_backbone_gets_last_stride_one(arch, monkeypatch):
  """The torchvision branch (used where torchvision is installed, as on the GPU image).

  torchvision is not installable on the CPU machines, so a stand-in module serves
  `torchvision.models.<arch>(weights=None)`: the built-in torchvision-layout ResNet with
  torchvision's own last stride 2, which `build_model` must change to 1 in place.
  """
  torch = pytest.importorskip("torch", exc_type=ImportError)
  import types

  monkeypatch.setitem(sys.modules, "torchvision", None)
  builtin, _ = torch_reference.build_model(arch, num_parts=2, part_dim=8, num_classes=4,
                                           last_stride=1)
  assert builtin.source == "builtin"

  # Built before the stand-in is installed; the two-stream model asks for two backbones.
  stride2 = [torch_reference.build_model(arch, num_parts=2, part_dim=8, num_classes=4,
                                         last_stride=2)[0] for _ in range(2)]

  def torchvision_like(weights=None):
    assert weights is None
    net = stride2.pop()
    stem, trunk = net.rgb, net.shared
    return types.SimpleNamespace(conv1=stem[0], bn1=stem[1], relu=stem[2], maxpool=stem[3],
                                 layer1=trunk[0], layer2=trunk[1], layer3=trunk[2],
                                 layer4=trunk[3])

  fake = types.ModuleType("torchvision")
  fake.models = types.SimpleNamespace(**{arch: torchvision_like})
  monkeypatch.setitem(sys.modules, "torchvision", fake)
  net, _ = torch_reference.build_model(arch, num_parts=2, part_dim=8, num_classes=4,
                                       last_stride=1)
  assert net.source == "torchvision" and not stride2
  x = torch.zeros(1, 3, 64, 32)
  with torch.no_grad():
    got = net.shared(net.rgb(x)).shape
    want = builtin.shared(builtin.rgb(x)).shape
  assert got == want and got[-2:] == (4, 2)  # stride 16, not 32


@pytest.mark.torch
def test_train_step_benchmark_with_torch_reports_the_ratio(tmp_path):
  pytest.importorskip("torch", exc_type=ImportError)
  result = _run(["--torch", "--dtypes=bfloat16"], tmp_path)
  assert result["torch_images_per_s"] > 0 and result["torch_compile"] is False
  assert result["ratio_vs_torch"] == pytest.approx(
      result["images_per_s"] / result["torch_images_per_s"], rel=1e-2)


def test_torch_reference_imports_without_torch_and_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match="maumjax\\[torch\\]"):
    torch_reference.run("tiny", 16, 32, 16, "float32")
