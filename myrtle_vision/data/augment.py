"""Where and how a split's transform ops run: per image in the loader workers, or on a whole batch on
the training device.

Three :class:`Pipeline` s give the same images for the same seeds. Each sends uint8 pixels from the
loader workers and converts and normalizes the batch on the device.

- :class:`PerImage` runs torchvision's v2 transforms on each image in a loader worker (torch seeded
  with the sample's seed first). Every op works this way. (``RandomRotation90`` and
  ``RandomTranspose``, which torchvision lacks, are v2 transforms of myrtle_vision.transforms.)
- :class:`InWorkers`, for ops that only move pixels, draws the same parameters (below) and applies
  them with the functional kernels torchvision's transforms call, without their per-call
  overhead: bit for bit :class:`PerImage`'s images, faster. The default on CPU.
- :class:`OnDevice` leaves the pixels alone in the workers: each draws the sample's random
  parameters by calling the same torchvision transforms' own ``make_params`` (and the flips' coin)
  with torch seeded the same way, so the parameters are exactly torchvision's, and sends the decoded
  image with them. On the device the whole batch is then transformed at once: every geometric op
  (Resize, RandomResizedCrop, CenterCrop, RandomCrop, the flips) maps output rows to input rows and
  output columns to input columns, so an image's whole chain of ops is one row matrix and one column
  matrix, and the batch is two batched matrix products. ``RandomRotation90`` and ``RandomTranspose``
  swap an image's rows and columns: each image carries a flag, the ops after one act on the
  other axis (a quarter turn is a transpose then flips), and the products give each transposed
  image's transpose, turned back at the end. The resampling matrices hold the weights of
  torch's antialiased bilinear interpolation (what torchvision's ``Resize`` uses), crops and
  flips select and reverse rows, padding is rows of zeros. Results are rounded to uint8 levels,
  as the per-image path's are, then normalized. They match the per-image path to within one uint8
  level per resize in the chain (torch's CPU uint8 kernel rounds its fixed-point weights after each
  of a resize's two passes, and after each resize; the batch rounds once, at the end), and exactly
  for a chain without a resize (crops, padding, flips, quarter turns and transposes only move
  pixels); the tests check both.

``RandAugment`` and ``ColorJitter`` act on pixel values, image by image, and only run per image; a
split whose ops include one runs wholly in :class:`PerImage` (from the decoded cache all the same).
:func:`pipeline_for` chooses: on the device when training on CUDA and every op can be batched
(``augment_on: auto``), or as the data config's ``augment_on`` says. On a CPU the batched matrices
cost more than torch's uint8 kernels image by image, so there ``auto`` keeps the work in the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError
from ..transforms import OPS, build_transform, parse_ops, per_image_only, rot90, stack, transpose


class TransformFailed(ValueError):
    """An op that cannot transform an image: a ``RandomCrop`` larger than the image (with its padding), the one
    op that refuses an image for its size. ``op`` names the op; the dataset adds the field and the image."""

    def __init__(self, op: str, problem: str):
        self.op, self.problem = op, problem
        super().__init__(f"{op}: {problem}")

    def __reduce__(self):  # picklable across loader worker processes
        return (TransformFailed, (self.op, self.problem))


def _check_crop(kwargs: dict, height: int, width: int) -> None:
    """Raise TransformFailed where ``RandomCrop(**kwargs)`` cannot crop a ``height`` x ``width`` image."""
    crop_h, crop_w = _height_width(kwargs["size"])
    pad = kwargs.get("padding") or 0
    if crop_h > height + 2 * pad or crop_w > width + 2 * pad:
        padded = f" ({height + 2 * pad}x{width + 2 * pad} with its padding)" if pad else ""
        raise TransformFailed(
            "RandomCrop",
            f"the image is {height}x{width}{padded}, smaller than the crop "
            f"{crop_h}x{crop_w}; add padding, or a Resize before it",
        )


class Pipeline:
    """A split's transform ops: ``sample`` (in a worker, per image), ``collate`` (in a worker, per batch)
    and ``finish`` (on the device, per batch, when ``on_device``)."""

    on_device = False

    def sample(self, image: torch.Tensor, seed: int | None):
        raise NotImplementedError

    def collate(self, samples: list):
        raise NotImplementedError

    def finish(self, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output_size(self, image: torch.Tensor) -> tuple[int, int]:
        """(height, width) of ``image`` after the ops."""
        raise NotImplementedError


class PerImage(Pipeline):
    """torchvision's v2 pipeline on each image in the worker, a uint8 batch from the worker, and the
    float conversion and ``Normalize`` of the whole batch on the device."""

    def __init__(self, parsed: list[tuple[str, dict]]):
        self.transform, self.normalize = build_transform(parsed)
        # each step of the Compose, with its op's name and arguments (ToImage first, Normalize left for the batch)
        self.steps = list(
            zip([("ToImage", {})] + [(n, k) for n, k in parsed if n != "Normalize"], self.transform.transforms)
        )

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        return stack(samples)

    def finish(self, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        blocking = device.type != "cuda"
        return (
            self.normalize(images.to(device, non_blocking=not blocking)),
            labels.to(device, non_blocking=not blocking),
        )

    def sample(self, image: torch.Tensor, seed: int | None) -> torch.Tensor:
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # CPU generator only: torch.manual_seed costs ~100x more
        for (name, kwargs), step in self.steps:  # what the Compose does, step by step
            if name == "RandomCrop":
                _check_crop(kwargs, *image.shape[-2:])
            image = step(image)
        return image

    def output_size(self, image: torch.Tensor) -> tuple[int, int]:
        return tuple(self.sample(image, 0).shape[-2:])


@dataclass
class RawBatch:
    """Decoded images padded to the batch's largest (uint8, (B, 3, H, W)), their sizes (B, 2), the
    transform parameters drawn for each ((B, P) float64) and the labels."""

    images: torch.Tensor
    sizes: torch.Tensor
    params: torch.Tensor
    labels: torch.Tensor

    def pin_memory(self) -> RawBatch:  # the DataLoader pins batches of this type too
        return RawBatch(
            self.images.pin_memory(), self.sizes.pin_memory(), self.params.pin_memory(), self.labels.pin_memory()
        )


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without waiting for the device (pinned, then copied asynchronously)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class _Axis:
    """Where each output row (or column) of every image of a batch comes from.

    The bookkeeping is (B,) CPU tensors, so that sizes are known without waiting for the device:
    ``start`` + ``step`` * i is the base row of current row i (``step`` -1 after a flip), and a row
    outside [0, base size) is zero (padding). The base rows are the decoded image's until a resize
    makes new ones: then ``dense`` ((B, n, base) on the device) holds how they are made from the
    decoded image's rows.
    """

    def __init__(self, size: torch.Tensor):
        self.base = size.clone()  # (B,) base rows
        self.size = size.clone()  # (B,) current rows
        self.start = torch.zeros_like(size)
        self.step = torch.ones_like(size)
        self.dense: torch.Tensor | None = None

    def crop(self, top: torch.Tensor, length) -> None:
        self.start = self.start + self.step * top
        self.size = torch.as_tensor(length).expand_as(self.size).clone()

    def flip(self, mask: torch.Tensor) -> None:
        self.start = torch.where(mask, self.start + self.step * (self.size - 1), self.start)
        self.step = torch.where(mask, -self.step, self.step)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base row of every current row (B, n), whether it is inside the base), n = the largest size."""
        i = torch.arange(int(self.size.max()))
        index = self.start[:, None] + self.step[:, None] * i
        valid = (index >= 0) & (index < self.base[:, None]) & (i < self.size[:, None])
        return index.clamp(0, int(self.base.max()) - 1), valid

    def selected(self, device: torch.device) -> torch.Tensor:
        """The current rows as weights over the decoded image's rows: (B, n, rows) on ``device``."""
        index, valid = (_to(t, device) for t in self.rows())
        if self.dense is None:
            out = torch.zeros(*index.shape, int(self.base.max()), device=device)
            return out.scatter_(2, index[..., None], valid[..., None].float())
        picked = self.dense.gather(1, index[..., None].expand(-1, -1, self.dense.shape[2]))
        return picked * valid[..., None]

    def resize(self, out: torch.Tensor, device: torch.device) -> None:
        """Resample the current rows to ``out`` (B,) rows with antialiased bilinear weights."""
        weights = resample_weights(_to(self.size, device), _to(out, device), int(out.max()), int(self.size.max()))
        self.dense = torch.bmm(weights, self.selected(device))
        self.base, self.size = out.clone(), out.clone()
        self.start, self.step = torch.zeros_like(out), torch.ones_like(out)


