"""A synthetic State-Farm-shaped driver dataset: rendered driver images in State Farm's exact Kaggle layout.

It is a generator, not the State Farm adapter: the adapter is the competition spec in
configs/statefarm.yaml, which reads this dataset (``ingest.source: synthetic``) and the real data the
same way.

The structure copies what makes the real competition hard (docs/design.md#the-competition-state-farm):

- Each driver has a persistent look (skin, hair, clothes, seat position, body size, car interior,
  window view, lighting, sensor noise), so a random image-level split leaks the driver.
- Frames come in video-like sequences: consecutive frames of one driver and class differ by a small
  random walk of pose and exposure, so an image's nearest neighbour is almost always the same driver.
- The ten classes differ only in what the hands (and head) do. The confusions are the real ones:
  c0 vs c9 differ by a head turn, phone (c2/c4) vs texting (c1/c3) by arm height, and right vs left
  classes are mirror images of each other (so a horizontal flip swaps labels).
- Counts are unequal per driver and per class; test drivers never appear in train.

Geometry is drawn in "height units" (1.0 = image height, 4/3 = image width) so every resolution
shows the same scene. Everything random is planned up front from ``cfg.seed`` and each frame is then
a pure function of its plan row, so the output is byte-identical for a seed however many worker
processes render it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.config import SyntheticConfig, load_profile
from pipeline.env import die_with_parent
from pipeline.io import atomic_write_csv

# State Farm's classes, as its sample_submission.csv names them (c0 safe driving ... c9 talking to passenger).
CLASSES = tuple(f"c{i}" for i in range(10))
# Real train-set class counts (c0..c9): the synthetic class mix is drawn around these proportions.
REAL_CLASS_COUNTS = np.array([2489, 2267, 2317, 2346, 2326, 2312, 2325, 2002, 1911, 2129], dtype=float)
# Real subject numbers run p002..p081; synthetic ones are drawn from the same kind of range.
MIN_SUBJECT_NUMBER = 2

SUBPIXEL_BITS = 4  # cv2 drawing takes fixed-point coordinates; 4 bits = 1/16 pixel precision
SUBPIXEL = 1 << SUBPIXEL_BITS
NOISE_MARGIN = 32  # the per-driver noise field is this much larger than a frame, cropped per frame

# Item codes held in a hand.
NO_ITEM, PHONE_SCREEN, PHONE_EAR, CUP = 0, 1, 2, 3

# How strongly drivers differ and frames jitter (height units unless noted). Tuned with
# benchmarks/leakage.py: a random split must look much better than held-out drivers.
SEAT_SHIFT_X = 0.04  # driver seat/camera offset, uniform +-
SEAT_SHIFT_Y = 0.025
BODY_SCALE = (0.92, 1.08)
STYLE_HAND_SD = 0.025  # a driver's own way of holding the phone, cup, ...
STYLE_HEAD_SD = 0.12
CLIP_OFFSET_SD = 0.015  # one video clip vs another of the same driver and class
STEP_SD = 0.006  # frame-to-frame pose jitter inside a clip
STEP_PERSISTENCE = 0.85  # AR(1) coefficient of that jitter: neighbouring frames stay near-duplicates
CLIP_LENGTH = (5, 30)
TRANSITION_PROB = 0.25  # clips that start mid-movement (hand on its way from the wheel)

# Pose fields of a plan row, in order.
POSE_FIELDS = ("rx", "ry", "lx", "ly", "yaw", "pitch", "twist")


# ---------------------------------------------------------------------------- class poses


@dataclass(frozen=True)
class ClassPose:
    """What a class looks like: hand targets relative to the shoulder centre (x to image right, y down),
    head yaw (-1 = turned to the passenger side, image left), pitch (+ = looking down), torso twist."""

    right: tuple[float, float]
    left: tuple[float, float]
    yaw: float = 0.0
    pitch: float = 0.0
    twist: float = 0.0
    right_item: int = NO_ITEM
    left_item: int = NO_ITEM

    def mirrored(self) -> ClassPose:
        """The same action done with the other hand (c1 <-> c3, c2 <-> c4)."""
        return ClassPose(
            right=(-self.left[0], self.left[1]),
            left=(-self.right[0], self.right[1]),
            yaw=-self.yaw,
            pitch=self.pitch,
            twist=-self.twist,
            right_item=self.left_item,
            left_item=self.right_item,
        )


# The driver faces the camera: their right hand is on the image left, where the console and
# passenger are. Wheel grips sit at ten-to-two on the wheel rim.
WHEEL_CENTRE = (0.0, 0.31)
WHEEL_RADII = (0.20, 0.075)
RIGHT_GRIP = (-0.165, 0.27)
LEFT_GRIP = (0.165, 0.27)

TEXTING_RIGHT = ClassPose(right=(-0.05, 0.19), left=LEFT_GRIP, yaw=-0.15, pitch=0.8, right_item=PHONE_SCREEN)
PHONE_RIGHT = ClassPose(right=(-0.095, -0.185), left=LEFT_GRIP, yaw=0.1, pitch=0.1, right_item=PHONE_EAR)

CLASS_POSES: dict[str, ClassPose] = {
    "c0": ClassPose(right=RIGHT_GRIP, left=LEFT_GRIP),
    "c1": TEXTING_RIGHT,
    "c2": PHONE_RIGHT,
    "c3": TEXTING_RIGHT.mirrored(),
    "c4": PHONE_RIGHT.mirrored(),
    "c5": ClassPose(right=(-0.33, 0.30), left=LEFT_GRIP, yaw=-0.45, pitch=0.45),
    "c6": ClassPose(right=(-0.035, -0.10), left=LEFT_GRIP, pitch=-0.3, right_item=CUP),
    "c7": ClassPose(right=(-0.31, -0.14), left=LEFT_GRIP, yaw=-1.0, pitch=-0.1, twist=1.0),
    "c8": ClassPose(right=(-0.07, -0.31), left=LEFT_GRIP, yaw=0.3, pitch=-0.35),
    # Only the head turn tells c9 from c0, as in the real data.
    "c9": ClassPose(right=RIGHT_GRIP, left=LEFT_GRIP, yaw=-0.7),
}
# Classes a driver may do with either hand (a per-driver habit); the others have a fixed hand.
HANDED_CLASSES = ("c6", "c8")


# ---------------------------------------------------------------------------- driver looks


@dataclass(frozen=True)
class DriverLook:
    """Everything persistent about a driver's recording session."""

    subject: str
    seed: int  # renders this driver's static background and noise field
    seat: tuple[float, float]  # shoulder-centre position in height units
    scale: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    short_sleeves: bool
    long_hair: bool
    hat: tuple[int, int, int] | None
    seat_colour: tuple[int, int, int]
    interior: tuple[int, int, int]
    sky: tuple[int, int, int]
    cup: tuple[int, int, int]
    light_gain: float
    light_tint: tuple[float, float, float]
    light_slope: float  # brighter toward the window side (+) or the other (-)
    noise_sd: float
    left_handed: tuple[bool, ...]  # per HANDED_CLASSES entry: does this driver use the left hand


