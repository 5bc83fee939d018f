"""``test_quantize.py --per-layer``: where a number format hurts the model, rounding point by rounding point.

A rounding point is each place the model rounds a tensor in a format (see :mod:`myrtle_vision.quantization`):
a Linear's or LayerNorm's input, its weights (weight and bias), under FP16_16 its output and every activation
(the tokens, the attention scores and softmax, the GELU, the residual adds); under PyTorchINT8 each
quantization point and each Linear's int8 weights. On the first N images of a split, for each point:

- **range**, measured in FP32 (every point left in FP32): the largest magnitude, the 99.9th percentile (to an
  eighth of a power of two), the smallest nonzero magnitude; against the format, the headroom (powers of two
  between the largest magnitude and the format's largest value, or INT8's calibrated range), how many values
  would overflow (to infinity; under ``qtorch`` rounding, saturate at its largest value; under INT8, be
  clipped to the calibrated range) and how many nonzero values would become subnormal or zero;
- **what it costs**: (a) with every point rounded, the relative error of its output against FP32 (the root
  of the summed squared differences over the root of the summed squares), which shows the error building
  up along the depth; (b) with only that point rounded, the change of top-1 against FP32 and the mean
  KL divergence of the logits' softmax from FP32's (its sensitivity); (c) with every point but that one
  rounded, the same (what keeping it in FP32 would buy).

(b) and (c) take one forward pass per point and batch; (a) keeps each point's FP32 output of a few images at
a time to compare with. With several processes each takes its share of the N images and the sums, counts and
histograms are added up.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from ..config import Config
from ..distributed import Processes
from ..errors import UserError
from ..evaluation import split_loader
from ..files import write_atomic, write_json
from ..int8 import ACT_MAX, ACT_MIN, WEIGHT_MAX, FakeQuant, WeightQuant, fake_quantize_weight, weight_scale
from ..quantization import FP32_FORMAT, Round, rounding_function
from ..reporting import say
from ..weights.deploy import has_distillation
from .outputs import check_outputs, save_png, write_report
from .quantize import calibrate_on_validation, setup

DEFAULT_IMAGES = 64  # images of the split the report measures on
CHUNK = 8  # images whose FP32 outputs are kept at every point at once, for (a)
BINS_PER_OCTAVE, LOWEST, HIGHEST = 8, -160, 160  # the histogram of log2 |x|, for the percentile
PERCENTILE = 99.9
FIELDS = (
    "depth",
    "point",
    "module",
    "kind",
    "values",
    "max_abs",
    "p99_9_abs",
    "min_nonzero_abs",
    "format_max",
    "headroom_bits",
    "overflow",
    "subnormal",
    "to_zero",
    "rel_error_all",
    "alone_top1_change",
    "alone_changed",
    "alone_kl",
    "all_but_top1_change",
    "all_but_changed",
    "all_but_kl",
)

# A module path's words, as a user reads them: blocks.7.mlp.fc1.round_input -> block 7 mlp fc1 input
_WORDS = {
    "patch_embed": "patch embedding",
    "blocks": "block",
    "attn": "attention",
    "head_dist": "distillation head",
    "round_in": "patches",
    "round_input": "input",
    "round_params": "weights",
    "weight_quant": "weights",
    "round_output": "output",
    "round_scores": "scores",
    "round_softmax": "softmax",
    "round_out": "output",
    "round_act": "gelu output",
    "round_add1": "attention residual add",
    "round_add2": "mlp residual add",
    "round_cls": "class token",
    "round_cat": "tokens concatenated",
    "round_pos": "position embedding",
    "round_pos_add": "position embedding add",
    "round_dist": "distillation token",
    "round_head": "head input",
    "round_head_dist": "distillation head input",
}


def point_name(path: str) -> str:
    """``blocks.7.mlp.fc1.round_input`` -> ``block 7 mlp fc1 input``; ``norm.round_input`` -> ``final norm input``."""
    parts = path.split(".")
    if parts[0] == "norm":
        parts[0] = "final norm"
    if parts[:2] == ["patch_embed", "proj"]:  # the patch embedding is its projection
        del parts[1]
    return " ".join(_WORDS.get(p, p) for p in parts)


@dataclass
class Point:
    path: str  # the rounding module's name in the model
    module: nn.Module  # a Round, FakeQuant or WeightQuant
    params: list[torch.Tensor]  # the tensors a weights point rounds; empty for an activation

    @property
    def name(self) -> str:
        return point_name(self.path)

    @property
    def kind(self) -> str:
        return "parameters" if self.params else "activation"


def rounding_points(model: nn.Module) -> list[Point]:
    """Every rounding point of ``model``, in the order the forward pass reaches it; points it never reaches (a
    DeiT's distillation token, which the class head does not use) are left out."""
    modules = dict(model.named_modules())
    found = []
    for path, m in modules.items():
        if not isinstance(m, Round | FakeQuant | WeightQuant):
            continue
        owner = modules[path.rpartition(".")[0]] if "." in path else model
        if path.endswith(".round_params"):
            params = [p for p in (owner.weight, owner.bias) if p is not None]
        elif isinstance(m, WeightQuant):
            params = [owner.weight]
        else:
            params = []
        found.append(Point(path, m, params))
    order: dict[str, int] = {}
    tokens: dict[str, torch.Tensor] = {}  # points that round a parameter directly (the class token, the positions)

    def reached(path: str, x) -> None:  # (a pre-hook that returns something replaces the module's input)
        order.setdefault(path, len(order))
        if isinstance(x[0], nn.Parameter):
            tokens[path] = x[0]

    hooks = [p.module.register_forward_pre_hook(lambda _m, x, path=p.path: reached(path, x)) for p in found]
    for m in model.modules():
        m.__dict__.pop("_rounded_cache", None)  # so that each weights point is reached (and ordered) below
    try:
        with torch.no_grad():
            args = model.args
            model(torch.zeros(1, args.in_chans, args.image_size, args.image_size, device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
    for p in found:
        if p.path in tokens:
            p.params = [tokens[p.path]]
    return sorted((p for p in found if p.path in order), key=lambda p: order[p.path])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def set_rounded(points: list[Point], rounded) -> None:
    """Round at the points whose index is in ``rounded`` ("all" or a set), leave the others in FP32."""
    for i, p in enumerate(points):
        p.module.bypass = not (rounded == "all" or i in rounded)


# --- what a point's format does to a tensor ------------------------------------------------------------------------


def format_max(point: Point) -> float:
    """The largest magnitude a point holds to within its rounding: its float format's largest value (qtorch counts
    the top exponent as finite, so it saturates at twice IEEE's largest, less one step), or INT8's calibrated range
    (half a step beyond its end grid value, which is where clipping starts to cost more than rounding)."""
    m = point.module
    if isinstance(m, Round):
        fmt = m.fmt
        top = (2 - 2.0**-fmt.man) * 2.0 ** (2 ** (fmt.exp - 1) - 1)
        if m.rounding == "qtorch" and fmt.exp < 8:
            top *= 2
        return min(top, torch.finfo(torch.float32).max)
    if isinstance(m, FakeQuant):
        scale, zp = m.scale.item(), m.zero_point.item()
        return max(ACT_MAX + 0.5 - zp, zp - ACT_MIN + 0.5) * scale
    return float(((WEIGHT_MAX + 0.5) * weight_scale(point.params[0], m.per_channel)).max())


def outcome(point: Point, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of the values of ``x`` that the point would make overflow, subnormal, zero. Overflow: to infinity
    (IEEE rounding), or beyond the largest value (qtorch saturates there), or, for INT8, beyond the calibrated
    range by more than half a step (clipped by more than rounding would move it)."""
    m = point.module
    finite = torch.isfinite(x)
    if isinstance(m, Round):
        r = m.fn(x)
        if m.rounding == "qtorch":
            over = finite & (x.abs() > format_max(point))
        else:
            over = finite & ~torch.isfinite(r)
        smallest_normal = 2.0 ** (2 - 2 ** (m.fmt.exp - 1))
        tiny = torch.finfo(torch.float32).tiny
        subnormal = (r != 0) & (r.abs() < smallest_normal) & (x.abs() >= tiny)
        return over, subnormal, (x != 0) & (r == 0)
    # INT8 rounds to within half a step; a value moved further was clipped (a little slack for FP32's own rounding)
    scale = m.scale if isinstance(m, FakeQuant) else weight_scale(x, m.per_channel)
    if isinstance(m, WeightQuant) and m.per_channel:
        scale = scale[:, None]
    over = finite & ((x - rounded(point, x)).abs() > 0.5 * scale * (1 + 1e-4))
    return over, torch.zeros_like(over), (x != 0) & (rounded(point, x) == 0)


def rounded(point: Point, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the point rounds it (whether or not it is bypassed)."""
    m = point.module
    if isinstance(m, Round):
        return m.fn(x)
    if isinstance(m, FakeQuant):
        return torch.fake_quantize_per_tensor_affine(x, m.scale, m.zero_point, ACT_MIN, ACT_MAX)
    return fake_quantize_weight(x, m.per_channel)


# --- the measurements ----------------------------------------------------------------------------------------------


class Ranges:
    """Per point: values seen, overflow, subnormal and zero counts, largest magnitude, smallest nonzero magnitude,
    and a histogram of log2 of the nonzero magnitudes (for the percentile), summable over processes."""

    def __init__(self, n: int, device: torch.device):
        bins = (HIGHEST - LOWEST) * BINS_PER_OCTAVE
        self.counts = torch.zeros(n, 4, dtype=torch.float64, device=device)  # values, overflow, subnormal, zero
        self.max_abs = torch.zeros(n, dtype=torch.float64, device=device)
        self.neg_min = torch.full((n,), -math.inf, dtype=torch.float64, device=device)  # -(smallest nonzero)
        self.hist = torch.zeros(n, bins, dtype=torch.float64, device=device)

    def add(self, i: int, point: Point, x: torch.Tensor) -> None:
        x = x.detach().float()
        over, subnormal, zero = outcome(point, x)
        seen = [torch.tensor(x.numel(), device=x.device)] + [m.sum() for m in (over, subnormal, zero)]
        self.counts[i] += torch.stack(seen).double()
        mag = x.abs()[(x != 0) & torch.isfinite(x)]
        if mag.numel():
            self.max_abs[i] = torch.maximum(self.max_abs[i], mag.max().double())
            self.neg_min[i] = torch.maximum(self.neg_min[i], -mag.min().double())
            self.hist[i] += torch.histc(mag.log2(), self.hist.shape[1], LOWEST, HIGHEST).double()

    def reduce(self, procs: Processes) -> None:
        procs.all_reduce_sum(self.counts), procs.all_reduce_sum(self.hist)
        procs.all_reduce_max(self.max_abs), procs.all_reduce_max(self.neg_min)

    def percentile(self, i: int) -> float:
        """The magnitude below which PERCENTILE% of the nonzero values lie, to the upper edge of its bin."""
        hist = self.hist[i]
        total = hist.sum().item()
        if total == 0:
            return 0.0
        at = int(torch.searchsorted(hist.cumsum(0), hist.new_tensor(total * PERCENTILE / 100)))
        return min(2.0 ** (LOWEST + (at + 1) / BINS_PER_OCTAVE), self.max_abs[i].item())


class Effects:
    """Per point and per pass kind (alone, all but): KL sums, correct top-1 counts, predictions changed."""

    def __init__(self, n: int, device: torch.device):
        self.sums = torch.zeros(2, n, 3, dtype=torch.float64, device=device)

    def add(self, kind: int, i: int, logits: torch.Tensor, fp32: torch.Tensor, targets: torch.Tensor) -> None:
        self.sums[kind, i] += _effect(logits, fp32, targets)


def _effect(logits: torch.Tensor, fp32: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(summed KL(softmax(fp32) || softmax(logits)), correct top-1, top-1 predictions that differ from FP32's)."""
    log_p, log_q = F.log_softmax(fp32.double(), 1), F.log_softmax(logits.double(), 1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    pred = logits.argmax(1)
    return torch.stack([kl, (pred == targets).sum().double(), (pred != fp32.argmax(1)).sum().double()])


@torch.no_grad()
def measure(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], procs: Processes) -> dict:
    """Every measurement of the report on ``batches`` (this process's share), summed over processes."""
    points = rounding_points(model)
    device = _device(model)
    n = len(points)
    ranges, effects = Ranges(n, device), Effects(n, device)
    errors = torch.zeros(n, 2, dtype=torch.float64, device=device)  # (a): summed squared error, summed squares
    # images, FP32 correct; with every point rounded: KL, correct, changed; and its largest logit difference
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    largest_diff = torch.zeros(1, dtype=torch.float64, device=device)
    index = {p.path: i for i, p in enumerate(points)}
    state = {"mode": None, "ref": {}}

    def hook(module, args, out, path):
        i, x = index[path], args[0]
        if state["mode"] == "fp32":
            ranges.add(i, points[i], x)
            state["ref"][path] = x.detach().clone()
        elif state["mode"] == "all":
            ref = state["ref"][path]
            errors[i] += torch.stack([((out.double() - ref.double()) ** 2).sum(), (ref.double() ** 2).sum()])

    activations = [p for p in points if not p.params]
    handles = [p.module.register_forward_hook(lambda m, a, o, path=p.path: hook(m, a, o, path)) for p in activations]
    try:
        for images, targets in batches:
            images, targets = images.to(device), targets.to(device)
            fp32, everything = [], []
            for chunk in images.split(CHUNK):
                set_rounded(points, set())
                state["mode"] = "fp32"
                fp32.append(model(chunk))
                set_rounded(points, "all")
                state["mode"] = "all"
                everything.append(model(chunk))
                state["ref"].clear()
            state["mode"] = None
            fp32, everything = torch.cat(fp32), torch.cat(everything)
            totals[0] += len(targets)
            totals[1] += (fp32.argmax(1) == targets).sum()
            totals[2:] += _effect(everything, fp32, targets)
            largest_diff = torch.maximum(largest_diff, (everything - fp32).abs().max().double())
            for i in range(n):
                set_rounded(points, {i})
                effects.add(0, i, model(images), fp32, targets)
                set_rounded(points, set(range(n)) - {i})
                effects.add(1, i, model(images), fp32, targets)
    finally:
        for h in handles:
            h.remove()
        set_rounded(points, "all")
    # the activations' figures over every process's images; the weights' rows are still empty here
    ranges.reduce(procs)
    procs.all_reduce_sum(errors), procs.all_reduce_sum(effects.sums), procs.all_reduce_sum(totals)
    procs.all_reduce_max(largest_diff)
    for i, p in enumerate(points):  # then the weights: the same on every process, measured once
        if p.params:
            # a Round's weight and bias as one tensor; int8 weights keep their shape (scales per row or tensor)
            flat = p.params[0] if isinstance(p.module, WeightQuant) else torch.cat([t.flatten() for t in p.params])
            flat = flat.detach().float()
            ranges.add(i, p, flat)
            r = rounded(p, flat)
            errors[i] = torch.stack([((r.double() - flat.double()) ** 2).sum(), (flat.double() ** 2).sum()])
    return {
        "points": points,
        "ranges": ranges,
        "effects": effects,
        "errors": errors,
        "totals": totals,
        "max_logit_diff": largest_diff.item(),
    }


def rows_of(measured: dict) -> tuple[dict, list[dict]]:
    """(the summary, one row per point in depth order) of :func:`measure`'s figures."""
    points, ranges, effects, errors, totals = (measured[k] for k in ("points", "ranges", "effects", "errors", "totals"))
    images = totals[0].item()
    fp32_top1 = 100 * totals[1].item() / max(images, 1)
    rows = []
    for i, p in enumerate(points):
        values, over, subnormal, zero = (int(v) for v in ranges.counts[i].tolist())
        largest, top = ranges.max_abs[i].item(), format_max(p)
        num, den = errors[i].tolist()
        alone, but = effects.sums[0, i].tolist(), effects.sums[1, i].tolist()
        rows.append(
            {
                "depth": i,
                "point": p.name,
                "module": p.path,
                "kind": p.kind,
                "values": values,
                "max_abs": largest,
                "p99_9_abs": ranges.percentile(i),
                "min_nonzero_abs": -ranges.neg_min[i].item() if largest > 0 else 0.0,
                "format_max": top,
                "headroom_bits": math.log2(top / largest) if largest > 0 else math.inf,
                "overflow": over,
                "subnormal": subnormal,
                "to_zero": zero,
                "rel_error_all": math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf),
                "alone_top1_change": 100 * alone[1] / max(images, 1) - fp32_top1,
                "alone_changed": int(alone[2]),
                "alone_kl": alone[0] / max(images, 1),
                "all_but_top1_change": 100 * but[1] / max(images, 1) - fp32_top1,
                "all_but_changed": int(but[2]),
                "all_but_kl": but[0] / max(images, 1),
            }
        )
    summary = {
        "num_images": int(images),
        "points": len(points),
        "fp32_top1": fp32_top1,
        "all_rounded_top1": 100 * totals[3].item() / max(images, 1),
        "all_rounded_kl": totals[2].item() / max(images, 1),
        "all_rounded_changed": int(totals[4].item()),
        "all_rounded_max_logit_diff": measured["max_logit_diff"],
    }
    return summary, rows


def _badness(row: dict) -> tuple:
    kl = row["alone_kl"]
    return (-row["overflow"], -(math.inf if math.isnan(kl) else kl), -row["subnormal"] - row["to_zero"])


def worst_first(rows: list[dict]) -> list[dict]:
    """Overflowing points first (most values first), then by sensitivity (KL with the point rounded alone)."""
    return sorted(rows, key=_badness)


def summary_line(fmt: str, rows: list[dict]) -> str:
    over = [r for r in rows if r["overflow"]]
    worst = worst_first([dict(r, overflow=0) for r in rows])[0] if rows else None
    most = (
        f"the most sensitive is {worst['point']}: {worst['alone_top1_change']:+.2f} points alone "
        f"(KL {worst['alone_kl']:.3g})"
        if worst
        else "there is no rounding point"
    )
    if not over:
        return f"no point overflows {fmt}; {most}"
    first = over[0]
    return (
        f"{len(over)} point{'s' if len(over) > 1 else ''} overflow {fmt}, the first along the depth "
        f"{first['point']} ({first['overflow']} values); {most}"
    )


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def table(rows: list[dict], limit: int = 15) -> str:
    head = (
        f"{'point':<36} {'max|x|':>9} {'headroom':>8} {'overflow':>8} {'subn/0':>7} {'rel err':>8} "
        f"{'alone: top-1':>12} {'KL':>8} {'all but: top-1':>14} {'KL':>8}"
    )
    lines = [head]
    for r in rows[:limit]:
        lines.append(
            f"{r['point'][:36]:<36} {_fmt(r['max_abs']):>9} {_fmt(r['headroom_bits']):>8} {r['overflow']:>8} "
            f"{r['subnormal'] + r['to_zero']:>7} {_fmt(r['rel_error_all']):>8} {r['alone_top1_change']:>+12.2f} "
            f"{_fmt(r['alone_kl']):>8} {r['all_but_top1_change']:>+14.2f} {_fmt(r['all_but_kl']):>8}"
        )
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more points in layers.csv")
    return "\n".join(lines)


def chart(rows: list[dict], title: str):
    """Along the depth: each point's headroom (red: it overflows) and its sensitivity (log10 of the KL of the
    logits with it alone rounded), as a PIL image."""
    from PIL import Image, ImageDraw

    n, bar, pad, height = len(rows), 6, 60, 160
    width = pad * 2 + max(n, 1) * bar
    img = Image.new("RGB", (width, 2 * height + 3 * pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), title, fill="black")

    def panel(top: int, label: str, values: list[float], lo: float, hi: float, colours: list[str]) -> None:
        draw.text((pad, top - 16), label, fill="black")
        draw.rectangle([pad, top, pad + n * bar, top + height], outline=(200, 200, 200))
        zero = top + height * (hi / (hi - lo)) if hi > 0 > lo else top + height
        for i, (v, c) in enumerate(zip(values, colours)):
            v = min(max(v, lo), hi)
            y = top + height * (hi - v) / (hi - lo)
            draw.rectangle([pad + i * bar, min(y, zero), pad + i * bar + bar - 2, max(y, zero)], fill=c)
        draw.text((4, top - 4), f"{hi:g}", fill="black")
        draw.text((4, top + height - 8), f"{lo:g}", fill="black")

    headroom = [r["headroom_bits"] if math.isfinite(r["headroom_bits"]) else 128.0 for r in rows]
    panel(
        pad + 10,
        "headroom (powers of two below the format's largest value; red: overflows)",
        headroom,
        min(0.0, min(headroom, default=0.0)),
        max(1.0, max(headroom, default=1.0)),
        ["red" if r["overflow"] else "steelblue" for r in rows],
    )
    kl = [math.log10(r["alone_kl"]) if r["alone_kl"] > 0 and math.isfinite(r["alone_kl"]) else -12.0 for r in rows]
    panel(
        2 * pad + height + 10,
        "sensitivity: log10 KL(FP32 || only this point rounded)",
        kl,
        -12.0,
        max(0.0, max(kl, default=0.0)),
        ["darkorange"] * n,
    )
    return img


def _json_safe(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def run_layer_report(
    cfg: Config,
    checkpoint_path: Path,
    procs: Processes = Processes(),
    q_format: str | None = None,
    q_rounding: str | None = None,
    quantized_ckpt: bool = False,
    json_path: str | None = None,
    calib_steps: int | None = None,
    per_channel: bool = False,
    split: str = "val",
    images: int = DEFAULT_IMAGES,
    output_dir: str | None = None,
    force: bool = False,
) -> dict:
    """The per-layer report of ``checkpoint_path`` in a format (as ``test_quantize.py`` chooses it) on the first
    ``images`` images of ``split``: printed worst points first with a summary line, and every point in
    ``layers.csv``, ``layers.json`` and ``layers.png`` in ``output_dir`` (default: ``<split>_<format>_<checkpoint
    name>`` beside the checkpoint, as ``test_quantize.py``'s other files)."""
    if images < 1:
        raise UserError(f"--per-layer-images {images}: must be at least 1 (the images the report measures on)")
    ckpt, fmt, rounding, out_dir, int8_options = setup(
        cfg, checkpoint_path, procs, q_format, q_rounding, quantized_ckpt, calib_steps, per_channel, split
    )
    out_dir = Path(output_dir) if output_dir else out_dir
    check_outputs(procs, out_dir, json_path, force)
    weights = int8_options[1] if int8_options else "per_tensor"
    # FP32 rounds nothing: its points are FP16_32's places, each rounding to FP32 (every figure zero)
    model = checkpoint.ready_model(
        cfg,
        ckpt,
        checkpoint_path,
        q_format="FP16_32" if fmt == "FP32" else fmt,
        q_rounding=rounding,
        int8_weights=weights,
        device=procs.device,
    )
    if fmt == "FP32":
        for m in model.modules():
            if isinstance(m, Round):
                m.fmt, m.fn = FP32_FORMAT, rounding_function(FP32_FORMAT, rounding)
    say(
        f"{checkpoint_path}: where {fmt} ({f'{weights} int8 weights' if int8_options else f'{rounding} rounding'}) "
        f"hurts the model, point by point, on the first {images} {split} images"
        + (" (DeiT: class head)" if has_distillation(ckpt) else ""),
        procs,
    )
    if int8_options:
        calibrate_on_validation(cfg, model, procs, int8_options[0])
    tc = cfg.train_config
    loader, _ = split_loader(cfg, procs, tc.local_batch_size, tc.num_workers, split)
    measured = measure(model, _first_images(loader, images, procs), procs)
    summary, rows = rows_of(measured)
    line = summary_line(fmt, rows)
    result = {
        "q_format": fmt,
        "q_rounding": None if int8_options else rounding,
        "quantized_ckpt": quantized_ckpt,
        "split": split,
        **summary,
        "summary": line,
        "output_dir": str(out_dir),
        "layers": [{k: _json_safe(v) for k, v in r.items()} for r in rows],
    }
    if not procs.is_main:
        return result
    say(table(worst_first(rows)), procs)
    say(
        f"every point rounded: top-1 {summary['all_rounded_top1']:.2f}% against {summary['fp32_top1']:.2f}% in FP32, "
        f"{summary['all_rounded_changed']} of {summary['num_images']} predictions changed, "
        f"KL {summary['all_rounded_kl']:.3g}",
        procs,
    )
    say(line, procs)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "layers.csv", text.getvalue(), "per-layer report")
    write_json(out_dir / "layers.json", result, "per-layer report")
    save_png(
        chart(rows, f"{checkpoint_path.name}: {fmt}, {summary['num_images']} {split} images"), out_dir / "layers.png"
    )
    say(f"every point (layers.csv, layers.json) and the chart along the depth (layers.png): {out_dir}", procs)
    write_report(result, json_path)
    return result


def _first_images(loader, count: int, procs: Processes):
    """This process's share of the first ``count`` images of the split: the loader deals image k to process
    k mod world_size, so this process's j-th image is image rank + j * world_size."""
    mine = max(0, -(-(count - procs.rank) // procs.world_size))  # ceil((count - rank) / world_size)
    for images, targets in loader:
        if mine <= 0:
            return
        yield images[:mine], targets[:mine]
        mine -= len(targets)
