"""PyTorch reference of the MAUM train step, for a side-by-side throughput ratio.

  python -m experiments.benchmarks.torch_reference [--arch=resnet50] [--height=288 --width=144] \
      [--batches=64,128,256] [--dtypes=float32,bfloat16] [--compile=off|on|both] \
      [--channels_last] [--device=cuda] [--out=results.jsonl]

`train_step.py --torch` calls `run` in its own process on the same sizes. PyTorch is an
optional extra (`pip install 'maumjax[torch]'`): this module imports without it and raises a
clear error only when a run is asked for.

The model and loss do the work of maumjax's `sysu` MAUM step (maumjax/methods/maum.py), written
the way a PyTorch re-ID code base writes it:

* torchvision's ResNet (v1.5: stride on the 3x3 conv) with last stride 1; torchvision's own
  class when it is importable and the arch is one of its, otherwise the same structure written
  here (always for 'tiny', whose widths match `maumjax.models.resnet.ARCHS['tiny']`);
* a two-stream stem (modality-specific conv1/bn1/relu/max-pool, then the shared layer1-4 on
  the concatenated [visible; infrared] batch), as maumjax's `ReidNet(specific_stages=1)`;
* a PCB head: GeM (p = 3) over `num_parts` horizontal stripes (AdaptiveAvgPool2d((P, 1)) bins,
  maumjax's `stripe_bounds`), a per-part bias-free reduction to `part_dim` (one [P, C, D]
  einsum) and a BN-neck (BatchNorm1d over P x D, bias frozen), all in float32;
* losses: Circle loss (gamma 64, m 0.25) in proxy form of each modality against its own
  proxies; the two unidirectional terms against the detached counterpart proxies plus a
  K-slot FIFO bank of their normalised snapshots ((K + 1) x C references per head); batch-hard
  triplet (margin 0.3, Euclidean) on the concatenated pre-BN part features; summed over parts;
* SGD, Nesterov momentum 0.9, weight decay 5e-4, backbone lr 0.01 and head/proxy lr 0.1; after
  the step the bank's next slot gets the normalised new proxies.

Options: bf16 autocast (AMP) or float32 (TF32 allowed for convolutions and matmuls, as XLA's
default precision on GPUs), channels_last, `torch.compile` of the forward and loss (the
backward through AOTAutograd; the optimiser step stays eager with its foreach kernels).
maumjax's step also augments on the device and guards against non-finite losses; this
reference does neither, so the ratio leaves that work to maumjax alone.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
from absl import app, flags

from experiments.benchmarks import report

FLAGS = flags.FLAGS
GEM_P = 3.0
GAMMA, MARGIN, TRI_MARGIN = 64.0, 0.25, 0.3
LR_HEAD, LR_BACKBONE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.01, 0.9, 5e-4
# name -> (block, layers, width); the same table as maumjax.models.resnet.ARCHS.
ARCHS = {
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "tiny": ("basic", (1, 1, 1, 1), 8),
    "small": ("basic", (1, 1, 1, 1), 16),
}


def require_torch():
  """Imports torch, or raises ImportError saying how to install the optional extra."""
  try:
    import torch
  except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("the PyTorch reference needs torch, an optional extra of maumjax: "
                      "pip install 'maumjax[torch]' (or pip install torch)") from e
  return torch


@functools.cache
def _modules():
  """The torch module classes (defined lazily so this file imports without torch)."""
  torch = require_torch()
  nn = torch.nn
  F = torch.nn.functional

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      y = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(y)) + identity)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.relu(self.bn2(self.conv2(y)))
      return self.relu(self.bn3(self.conv3(y)) + identity)

  class ResNet(nn.Module):
    """torchvision's ResNet layout (module names included), without the classifier."""

    def __init__(self, block, layers, width=64, last_stride=1):
      super().__init__()
      self.inplanes = width
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      strides = (1, 2, 2, last_stride)
      for i, (n, stride) in enumerate(zip(layers, strides)):
        setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2 ** i, n, stride))
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
      layers = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

  def resnet(arch: str, last_stride: int) -> tuple[Any, str]:
    """(a torchvision-layout ResNet with the given last stride, where it came from)."""
    block, layers, width = ARCHS[arch]
    try:
      import torchvision
    except ImportError:
      torchvision = None
    if torchvision is not None and arch in ("resnet50", "resnet18"):
      net = getattr(torchvision.models, arch)(weights=None)
      first = net.layer4[0]
      (first.conv2 if block == "bottleneck" else first.conv1).stride = (last_stride,) * 2
      if first.downsample is not None:
        first.downsample[0].stride = (last_stride,) * 2
      return net, "torchvision"
    cls = Bottleneck if block == "bottleneck" else BasicBlock
    return ResNet(cls, layers, width, last_stride), "builtin"

  class TwoStreamPCB(nn.Module):
    """Modality-specific stems, a shared trunk, GeM stripes, per-part reduction, BN-neck."""

    def __init__(self, arch, num_parts, part_dim, last_stride=1):
      super().__init__()
      rgb, self.source = resnet(arch, last_stride)
      ir, _ = resnet(arch, last_stride)
      self.rgb = nn.Sequential(rgb.conv1, rgb.bn1, rgb.relu, rgb.maxpool)
      self.ir = nn.Sequential(ir.conv1, ir.bn1, ir.relu, ir.maxpool)
      self.shared = nn.Sequential(rgb.layer1, rgb.layer2, rgb.layer3, rgb.layer4)
      block, _, width = ARCHS[arch]
      channels = width * 8 * (4 if block == "bottleneck" else 1)
      self.num_parts, self.part_dim = num_parts, part_dim
      self.reduce = nn.Parameter(torch.randn(num_parts, channels, part_dim)
                                 * (2.0 / channels) ** 0.5)
      self.bnneck = nn.BatchNorm1d(num_parts * part_dim)
      self.bnneck.bias.requires_grad_(False)

    def backbone_parameters(self):
      return [*self.rgb.parameters(), *self.ir.parameters(), *self.shared.parameters()]

    def forward(self, rgb, ir):
      x = self.shared(torch.cat([self.rgb(rgb), self.ir(ir)], dim=0))
      with torch.autocast(x.device.type, enabled=False):
        x = x.float().clamp(min=1e-6).pow(GEM_P)
        if x.shape[2] < self.num_parts:
          raise ValueError(f"feature map height {x.shape[2]} < num_parts={self.num_parts}")
        stripes = F.adaptive_avg_pool2d(x, (self.num_parts, 1)).pow(1.0 / GEM_P)
        stripes = stripes.flatten(2).transpose(1, 2)  # [N, P, C]
        pre = torch.einsum("npc,pcd->npd", stripes, self.reduce)
        n = pre.shape[0]
        bn = self.bnneck(pre.reshape(n, -1)).reshape(n, self.num_parts, self.part_dim)
      return pre, bn

  def circle(sim, pos):
    """Pair-wise Circle loss per row: sim [H, n, R], pos [n, R] -> [H, n]."""
    s = sim.detach()
    alpha_p = (1.0 + MARGIN - s).clamp(min=0.0)
    alpha_n = (s + MARGIN).clamp(min=0.0)
    logit_p = (-GAMMA * alpha_p * (sim - (1.0 - MARGIN))).masked_fill(~pos, -1e9)
    logit_n = (GAMMA * alpha_n * (sim - MARGIN)).masked_fill(pos, -1e9)
    return F.softplus(torch.logsumexp(logit_n, -1) + torch.logsumexp(logit_p, -1))

  def proxy_metric(feats, labels, refs, ref_labels):
    """feats [n, H, D] vs refs [H, R, D]: per-row loss summed over heads, [n]."""
    f = F.normalize(feats.float(), dim=-1).transpose(0, 1)
    r = F.normalize(refs.float(), dim=-1)
    sim = torch.bmm(f, r.transpose(1, 2))
    return circle(sim, labels[:, None] == ref_labels[None, :]).sum(0)

  class MaumLoss(nn.Module):
    """MS proxies + memory-augmented unidirectional terms + batch-hard triplet."""

    def __init__(self, num_parts, num_classes, part_dim, memory_size):
      super().__init__()
      shape = (num_parts, num_classes, part_dim)
      self.proxies_rgb = nn.Parameter(0.001 * torch.randn(shape))
      self.proxies_ir = nn.Parameter(0.001 * torch.randn(shape))
      self.register_buffer("bank_rgb", F.normalize(self.proxies_rgb.detach(), dim=-1)
                           .expand(memory_size, *shape).clone())
      self.register_buffer("bank_ir", F.normalize(self.proxies_ir.detach(), dim=-1)
                           .expand(memory_size, *shape).clone())
      self.register_buffer("class_ids", torch.arange(num_classes))
      self.ptr = 0

    def _refs(self, proxies, bank):
      slots = torch.cat([proxies.detach()[None], bank], dim=0)  # [K+1, H, C, D]
      k1, h, c, d = slots.shape
      return slots.transpose(0, 1).reshape(h, k1 * c, d), self.class_ids.repeat(k1)

    def forward(self, pre, bn, labels_rgb, labels_ir):
      b = labels_rgb.shape[0]
      f_rgb, f_ir = bn[:b], bn[b:]
      ms = (proxy_metric(f_rgb, labels_rgb, self.proxies_rgb, self.class_ids).mean()
            + proxy_metric(f_ir, labels_ir, self.proxies_ir, self.class_ids).mean())
      refs_rgb, ids_rgb = self._refs(self.proxies_rgb, self.bank_rgb)
      refs_ir, ids_ir = self._refs(self.proxies_ir, self.bank_ir)
      uni = (proxy_metric(f_ir, labels_ir, refs_rgb, ids_rgb).mean()
             + proxy_metric(f_rgb, labels_rgb, refs_ir, ids_ir).mean())
      feats = pre.reshape(pre.shape[0], -1).float()
      labels = torch.cat([labels_rgb, labels_ir])
      sq = (feats * feats).sum(1)
      dist = (sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T).clamp(min=1e-12).sqrt()
      same = labels[:, None] == labels[None, :]
      d_ap = dist.masked_fill(~same, float("-inf")).amax(1)
      d_an = dist.masked_fill(same, float("inf")).amin(1)
      triplet = F.relu(d_ap - d_an + TRI_MARGIN).mean()
      return ms + uni + triplet

    @torch.no_grad()
    def update_bank(self):
      self.bank_rgb[self.ptr].copy_(F.normalize(self.proxies_rgb, dim=-1))
      self.bank_ir[self.ptr].copy_(F.normalize(self.proxies_ir, dim=-1))
      self.ptr = (self.ptr + 1) % self.bank_rgb.shape[0]

  return TwoStreamPCB, MaumLoss


