"""DINO multi-crop augmentation, batched on tensors on the training device.

The recipe is DINO's ``DataAugmentationDINO`` (facebookresearch/dino ``main_dino.py``): random
resized crop (bicubic) + horizontal flip -> colour jitter (p=0.8) -> grayscale (p=0.2) -> Gaussian
blur (p = 1.0 / 0.1 / 0.5) -> solarize (p = 0 / 0.2 / 0) -> normalise. Two entry points, both
returning ``[global1, global2, local1, ..., localN]``, each float32 ``(B, 3, S, S)`` normalised
with the mean/std, on the input's device:

* :meth:`MultiCrop.__call__` on uint8 batches ``(B, C, H, W)`` of the small in-memory sets
  (Fashion-MNIST, CIFAR, STL): the whole recipe, crops included, batched here. Each image is the
  original there, so the boxes are sampled over the whole image, and their 28-96 px images are
  upsampled into the crops, where bicubic needs no antialiasing.
* :meth:`MultiCrop.from_crops` on ready uint8 crops of image files, cut from the original image
  where it was decoded (:mod:`bcssl.data.crops`: torchvision's ``RandomResizedCrop.get_params``
  boxes, PIL's antialiased bicubic): flip + the photometric part, batched here.

How it is batched:

* Every random decision is drawn by :meth:`MultiCrop.sample_params` from a CPU
  ``torch.Generator`` seeded with ``seed`` (small tensors), so the output depends only on
  ``(images, seed)``: not on the global RNG or the thread count, nor (up to float rounding)
  on the device.
* Crops are bicubic (a=-0.75, align_corners=False, border padding) resamplings of axis-aligned
  boxes, flip folded in as a negative x scale: ``grid_sample``'s sampling of the box's affine
  grid (:func:`resized_crop` is that reference). On the GPU all crops of all images come from
  ONE ``F.grid_sample`` call, the grids of an image's crops laid end to end. On the CPU the same
  taps run as two separable passes (:meth:`MultiCrop._resize_separable`: ``embedding_bag``
  gather-and-sum over rows, with one transpose in between), several times faster than the
  16-tap ``grid_sample`` and equal to it up to float rounding (~2e-6).
  The output ``(B, 3, P)`` is worked on in place and is the returned memory: each crop is a view
  ``(B, 3, S, S)`` of it (batch stride ``3 * P``; ``.contiguous()`` where a dense tensor is needed).
* Colour jitter uses torchvision's per-image random factors, but ONE random order of the four
  adjustments per crop group (global1, global2, each local) and call, where torchvision's
  ``ColorJitter`` draws an order per image: each op then runs on a whole crop group at once.
  Images that skip the jitter (p=0.2) get identity factors, which are exact no-ops.
* Hue, grayscale, blur and solarize only touch the images drawn for them (``index_select`` /
  ``index_copy_`` with indices computed on the CPU, so nothing waits on the device).
* Blur: separable Gaussian with per-image sigma, radius ``ceil(3 * blur_sigma[1])`` (at most
  S - 1; fixed by the config, so an image's crops never depend on the rest of the batch), reflect
  padding (as torchvision); on the GPU two grouped (depthwise)
  convolutions, on the CPU two ``embedding_bag`` passes with the reflection folded into the
  indices (:func:`_blur_rows`: its cost is per image, where oneDNN pads channels to 16).
* CPU only: images go a few at a time (``CHUNK_PIXELS``): a chunk's crops are made and then
  jittered, blurred and normalised while they are in cache (on whole 64-image groups memory
  traffic makes the ~40 elementwise passes 2-5x slower). Scratch tensors are kept between calls
  and the returned buffer is recycled once nothing refers to it any more (fresh CPU memory costs
  page faults worth ~10 elementwise passes), so an instance must not be used by two threads at
  once. None of this changes the results. ``benchmarks/augment_throughput.py`` compares with
  DINO's per-image PIL pipeline (2x224 + 8x96 crops: ~3.3-3.6x its images/s on one core).

Known differences from DINO's PIL pipeline (all in the direction of torchvision's tensor ops):
blur is an exact Gaussian (PIL approximates it with box blurs); colour ops run on float images
(PIL rounds to uint8 after each op); the jitter order is per crop group, not per image. On the
in-memory path also: crop boxes are continuous (sub-pixel) instead of rounded to whole pixels, and
bicubic uses ``grid_sample``'s a=-0.75 kernel (PIL: a=-0.5) without antialiasing (those crops are
upsampled). Image files get DINO's whole-pixel boxes and PIL's resampling itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MultiCropConfig",
    "MultiCrop",
    "multicrop_from_config",
    "GRAY_WEIGHTS",
    "SOLARIZE_THRESHOLD",
    "crop_grid",
    "resized_crop",
    "resized_crop_separable",
    "cubic_taps",
    "rgb_to_grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "gaussian_blur",
    "solarize",
]

#: ITU-R 601-2 luma weights, the ones torchvision's ``rgb_to_grayscale`` uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
#: PIL's ``ImageOps.solarize`` inverts uint8 pixels >= 128. A continuous value that PIL would
#: round to >= 128 is >= 127.5/255 = 0.5, and on uint8 values ``k/255 >= 0.5`` iff ``k >= 128``.
SOLARIZE_THRESHOLD = 0.5

_PAD = 2  # replicated border of the input: the reach of the bicubic kernel

# Jitter op ids, in torchvision ColorJitter's order of factors.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class MultiCropConfig:
    """DINO multi-crop recipe (defaults: docs/recipe.md section 2, ConvNeXt/ViT scales)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple = (0.4, 1.0)  # 0.14-1 for ResNet, set by caller
    local_scale: tuple = (0.05, 0.4)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple = (1.0, 0.1, 0.5)  # global1, global2, each local
    blur_sigma: tuple = (0.1, 2.0)  # in pixels of the output crop, as DINO's PIL blur
    solarize_p: tuple = (0.0, 0.2, 0.0)  # global1, global2, each local
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.global_size < 1 or self.local_size < 1 or self.n_local < 0:
            raise ValueError("global_size and local_size must be >= 1 and n_local >= 0")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter must be 4 non-negative values with hue <= 0.5, got {self.jitter}")
        if len(self.blur_p) != 3 or len(self.solarize_p) != 3:
            raise ValueError("blur_p and solarize_p must have 3 values: global1, global2, each local")


def multicrop_from_config(crops) -> "MultiCrop":
    """The :class:`MultiCrop` of a run's ``crops.*`` section (a mapping; lists become tuples)."""
    fields = MultiCropConfig.__dataclass_fields__
    kw = {k: (tuple(v) if not isinstance(v, (str, bytes)) and hasattr(v, "__len__") else v)
          for k, v in crops.items() if k in fields}
    return MultiCrop(MultiCropConfig(**kw))


