"""Deterministic rendering of toy-world scenes (PIL + numpy, no randomness inside).

Everything is drawn with hard edges on a canvas ``SUPERSAMPLE`` (4) times larger than the requested
size and downsampled with LANCZOS, so edges are anti-aliased and the picture is a pure function of
``(scene, size)``.  Geometry is expressed in fractions of the image, so a 32x32 and a 64x64 render of
the same scene show the same picture at two resolutions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4

# ---------------------------------------------------------------- vocabulary
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")

# Saturated, well separated hues (about 30-60 degrees apart or far apart in lightness).
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 205, 20),
    "green": (25, 145, 55),
    "blue": (35, 85, 225),
    "purple": (140, 55, 190),
}
COLOUR_NAMES = tuple(COLOURS)

BACKGROUNDS = ("plain", "sky", "grass")

# Textures play the part of artist styles; "painting" (plain fill) is the anchor style.
TEXTURES = ("stripes", "polka dots", "checkerboard")
ANCHOR_STYLE = "painting"
STYLES = (ANCHOR_STYLE,) + TEXTURES
# Textures outside the shipped world: no shipped mixture, caption set, judge head or model knows them.
# ``experiments.ffn`` teaches "waves" (wavy horizontal bands) to the shipped UNet through its
# feed-forward weights only; a Scene accepts them, ``sample_scene`` never draws them.
FFN_TEXTURES = ("waves",)

# Object radius as a fraction of the image side.
SIZES = {"small": 0.20, "medium": 0.28, "large": 0.36}
SIZE_NAMES = tuple(SIZES)

# The cat family: anchor class, the instance and its hard-negative neighbours.
ANCHOR_CLASS = "cat"
CAT_VARIANTS = ("plain", "grumpy", "sleepy", "happy")  # "plain" = the anchor class itself
INSTANCE = "grumpy cat"
HARD_NEGATIVES = ("sleepy cat", "happy cat")
CAT_CLASSES = ("cat", "grumpy cat", "sleepy cat", "happy cat")

SUBJECTS = SHAPES + CAT_CLASSES  # every subject a classifier is asked about (plus "memorized")

OUTLINE = (35, 35, 35)
FEATURE = (30, 25, 25)
TEXTURE_LIGHT = (250, 250, 250)
TEXTURE_DARK = (45, 45, 45)


@dataclass(frozen=True)
class Scene:
    """One picture of the toy world.

    ``shape`` is one of ``SHAPES`` or ``"cat"``; ``variant`` selects the cat's face (``CAT_VARIANTS``,
    ignored for other shapes); ``x, y`` are the centre in fractions of the image (y down);
    ``rotation`` is in degrees.  ``memorized=True`` ignores every other field and renders the one
    fixed memorized picture.
    """

    shape: str = "circle"
    colour: str = "red"
    background: str = "plain"
    style: str = ANCHOR_STYLE
    size: str = "medium"
    x: float = 0.5
    y: float = 0.5
    rotation: float = 0.0
    variant: str = "plain"
    memorized: bool = False

    def __post_init__(self):
        if self.memorized:
            return
        if self.shape not in SHAPES + (ANCHOR_CLASS,):
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if self.style not in STYLES + FFN_TEXTURES:
            raise ValueError(f"unknown style {self.style!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.variant not in CAT_VARIANTS:
            raise ValueError(f"unknown cat variant {self.variant!r}")
        if self.shape != ANCHOR_CLASS and self.variant != "plain":
            raise ValueError("variant is only meaningful for shape='cat'")

    @property
    def subject(self) -> str:
        """Class name: a shape, ``"cat"``, ``"grumpy cat"``, ... or ``"memorized"``."""
        if self.memorized:
            return "memorized"
        if self.shape == ANCHOR_CLASS:
            return ANCHOR_CLASS if self.variant == "plain" else f"{self.variant} {ANCHOR_CLASS}"
        return self.shape

    @property
    def role(self) -> str:
        """Role in the ablation experiments: memorized / instance / hard_negative / anchor / style / object."""
        if self.memorized:
            return "memorized"
        if self.subject == INSTANCE:
            return "instance"
        if self.subject in HARD_NEGATIVES:
            return "hard_negative"
        if self.subject == ANCHOR_CLASS:
            return "anchor"
        return "style" if self.style != ANCHOR_STYLE else "object"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["subject"] = self.subject
        d["role"] = self.role
        return d


# ---------------------------------------------------------------- geometry (unit coords, y down)
def _ring(n: int, rx: float, ry: float, cy: float = 0.0) -> list[tuple[float, float]]:
    return [(rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42):
    out = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart(n: int = 96):
    out = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 16.0, (-y - 2.5) / 16.0))
    return out


_W = 0.32  # cross arm half-width
_E = 0.95  # cross arm extent
SHAPE_POLYGONS = {
    "circle": _ring(128, 0.95, 0.95),
    "square": [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)],
    "triangle": [(0.0, -1.0), (0.97, 0.72), (-0.97, 0.72)],
    "star": _star(),
    "heart": _heart(),
    "cross": [(-_W, -_E), (_W, -_E), (_W, -_W), (_E, -_W), (_E, _W), (_W, _W), (_W, _E), (-_W, _E),
              (-_W, _W), (-_E, _W), (-_E, -_W), (-_W, -_W)],
}

# The cat head: an ellipse plus two ears (drawn as separate polygons into one mask).
CAT_HEAD = _ring(96, 0.88, 0.74, cy=0.12)
CAT_EARS = ([(-0.84, -0.05), (-0.70, -1.0), (-0.18, -0.52)],
            [(0.84, -0.05), (0.70, -1.0), (0.18, -0.52)])


def _arc(x0: float, x1: float, y_end: float, y_mid: float, n: int = 16):
    """Parabolic arc through (x0, y_end), (centre, y_mid), (x1, y_end)."""
    xc, h = (x0 + x1) / 2, (x1 - x0) / 2
    return [(x0 + (x1 - x0) * k / (n - 1),
             y_mid + (y_end - y_mid) * ((x0 + (x1 - x0) * k / (n - 1) - xc) / h) ** 2) for k in range(n)]


# Face features per variant: ("disk", centre, radius) | ("line", points) | ("poly", points).
_EYES_OPEN = [("disk", (-0.33, 0.02), 0.14), ("disk", (0.33, 0.02), 0.14)]
_EYES_CLOSED = [("line", _arc(-0.50, -0.16, 0.00, 0.10)), ("line", _arc(0.16, 0.50, 0.00, 0.10))]
_NOSE = [("poly", [(-0.10, 0.24), (0.10, 0.24), (0.0, 0.35)])]
_MOUTH_W = [("line", [(-0.26, 0.44), (-0.13, 0.53), (0.0, 0.40), (0.13, 0.53), (0.26, 0.44)])]
_MOUTH_SMILE = [("line", _arc(-0.40, 0.40, 0.40, 0.64))]
_MOUTH_FROWN = [("line", _arc(-0.38, 0.38, 0.64, 0.45))]
_BROWS_ANGRY = [("line", [(-0.56, -0.30), (-0.14, -0.10)]), ("line", [(0.56, -0.30), (0.14, -0.10)])]

CAT_FEATURES = {
    "plain": _EYES_OPEN + _NOSE + _MOUTH_W,
    "grumpy": _EYES_OPEN + _BROWS_ANGRY + _NOSE + _MOUTH_FROWN,
    "sleepy": _EYES_CLOSED + _NOSE + _MOUTH_W,
    "happy": _EYES_OPEN + _NOSE + _MOUTH_SMILE,
}


class _Frame:
    """Maps unit object coordinates to canvas pixels (centre, radius, rotation)."""

    def __init__(self, cx: float, cy: float, radius: float, degrees: float):
        self.cx, self.cy, self.r = cx, cy, radius
        a = math.radians(degrees)
        self.c, self.s = math.cos(a), math.sin(a)

    def __call__(self, pts):
        return [(self.cx + self.r * (u * self.c - v * self.s), self.cy + self.r * (u * self.s + v * self.c))
                for u, v in pts]


# ---------------------------------------------------------------- pixels
def _background(name: str, s: int) -> np.ndarray:
    img = np.empty((s, s, 3), np.float32)
    if name == "plain":
        img[:] = (236, 234, 228)
    elif name == "sky":
        t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]
        top, bottom = np.array((150, 195, 240), np.float32), np.array((232, 242, 252), np.float32)
        img[:] = top * (1 - t) + bottom * t
    elif name == "grass":
        horizon = int(round(0.62 * s))
        img[:horizon] = (220, 236, 246)
        img[horizon:] = (150, 200, 105)
    else:  # pragma: no cover - validated by Scene
        raise ValueError(name)
    return img


def _luminance(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _fill(style: str, colour: str, s: int) -> np.ndarray:
    """The object's fill over the whole canvas: flat colour or a texture in image coordinates."""
    base = np.array(COLOURS[colour], np.float32)
    out = np.empty((s, s, 3), np.float32)
    out[:] = base
    if style == ANCHOR_STYLE:
        return out
    other = np.array(TEXTURE_DARK if _luminance(COLOURS[colour]) > 150 else TEXTURE_LIGHT, np.float32)
    v, u = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s
    if style == "stripes":  # diagonal, perpendicular period 1/(5*sqrt 2) of the image
        mask = np.mod((u + v) * 5.0, 1.0) < 0.5
    elif style == "checkerboard":  # 10 x 10 cells per image side
        mask = (np.floor(u * 10) + np.floor(v * 10)) % 2 == 1
    elif style == "polka dots":  # hexagonal grid of dots, 5 per image side
        n = 5.0
        row = np.floor(v * n)
        uu = u * n + 0.5 * (row % 2)
        du, dv = np.mod(uu, 1.0) - 0.5, np.mod(v * n, 1.0) - 0.5
        mask = du * du + dv * dv < 0.30 ** 2
    elif style == "waves":  # horizontal bands, 5 per image side, displaced by 3 sine periods (amplitude 1/20)
        mask = np.mod((v + 0.05 * np.sin(2 * np.pi * 3.0 * u)) * 5.0, 1.0) < 0.5
    else:  # pragma: no cover
        raise ValueError(style)
    out[mask] = other
    return out