def build_model(arch: str = "resnet50", num_parts: int = 6, part_dim: int = 256,
                num_classes: int = 395, memory_size: int = 8, last_stride: int = 1):
  """(network, loss module) on the CPU: the two-stream PCB model and the MAUM loss.

  The loss module owns the proxies (trainable) and the banks (buffers).

  Raises:
    ImportError: torch is not installed.
  """
  net_cls, loss_cls = _modules()
  return (net_cls(arch, num_parts, part_dim, last_stride),
          loss_cls(num_parts, num_classes, part_dim, memory_size))


def _device_name(torch, device: str) -> str:
  if device.startswith("cuda"):
    return torch.cuda.get_device_name(torch.device(device))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"cpu:{cores} cores ({platform.processor() or platform.machine()})"


def run(arch: str = "resnet50", batch: int = 64, height: int = 288, width: int = 144,
        dtype: str = "bfloat16", compile: bool = False, channels_last: bool = True,
        steps: int = 20, warmup: int = 5, num_classes: int = 395, device: str | None = None,
        *, num_parts: int = 6, part_dim: int = 256, num_instances: int = 4,
        memory_size: int = 8, seed: int = 0) -> dict[str, Any]:
  """Times the reference train step; returns one result dict (benchmark 'torch_reference').

  Args:
    arch: 'resnet50', 'resnet18' or 'tiny'.
    batch: images per step (visible + infrared), a multiple of 2 * num_instances.
    height, width: input size.
    dtype: 'bfloat16' (autocast AMP, float32 weights) or 'float32'.
    compile: torch.compile the forward and loss.
    channels_last: NHWC memory format for the model and inputs.
    steps: timed steps (each synchronised).
    warmup: untimed steps first; the first of them (compilation included) is `compile_s`.
    num_classes: identities C (proxies per modality and head).
    device: 'cuda', 'cpu', ...; None picks cuda when available.
    num_parts, part_dim: PCB head shape.
    num_instances: K, images per identity per modality.
    memory_size: FIFO bank slots.
    seed: seed of the parameters and the batch.

  Raises:
    ImportError: torch is not installed.
    ValueError: bad dtype, arch or batch.
  """
  torch = require_torch()
  try:
    return _run(torch, arch, batch, height, width, dtype, compile, channels_last, steps, warmup,
                num_classes, device, num_parts, part_dim, num_instances, memory_size, seed)
  finally:  # the model, optimiser and batch are gone with _run's frame: release their memory
    if compile:
      torch._dynamo.reset()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()