class _Maps:
    """Every image's chain of ops so far, as the maps of its decoded rows and columns (two :class:`_Axis`)
    and whether the image is transposed.

    A transposed image's current rows come from ``cols`` and its current columns from ``rows``, so an op
    on its current rows acts on ``cols``: the methods take their arguments in each image's current
    (height, width) order and hand them to the axes swapped where the image is transposed. The two
    matrix products then give each transposed image's transpose (:func:`_untranspose` turns it back).
    """

    def __init__(self, sizes: torch.Tensor):
        self.rows, self.cols = _Axis(sizes[:, 0]), _Axis(sizes[:, 1])
        self.transposed = torch.zeros(len(sizes), dtype=torch.bool)

    def _swap(self, along_height, along_width) -> tuple[torch.Tensor, torch.Tensor]:
        """(for ``rows``, for ``cols``): (B,) arguments given along each image's current height and width."""
        h, w = (torch.as_tensor(v).expand_as(self.transposed) for v in (along_height, along_width))
        return torch.where(self.transposed, w, h), torch.where(self.transposed, h, w)

    def height(self) -> torch.Tensor:
        return self._swap(self.rows.size, self.cols.size)[0]

    def width(self) -> torch.Tensor:
        return self._swap(self.rows.size, self.cols.size)[1]

    def crop(self, top, left, height, width) -> None:
        (row_start, col_start), (row_length, col_length) = self._swap(top, left), self._swap(height, width)
        self.rows.crop(row_start, row_length)
        self.cols.crop(col_start, col_length)

    def resize(self, height, width, device: torch.device) -> None:
        row_size, col_size = self._swap(height, width)
        self.rows.resize(row_size, device)
        self.cols.resize(col_size, device)

    def flip(self, vertical, horizontal) -> None:
        """Reverse the current rows where ``vertical``, the current columns where ``horizontal``."""
        row_flip, col_flip = self._swap(vertical, horizontal)
        self.rows.flip(row_flip)
        self.cols.flip(col_flip)

    def transpose(self, mask: torch.Tensor) -> None:
        self.transposed = self.transposed ^ mask

    def rotate(self, quarter_turns: torch.Tensor) -> None:
        """k counter-clockwise quarter turns: a transpose when k is odd, then the rows reversed when k is 1
        or 2 and the columns when k is 2 or 3 (what torch.rot90 does)."""
        self.transpose(quarter_turns % 2 == 1)
        self.flip((quarter_turns == 1) | (quarter_turns == 2), quarter_turns >= 2)