def _colour(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))  # type: ignore[return-value]


def _skin_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # From dark to light skin along one warm axis, so skin never looks green or blue.
    t = rng.uniform(0.0, 1.0)
    base = np.array([95, 60, 40]) + t * np.array([140, 130, 110])
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 8, 3), 0, 255))  # type: ignore[return-value]


def sample_driver_look(rng: np.random.Generator, subject: str) -> DriverLook:
    grey = int(rng.integers(40, 170))
    return DriverLook(
        subject=subject,
        seed=int(rng.integers(2**31)),
        seat=(2 / 3 + rng.uniform(-SEAT_SHIFT_X, SEAT_SHIFT_X), 0.50 + rng.uniform(-SEAT_SHIFT_Y, SEAT_SHIFT_Y)),
        scale=float(rng.uniform(*BODY_SCALE)),
        skin=_skin_colour(rng),
        hair=_colour(rng, 10, 120),
        shirt=_colour(rng, 20, 235),
        short_sleeves=bool(rng.random() < 0.5),
        long_hair=bool(rng.random() < 0.35),
        hat=_colour(rng, 20, 220) if rng.random() < 0.25 else None,
        seat_colour=_colour(rng, 15, 90),
        interior=tuple(int(np.clip(grey + d, 0, 255)) for d in rng.integers(-25, 25, 3)),  # type: ignore[arg-type]
        sky=_colour(rng, 120, 255),
        cup=_colour(rng, 30, 250),
        light_gain=float(rng.uniform(0.7, 1.2)),
        light_tint=tuple(float(v) for v in rng.uniform(0.9, 1.1, 3)),  # type: ignore[arg-type]
        light_slope=float(rng.uniform(-0.3, 0.3)),
        noise_sd=float(rng.uniform(2.0, 7.0)),
        left_handed=tuple(bool(rng.random() < 0.3) for _ in HANDED_CLASSES),
    )