def _run(torch, arch, batch, height, width, dtype, compile, channels_last, steps, warmup,
         num_classes, device, num_parts, part_dim, num_instances, memory_size, seed):
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype {dtype!r}; use float32 or bfloat16")
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; use one of {sorted(ARCHS)}")
  if batch % (2 * num_instances):
    raise ValueError(f"batch {batch} is not a multiple of 2 * num_instances")
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  dev = torch.device(device)
  cuda = dev.type == "cuda"
  if cuda:
    # float32 runs as XLA's default GPU precision does: TF32 tensor cores.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats(dev)
  torch.manual_seed(seed)
  net, criterion = build_model(arch, num_parts, part_dim, num_classes, memory_size)
  net, criterion = net.to(dev), criterion.to(dev)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(memory_format=memory_format)
  net.train()
  backbone = net.backbone_parameters()
  backbone_ids = {id(p) for p in backbone}
  head = [p for p in [*net.parameters(), *criterion.parameters()]
          if id(p) not in backbone_ids and p.requires_grad]
  opt = torch.optim.SGD([{"params": backbone, "lr": LR_BACKBONE},
                         {"params": head, "lr": LR_HEAD}],
                        momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)

  pairs = batch // 2
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.choice(num_classes, pairs // num_instances, replace=False),
                     num_instances)
  labels = torch.as_tensor(labels, dtype=torch.long, device=dev)
  gen = torch.Generator(device="cpu").manual_seed(seed)
  rgb, ir = (torch.randn(pairs, 3, height, width, generator=gen).to(dev)
             .contiguous(memory_format=memory_format) for _ in range(2))
  amp = dtype == "bfloat16"

  def forward_loss(rgb, ir, labels_rgb, labels_ir):
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      pre, bn = net(rgb, ir)
    return criterion(pre, bn, labels_rgb, labels_ir)

  loss_fn = torch.compile(forward_loss) if compile else forward_loss

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(rgb, ir, labels, labels)
    loss.backward()
    opt.step()
    criterion.update_bank()
    return loss

  def sync():
    if cuda:
      torch.cuda.synchronize(dev)

  t0 = time.perf_counter()
  step()
  sync()
  first_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    step()
  sync()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  result = {
      "benchmark": "torch_reference", "device": _device_name(torch, device),
      "platform": dev.type, "commit": report.commit(), "arch": arch, "height": height,
      "width": width, "dtype": dtype, "batch": batch, "num_classes": num_classes,
      "num_parts": num_parts, "part_dim": part_dim, "num_instances": num_instances,
      "memory_size": memory_size, "compile": bool(compile), "channels_last": bool(channels_last),
      "images_per_s": round(batch / step_s, 2), "step_ms": round(1e3 * step_s, 3),
      "step_ms_mean": round(1e3 * statistics.fmean(times), 3),
      "step_ms_min": round(1e3 * min(times), 3), "compile_s": round(first_s, 3),
      "steps": steps, "warmup": warmup,
      "peak_memory_bytes": int(torch.cuda.max_memory_allocated(dev)) if cuda else None,
      "loss": round(float(loss.detach()), 5), "threads": torch.get_num_threads(),
      "model_source": net.source, "torch_version": torch.__version__,
  }
  return result


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: train_step.py imports this)."""
  flags.DEFINE_string("arch", "resnet50", "resnet50, resnet18 or tiny.")
  flags.DEFINE_integer("height", 288, "Input height.")
  flags.DEFINE_integer("width", 144, "Input width.")
  flags.DEFINE_string("batches", "64,128,256", "Comma list of images per step.")
  flags.DEFINE_string("dtypes", "float32,bfloat16", "Comma list: float32, bfloat16 (AMP).")
  flags.DEFINE_enum("compile", "off", ["off", "on", "both"], "torch.compile.")
  flags.DEFINE_bool("channels_last", True, "channels_last memory format.")
  flags.DEFINE_integer("steps", 20, "Timed steps.")
  flags.DEFINE_integer("warmup", 5, "Untimed steps (the first compiles).")
  flags.DEFINE_integer("num_classes", 395, "Identities C.")
  flags.DEFINE_integer("num_instances", 4, "K, images per identity per modality.")
  flags.DEFINE_integer("num_parts", 6, "Part stripes.")
  flags.DEFINE_integer("part_dim", 256, "Reduced dimension per part.")
  flags.DEFINE_string("device", "", "torch device ('' = cuda when available, else cpu).")
  flags.DEFINE_string("out", "", "Append each result as a JSON line to this file.")
  flags.DEFINE_integer("seed", 0, "Seed.")


def main(argv):
  del argv
  modes = {"off": (False,), "on": (True,), "both": (False, True)}[FLAGS.compile]
  for dtype in [d.strip() for d in FLAGS.dtypes.split(",") if d.strip()]:
    for batch in [int(b) for b in FLAGS.batches.split(",") if b.strip()]:
      for use_compile in modes:
        result = run(FLAGS.arch, batch, FLAGS.height, FLAGS.width, dtype, use_compile,
                     FLAGS.channels_last, FLAGS.steps, FLAGS.warmup, FLAGS.num_classes,
                     FLAGS.device or None, num_parts=FLAGS.num_parts, part_dim=FLAGS.part_dim,
                     num_instances=FLAGS.num_instances, seed=FLAGS.seed)
        report.emit(result)
        if FLAGS.out:
          with open(FLAGS.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