# --------------------------------------------------------------------------------------------
# Scratch memory
# --------------------------------------------------------------------------------------------


class _Workspace:
    """Named CPU scratch buffers kept between calls; ``get`` returns a view of the needed shape.

    Every step needs temporaries of the same sizes. On the CPU, fresh large allocations go back
    to the OS when freed and are page-faulted in again on the next step, which costs more than
    the arithmetic on them. Other devices have caching allocators: plain allocations there.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, device, dtype=torch.float32) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            return torch.empty(shape, device=device, dtype=dtype)
        numel = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.device != torch.device(device) or buf.dtype != dtype:
            buf = torch.empty(numel, device=device, dtype=dtype)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


def _scratch(ws: _Workspace | None, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    if ws is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    return ws.get(name, shape, like.device, like.dtype)


# --------------------------------------------------------------------------------------------
# Batched ops. Images are float (N, 3, ...) in [0, 1]; factors are per image (N,).
# The ``*_`` kernels work in place on contiguous (N, 3, P) tensors.
# --------------------------------------------------------------------------------------------


def crop_grid(boxes: torch.Tensor, flips: torch.Tensor, size: int, out: torch.Tensor | None = None,
              fit: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Sampling grid ``(..., S, S, 2)`` for crop boxes, equal to ``F.affine_grid`` (align_corners=False).

    ``boxes`` (..., 4) = (top, left, height, width) as fractions of the image height/width
    (sub-pixel allowed); ``flips`` (...) bool mirrors the crop horizontally. The affine is
    ``theta = [[a_x, 0, t_x], [0, a_y, t_y]]`` with ``a_x = +-width``, ``t_x = 2 * left + width - 1``,
    ``a_y = height``, ``t_y = 2 * top + height - 1``: diagonal, so the grid is one fused
    ``base * (a_x, a_y) + (t_x, t_y)`` over affine_grid's base grid, without its per-pixel matmul.
    ``fit`` = (fx, fy) scales the x and y coordinates: ``W / (W + 2p)`` addresses the same pixels
    in an input padded by ``p`` on each side.
    """
    top, left, h, w = boxes.unbind(-1)
    lead = boxes.shape[:-1]
    ramp = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) * 2 + 1) / size - 1
    base = torch.stack(torch.broadcast_tensors(ramp[None, :], ramp[:, None]), -1)  # (S, S, (x, y))
    # rows of (x, y) pairs as one inner dim of 2S: broadcast ops over a tiny inner dim are slow on CPU
    reps = (*([1] * len(lead)), size)
    fx, fy = fit
    scale = torch.stack((torch.where(flips, -w, w) * fx, h * fy), -1).repeat(reps).view(*lead, 1, 2 * size)
    shift = torch.stack(((2 * left + w - 1) * fx, (2 * top + h - 1) * fy), -1).repeat(reps).view(
        *lead, 1, 2 * size)
    if out is None:
        out = torch.empty(*lead, size, size, 2, device=boxes.device, dtype=boxes.dtype)
    rows = out.view(*lead, size, 2 * size)
    torch.mul(base.view(size, 2 * size), scale, out=rows).add_(shift)
    return out


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (N, 4) out of float ``images`` (N, C, H, W), resize to S x S (bicubic), flip, clamp."""
    grid = crop_grid(boxes.to(images.device, torch.float32), flips.to(images.device), size)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)  # bicubic overshoots


#: PyTorch's bicubic convolution constant (``grid_sample`` / ``interpolate``); PIL uses -0.5.
CUBIC_A = -0.75


def cubic_taps(start: torch.Tensor, extent: torch.Tensor, flip: torch.Tensor | None, size: int,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic taps along one axis for crops resized to ``size`` samples.

    ``start``/``extent`` (...) are the crop's offset and length as fractions of the axis
    ``length`` (in pixels); ``flip`` (...) bool mirrors it. Output sample ``t`` reads the source
    coordinate ``(start + extent * u) * length - 0.5`` with ``u = (t + 0.5) / size`` (``1 - u``
    when flipped): ``grid_sample``'s align_corners=False mapping of the crop's affine grid.
    Returns the 4 tap indices (..., size, 4) int64, clamped into ``[0, length - 1]`` (that is
    ``grid_sample``'s "border" padding, which clips every tap), and their weights (..., size, 4)
    float32 (PyTorch's cubic convolution, ``a = -0.75``). Coordinates are computed in float64.
    """
    u = (torch.arange(size, dtype=torch.float64, device=start.device) + 0.5) / size
    u = u.expand(*start.shape, size)
    if flip is not None:
        u = torch.where(flip[..., None], 1 - u, u)
    pix = (start.double()[..., None] + extent.double()[..., None] * u) * length - 0.5
    base = pix.floor()
    t = (pix - base).float()[..., None]
    a = CUBIC_A
    d = torch.cat((t + 1, t, 1 - t, 2 - t), -1)  # distances to the 4 taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    weights = torch.cat((far[..., :1], near[..., 1:3], far[..., 3:]), -1)
    idx = base.long()[..., None] + torch.arange(-1, 3, device=start.device)
    return idx.clamp_(0, length - 1), weights


def resized_crop_separable(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                           size: int) -> torch.Tensor:
    """:func:`resized_crop` as two separable passes (reference implementation, no chunking).

    ``images`` float (N, C, H, W), ``boxes`` (N, K, 4), ``flips`` (N, K): returns (N, K, C, S, S),
    equal to ``resized_crop`` of each box up to float rounding. :class:`MultiCrop` runs the same
    two passes in cache-sized chunks; see :meth:`MultiCrop._resize_separable`.
    """
    n, c, h, w = images.shape
    k = boxes.shape[1]
    ix, wx = cubic_taps(boxes[..., 1], boxes[..., 3], flips, size, w)
    iy, wy = cubic_taps(boxes[..., 0], boxes[..., 2], None, size, h)
    table = images.transpose(2, 3).reshape(n * c * w, h)  # rows: image columns
    rows = torch.arange(n * c).view(n, 1, c, 1, 1) * w
    t1 = F.embedding_bag((rows + ix[:, :, None]).view(-1, 4), table,
                         per_sample_weights=wx[:, :, None].expand(n, k, c, size, 4).reshape(-1, 4),
                         mode="sum")
    t1 = t1.view(n * k * c, size, h).transpose(1, 2).reshape(n * k * c * h, size)
    rows = torch.arange(n * k * c).view(n, k, c, 1, 1) * h
    t2 = F.embedding_bag((rows + iy[:, :, None]).view(-1, 4), t1,
                         per_sample_weights=wy[:, :, None].expand(n, k, c, size, 4).reshape(-1, 4),
                         mode="sum")
    return t2.view(n, k, c, size, size).clamp_(0, 1)