def class_pose_for(look: DriverLook, classname: str) -> ClassPose:
    pose = CLASS_POSES[classname]
    if classname in HANDED_CLASSES and look.left_handed[HANDED_CLASSES.index(classname)]:
        return pose.mirrored()
    return pose


# ---------------------------------------------------------------------------- planning


def split_unequally(total: int, parts: int, rng: np.random.Generator, min_each: int, alpha: float) -> np.ndarray:
    """``total`` items over ``parts`` bins, each at least ``min_each``, the rest by Dirichlet weights."""
    base = np.full(parts, min_each, dtype=int)
    rest = total - base.sum()
    if rest < 0:
        raise ValueError(f"cannot split {total} items into {parts} parts of at least {min_each}")
    return base + rng.multinomial(rest, rng.dirichlet(np.full(parts, alpha)))


def class_counts(n_frames: int, rng: np.random.Generator, every_class: bool) -> np.ndarray:
    """Frames per class for one driver: around the real class mix, unequal, optionally >= 1 each."""
    weights = rng.dirichlet(30 * REAL_CLASS_COUNTS / REAL_CLASS_COUNTS.sum())
    base = np.ones(len(CLASSES), dtype=int) if every_class else np.zeros(len(CLASSES), dtype=int)
    return base + rng.multinomial(n_frames - base.sum(), weights)


def clip_lengths(n_frames: int, rng: np.random.Generator) -> list[int]:
    lengths = []
    while n_frames > 0:
        length = min(n_frames, int(rng.integers(CLIP_LENGTH[0], CLIP_LENGTH[1] + 1)))
        lengths.append(length)
        n_frames -= length
    return lengths


def pose_vector(pose: ClassPose) -> np.ndarray:
    return np.array([*pose.right, *pose.left, pose.yaw, pose.pitch, pose.twist])


def driver_style(rng: np.random.Generator) -> np.ndarray:
    """Per class, this driver's persistent deviation from the class pose (hands, then head)."""
    hands = rng.normal(0, STYLE_HAND_SD, (len(CLASSES), 4))
    head = rng.normal(0, STYLE_HEAD_SD, (len(CLASSES), 3))
    return np.concatenate([hands, head], axis=1)