def _untranspose(x: torch.Tensor, transposed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The batch ``x`` (B, C, n, m), made along every image's decoded rows and columns, as (B, C, height,
    width) images: the transposed ones transposed back. Where the images are not square the batch is
    padded to a square first, so that every image, transposed or not, fits one tensor before the crop."""
    if not bool(transposed.any()):
        return x
    side = max(x.shape[-2:])
    x = torch.nn.functional.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))
    x = torch.where(_to(transposed, x.device)[:, None, None, None], x.transpose(-2, -1), x)
    return x[..., :height, :width]


def resample_weights(in_size: torch.Tensor, out_size: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """(B, n_out, n_in): torch's antialiased bilinear interpolation (``align_corners=False``) from
    ``in_size`` to ``out_size`` rows of each image, as a matrix whose rows sum to 1: output row i is
    centred on input position ``scale * (i + 0.5)`` (scale = in / out), with a triangle filter as wide
    as one input row, or ``scale`` rows when shrinking (the antialiasing)."""
    device = in_size.device
    in_f, out_f = in_size.double()[:, None, None], out_size.double()[:, None, None]
    scale = in_f / out_f
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    center = scale * (torch.arange(n_out, device=device, dtype=torch.float64)[None, :, None] + 0.5)
    j = torch.arange(n_in, device=device, dtype=torch.float64)[None, None, :]
    w = (1 - ((j - center + 0.5) / support).abs()).clamp(min=0) * (j < in_f)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return (w * (torch.arange(n_out, device=device)[None, :, None] < out_f)).float()


class _Geometric(Pipeline):
    """Ops that only move pixels (the batchable ones): each image's random parameters are drawn once, by
    the torchvision transforms' own ``make_params`` (and the flips' coin), in the order torchvision's
    ``Compose`` draws them, with torch seeded by the sample's seed; then they are applied."""

    def __init__(self, parsed: list[tuple[str, dict]]):
        self.ops = [(name, kwargs, OPS[name][1](**kwargs)) for name, kwargs in parsed if name != "Normalize"]
        self.normalize = build_transform(parsed)[1]

    def output_size(self, image: torch.Tensor) -> tuple[int, int]:
        return self._params(image, 0)[1]

    def _params(self, image: torch.Tensor, seed: int | None) -> tuple[list[float], tuple[int, int]]:
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        h, w = image.shape[-2:]
        params: list[float] = []
        for name, kwargs, op in self.ops:
            shape = torch.empty((), dtype=torch.uint8).expand(3, h, w)  # the size, for make_params; no pixels
            if name == "RandomResizedCrop":
                p = op.make_params([shape])
                params += [p["top"], p["left"], p["height"], p["width"]]
                h, w = op.size
            elif name == "RandomCrop":
                _check_crop(kwargs, h, w)
                p = op.make_params([shape])
                pad_left, pad_top = p["padding"][0], p["padding"][1]
                params += [p["top"] - pad_top, p["left"] - pad_left]
                h, w = op.size
            elif name in COINS:
                params.append(float(torch.rand(1) < op.p))  # the draw v2's _RandomApplyTransform makes
                if name == "RandomTranspose" and params[-1]:
                    h, w = w, h
            elif name == "RandomRotation90":
                quarter_turns = op.make_params([shape])["k"]
                params.append(float(quarter_turns))
                if quarter_turns % 2:
                    h, w = w, h
            elif name == "Resize":
                h, w = resized_size(h, w, kwargs["size"])
            elif name == "CenterCrop":
                h, w = _height_width(kwargs["size"])
        return params, (h, w)