def _col(v, x: torch.Tensor) -> torch.Tensor:
    """Per-image values as an (N, 1, ..., 1) tensor that broadcasts against ``x`` (N, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape[0], *([1] * (x.dim() - 1)))


def _gray_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Luma of ``x`` (N, 3, P) into ``out`` (N, P), in torchvision's order (bit-identical)."""
    r, g, b = x.unbind(1)
    out = torch.mul(r, GRAY_WEIGHTS[0], out=out)
    return out.add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def _gray_mean(x: torch.Tensor, rowwise: bool = False) -> torch.Tensor:
    """Per-image mean of the luma (N,), from per-channel means (the luma is linear).

    The default, a BLAS matrix-vector product, can round an image's value differently with the
    number of images (its kernel depends on N); ``rowwise`` sums the weighted channel means
    elementwise, the same for an image in any batch. The batched path on in-memory images keeps
    the product (its results, the demo's among them, stay as they were); the ready-crops path of
    image files, whose crops are promised equal for any number of processes, is rowwise."""
    m = x.flatten(2).mean(-1)
    if rowwise:
        return m[:, 0] * GRAY_WEIGHTS[0] + m[:, 1] * GRAY_WEIGHTS[1] + m[:, 2] * GRAY_WEIGHTS[2]
    return m @ torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)


def _brightness_(x: torch.Tensor, f: torch.Tensor) -> None:
    x.mul_(_col(f, x)).clamp_(0, 1)


# In-place mul_/add_ chains rather than addcmul: with broadcast operands addcmul is ~5x slower on CPU.
def _contrast_(x: torch.Tensor, f: torch.Tensor, rowwise: bool = False) -> None:
    f = _col(f, x)
    mean = _col(_gray_mean(x, rowwise), x)
    x.mul_(f).add_((1 - f) * mean).clamp_(0, 1)


def _saturation_(x: torch.Tensor, f: torch.Tensor, ws: _Workspace | None = None) -> None:
    f = _col(f, x)
    gray = _gray_into(x, _scratch(ws, "gray", (x.shape[0], x.shape[2]), x)).unsqueeze(1).mul_(1 - f)
    x.mul_(f).add_(gray).clamp_(0, 1)


def _hue_(x: torch.Tensor, shift: torch.Tensor, ws: _Workspace | None = None) -> None:
    """In-place hue shift of ``x`` (N, 3, P) by ``shift`` (N,) turns; see :func:`adjust_hue`."""
    n, _, p = x.shape
    t = [_scratch(ws, f"hue{i}", (n, p), x) for i in range(6)]
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g, out=t[0]), b, out=t[0])
    minc = torch.minimum(torch.minimum(r, g, out=t[1]), b, out=t[1])
    # Branch masks as 0/1 floats: arithmetic is ~10x faster than torch.where on CPU.
    is_r = torch.eq(maxc, r, out=t[2])
    is_g = torch.eq(maxc, g, out=t[3])
    is_g.addcmul_(is_g, is_r, value=-1.0)  # max == g and max != r
    # Hue in sextants with torchvision's branches: max r: (g-b)/C, max g: (b-r)/C + 2, else
    # (r-g)/C + 4; written as the last branch plus masked corrections (2g-b-r and b+g-2r).
    num = torch.sub(r, g, out=t[4])
    num.addcmul_(is_r, torch.mul(g, 2.0, out=t[5]).sub_(b).sub_(r))
    num.addcmul_(is_g, torch.add(b, g, out=t[5]).sub_(r, alpha=2.0))
    chroma = maxc.sub_(minc)
    # chroma == 0 means r == g == b: the numerator is exactly 0, any positive divisor gives 0.
    h6 = num.div_(torch.clamp(chroma, min=1e-12, out=t[5]))
    h6.add_(is_r, alpha=-4.0).add_(is_g, alpha=-2.0).add_(_col(shift, h6) * 6.0 + 4.0)
    h6.sub_(torch.mul(h6, 1.0 / 6.0, out=t[2]).floor_().mul_(6.0))  # mod 6 -> [0, 6]
    # HSV -> RGB in closed form: c = min + chroma * T(h6 + n_c), n = 5, 3, 1 for R, G, B, with the
    # period-6 trapezoid T(k) = clamp(|k - 2| - 1, 0, 1) for k in [-1, 6), which over [0, 12) is
    # clamp(min(|k - 2|, |k - 8|) - 1, 0, 1). R uses n = -1 (= 5 mod 6) and needs one |.| only.
    torch.sub(h6, 3.0, out=r).abs_()
    torch.minimum(torch.add(h6, 1.0, out=g).abs_(), torch.sub(h6, 5.0, out=t[2]).abs_(), out=g)
    torch.minimum(torch.sub(h6, 1.0, out=b).abs_(), torch.sub(h6, 7.0, out=t[2]).abs_(), out=b)
    # min + C * clamp(v - 1, 0, 1) == (min - C) + C * clamp(v, 1, 2): one pass less
    x.clamp_(1.0, 2.0).mul_(chroma.unsqueeze(1)).add_(minc.sub_(chroma).unsqueeze(1))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], 3, -1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of RGB ``x`` (N, 3, H, W), replicated to 3 channels (as torchvision)."""
    g = _gray_into(_flat(x), torch.empty(x.shape[0], x[0, 0].numel(), dtype=x.dtype, device=x.device))
    return g.view(x.shape[0], 1, *x.shape[2:]).expand_as(x).contiguous()


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image brightness: ``clamp(f * x)`` (torchvision ``adjust_brightness``)."""
    y = _flat(x).clone()
    _brightness_(y, torch.as_tensor(factor, dtype=x.dtype, device=x.device))
    return y.view(x.shape)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image contrast: blend with the image's mean luma (torchvision ``adjust_contrast``)."""
    y = _flat(x).clone()
    _contrast_(y, torch.as_tensor(factor, dtype=x.dtype, device=x.device))
    return y.view(x.shape)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image saturation: blend with the luma image (torchvision ``adjust_saturation``)."""
    y = _flat(x).clone()
    _saturation_(y, torch.as_tensor(factor, dtype=x.dtype, device=x.device))
    return y.view(x.shape)


def adjust_hue(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image hue shift by ``factor`` in [-0.5, 0.5] turns (torchvision ``adjust_hue``).

    RGB -> (hue, chroma, V) with the branches of torchvision's ``_rgb_to_hsv`` (max == r, else
    max == g, else b), shift the hue, then the closed-form HSV -> RGB
    ``c = V - chroma * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 * hue) mod 6``, ``n = 5, 3, 1``.
    Branches use 0/1 masks and arithmetic, all in place on a few scratch planes.
    """
    y = _flat(x).clone()
    _hue_(y, torch.as_tensor(factor, dtype=x.dtype, device=x.device))
    return y.view(x.shape)