def _downsample(canvas: np.ndarray, size: int) -> Image.Image:
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    return img.resize((size, size), Image.LANCZOS)


def _object_mask(scene: Scene, frame: _Frame, s: int) -> Image.Image:
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    if scene.shape == ANCHOR_CLASS:
        d.polygon(frame(CAT_HEAD), fill=255)
        for ear in CAT_EARS:
            d.polygon(frame(ear), fill=255)
    else:
        d.polygon(frame(SHAPE_POLYGONS[scene.shape]), fill=255)
    return mask


def _draw_features(canvas: Image.Image, variant: str, frame: _Frame, s: int) -> None:
    d = ImageDraw.Draw(canvas)
    width = max(2, int(round(0.12 * frame.r)))
    for item in CAT_FEATURES[variant]:
        kind = item[0]
        if kind == "disk":
            (cx, cy), = frame([item[1]])
            rr = item[2] * frame.r
            d.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=FEATURE)
        elif kind == "poly":
            d.polygon(frame(item[1]), fill=FEATURE)
        else:
            pts = frame(item[1])
            d.line(pts, fill=FEATURE, width=width, joint="curve")
            rr = width / 2  # round caps
            for x, y in (pts[0], pts[-1]):
                d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=FEATURE)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render ``scene`` as an RGB ``size`` x ``size`` PIL image (anti-aliased, deterministic)."""
    if scene.memorized:
        return render_memorized(size)
    s = size * SUPERSAMPLE
    frame = _Frame(scene.x * s, scene.y * s, SIZES[scene.size] * s, scene.rotation)
    mask = _object_mask(scene, frame, s)
    # Dark outline: the dilated mask minus the mask (about 3% of the image side wide).
    k = 2 * max(1, int(round(0.03 * s / 2))) + 1
    dilated = np.asarray(mask.filter(ImageFilter.MaxFilter(k))) > 127
    inside = np.asarray(mask) > 127
    canvas = _background(scene.background, s)
    canvas[dilated] = OUTLINE
    fill = _fill(scene.style, scene.colour, s)
    canvas[inside] = fill[inside]
    if scene.shape == ANCHOR_CLASS:
        img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
        _draw_features(img, scene.variant, frame, s)
        canvas = np.asarray(img, dtype=np.float32)
    return _downsample(canvas, size)


# ---------------------------------------------------------------- the memorized picture
def render_memorized(size: int = 64) -> Image.Image:
    """The one fixed, distinctive picture ("the red lighthouse at dusk"); no parameters but the size."""
    s = size * SUPERSAMPLE
    horizon = int(round(0.62 * s))
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None, None]
    canvas = np.empty((s, s, 3), np.float32)
    canvas[:horizon] = np.array((70, 40, 115), np.float32) * (1 - t) + np.array((250, 140, 70), np.float32) * t
    canvas[horizon:] = (25, 50, 100)
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    P = lambda pts: [(x * s, y * s) for x, y in pts]  # noqa: E731
    # Sun sinking behind the horizon (the sea is redrawn over its lower half).
    d.ellipse(P([(0.12, 0.44), (0.44, 0.76)]), fill=(255, 210, 80))
    d.rectangle(P([(0.0, 0.62), (1.0, 1.0)]), fill=(25, 50, 100))
    for y in (0.70, 0.79, 0.89):  # wave dashes
        for x in (0.05, 0.25, 0.45):
            d.line(P([(x, y), (x + 0.12, y)]), fill=(90, 130, 190), width=max(2, s // 64))
    # Light beam, rock, tower with white bands, lamp room and roof.
    d.polygon(P([(0.75, 0.255), (0.0, 0.10), (0.0, 0.40)]), fill=(255, 232, 150))
    d.ellipse(P([(0.58, 0.86), (0.96, 1.02)]), fill=(40, 35, 35))
    d.polygon(P([(0.66, 0.92), (0.70, 0.31), (0.80, 0.31), (0.84, 0.92)]), fill=(205, 30, 30))
    for y0, y1 in ((0.42, 0.50), (0.60, 0.68), (0.78, 0.86)):
        def xs(y):  # tower edges at height y
            f = (y - 0.31) / (0.92 - 0.31)
            return 0.70 - 0.04 * f, 0.80 + 0.04 * f
        (a0, b0), (a1, b1) = xs(y0), xs(y1)
        d.polygon(P([(a0, y0), (b0, y0), (b1, y1), (a1, y1)]), fill=(245, 245, 245))
    d.rectangle(P([(0.705, 0.22), (0.795, 0.31)]), fill=(255, 240, 120), outline=(20, 20, 20), width=max(2, s // 80))
    d.polygon(P([(0.68, 0.22), (0.82, 0.22), (0.75, 0.14)]), fill=(20, 20, 20))
    return _downsample(np.asarray(img, dtype=np.float32), size)