# The ops applied or not by a coin of probability p, and their kernels
COINS = {
    "RandomHorizontalFlip": TF.horizontal_flip,
    "RandomVerticalFlip": TF.vertical_flip,
    "RandomTranspose": transpose,
}


class InWorkers(_Geometric):
    """The parameters drawn and applied per image in the worker, with torchvision's own functional kernels
    (what its transforms call with them, without their per-call overhead); a uint8 batch crosses to the
    device, which converts and normalizes it. The images are exactly those of :class:`PerImage`."""

    def sample(self, image: torch.Tensor, seed: int | None) -> torch.Tensor:
        params, k = self._params(image, seed)[0], 0
        for name, _, op in self.ops:
            if name == "RandomResizedCrop":
                top, left, height, width = (int(v) for v in params[k : k + 4])
                image = TF.resized_crop(
                    image, top, left, height, width, op.size, interpolation=op.interpolation, antialias=op.antialias
                )
                k += 4
            elif name == "RandomCrop":  # a crop reaching outside the image pads with zeros, as RandomCrop's padding
                image = TF.crop(image, int(params[k]), int(params[k + 1]), *op.size)
                k += 2
            elif name == "CenterCrop":
                image = TF.center_crop(image, op.size)
            elif name == "Resize":
                image = TF.resize(
                    image, op.size, interpolation=op.interpolation, max_size=op.max_size, antialias=op.antialias
                )
            elif name in COINS:
                if params[k]:
                    image = COINS[name](image)
                k += 1
            elif name == "RandomRotation90":
                image = rot90(image, int(params[k]))
                k += 1
        return image

    collate = PerImage.collate
    finish = PerImage.finish