def _reflect_pad_into(x: torch.Tensor, out: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Reflect-pad ``x`` by ``r`` on both sides of ``dim`` into ``out`` (as ``F.pad(mode="reflect")``).

    ``F.pad``'s reflect kernel is erratic on CPU (1x to 10x a copy, depending on the shape); a
    copy of the centre plus two flipped edge slabs costs about one copy.
    """
    n = x.shape[dim]
    out.narrow(dim, r, n).copy_(x)
    out.narrow(dim, 0, r).copy_(x.narrow(dim, 1, r).flip(dim))
    out.narrow(dim, r + n, r).copy_(x.narrow(dim, n - 1 - r, r).flip(dim))
    return out


def gaussian_blur(x: torch.Tensor, sigma, radius: int | None = None,
                  ws: _Workspace | None = None) -> torch.Tensor:
    """Per-image Gaussian blur of ``x`` (N, C, H, W) with ``sigma`` (N,) in pixels; returns a new tensor.

    Separable kernels ``exp(-t^2 / 2 sigma^2)``, ``t = -radius..radius`` (radius defaults to
    ``ceil(3 * max sigma)``, and is cut to ``size - 1``), applied by two grouped (depthwise)
    convolutions, one per axis, with reflect padding: torchvision
    ``gaussian_blur(kernel_size=2 * radius + 1, sigma)`` for each image.
    """
    n, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(n)
    if radius is None:
        radius = math.ceil(3 * float(sigma.max())) if n else 0
    r = min(int(radius), h - 1, w - 1)  # reflect padding needs pad < size
    if r <= 0 or n == 0:
        return x.clone()
    return _blur(x, _gaussian_kernels(sigma, r), ws).contiguous()


def _gaussian_kernels(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (N, 2r+1), one per sigma (torchvision's formula)."""
    t = torch.arange(-r, r + 1, dtype=sigma.dtype, device=sigma.device)
    kern = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return kern / kern.sum(1, keepdim=True)


def _blur(x: torch.Tensor, kern: torch.Tensor, ws: _Workspace | None = None) -> torch.Tensor:
    """Separable blur of ``x`` (N, C, H, W) with per-image kernels ``kern`` (N, 2r+1), reflect padding.

    CPU: :func:`_blur_rows` (gather-and-sum; returns a transposed view). Elsewhere: two grouped
    (depthwise) convolutions.
    """
    if x.device.type == "cpu":
        return _blur_rows(x, kern, ws)
    return _blur_conv(x, kern, ws)


def _blur_conv(x: torch.Tensor, kern: torch.Tensor, ws: _Workspace | None = None) -> torch.Tensor:
    """:func:`_blur` as two grouped convolutions (each image its own channel group, so it gets
    its own kernel), one axis at a time, on reflect-padded copies."""
    n, c, h, w = x.shape
    r = kern.shape[1] // 2
    kern = kern.repeat_interleave(c, 0)  # (N*C, 2r+1)
    planes = x.reshape(1, n * c, h, w)
    y = F.conv2d(_reflect_pad_into(planes, _scratch(ws, "pad_v", (1, n * c, h + 2 * r, w), x), r, 2),
                 kern.view(n * c, 1, -1, 1), groups=n * c)
    y = F.conv2d(_reflect_pad_into(y, _scratch(ws, "pad_h", (1, n * c, h, w + 2 * r), x), r, 3),
                 kern.view(n * c, 1, 1, -1), groups=n * c)
    return y.view(n, c, h, w)


def _reflect_taps(size: int, r: int, device) -> torch.Tensor:
    """(size, 2r+1) indices of the taps ``t - r .. t + r`` of each position, reflected at the
    edges as ``F.pad(mode="reflect")`` (needs ``r < size``)."""
    t = (torch.arange(size, device=device)[:, None] + torch.arange(-r, r + 1, device=device)).abs_()
    return torch.where(t > size - 1, 2 * (size - 1) - t, t)


def _blur_rows(x: torch.Tensor, kern: torch.Tensor, ws: _Workspace | None = None) -> torch.Tensor:
    """:func:`_blur` as two ``F.embedding_bag`` passes; returns a (N, C, H, W) transposed view.

    Each blurred row is a weighted sum of 2r+1 rows (reflection folded into the indices), one
    ``embedding_bag`` over the rows of ``x``; then the same over the rows of the transposed
    result. Unlike a depthwise convolution (oneDNN pads the channels to blocks of 16), the cost
    is per image, and no padded copies are made. The result is the transposed buffer, viewed
    back: copy it where it belongs.
    """
    n, c, h, w = x.shape
    k = kern.shape[1]
    r = k // 2
    kern = kern.repeat_interleave(c, 0)[:, None, :]  # (N*C, 1, 2r+1)
    planes = (torch.arange(n * c, device=x.device) * h).view(n * c, 1, 1)
    y = F.embedding_bag((planes + _reflect_taps(h, r, x.device)).view(-1, k), x.reshape(n * c * h, w),
                        per_sample_weights=kern.expand(n * c, h, k).reshape(-1, k), mode="sum")  # columns
    yt = _scratch(ws, "blur_t", (n * c, w, h), y)
    yt.copy_(y.view(n * c, h, w).transpose(1, 2))
    planes = (torch.arange(n * c, device=x.device) * w).view(n * c, 1, 1)
    z = F.embedding_bag((planes + _reflect_taps(w, r, x.device)).view(-1, k), yt.view(n * c * w, h),
                        per_sample_weights=kern.expand(n * c, w, k).reshape(-1, k), mode="sum")  # rows
    return z.view(n, c, w, h).transpose(2, 3)


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert pixels ``>= threshold`` (``x -> 1 - x``), as torchvision/PIL ``solarize``."""
    if threshold == 0.5:  # min(x, 1 - x) is exactly that, and much faster than torch.where
        return torch.minimum(x, 1.0 - x)
    return torch.where(x >= threshold, 1.0 - x, x)


# --------------------------------------------------------------------------------------------
# Execution plans: everything decided on the CPU, moved to the device in one copy per dtype.
# --------------------------------------------------------------------------------------------


def _to_device(plan: dict, device: torch.device) -> dict:
    """Move a plan's tensors to ``device`` with one transfer per dtype (few small H2D copies)."""
    if device.type == "cpu":
        return plan
    out = dict(plan)
    tensors = {k: v for k, v in plan.items() if isinstance(v, torch.Tensor)}
    for dtype in {v.dtype for v in tensors.values()}:
        keys = [k for k, v in tensors.items() if v.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in keys]).to(device, non_blocking=True)
        for k, part in zip(keys, flat.split([tensors[k].numel() for k in keys])):
            out[k] = part.view(tensors[k].shape)
    return out