def clip_poses(target: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """One video clip: the class pose plus a clip offset plus a slow AR(1) jitter per frame."""
    rest = pose_vector(CLASS_POSES["c0"])
    start = target + rng.normal(0, CLIP_OFFSET_SD, target.shape)
    steps = rng.normal(0, STEP_SD, (length, target.size))
    walk = np.zeros_like(steps)
    for t in range(1, length):
        walk[t] = STEP_PERSISTENCE * walk[t - 1] + steps[t]
    poses = start + walk
    if rng.random() < TRANSITION_PROB:
        # The clip opens mid-movement: the first frames are partway between the wheel and the target.
        ramp = np.clip(np.linspace(0.45, 1.3, min(length, 4)), 0, 1)
        poses[: len(ramp)] = rest + ramp[:, None] * (poses[: len(ramp)] - rest)
    return poses


def plan_driver_frames(look: DriverLook, counts: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    style = driver_style(rng)
    rows = []
    for class_idx, (classname, n) in enumerate(zip(CLASSES, counts, strict=True)):
        pose = class_pose_for(look, classname)
        target = pose_vector(pose) + style[class_idx]
        for clip, length in enumerate(clip_lengths(int(n), rng)):
            poses = clip_poses(target, length, rng)
            exposure = 1 + rng.normal(0, 0.04) + np.cumsum(rng.normal(0, 0.006, length))
            for step in range(length):
                rows.append(
                    {
                        "subject": look.subject,
                        "classname": classname,
                        "clip": clip,
                        "step": step,
                        **dict(zip(POSE_FIELDS, poses[step].tolist(), strict=True)),
                        "right_item": pose.right_item,
                        "left_item": pose.left_item,
                        "exposure": float(exposure[step]),
                        "noise_dx": int(rng.integers(NOISE_MARGIN)),
                        "noise_dy": int(rng.integers(NOISE_MARGIN)),
                    }
                )
    return pd.DataFrame(rows)


def subject_names(n: int, rng: np.random.Generator) -> list[str]:
    """Unique subject ids like p002, p012, ... (real ones run p002..p081)."""
    pool = np.arange(MIN_SUBJECT_NUMBER, max(82, 3 * n))
    return [f"p{k:03d}" for k in rng.choice(pool, size=n, replace=False)]


def assign_image_names(frames: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Unique shuffled ``img_<N>.jpg`` across train and test, so numbering says nothing about the class."""
    id_space = len(frames) + len(frames) // 10 + 10
    ids = rng.choice(id_space, size=len(frames), replace=False)
    return frames.assign(img=[f"img_{k}.jpg" for k in ids])


@dataclass(frozen=True)
class DatasetPlan:
    looks: dict[str, DriverLook]
    frames: pd.DataFrame  # one row per image: img, split, subject, classname, pose and exposure


def plan_dataset(cfg: SyntheticConfig) -> DatasetPlan:
    """Every random choice of the dataset, made once from ``cfg.seed`` (cheap: no pixels)."""
    rng = np.random.default_rng(cfg.seed)
    n_drivers = cfg.n_train_drivers + cfg.n_test_drivers
    subjects = subject_names(n_drivers, rng)
    train_subjects = sorted(subjects[: cfg.n_train_drivers])
    test_subjects = sorted(subjects[cfg.n_train_drivers :])
    looks = {s: sample_driver_look(rng, s) for s in train_subjects + test_subjects}

    lo, hi = cfg.train_per_driver
    per_test_driver = split_unequally(
        cfg.n_test, cfg.n_test_drivers, rng, min_each=min(10, cfg.n_test // cfg.n_test_drivers), alpha=3.0
    )
    parts = []
    for subject in train_subjects:
        counts = class_counts(int(rng.integers(lo, hi + 1)), rng, every_class=True)
        parts.append(plan_driver_frames(looks[subject], counts, rng).assign(split="train"))
    for subject, n in zip(test_subjects, per_test_driver, strict=True):
        counts = class_counts(int(n), rng, every_class=False)
        parts.append(plan_driver_frames(looks[subject], counts, rng).assign(split="test"))
    frames = assign_image_names(pd.concat(parts, ignore_index=True), rng)
    return DatasetPlan(looks=looks, frames=frames)


# ---------------------------------------------------------------------------- drawing


class Canvas:
    """An RGB uint8 image drawn in height units with anti-aliased cv2 primitives."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.unit = image.shape[0]

    def _pt(self, x: float, y: float) -> tuple[int, int]:
        return int(round(x * self.unit * SUBPIXEL)), int(round(y * self.unit * SUBPIXEL))

    def _len(self, r: float) -> int:
        return max(1, int(round(r * self.unit * SUBPIXEL)))

    def _thickness(self, w: float) -> int:
        return max(1, int(round(w * self.unit)))

    def ellipse(self, centre: Sequence[float], radii: Sequence[float], colour: Sequence[int], angle: float = 0.0,
                thickness: float | None = None) -> None:
        t = -1 if thickness is None else self._thickness(thickness)
        axes = (self._len(radii[0]), self._len(radii[1]))
        cv2.ellipse(self.image, self._pt(*centre), axes, angle, 0, 360, tuple(colour), t, cv2.LINE_AA, SUBPIXEL_BITS)

    def line(self, a: Sequence[float], b: Sequence[float], width: float, colour: Sequence[int]) -> None:
        cv2.line(self.image, self._pt(*a), self._pt(*b), tuple(colour), self._thickness(width), cv2.LINE_AA,
                 SUBPIXEL_BITS)

    def polygon(self, points: Sequence[Sequence[float]], colour: Sequence[int]) -> None:
        pts = np.array([self._pt(*p) for p in points], dtype=np.int32)
        cv2.fillPoly(self.image, [pts], tuple(colour), cv2.LINE_AA, SUBPIXEL_BITS)

    def rect(self, a: Sequence[float], b: Sequence[float], colour: Sequence[int]) -> None:
        self.polygon([(a[0], a[1]), (b[0], a[1]), (b[0], b[1]), (a[0], b[1])], colour)


def shade(colour: Sequence[int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)  # type: ignore[return-value]


def draw_car_interior(canvas: Canvas, look: DriverLook, rng: np.random.Generator) -> None:
    """Static per driver: headliner, side window with a blurred outside view, pillar, dashboard, console."""
    h = canvas.unit
    w = canvas.image.shape[1]
    ramp = np.linspace(0.75, 1.15, h)[:, None, None]
    canvas.image[:] = np.clip(np.array(look.interior)[None, None, :] * ramp, 0, 255).astype(np.uint8)
    sx, sy = look.seat
    window_top, window_bottom = 0.04 + rng.uniform(0, 0.06), sy - 0.12 + rng.uniform(-0.04, 0.04)
    window_left = sx + 0.12 + rng.uniform(-0.03, 0.05)
    canvas.rect((window_left, window_top), (w / h + 0.05, window_bottom), look.sky)
    for _ in range(6):  # trees, buildings, other cars outside
        cx, cy = rng.uniform(window_left, w / h), rng.uniform(window_top, window_bottom)
        canvas.ellipse((cx, cy), rng.uniform(0.02, 0.09, 2), _colour(rng, 20, 200))
    canvas.rect((0.0, 0.0), (w / h + 0.05, window_top), shade(look.interior, 0.8))
    canvas.rect((0.0, window_bottom), (w / h + 0.05, window_bottom + 0.02), shade(look.interior, 0.6))
    pillar_x = window_left + rng.uniform(0.15, 0.35)
    canvas.rect((pillar_x, 0.0), (pillar_x + 0.05, window_bottom + 0.02), shade(look.interior, 0.9))
    # Rear passenger window on the image left (seen when reaching behind).
    canvas.rect((0.0, window_top + 0.05), (sx - 0.30, window_bottom - 0.05), shade(look.sky, 0.8))
    # Dashboard and the centre console with the radio, to the driver's right (image left).
    canvas.polygon([(0.0, sy + 0.22), (sx - 0.22, sy + 0.26), (sx - 0.22, 1.05), (0.0, 1.05)], shade(look.interior, 0.7))
    canvas.rect((sx - 0.42, sy + 0.27), (sx - 0.27, sy + 0.37), (25, 25, 28))
    canvas.rect((sx - 0.40, sy + 0.285), (sx - 0.33, sy + 0.315), _colour(rng, 60, 255))
    for k in range(4):
        canvas.ellipse((sx - 0.40 + 0.035 * k, sy + 0.345), (0.008, 0.008), (150, 150, 150))
    # The driver's seat back and headrest (the driver sits in front, drawn per frame).
    s = look.scale
    canvas.polygon([(sx - 0.21 * s, sy - 0.10 * s), (sx + 0.21 * s, sy - 0.10 * s), (sx + 0.24 * s, 1.05),
                    (sx - 0.24 * s, 1.05)], look.seat_colour)
    canvas.ellipse((sx, sy - 0.25 * s), (0.10 * s, 0.075 * s), shade(look.seat_colour, 1.15))


def render_background(look: DriverLook, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(look.seed)
    canvas = Canvas(np.zeros((height, width, 3), dtype=np.uint8))
    draw_car_interior(canvas, look, rng)
    # The window view and interior are out of focus: soften them once per driver.
    return cv2.GaussianBlur(canvas.image, (0, 0), max(0.5, height / 160))


def light_field(look: DriverLook, width: int, height: int) -> np.ndarray:
    """Per-driver lighting: overall gain, colour cast and a horizontal gradient from the window side."""
    x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    field = look.light_gain * (1 + look.light_slope * x) * np.array(look.light_tint, dtype=np.float32)
    return np.broadcast_to(field, (height, width, 3)).astype(np.float32)


def noise_field(look: DriverLook, width: int, height: int) -> np.ndarray:
    """Sensor noise bigger than a frame; each frame crops it at its own offset."""
    rng = np.random.default_rng([look.seed, 1])
    shape = (height + NOISE_MARGIN, width + NOISE_MARGIN, 3)
    return (rng.standard_normal(shape, dtype=np.float32) * look.noise_sd).astype(np.float32)


def elbow_position(shoulder: np.ndarray, hand: np.ndarray, length: float, outward: float) -> np.ndarray:
    """Two-segment arm of equal segment ``length``: the elbow bends outward and down, as arms do."""
    d = hand - shoulder
    dist = float(np.hypot(*d))
    if dist >= 2 * length or dist < 1e-9:
        return shoulder + d / 2
    bend = np.sqrt(length**2 - (dist / 2) ** 2)
    normal = np.array([-d[1], d[0]]) / dist
    candidates = [shoulder + d / 2 + bend * normal, shoulder + d / 2 - bend * normal]
    return max(candidates, key=lambda e: outward * e[0] + 0.5 * e[1])


@dataclass(frozen=True)
class FramePose:
    right: np.ndarray
    left: np.ndarray
    yaw: float
    pitch: float
    twist: float
    right_item: int
    left_item: int


def draw_head(canvas: Canvas, look: DriverLook, centre: np.ndarray, pose: FramePose) -> None:
    s = look.scale
    rx, ry = 0.068 * s, 0.085 * s
    yaw = float(np.clip(pose.yaw, -1.3, 1.3))
    # Turning shows more of the back of the head: hair shifts away from the face direction.
    hair_centre = centre + np.array([-0.03 * yaw * s, -0.012 * s])
    if look.long_hair:
        canvas.ellipse(hair_centre + np.array([0, 0.06 * s]), (rx * 1.15, ry * 1.2), look.hair)
    canvas.ellipse(hair_centre, (rx * 1.06, ry * 1.02), look.hair)
    face_centre = centre + np.array([0.018 * yaw * s, 0.012 * s])
    canvas.ellipse(face_centre, (rx * (0.92 - 0.2 * abs(yaw)), ry * 0.82), look.skin)
    fx = face_centre[0] + 0.03 * yaw * s
    fy = face_centre[1] + 0.02 * pose.pitch * s
    eye_gap = 0.025 * s * (1 - 0.45 * min(abs(yaw), 1))
    for side in (-1, 1):
        canvas.ellipse((fx + side * eye_gap, fy - 0.012 * s), (0.008 * s, 0.006 * s), (25, 20, 20))
    canvas.ellipse((fx + 0.012 * yaw * s, fy + 0.012 * s), (0.007 * s, 0.010 * s), shade(look.skin, 0.8))
    canvas.line((fx - 0.014 * s, fy + 0.04 * s), (fx + 0.014 * s, fy + 0.04 * s), 0.006 * s, shade(look.skin, 0.55))
    if look.hat is not None:
        canvas.ellipse(hair_centre + np.array([0, -0.04 * s]), (rx * 1.1, ry * 0.6), look.hat)
        canvas.line(hair_centre + np.array([-rx * 1.2, -0.01 * s]), hair_centre + np.array([rx * 1.2, -0.01 * s]),
                    0.018 * s, shade(look.hat, 0.7))


def draw_item(canvas: Canvas, look: DriverLook, item: int, hand: np.ndarray, towards: np.ndarray) -> None:
    s = look.scale
    if item == PHONE_SCREEN:  # held low, screen lit and facing the driver (seen edge-on and bright)
        canvas.rect(hand + np.array([-0.028, -0.055]) * s, hand + np.array([0.028, -0.005]) * s, (20, 20, 25))
        canvas.rect(hand + np.array([-0.022, -0.05]) * s, hand + np.array([0.022, -0.012]) * s, (200, 225, 245))
    elif item == PHONE_EAR:  # pressed between the hand and the ear
        mid = (hand + towards) / 2
        canvas.rect(mid + np.array([-0.012, -0.045]) * s, mid + np.array([0.012, 0.035]) * s, (15, 15, 18))
    elif item == CUP:  # raised to the mouth
        canvas.rect(hand + np.array([-0.022, -0.07]) * s, hand + np.array([0.022, 0.015]) * s, look.cup)
        canvas.ellipse(hand + np.array([0.0, -0.07]) * s, (0.022 * s, 0.008 * s), shade(look.cup, 0.6))


def draw_arm(canvas: Canvas, look: DriverLook, shoulder: np.ndarray, hand: np.ndarray, outward: float) -> None:
    s = look.scale
    elbow = elbow_position(shoulder, hand, 0.175 * s, outward)
    canvas.line(shoulder, elbow, 0.055 * s, look.shirt)
    canvas.line(elbow, hand, 0.045 * s, look.skin if look.short_sleeves else shade(look.shirt, 0.9))
    canvas.ellipse(hand, (0.03 * s, 0.03 * s), look.skin)


def draw_driver(canvas: Canvas, look: DriverLook, pose: FramePose) -> None:
    s = look.scale
    origin = np.array(look.seat)
    twist = pose.twist
    # Reaching behind turns the shoulders: the right shoulder goes back (up, in), the left comes forward.
    r_shoulder = origin + np.array([-0.14 + 0.03 * twist, -0.02 * twist]) * s
    l_shoulder = origin + np.array([0.14 + 0.015 * twist, 0.01 * twist]) * s
    canvas.polygon([r_shoulder + np.array([-0.01, 0]) * s, l_shoulder + np.array([0.01, 0]) * s,
                    origin + np.array([0.15, 0.65]) * s, origin + np.array([-0.15, 0.65]) * s], look.shirt)
    neck_top = origin + np.array([0.0, -0.12]) * s
    canvas.line(neck_top, origin + np.array([0.0, -0.01]) * s, 0.05 * s, shade(look.skin, 0.85))
    head = origin + np.array([0.012 * pose.yaw, -0.19]) * s
    draw_head(canvas, look, head, pose)
    # Steering wheel and column in front of the torso; hands are drawn over the rim.
    wheel = origin + np.array(WHEEL_CENTRE) * s
    canvas.line(wheel, wheel + np.array([0.0, 0.3]) * s, 0.05 * s, (30, 30, 32))
    canvas.ellipse(wheel, (WHEEL_RADII[0] * s, WHEEL_RADII[1] * s), (30, 30, 32), thickness=0.022 * s)
    ear = {-1: head + np.array([-0.065, 0.0]) * s, 1: head + np.array([0.065, 0.0]) * s}
    for side, shoulder, hand, item in ((-1, r_shoulder, pose.right, pose.right_item),
                                       (1, l_shoulder, pose.left, pose.left_item)):
        hand_at = origin + hand * s
        draw_arm(canvas, look, shoulder, hand_at, outward=side)
        draw_item(canvas, look, item, hand_at, ear[side])


def frame_pose(row: pd.Series | dict) -> FramePose:
    return FramePose(
        right=np.array([row["rx"], row["ry"]]),
        left=np.array([row["lx"], row["ly"]]),
        yaw=float(row["yaw"]),
        pitch=float(row["pitch"]),
        twist=float(row["twist"]),
        right_item=int(row["right_item"]),
        left_item=int(row["left_item"]),
    )


class DriverAssets:
    """Per-driver pixels reused by all of that driver's frames (background, light, noise)."""

    def __init__(self, look: DriverLook, width: int, height: int) -> None:
        self.look = look
        self.background = render_background(look, width, height)
        self.light = light_field(look, width, height)
        self.noise = noise_field(look, width, height)


def render_frame(assets: DriverAssets, row: dict) -> np.ndarray:
    """One RGB uint8 frame: background, driver in pose, exposure and sensor noise."""
    height, width = assets.background.shape[:2]
    canvas = Canvas(assets.background.copy())
    draw_driver(canvas, assets.look, frame_pose(row))
    dy, dx = int(row["noise_dy"]), int(row["noise_dx"])
    lit = canvas.image.astype(np.float32) * (assets.light * np.float32(row["exposure"]))
    lit += assets.noise[dy : dy + height, dx : dx + width]
    return np.clip(lit, 0, 255).astype(np.uint8)


def encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# ---------------------------------------------------------------------------- writing


def image_path(out_dir: Path, row: dict) -> Path:
    if row["split"] == "train":
        return out_dir / "imgs" / "train" / row["classname"] / row["img"]
    return out_dir / "imgs" / "test" / row["img"]


@dataclass(frozen=True)
class RenderJob:
    """One driver's frames to render: small enough to pickle to a worker process."""

    look: DriverLook
    rows: list[dict]
    width: int
    height: int
    quality: int
    out_dir: Path


def render_job(job: RenderJob) -> int:
    assets = DriverAssets(job.look, job.width, job.height)
    for row in job.rows:
        image_path(job.out_dir, row).write_bytes(encode_jpeg(render_frame(assets, row), job.quality))
    return len(job.rows)


def render_worker_setup(parent_pid: int) -> None:
    cv2.setNumThreads(1)  # parallelism comes from the worker processes, not cv2's own thread pool
    die_with_parent(parent_pid)  # a killed ingest leaves no renderer behind


def render_jobs(plan: DatasetPlan, cfg: SyntheticConfig, out_dir: Path, rows_per_job: int = 400) -> Iterator[RenderJob]:
    """Jobs by driver (each job builds that driver's assets once), cut into pieces for load balance."""
    for subject, frames in plan.frames.groupby("subject", sort=True):
        rows = frames.to_dict("records")
        for start in range(0, len(rows), rows_per_job):
            yield RenderJob(plan.looks[str(subject)], rows[start : start + rows_per_job], cfg.width, cfg.height,
                            cfg.jpeg_quality, out_dir)


def worker_count(n_images: int, width: int) -> int:
    """Processes to render with: one for small sets (start-up would dominate), else up to the cores."""
    if n_images * width < 400_000:  # e.g. under ~2,500 images at 160 px wide
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def write_images(plan: DatasetPlan, cfg: SyntheticConfig, out_dir: Path) -> None:
    for classname in CLASSES:
        (out_dir / "imgs" / "train" / classname).mkdir(parents=True, exist_ok=True)
    (out_dir / "imgs" / "test").mkdir(parents=True, exist_ok=True)
    jobs = list(render_jobs(plan, cfg, out_dir))
    workers = worker_count(len(plan.frames), cfg.width)
    if workers == 1:
        for job in jobs:
            render_job(job)
        return
    # spawn, not fork: callers (Prefect) run tasks in threads, and forking a threaded process can hang.
    with mp.get_context("spawn").Pool(workers, initializer=render_worker_setup, initargs=(os.getpid(),)) as pool:
        for _ in pool.imap_unordered(render_job, jobs):
            pass


def write_tables(plan: DatasetPlan, out_dir: Path, hidden_dir: Path) -> None:
    frames = plan.frames
    train = frames[frames["split"] == "train"]
    # Kaggle's list is grouped by subject and class; frames keep their video order inside.
    atomic_write_csv(out_dir / "driver_imgs_list.csv", train[["subject", "classname", "img"]])
    test = frames[frames["split"] == "test"].sort_values("img")
    submission = pd.DataFrame({"img": test["img"].to_numpy()})
    for classname in CLASSES:
        submission[classname] = 0.1
    atomic_write_csv(out_dir / "sample_submission.csv", submission)
    hidden_dir.mkdir(parents=True, exist_ok=True)
    hidden = test[["img", "classname", "subject"]].set_axis(["id", "label", "group"], axis=1)
    atomic_write_csv(hidden_dir / "test_labels.csv", hidden)


def generate(cfg: SyntheticConfig, out_dir: Path, hidden_dir: Path) -> dict:
    """Writes the competition files into out_dir and hidden test labels into hidden_dir.
    Returns figures: {"n_train", "n_test", "n_train_drivers", "n_test_drivers", "seconds", "images_per_s"}."""
    out_dir, hidden_dir = Path(out_dir), Path(hidden_dir)
    if hidden_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"hidden labels must live outside the competition folder: {hidden_dir} is inside {out_dir}")
    start = time.perf_counter()
    plan = plan_dataset(cfg)
    write_images(plan, cfg, out_dir)
    write_tables(plan, out_dir, hidden_dir)
    seconds = time.perf_counter() - start
    n_train = int((plan.frames["split"] == "train").sum())
    return {
        "n_train": n_train,
        "n_test": len(plan.frames) - n_train,
        "n_train_drivers": cfg.n_train_drivers,
        "n_test_drivers": cfg.n_test_drivers,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(plan.frames) / seconds, 1),
    }


def preset_config(preset: str) -> SyntheticConfig:
    """``full`` is the real-size default; ``demo`` and ``smoke`` are the profiles' own settings."""
    if preset == "full":
        return SyntheticConfig()
    return load_profile(preset).ingest.synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic.drivers", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="competition folder to write (Kaggle layout)")
    parser.add_argument("hidden_dir", type=Path, help="folder for test_labels.csv, outside out_dir")
    parser.add_argument("--preset", choices=("demo", "smoke", "full"), default="demo")
    args = parser.parse_args(argv)
    figures = generate(preset_config(args.preset), args.out_dir, args.hidden_dir)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
