"""Procedural person renderer behind `maumjax.data.synthetic`: one body model, two modalities.

A person is a frozen bundle of identity traits (`Person`, drawn by `sample_person` from a
per-identity generator); an image adds a per-image `Pose` and a `Camera`. The body is first laid
out as a part-label map (skin, hair, upper and lower garment, shoes, hat, side bag, backpack)
plus a garment-pattern mask; both modalities colour that same map:

* visible (`modality="rgb"`): part colours, the garment pattern as a second colour, cylindrical
  shading, a specular sheen on low-emissivity (glossy) fabrics, a textured per-camera background,
  per-camera tint / brightness / contrast, slight blur and noise.
* thermal (`modality="ir"`): part temperatures seen through the material's emissivity
  (`emissivity * heat + (1 - emissivity) * ambient`), the garment pattern as a thermal contrast,
  a cool low-texture background, blur, per-camera gain and sensor noise; returned as 3 equal
  channels.

With the default `Camera.nir = 0`, no colour enters the thermal path, so colour does not
transfer across modalities, while body shape, accessories, garment pattern and material
(emissivity shows as gloss in the visible image and as a cool garment in the thermal one) do: a
model can learn cross-modality identity, but only from those cues. Every draw a renderer makes
depends on geometry and camera only, never on a colour, so swapping an identity's colours leaves
its thermal images bit-identical. That is a far-infrared (thermal) camera, as RegDB's.

SYSU-MM01's infrared cameras are near-infrared ones with active illumination: they see reflected
light, and a garment's near-infrared reflectance follows its visible lightness in part. An `ir`
camera with `nir = w` in (0, 1] mixes, on the body, `w` of reflected light (each part's visible
luminance, the pattern's second colour where the pattern is on, with the same shading) into
`1 - w` of the thermal signal. Then dark-and-light structure (lightness of garments, patterns,
hair) carries across modalities too, while hue still does not. Our model, not a measured one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# Part labels of the layout map; 0 is background.
BACKGROUND, SKIN, HAIR, UPPER, LOWER, SHOES, HAT, BAG, BACKPACK = range(9)
NUM_PARTS = 9
# Garment and accessory parts, in the order of `Person.emissivity` / `Person.heat`.
_MATERIAL_PARTS = (UPPER, LOWER, SHOES, HAT, BAG, BACKPACK)
# Garment patterns: plain, horizontal stripes, vertical stripes, checks.
PATTERNS = ("plain", "hstripes", "vstripes", "checks")

Rgb = tuple[float, float, float]
# ITU-R BT.601 luma weights: a part's visible lightness, its near-infrared reflectance here.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class Person:
  """Identity traits. Lengths are fractions of the figure height; colours are RGB in [0, 1]."""

  height: float  # figure height as a fraction of the frame height
  shoulder: float  # half shoulder width
  head: float  # head radius
  leg_width: float  # leg radius
  hair_length: int  # 0 short, 1 shoulder length, 2 long
  long_sleeves: bool
  long_lower: bool  # trousers rather than shorts
  bag_side: int  # side bag on the person's -1 left / +1 right; 0 none
  backpack: bool
  hat: bool
  upper_pattern: int  # index into PATTERNS
  upper_freq: float  # pattern periods per figure height
  lower_pattern: int
  lower_freq: float
  skin_rgb: Rgb
  hair_rgb: Rgb
  upper_rgb: Rgb
  upper_rgb2: Rgb  # second colour of the upper pattern
  lower_rgb: Rgb
  lower_rgb2: Rgb
  shoes_rgb: Rgb
  hat_rgb: Rgb
  bag_rgb: Rgb
  backpack_rgb: Rgb
  skin_heat: float
  hair_heat: float
  emissivity: tuple[float, ...]  # per material part: upper, lower, shoes, hat, bag, backpack
  heat: tuple[float, ...]  # same order; accessories range from cool to warm
  pattern_contrast: tuple[float, float]  # thermal contrast of the upper / lower pattern


@dataclasses.dataclass(frozen=True)
class Pose:
  """Per-image pose and framing; offsets are fractions of the frame."""

  facing_back: bool
  leg_spread: float  # horizontal foot offset, fraction of figure height
  arm_left: float  # arm angle from vertical, radians, in image left / right
  arm_right: float
  dx: float
  dy: float
  scale: float


@dataclasses.dataclass(frozen=True)
class Camera:
  """A camera: output size, viewpoint, and modality-specific photometry.

  `tint`, `brightness`, `contrast`, `background`, `bg_kind` and `bg_freq` apply to `rgb`
  cameras; `gain`, `ambient` and `clutter` to `ir` ones; the rest to both.
  """

  modality: str  # "rgb" or "ir"
  height: int
  width: int
  scale: float = 1.0  # figure size relative to the frame (viewpoint distance)
  offset_y: float = 0.0  # vertical offset of the figure, fraction of the frame
  noise: float = 0.02
  blur: float = 0.5
  tint: Rgb = (1.0, 1.0, 1.0)
  brightness: float = 1.0
  contrast: float = 1.0
  background: Rgb = (0.5, 0.5, 0.5)
  bg_kind: int = 0  # 0 horizontal bands, 1 vertical panels, 2 floor tiles, 3 smooth
  bg_freq: float = 4.0
  gain: float = 1.0
  ambient: float = 0.18  # background temperature, also reflected by low-emissivity fabrics
  clutter: int = 0  # lukewarm background objects per thermal image
  nir: float = 0.0  # ir: weight of reflected near-infrared light on the body (0 = thermal only)

  def __post_init__(self):
    if not 0.0 <= self.nir <= 1.0:
      raise ValueError(f"camera nir={self.nir!r} must be in [0, 1]: the weight of reflected "
                       "near-infrared light in the infrared images (0 = thermal only)")


def _colour(rng: np.random.Generator, lo: float = 0.05, hi: float = 0.95) -> Rgb:
  return tuple(float(c) for c in rng.uniform(lo, hi, 3))


def sample_person(rng: np.random.Generator) -> Person:
  """Draws an identity's traits.

  Materials (emissivity, heat, pattern contrast) come from their own draws, independent of the
  colours, so the thermal appearance carries no information about colour.

  Args:
    rng: the identity's own generator.

  Returns:
    The identity's `Person`.
  """
  skin = np.array([0.95, 0.75, 0.6]) * rng.uniform(0.45, 1.0)
  # Natural hair shades (black, brown, blond, grey), each with its own lightness.
  hair_base = np.array([(0.08, 0.06, 0.05), (0.3, 0.18, 0.1), (0.6, 0.45, 0.25),
                        (0.55, 0.55, 0.55)])[rng.integers(4)]
  hair = tuple(float(c) for c in np.clip(hair_base * rng.uniform(0.7, 1.3), 0.0, 1.0))
  upper = _colour(rng)
  lower = _colour(rng)
  return Person(
    height=float(rng.uniform(0.76, 0.94)), shoulder=float(rng.uniform(0.085, 0.14)),
    head=float(rng.uniform(0.05, 0.075)), leg_width=float(rng.uniform(0.032, 0.05)),
    hair_length=int(rng.integers(3)), long_sleeves=bool(rng.random() < 0.6),
    long_lower=bool(rng.random() < 0.7), bag_side=int(rng.choice([-1, 0, 0, 1])),
    backpack=bool(rng.random() < 0.35), hat=bool(rng.random() < 0.25),
    upper_pattern=int(rng.integers(len(PATTERNS))), upper_freq=float(rng.uniform(6.0, 16.0)),
    lower_pattern=int(rng.choice(len(PATTERNS), p=[0.55, 0.15, 0.15, 0.15])),
    lower_freq=float(rng.uniform(6.0, 14.0)),
    skin_rgb=tuple(float(c) for c in skin), hair_rgb=hair,
    # A second pattern colour far from the first, so the pattern is visible in colour too.
    upper_rgb=upper, upper_rgb2=tuple(float((c + 0.5) % 1.0) for c in upper),
    lower_rgb=lower, lower_rgb2=tuple(float((c + 0.5) % 1.0) for c in lower),
    shoes_rgb=_colour(rng, 0.02, 0.8), hat_rgb=_colour(rng), bag_rgb=_colour(rng),
    backpack_rgb=_colour(rng),
    skin_heat=float(rng.uniform(0.8, 0.95)), hair_heat=float(rng.uniform(0.45, 0.7)),
    emissivity=tuple(float(e) for e in rng.uniform(0.55, 0.98, 6)),
    heat=tuple(float(t) for t in np.concatenate(
      [rng.uniform(0.35, 0.85, 3), rng.uniform(0.1, 0.9, 3)])),
    pattern_contrast=(float(rng.uniform(0.12, 0.35)), float(rng.uniform(0.12, 0.35))),
  )


def sample_pose(rng: np.random.Generator) -> Pose:
  """Draws a per-image pose and framing jitter."""
  return Pose(
    facing_back=bool(rng.random() < 0.5), leg_spread=float(rng.uniform(0.0, 0.08)),
    arm_left=float(rng.uniform(0.03, 0.45)), arm_right=float(rng.uniform(0.03, 0.45)),
    dx=float(rng.uniform(-0.06, 0.06)), dy=float(rng.uniform(-0.03, 0.03)),
    scale=float(rng.uniform(0.93, 1.05)))


def _capsule(yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
             r: float) -> np.ndarray:
  """Pixels within `r` of the segment p0-p1 ((y, x) points)."""
  dy, dx = p1[0] - p0[0], p1[1] - p0[1]
  t = np.clip(((yy - p0[0]) * dy + (xx - p0[1]) * dx) / (dy * dy + dx * dx + 1e-9), 0.0, 1.0)
  return (yy - p0[0] - t * dy) ** 2 + (xx - p0[1] - t * dx) ** 2 <= r * r


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float,
             rx: float) -> np.ndarray:
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _box(yy: np.ndarray, xx: np.ndarray, y0: float, y1: float, x0: float,
         x1: float) -> np.ndarray:
  return (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)


def _pattern(kind: int, freq: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  hs = (v * freq) % 1.0 < 0.5
  vs = (u * freq + 0.25) % 1.0 < 0.5
  return (np.zeros_like(hs), hs, vs, hs ^ vs)[kind]


def layout(person: Person, pose: Pose, camera: Camera) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
  """Lays the body out on the camera's pixel grid.

  Args:
    person: identity traits.
    pose: per-image pose.
    camera: supplies the frame size and viewpoint.

  Returns:
    `labels` [H, W] uint8 part labels, `pattern` [H, W] bool (second pattern phase on
    garments), `across` [H, W] float32 horizontal body coordinate (0 on the body axis, 1 at 1.3
    shoulder half-widths) for shading and sheen.
  """
  h, w = camera.height, camera.width
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  ht = h * person.height * camera.scale * pose.scale
  top = (h - ht) / 2 + (camera.offset_y + pose.dy) * h
  cx = w / 2 + pose.dx * w
  mirror = -1 if pose.facing_back else 1  # the person's left is image right from the back
  rh = person.head * ht
  rv = 1.2 * rh
  head_cy = top + rv
  ys = top + 2 * rv + 0.03 * ht  # shoulder line
  yh = ys + 0.3 * ht  # hip line
  sw, hw = person.shoulder * ht, 0.78 * person.shoulder * ht
  foot_y = top + 0.975 * ht
  lab = np.zeros((h, w), np.uint8)

  long_hair = None
  if person.hair_length:
    hair_end = ys + (0.0, 0.06, 0.18)[person.hair_length] * ht
    long_hair = _box(yy, xx, head_cy, hair_end, cx - 1.1 * rh, cx + 1.1 * rh)
    if not pose.facing_back:
      lab[long_hair] = HAIR  # seen behind neck and shoulders
  knee_y = (yh + foot_y) / 2
  for side in (-1, 1):
    foot_x = cx + side * (0.5 * hw + pose.leg_spread * ht)
    leg = _capsule(yy, xx, (yh - 0.02 * ht, cx + side * 0.5 * hw), (foot_y, foot_x),
                   person.leg_width * ht)
    lab[leg] = LOWER
    if not person.long_lower:
      lab[leg & (yy > knee_y)] = SKIN
    lab[_ellipse(yy, xx, foot_y, foot_x + side * 0.012 * ht, 0.025 * ht, 0.05 * ht)] = SHOES
  frac = np.clip((yy - ys) / (yh - ys), 0.0, 1.0)
  lab[(yy >= ys) & (yy <= yh + 0.02 * ht) & (np.abs(xx - cx) <= sw + (hw - sw) * frac)] = UPPER
  lab[_box(yy, xx, head_cy, ys + 0.01 * ht, cx - 0.45 * rh, cx + 0.45 * rh)] = SKIN
  arm_r, arm_len = 0.032 * ht, 0.36 * ht
  for side, angle in ((-1, pose.arm_left), (1, pose.arm_right)):
    p0 = (ys + arm_r, cx + side * (sw - 0.3 * arm_r))
    p1 = (p0[0] + arm_len * np.cos(angle), p0[1] + side * arm_len * np.sin(angle))
    arm = _capsule(yy, xx, p0, p1, arm_r)
    along = ((yy - p0[0]) * (p1[0] - p0[0]) + (xx - p0[1]) * (p1[1] - p0[1])) / arm_len ** 2
    lab[arm] = UPPER
    lab[arm & (along > (0.88 if person.long_sleeves else 0.35))] = SKIN
    lab[_ellipse(yy, xx, p1[0], p1[1], 1.1 * arm_r, 1.1 * arm_r)] = SKIN
  if person.bag_side:
    s = person.bag_side * mirror
    bx = cx + s * (hw + 0.05 * ht)
    lab[_capsule(yy, xx, (ys, cx - s * 0.6 * sw), (yh - 0.04 * ht, bx), 0.011 * ht)] = BAG
    lab[_box(yy, xx, yh - 0.06 * ht, yh + 0.07 * ht, bx - 0.05 * ht, bx + 0.05 * ht)] = BAG
  if person.backpack:
    if pose.facing_back:
      lab[_box(yy, xx, ys + 0.02 * ht, ys + 0.24 * ht, cx - 0.75 * sw, cx + 0.75 * sw)] = BACKPACK
    else:
      for s in (-1, 1):
        x0 = cx + s * 0.55 * sw
        lab[_box(yy, xx, ys, ys + 0.2 * ht, x0 - 0.02 * ht, x0 + 0.02 * ht)] = BACKPACK
  head = _ellipse(yy, xx, head_cy, cx, rv, rh)
  lab[head] = SKIN
  hairline = head_cy + (0.8 if pose.facing_back else -0.35) * rv
  crown = _ellipse(yy, xx, head_cy - 0.1 * rv, cx, 1.05 * rv, 1.08 * rh)
  lab[(head | crown) & (yy < hairline)] = HAIR
  if long_hair is not None and pose.facing_back:
    lab[long_hair] = HAIR  # falls over the neck and upper back
  if person.hat:
    lab[_box(yy, xx, top - 0.02 * ht, head_cy - 0.35 * rv, cx - 1.1 * rh, cx + 1.1 * rh)] = HAT
    lab[_box(yy, xx, head_cy - 0.5 * rv, head_cy - 0.3 * rv, cx - 1.45 * rh, cx + 1.45 * rh)] = HAT

  u, v = (xx - cx) / ht, (yy - top) / ht
  pattern = np.where(lab == UPPER, _pattern(person.upper_pattern, person.upper_freq, u, v),
                     (lab == LOWER) & _pattern(person.lower_pattern, person.lower_freq, u, v))
  return lab, pattern, ((xx - cx) / (1.3 * sw)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
  """A low-frequency random field in about [-1, 1]: coarse noise, bilinearly upsampled."""
  coarse = rng.uniform(-1.0, 1.0, cells)
  return ndimage.zoom(coarse, (h / cells[0], w / cells[1]), order=1, mode="nearest",
                      grid_mode=True)[:h, :w]


def _rgb_background(camera: Camera, rng: np.random.Generator) -> np.ndarray:
  h, w = camera.height, camera.width
  v = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
  u = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
  phase = rng.uniform(0.0, 1.0)
  bands = (np.sin(2 * np.pi * (v * camera.bg_freq + phase)),
           np.sin(2 * np.pi * (u * camera.bg_freq / 2 + phase)),
           np.sign(np.sin(2 * np.pi * (v * camera.bg_freq + phase))
                   * np.sin(2 * np.pi * (u * camera.bg_freq / 2 + phase))) * (v > 0.6),
           np.zeros((h, w), np.float32))[camera.bg_kind]
  base = np.asarray(camera.background) + rng.normal(0.0, 0.05, 3)
  img = base + (0.08 * bands + 0.15 * (v - 0.5))[..., None] * np.ones(3)
  img = img + 0.08 * _smooth_field(rng, h, w, (3, 2))[..., None]
  # A few random objects per image, so the background is not a fixed camera signature.
  for _ in range(2):
    y0, x0 = rng.uniform(0.0, 1.0, 2)
    sy, sx = rng.uniform(0.1, 0.5, 2)
    box = _box(v, u, y0 - sy / 2, y0 + sy / 2, x0 - sx / 2, x0 + sx / 2)
    img = np.where(box[..., None], 0.6 * img + 0.4 * rng.uniform(0.0, 1.0, 3), img)
  return img


def _ir_background(camera: Camera, rng: np.random.Generator) -> np.ndarray:
  h, w = camera.height, camera.width
  v = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
  u = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
  img = camera.ambient + 0.04 * v + 0.025 * _smooth_field(rng, h, w, (3, 2))
  for _ in range(camera.clutter):
    y0, x0 = rng.uniform(-0.5, 0.5), rng.uniform(0.0, 1.0)
    sy, sx = rng.uniform(0.1, 0.4, 2)
    box = _box(v, u, y0 - sy / 2, y0 + sy / 2, x0 - sx / 2, x0 + sx / 2)
    img = img + box * rng.uniform(0.03, 0.15)
  return img


def render(person: Person, pose: Pose, camera: Camera, rng: np.random.Generator) -> np.ndarray:
  """Renders one image of `person` in `pose` seen by `camera`.

  Args:
    person: identity traits.
    pose: per-image pose.
    camera: output size, viewpoint and photometry; `camera.modality` picks visible or thermal.
    rng: per-image generator for background, noise and body warmth.

  Returns:
    [H, W, 3] uint8; thermal images have three equal channels.

  Raises:
    ValueError: `camera.modality` is neither "rgb" nor "ir".
  """
  if camera.modality not in ("rgb", "ir"):
    raise ValueError(f"camera modality {camera.modality!r} is unknown; use 'rgb' or 'ir'")
  lab, pattern, across = layout(person, pose, camera)
  body = lab > 0
  emissivity = np.full(NUM_PARTS, 0.97, np.float32)  # skin and hair: matte, no sheen
  emissivity[list(_MATERIAL_PARTS)] = person.emissivity
  palette = np.array([(0.0, 0.0, 0.0), person.skin_rgb, person.hair_rgb, person.upper_rgb,
                      person.lower_rgb, person.shoes_rgb, person.hat_rgb, person.bag_rgb,
                      person.backpack_rgb], np.float32)
  palette2 = palette.copy()
  palette2[UPPER], palette2[LOWER] = person.upper_rgb2, person.lower_rgb2
  if camera.modality == "rgb":
    colour = np.where(pattern[..., None], palette2[lab], palette[lab])
    shade = 1.0 - 0.35 * np.clip(across ** 2, 0.0, 1.0)
    # Glossy (low-emissivity) fabrics show a specular band: the visible face of the material.
    sheen = (1.0 - emissivity[lab]) * 1.2 * np.exp(-(((across - 0.35) / 0.3) ** 2))
    img = np.where(body[..., None], colour * shade[..., None] + sheen[..., None],
                   _rgb_background(camera, rng))
    img = ((img - 0.5) * camera.contrast + 0.5) * camera.brightness * np.asarray(camera.tint)
    img = ndimage.gaussian_filter(img, (camera.blur, camera.blur, 0.0))
  else:
    heat = np.zeros(NUM_PARTS, np.float32)
    heat[[SKIN, HAIR]] = person.skin_heat, person.hair_heat
    heat[list(_MATERIAL_PARTS)] = person.heat
    radiance = emissivity * heat + (1.0 - emissivity) * camera.ambient
    contrast = np.zeros(NUM_PARTS, np.float32)
    contrast[[UPPER, LOWER]] = person.pattern_contrast
    warmth = rng.normal(0.0, 0.02)  # activity and clothing fit vary from image to image
    person_ir = radiance[lab] * (1.0 - contrast[lab] * pattern) + warmth
    if camera.nir:
      reflected = np.where(pattern, palette2[lab] @ LUMA, palette[lab] @ LUMA)
      person_ir = (1.0 - camera.nir) * person_ir + camera.nir * reflected
    person_ir = person_ir * (1.0 - 0.15 * np.clip(across ** 2, 0.0, 1.0))
    img = np.where(body, person_ir, _ir_background(camera, rng))
    img = ndimage.gaussian_filter(img, camera.blur) * camera.gain
    img = np.repeat(img[..., None], 3, axis=-1)
  noise = rng.normal(0.0, camera.noise, img.shape[:2] + ((3,) if camera.modality == "rgb"
                                                          else (1,)))
  return np.clip(np.rint((img + noise) * 255.0), 0, 255).astype(np.uint8)