def _idx(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().flatten()


def _chunk_plans(plan: dict, n: int, step: int):
    """Split a crop group's plan (CPU tensors) into plans for images ``lo:lo+step``, renumbered from 0.

    Yields ``(lo, hi, plan)``. The blur radius and kernels stay the group's: results do not
    depend on the chunking.
    """
    if step >= n:
        yield 0, n, plan
        return
    bounds = torch.arange(0, n + step, step).clamp_(max=n)
    keys = ("hue_idx", "gray_idx", "blur_idx", "sol_idx")
    pos = {k: torch.searchsorted(plan[k], bounds).tolist() for k in keys}  # indices are sorted
    for i, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        part = dict(plan, factors=plan["factors"][lo:hi])
        for k in keys:
            part[k] = plan[k][pos[k][i]:pos[k][i + 1]] - lo
        part["blur_kern"] = plan["blur_kern"][pos["blur_idx"][i]:pos["blur_idx"][i + 1]]
        yield lo, hi, part


def _runs(sizes: list[int]) -> list[tuple[int, int]]:
    """Run-length encoding of crop sizes: [224, 224, 96, ...] -> [(224, 2), (96, N)]."""
    runs: list[tuple[int, int]] = []
    for s in sizes:
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


# --------------------------------------------------------------------------------------------
# The multi-crop transform
# --------------------------------------------------------------------------------------------


class MultiCrop:
    """Batched DINO multi-crop: ``MultiCrop(cfg)(uint8 images, seed) -> [g1, g2, l1..lN]``."""

    N_TRIES = 10  # torchvision RandomResizedCrop's attempts before the center-crop fallback
    #: ``sample_params`` entries shared by the batch (not per image): kept whole by :meth:`slice_params`
    SHARED_PARAMS = ("jitter_order",)
    CHUNK_PIXELS = 1 << 19  # CPU: images go in chunks of ~this many pixels of their largest crop
    RESIZE_CHUNK = 1 << 19  # CPU: the separable resize goes in chunks of ~this many floats (2 MB)
    #: resize crops with two separable passes (True) or one bicubic ``grid_sample`` (False);
    #: None: separable on the CPU, grid_sample elsewhere. Same results up to float rounding.
    separable: bool | None = None
    #: reuse CPU output buffers once nothing in this process refers to them (see _output_buffer);
    #: False where outputs leave the process (loader workers: the trainer still reads them)
    recycle_outputs: bool = True

    def __init__(self, cfg: MultiCropConfig | None = None):
        self.cfg = cfg or MultiCropConfig()
        self._ws = _Workspace()
        self._out_pool: list[tuple[torch.Tensor, int]] = []  # see _output_buffer

    @property
    def n_crops(self) -> int:
        return 2 + self.cfg.n_local

    # ---------------------------------------------------------------- randomness
    def sample_params(self, batch_size: int, seed: int, image_size: tuple[int, int] | None = None) -> dict:
        """All random decisions for a batch, from a CPU generator seeded with ``seed``.

        Crops are in output order (global1, global2, local1..localN). Per image and crop, with
        leading dims ``(batch_size, n_crops)``:

        * ``box`` (.., 4) float: (top, left, height, width) as fractions of the image height/width.
          As torchvision's ``RandomResizedCrop``: area fraction ~ U(scale), aspect ratio (width /
          height in pixels) log-uniform in ``ratio``, the first of 10 tries that fits, else the
          centre crop of the closest allowed ratio; position uniform. Boxes are continuous (not
          rounded to pixels), so only the aspect of ``image_size`` = (H, W) matters (default square).
        * ``flip``, ``jitter`` (apply colour jitter), ``grayscale``, ``blur``, ``solarize``: bool.
        * ``jitter_factors`` (.., 4) float: brightness, contrast, saturation, hue factors.
        * ``blur_sigma`` float, in output pixels.

        Per crop group, shape ``(n_crops, 4)``: ``jitter_order``, the order of the four jitter ops
        (0 brightness, 1 contrast, 2 saturation, 3 hue), shared by the batch.
        """
        cfg = self.cfg
        b, n, t = int(batch_size), self.n_crops, self.N_TRIES
        if b < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = torch.Generator().manual_seed(int(seed))
        height, width = image_size or (1, 1)
        aspect = width / height

        def rand(*shape):
            return torch.rand(*shape, generator=gen, dtype=torch.float64)

        def per_crop(g1, g2, local):
            return torch.tensor([g1, g2] + [local] * cfg.n_local, dtype=torch.float64)

        # --- random resized crop, torchvision's 10 tries vectorised over a trailing dim
        lo = per_crop(cfg.global_scale[0], cfg.global_scale[0], cfg.local_scale[0])[:, None]
        hi = per_crop(cfg.global_scale[1], cfg.global_scale[1], cfg.local_scale[1])[:, None]
        area = lo + (hi - lo) * rand(b, n, t)
        log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * rand(b, n, t))
        w = torch.sqrt(area * ratio / aspect)  # fraction of the width
        h = torch.sqrt(area / ratio * aspect)  # fraction of the height
        fits = (w <= 1) & (h <= 1)
        first = fits.to(torch.uint8).argmax(-1, keepdim=True)  # first try that fits
        w, h = w.gather(-1, first)[..., 0], h.gather(-1, first)[..., 0]
        found = fits.any(-1)
        # fallback as torchvision: the whole image cut to the nearest allowed ratio, centred
        if aspect < min(cfg.ratio):
            fw, fh = 1.0, aspect / min(cfg.ratio)
        elif aspect > max(cfg.ratio):
            fw, fh = max(cfg.ratio) / aspect, 1.0
        else:
            fw, fh = 1.0, 1.0
        w, h = torch.where(found, w, fw), torch.where(found, h, fh)
        pos = rand(b, n, 2)
        top = torch.where(found, (1 - h) * pos[..., 0], (1 - h) / 2)
        left = torch.where(found, (1 - w) * pos[..., 1], (1 - w) / 2)
        box = torch.stack((top, left, h, w), -1).float()

        flip = rand(b, n) < cfg.flip_p
        # --- colour jitter: factor ranges as torchvision ColorJitter
        jitter = rand(b, n) < cfg.jitter_p
        bj, cj, sj, hj = cfg.jitter
        f_lo = torch.tensor([max(0.0, 1 - bj), max(0.0, 1 - cj), max(0.0, 1 - sj), -hj], dtype=torch.float64)
        f_hi = torch.tensor([1 + bj, 1 + cj, 1 + sj, hj], dtype=torch.float64)
        factors = (f_lo + (f_hi - f_lo) * rand(b, n, 4)).float()
        order = rand(n, 4).argsort(-1)
        gray = rand(b, n) < cfg.grayscale_p
        blur = rand(b, n) < per_crop(*cfg.blur_p)
        s_lo, s_hi = cfg.blur_sigma
        sigma = (s_lo + (s_hi - s_lo) * rand(b, n)).float()
        sol = rand(b, n) < per_crop(*cfg.solarize_p)
        return {"box": box, "flip": flip, "jitter": jitter, "jitter_factors": factors,
                "jitter_order": order, "grayscale": gray, "blur": blur, "blur_sigma": sigma,
                "solarize": sol}

    # ---------------------------------------------------------------- execution
    def __call__(self, images: torch.Tensor, seed: int, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
        """uint8 (B, C, H, W) on any device -> [global1, global2, local1..localN], each float32
        (B, 3, S, S) normalised with mean/std, on the same device. Same seed -> identical output.

        DDP: with ``world_size`` > 1, ``images`` is rank ``rank``'s contiguous slice of a global
        batch of ``world_size * B`` images; the parameters are drawn for the global batch and this
        rank takes its slice, so the ranks together make exactly one process's crops."""
        _check(images)
        b = images.shape[0]
        params = self.sample_params(b * world_size, seed, image_size=tuple(images.shape[-2:]))
        if world_size > 1:
            params = self.slice_params(params, rank * b, (rank + 1) * b)
        return self.apply(images, params)

    @classmethod
    def slice_params(cls, params: dict, lo: int, hi: int) -> dict:
        """The parameters of images ``lo:hi`` of the batch ``params`` were drawn for."""
        return {k: v if k in cls.SHARED_PARAMS else v[lo:hi] for k, v in params.items()}

    def apply(self, images: torch.Tensor, params: dict) -> list[torch.Tensor]:
        """Run the augmentation with given ``params`` (from :meth:`sample_params`).

        ``images``: uint8 (B, C, H, W), or float in [0, 1]; C in (1, 3), 1 is made RGB.
        The returned crops are views into one buffer ``(B, 3, P)`` that holds every crop of an
        image side by side (batch stride ``3 * P``, inner dims contiguous): one allocation per
        call and no copy; call ``.contiguous()`` on a crop where a dense tensor is needed.
        """
        _check(images)
        dev = images.device
        b, c = images.shape[:2]
        sizes = self._sizes()
        step = self._chunk(b, sizes, dev)
        separable = self.separable if self.separable is not None else dev.type == "cpu"
        if separable:
            resize = self._resize_plan(images, params, sizes, step)
            out = self._output_buffer((b, 3, sum(s * s for s in sizes)), dev)
            fill = lambda lo, hi: self._resize_separable(images, lo, hi, out, resize)  # noqa: E731
        else:
            out = self._resize_grid_sample(images, params, sizes)
            if c == 1:  # grayscale input -> RGB
                out = out.expand(b, 3, out.shape[-1]).contiguous()
            fill = None
        return self._photometric(out, params, sizes, step, fill)

    def from_crops(self, groups: list[torch.Tensor], seed: int, positions: torch.Tensor,
                   global_batch: int) -> list[torch.Tensor]:
        """Ready uint8 crops (cut from the original images where they were decoded,
        :mod:`bcssl.data.crops`) -> [global1, global2, local1..localN] as :meth:`__call__` returns.

        ``groups``: uint8 ``(B, k, C, S, S)`` per crop group (the 2 globals, then the locals), on
        the training device. The photometric parameters are drawn for the whole global batch of
        ``global_batch`` images from ``seed`` and each image takes those of its ``positions``
        (its place in the global batch): any number of processes, and dropped images, leave every
        image's crops as one process makes them. Their boxes are not used (the crops are cut).
        """
        params = self.sample_params(global_batch, seed)
        return self.apply_crops(groups, self.select_params(params, positions))

    @classmethod
    def select_params(cls, params: dict, positions: torch.Tensor) -> dict:
        """The parameters of the images at ``positions`` of the batch ``params`` were drawn for."""
        idx = torch.as_tensor(positions, dtype=torch.int64).cpu()
        return {k: v if k in cls.SHARED_PARAMS else v.index_select(0, idx) for k, v in params.items()}

    def apply_crops(self, groups: list[torch.Tensor], params: dict) -> list[torch.Tensor]:
        """:meth:`apply` for ready crops: flip (``params["flip"]``), then the photometric stages.

        ``groups``: uint8 (or float in [0, 1]) ``(B, k, C, S, S)`` per crop group, C in (1, 3);
        their sizes must be the config's. Same return layout as :meth:`apply`.
        """
        cfg = self.cfg
        if len(groups) != 2 or groups[0].shape[1] != 2 or groups[1].shape[1] != cfg.n_local \
                or groups[0].shape[-1] != cfg.global_size or groups[1].shape[-1] != cfg.local_size:
            shapes = [tuple(g.shape) for g in groups]
            raise ValueError(f"expected crop groups (B, 2, C, {cfg.global_size}, {cfg.global_size}) and "
                             f"(B, {cfg.n_local}, C, {cfg.local_size}, {cfg.local_size}), got {shapes}")
        b, dev = groups[0].shape[0], groups[0].device
        if b < 1:
            raise ValueError("expected a batch of at least one image")
        sizes = self._sizes()
        numels = [s * s for s in sizes]
        out = self._output_buffer((b, 3, sum(numels)), dev)
        dests = [v.view(b, 3, s, s) for v, s in zip(out.split(numels, 2), sizes)]
        srcs = [g[:, k] for g in groups for k in range(g.shape[1])]
        flips = params["flip"]

        def fill(lo: int, hi: int) -> None:
            for j, (dst, src) in enumerate(zip(dests, srcs)):
                d = dst[lo:hi]
                d.copy_(src[lo:hi].expand_as(d))  # uint8 -> float; one channel -> RGB
                if src.dtype == torch.uint8:
                    d.div_(255.0)
                idx = _idx(flips[lo:hi, j]).to(dev, non_blocking=True)
                if idx.numel():
                    d.index_copy_(0, idx, d.index_select(0, idx).flip(-1))

        return self._photometric(out, params, sizes, self._chunk(b, sizes, dev), fill, rowwise=True)

    def _sizes(self) -> list[int]:
        return [self.cfg.global_size] * 2 + [self.cfg.local_size] * self.cfg.n_local

    def _chunk(self, b: int, sizes: list[int], dev: torch.device) -> int:
        """Images per chunk. On the CPU, a few at a time: the crops of a chunk are made and then
        worked on while they are in cache (on whole 64-image groups, memory traffic makes the
        colour ops, blur and hue 2-5x slower). Elsewhere the whole batch at once."""
        return b if dev.type != "cpu" else max(1, min(b, self.CHUNK_PIXELS // max(sizes) ** 2))

    def _photometric(self, out: torch.Tensor, params: dict, sizes: list[int], step: int, fill,
                     rowwise: bool = False) -> list[torch.Tensor]:
        """Colour jitter, grayscale, blur, solarize and normalise ``out`` (B, 3, P) in place, chunk by
        chunk; ``fill(lo, hi)`` (if given) first writes images ``lo:hi``' crops into it. ``rowwise``:
        see :func:`_gray_mean`."""
        cfg, dev = self.cfg, out.device
        b = out.shape[0]
        numels = [s * s for s in sizes]
        mean, std = torch.tensor(cfg.mean).view(3, 1), torch.tensor(cfg.std).view(3, 1)
        norm = ((1 / std).to(dev), (-mean / std).to(dev))  # x * (1/std) + (-mean/std)
        plans = [dict(_to_device(self._plan(params, j, s), dev), rowwise=rowwise) for j, s in enumerate(sizes)]
        crops = [v.view(b, 3, s, s) for v, s in zip(out.split(numels, 2), sizes)]
        xs = [crop.view(b, 3, -1) for crop in crops]
        chunks = [_chunk_plans(plan, b, step) for plan in plans]
        for lo in range(0, b, step):
            hi = min(b, lo + step)
            if fill is not None:
                fill(lo, hi)
            for x, s, parts in zip(xs, sizes, chunks):
                _, _, part = next(parts)
                self._color_(x[lo:hi], part)
                self._blur_(x[lo:hi], part, s)
                self._finish_(x[lo:hi], part, norm)
        return crops

    def _input_float(self, images: torch.Tensor, name: str, shape, view) -> torch.Tensor:
        """``images`` as float in [0, 1], written through ``view(buffer)`` of a scratch buffer."""
        buf = self._ws.get(name, shape, images.device)
        dst = view(buf)
        if images.dtype == torch.uint8:
            torch.div(images, 255.0, out=dst)  # the only uint8 -> float pass
        else:
            dst.copy_(images)
        return buf

    def _resize_grid_sample(self, images: torch.Tensor, params: dict, sizes: list[int]) -> torch.Tensor:
        """Every crop of every image with one bicubic ``grid_sample`` -> (B, C, P), unclamped.

        The grids of all crops of an image are laid end to end. The input gets a 2-pixel
        replicated border: bicubic taps reach at most 2 pixels outside a box that lies in the
        image, so grid_sample's cheaper "zeros" padding then gives exactly "border" padding.
        """
        dev, ws = images.device, self._ws
        b, c, hgt, wid = images.shape
        x = self._input_float(images, "input", (b, c, hgt + 2 * _PAD, wid + 2 * _PAD),
                              lambda buf: buf[:, :, _PAD:-_PAD, _PAD:-_PAD])
        for dim in (2, 3):  # rows, then columns (full height: fills the corners)
            n = x.shape[dim]
            for edge, src in ((0, _PAD), (n - _PAD, n - _PAD - 1)):
                band = x.narrow(dim, edge, _PAD)
                band.copy_(x.narrow(dim, src, 1).expand_as(band))
        fit = (wid / (wid + 2 * _PAD), hgt / (hgt + 2 * _PAD))
        grid = ws.get("grid", (b, sum(s * s for s in sizes), 2), dev)
        box = params["box"].to(dev, torch.float32, non_blocking=True)
        flip = params["flip"].to(dev, non_blocking=True)
        first = offset = 0
        for size, n in _runs(sizes):  # one crop_grid per run of equal sizes
            part = grid[:, offset:offset + n * size * size].view(b, n, size, size, 2)
            crop_grid(box[:, first:first + n], flip[:, first:first + n], size, out=part, fit=fit)
            first, offset = first + n, offset + n * size * size
        return F.grid_sample(x, grid.unsqueeze(1), mode="bicubic", padding_mode="zeros",
                             align_corners=False)[:, :, 0]

    def _resize_plan(self, images: torch.Tensor, params: dict, sizes: list[int], step: int) -> dict:
        """Taps of the separable resize (see :meth:`_resize_separable`) for chunks of ``step`` images.

        Per run of equal crop sizes: ``embedding_bag`` indices and weights ``(B, bags, 4)``, bags
        in (image, crop, channel, output index) order; indices address the rows of a sub-chunk
        of ``sub`` images (``sub`` divides ``step``), so any aligned slice of images can run.
        """
        dev = images.device
        b, c, hgt, wid = images.shape
        runs = _runs(sizes)
        per_image = max(n * size for size, n in runs) * c * max(hgt, wid)  # floats of intermediate
        sub = max(1, min(step, self.RESIZE_CHUNK // per_image)) if dev.type == "cpu" else step
        while step % sub:
            sub -= 1
        box, flip = params["box"].cpu(), params["flip"].cpu()
        local = torch.arange(b).view(b, 1, 1, 1, 1) % sub  # image index within its sub-chunk
        chan = torch.arange(c).view(1, 1, c, 1, 1)
        taps, first = [], 0
        for size, n in runs:
            bx, fl = box[:, first:first + n], flip[:, first:first + n]
            ix, wx = cubic_taps(bx[..., 1], bx[..., 3], fl, size, wid)  # (B, n, S, 4)
            iy, wy = cubic_taps(bx[..., 0], bx[..., 2], None, size, hgt)
            i1 = (local * c + chan) * wid + ix[:, :, None]  # rows (image, channel, column)
            i2 = ((local * n + torch.arange(n).view(1, n, 1, 1, 1)) * c + chan) * hgt + iy[:, :, None]
            shape = (b, n * c * size, 4)
            w1 = wx[:, :, None].expand(b, n, c, size, 4).reshape(shape)
            w2 = wy[:, :, None].expand(b, n, c, size, 4).reshape(shape)
            run = [i1.view(shape), w1, i2.view(shape), w2]
            if dev.type != "cpu":
                run = [t.to(dev, non_blocking=True) for t in run]
            taps.append(run)
            first += n
        return {"runs": runs, "taps": taps, "sub": sub}

    def _resize_separable(self, images: torch.Tensor, lo: int, hi: int, out: torch.Tensor, plan: dict) -> None:
        """Crops of images ``lo:hi`` into ``out[lo:hi]`` (B, 3, P), unclamped: two separable passes.

        A crop is ``Ry X Rx^T`` with sparse (4 taps a row) resampling matrices, so per run of
        equal crop sizes S: (1) each crop column ``t`` = 4 weighted image columns, an
        ``F.embedding_bag`` over the rows of the transposed input ``(C*W, H)`` -> (S, H) per
        crop and channel; (2) transpose that to (H, S) (a copy); (3) each crop row ``s`` = 4
        weighted rows of it, another ``embedding_bag`` -> (S, S). ``embedding_bag``'s
        gather-and-sum kernel (fbgemm on x86) is several times faster than ``grid_sample``'s
        16-tap bicubic, whose taps it equals up to float rounding (~2e-6). The uint8 -> float
        conversion is the copy into the transposed input. On the CPU this goes ``plan["sub"]``
        images at a time (``RESIZE_CHUNK`` floats of intermediate), so that it runs in cache;
        results do not depend on the chunking. One-channel images are made RGB at the end.
        """
        dev, ws = images.device, self._ws
        _, c, hgt, wid = images.shape
        sub = plan["sub"]
        for a in range(lo, hi, sub):
            z = min(hi, a + sub)
            m = z - a
            xt = ws.get("input_t", (m, c, wid, hgt), dev)
            xt.copy_(images[a:z].transpose(2, 3))  # -> float, transposed
            if images.dtype == torch.uint8:
                xt.div_(255.0)  # in cache; the same floats as images.float() / 255
            table = xt.view(m * c * wid, hgt)
            offset = 0
            for (size, n), (i1, w1, i2, w2) in zip(plan["runs"], plan["taps"]):
                t1 = F.embedding_bag(i1[a:z].reshape(-1, 4), table, mode="sum",
                                     per_sample_weights=w1[a:z].reshape(-1, 4))  # (m*n*c*S, H)
                t1t = ws.get("resize_t", (m * n * c, hgt, size), dev)
                t1t.copy_(t1.view(m * n * c, size, hgt).transpose(1, 2))
                t2 = F.embedding_bag(i2[a:z].reshape(-1, 4), t1t.view(-1, size), mode="sum",
                                     per_sample_weights=w2[a:z].reshape(-1, 4))  # (m*n*c*S, S)
                dest = out[a:z, :, offset:offset + n * size * size].view(m, 3, n, size * size)
                dest.copy_(t2.view(m, n, c, size * size).transpose(1, 2).expand(m, 3, n, size * size))
                offset += n * size * size

    def _output_buffer(self, shape, device) -> torch.Tensor:
        """A buffer for the returned crops: fresh, or on the CPU a previous one nobody holds any more.

        Fresh CPU memory is page-faulted in on first touch (~10x the cost of writing it once
        it is mapped: for 2x224 + 8x96 crops of 64 images, ~75 ms a batch). The last two
        output buffers are kept and one is reused once no tensor other than this pool's refers
        to its storage (every crop and view of it is gone), so outputs are never overwritten
        while anything can still read them. Without ``torch._C._storage_Use_Count``: fresh.
        """
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if torch.device(device).type != "cpu" or use_count is None or not self.recycle_outputs:
            return torch.empty(shape, device=device)
        numel = math.prod(shape)
        pool = self._out_pool
        for i, (buf, free_count) in enumerate(pool):
            if buf.numel() >= numel and use_count(buf.untyped_storage()._cdata) == free_count:
                return buf[:numel].view(shape)
        buf = torch.empty(numel, device=device)
        pool.append((buf, use_count(buf.untyped_storage()._cdata)))
        del pool[:-2]
        return buf.view(shape)

    def _plan(self, params: dict, j: int, s: int) -> dict:
        """CPU-side plan for crop group ``j`` (size ``s``): per-image factors, image indices per op,
        and the blur kernels: radius ``ceil(3 * blur_sigma[1])`` (the config's largest sigma), at most
        ``s - 1``, so that an image's blur does not depend on the other images of the batch (DDP:
        a rank's slice of the global batch gets the crops one process makes)."""
        jit = params["jitter"][:, j]
        # identity factors for images that skip the jitter: exact no-ops
        ident = torch.tensor([1.0, 1.0, 1.0, 0.0])
        factors = torch.where(jit[:, None], params["jitter_factors"][:, j].float(), ident)
        blur = params["blur"][:, j]
        sigma = params["blur_sigma"][:, j][blur].float()
        radius = min(math.ceil(3 * self.cfg.blur_sigma[1]), s - 1) if sigma.numel() else 0
        return {"factors": factors, "order": params["jitter_order"][j].tolist(), "hue_idx": _idx(jit),
                "gray_idx": _idx(params["grayscale"][:, j]), "blur_idx": _idx(blur),
                "blur_kern": _gaussian_kernels(sigma, max(radius, 0)), "blur_radius": radius,
                "sol_idx": _idx(params["solarize"][:, j])}

    # The three stages run in place on images ``x`` (B, 3, S*S) of one crop group.
    def _color_(self, x: torch.Tensor, plan: dict) -> None:
        """Clamp the bicubic overshoot -> colour jitter (the group's order) -> grayscale."""
        ws = self._ws
        f = plan["factors"]
        x.clamp_(0, 1)  # bicubic overshoots
        for op in plan["order"]:
            if op == BRIGHTNESS:
                _brightness_(x, f[:, BRIGHTNESS])
            elif op == CONTRAST:
                _contrast_(x, f[:, CONTRAST], plan["rowwise"])
            elif op == SATURATION:
                _saturation_(x, f[:, SATURATION], ws)
            else:
                self._subset_(x, plan["hue_idx"], lambda sub, idx: _hue_(sub, f[idx, HUE], ws))
        self._subset_(x, plan["gray_idx"], self._gray)

    def _blur_(self, x: torch.Tensor, plan: dict, s: int) -> None:
        idx = plan["blur_idx"]
        if plan["blur_radius"] <= 0 or idx.numel() == 0:
            return
        x = x.view(x.shape[0], 3, s, s)
        if idx.numel() == x.shape[0]:
            x.copy_(_blur(x, plan["blur_kern"], self._ws))
        else:
            sub = torch.index_select(x, 0, idx, out=self._ws.get("subset", (idx.numel(), 3, s, s), x.device))
            x.index_copy_(0, idx, _blur(sub, plan["blur_kern"], self._ws))

    def _finish_(self, x: torch.Tensor, plan: dict, norm: tuple) -> None:
        """Solarize -> normalise."""
        self._subset_(x, plan["sol_idx"], lambda sub, idx: solarize(sub))
        x.mul_(norm[0]).add_(norm[1])

    def _gray(self, sub: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        gray = _gray_into(sub, _scratch(self._ws, "gray", (sub.shape[0], sub.shape[2]), sub))
        return gray.unsqueeze(1).expand_as(sub)

    def _subset_(self, x: torch.Tensor, idx: torch.Tensor, fn) -> None:
        """Run ``fn(sub, idx)`` on the images ``idx`` of ``x`` and write the result back.

        ``fn`` either returns the new images or ``None`` after changing ``sub`` in place. When
        ``idx`` covers all of ``x`` (it is sorted and unique, so it is then arange) ``sub`` is
        ``x`` itself: no gather.
        """
        k = idx.numel()
        if k == 0:
            return
        full = k == x.shape[0]
        if full:
            sub = x
        else:
            sub = torch.index_select(x, 0, idx, out=self._ws.get("subset", (k, *x.shape[1:]), x.device))
        res = fn(sub, idx)
        if full:
            if res is not None:
                x.copy_(res)
        else:
            x.index_copy_(0, idx, sub if res is None else res)

    def __repr__(self) -> str:
        return f"MultiCrop({self.cfg})"


def _check(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (B, C, H, W) with C in (1, 3), got {shape}")
    if images.shape[0] < 1:
        raise ValueError("expected a batch of at least one image")