class OnDevice(_Geometric):
    """The parameters drawn in the workers, the pixels transformed a whole batch at once on the device."""

    on_device = True

    def sample(self, image: torch.Tensor, seed: int | None) -> tuple[torch.Tensor, list[float]]:
        """The image and its parameters: for each random op, what torchvision's transform draws for it."""
        return image, self._params(image, seed)[0]

    def collate(self, samples: list) -> RawBatch:
        images = [img for (img, _), _ in samples]
        height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        batch = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
        for b, img in enumerate(images):
            batch[b, :, : img.shape[-2], : img.shape[-1]] = img
        sizes = torch.tensor([list(i.shape[-2:]) for i in images], dtype=torch.int64)
        params = torch.tensor([p for (_, p), _ in samples], dtype=torch.float64).reshape(len(images), -1)
        return RawBatch(batch, sizes, params, torch.tensor([label for _, label in samples], dtype=torch.int64))

    # --- on the device --------------------------------------------------------------------------

    def finish(self, batch: RawBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch transformed on ``device``: (normalized float images, labels). Nothing here waits for
        the device: the sizes and parameters are read on the CPU, only the pixels and matrices go to it."""
        maps = self.maps(batch.sizes, batch.params, device)
        height, width = maps.height(), maps.width()
        if int(height.min()) != int(height.max()) or int(width.min()) != int(width.max()):
            raise UserError(
                "the transform ops give images of different sizes in one batch; end them with a crop "
                "or a Resize to [height, width]"
            )
        rows, cols = maps.rows, maps.cols
        x = batch.images.to(device, non_blocking=True).float()
        if rows.dense is None:  # crops and flips only: pick the pixels
            (r, rv), (c, cv) = ((_to(t, device) for t in axis.rows()) for axis in (rows, cols))
            b = torch.arange(len(x), device=device)[:, None, None]
            x = x.permute(0, 2, 3, 1)[b, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)
            x = x * (rv[:, None, :, None] & cv[:, None, None, :])
        else:  # two batched products: rows, then columns
            x = torch.matmul(rows.selected(device)[:, None], x)
            x = torch.matmul(x, cols.selected(device).transpose(1, 2)[:, None])
            x = x.round_().clamp_(0, 255)  # the uint8 levels the per-image path rounds to
        x = _untranspose(x, maps.transposed, int(height[0]), int(width[0]))
        # then exactly the per-image path's float conversion and Normalize
        return self.normalize(x.to(torch.uint8).contiguous()), batch.labels.to(device, non_blocking=True)

    def maps(self, sizes: torch.Tensor, params: torch.Tensor, device: torch.device) -> _Maps:
        """Every image's rows and columns after the ops, from its size and parameters (CPU tensors);
        resampling matrices are made on ``device``."""
        maps = _Maps(sizes)
        k = 0
        for name, kwargs, op in self.ops:
            if name == "RandomResizedCrop":
                maps.crop(*(params[:, k + i].long() for i in range(4)))
                k += 4
                maps.resize(*op.size, device)
            elif name == "RandomCrop":
                maps.crop(params[:, k].long(), params[:, k + 1].long(), *op.size)
                k += 2
            elif name == "CenterCrop":
                crop_h, crop_w = _height_width(kwargs["size"])
                maps.crop(
                    _center_crop_start(maps.height(), crop_h), _center_crop_start(maps.width(), crop_w), crop_h, crop_w
                )
            elif name == "Resize":
                maps.resize(*resized_size(maps.height(), maps.width(), kwargs["size"]), device)
            elif name in COINS:
                heads = params[:, k] > 0
                k += 1
                if name == "RandomTranspose":
                    maps.transpose(heads)
                elif name == "RandomVerticalFlip":
                    maps.flip(heads, False)
                else:
                    maps.flip(False, heads)
            elif name == "RandomRotation90":
                maps.rotate(params[:, k].long())
                k += 1
        return maps


def _height_width(size) -> tuple[int, int]:
    """A size op argument (an int: a square) as (height, width)."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _center_crop_start(size: torch.Tensor, crop: int) -> torch.Tensor:
    """torchvision's center crop: round((size - crop) / 2) ties to even; a larger crop pads (crop - size) // 2 first."""
    inside = torch.round((size - crop).double() / 2).long()
    return torch.where(crop > size, -((crop - size) // 2), inside)


def resized_size(h, w, size):
    """torchvision's Resize output size: ``[h, w]`` as given, or the shorter side to ``size`` (the longer
    side scaled and truncated). ``h``, ``w`` are ints or (B,) tensors."""
    if not isinstance(size, int):
        if isinstance(h, torch.Tensor):
            return torch.full_like(h, size[0]), torch.full_like(w, size[1])
        return size[0], size[1]
    if isinstance(h, torch.Tensor):
        short, long = torch.minimum(h, w), torch.maximum(h, w)
        new_long = (size * long.double() / short.double()).floor().long()  # int() of a positive float
        return torch.where(h <= w, torch.full_like(h, size), new_long), torch.where(
            h <= w, new_long, torch.full_like(w, size)
        )
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    return (size, new_long) if h <= w else (new_long, size)


def pipeline_for(ops: dict, augment_on: str, device: torch.device) -> Pipeline:
    """The pipeline of an ops object for batches used on ``device``: on the device when ``augment_on`` is
    ``device``, or ``auto`` on CUDA with every op batchable; per image in the workers otherwise (the lean
    :class:`InWorkers` when every op is geometric, torchvision's whole pipeline when one is not)."""
    parsed = parse_ops(ops)
    if per_image_only(parsed):
        return PerImage(parsed)
    on_device = augment_on == "device" or (augment_on == "auto" and device.type == "cuda")
    return OnDevice(parsed) if on_device else InWorkers(parsed)
