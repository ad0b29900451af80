"""DINO multi-crop augmentation, batched on tensors on the training device.

The loader yields uint8 batches ``(B, C, H, W)``; one :class:`MultiCrop` call turns a batch into
``[global1, global2, local1, ..., localN]``, each float32 ``(B, 3, S, S)`` normalised with the
ImageNet mean/std, on the images' device. The recipe is DINO's ``DataAugmentationDINO``
(PAPER.md section 2): random resized crop (bicubic) + horizontal flip -> colour jitter (p=0.8) ->
grayscale (p=0.2) -> Gaussian blur (p = 1.0 / 0.1 / 0.5) -> solarize (p = 0 / 0.2 / 0) -> normalise.

How it is batched:

* Every random decision is drawn by :meth:`MultiCrop.sample_params` from a CPU
  ``torch.Generator`` seeded with ``seed`` (small tensors), so the output depends only on
  ``(images, seed)``: not on the device, the global RNG or the thread count.
* All crops of all images come from ONE ``F.grid_sample`` call (bicubic, align_corners=False,
  border padding): each crop is an axis-aligned affine box (flip folded in as a negative x scale);
  the grids of every crop are laid end to end in one ``(B, 1, P, 2)`` grid.
* Colour jitter follows torchvision's ``ColorJitter`` exactly, including its random order of the
  four adjustments *per image*: the jitter runs in four stages; at stage ``k`` each image applies
  its own ``order[k]``-th adjustment. Brightness, contrast and saturation are all
  ``clamp(alpha * x + beta * gray(x) + gamma)`` with per-image coefficients, so one fused
  elementwise pass handles every image of a stage; hue runs on the stage's hue subset.
* Grayscale, blur, solarize and hue touch only the images drawn for them (index_select /
  index_copy_ with indices computed on the CPU, so nothing waits on the device).
* Blur: separable Gaussian with per-image sigma via two grouped (depthwise) convolutions over the
  whole subset, radius ``ceil(3 * max sigma)`` of the subset, reflect padding (as torchvision).

Known differences from DINO's PIL pipeline (all in the direction of torchvision's tensor ops):
crop boxes are continuous (sub-pixel) instead of rounded to whole pixels; bicubic uses
``grid_sample``'s a=-0.75 kernel (PIL: a=-0.5) and does not antialias when a crop is shrunk;
blur is an exact Gaussian (PIL approximates it with box blurs); colour ops run on float images
(PIL rounds to uint8 after each op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MultiCropConfig",
    "MultiCrop",
    "GRAY_WEIGHTS",
    "SOLARIZE_THRESHOLD",
    "crop_grid",
    "resized_crop",
    "rgb_to_grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "color_jitter",
    "gaussian_blur",
    "solarize",
]

#: ITU-R 601-2 luma weights, the ones torchvision's ``rgb_to_grayscale`` uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
#: PIL's ``ImageOps.solarize`` inverts uint8 pixels >= 128. A continuous value that PIL would
#: round to >= 128 is >= 127.5/255 = 0.5, and on uint8 values ``k/255 >= 0.5`` iff ``k >= 128``.
SOLARIZE_THRESHOLD = 0.5

# Jitter op ids, in torchvision ColorJitter's order of factors.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


@dataclass
class MultiCropConfig:
    """DINO multi-crop recipe (defaults: PAPER.md section 2, ConvNeXt/ViT scales)."""

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


# --------------------------------------------------------------------------------------------
# Batched functional ops. Images are float (N, 3, H, W) in [0, 1]; factors are per image (N,).
# --------------------------------------------------------------------------------------------


def crop_grid(boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grid ``(N, S, S, 2)`` for crop boxes, equal to ``F.affine_grid`` (align_corners=False).

    ``boxes`` (N, 4) = (top, left, height, width) as fractions of the image height/width (floats,
    sub-pixel allowed); ``flips`` (N,) bool mirrors the crop horizontally. The affine is
    ``x = a_x * u + t_x``, ``y = a_y * v + t_y`` with ``a_x = -+width``, ``t_x = 2 * left + width - 1``
    (same for y), i.e. ``theta = [[a_x, 0, t_x], [0, a_y, t_y]]``. Being axis-aligned, the grid is
    an outer combination of two 1-D ramps, built without ``affine_grid``'s (N, S*S, 3) matmul.
    """
    top, left, h, w = boxes.unbind(-1)
    base = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) * 2 + 1) / size - 1
    ax = torch.where(flips, -w, w)
    gx = ax[:, None] * base + (2 * left + w - 1)[:, None]  # (N, S): x of each column
    gy = h[:, None] * base + (2 * top + h - 1)[:, None]  # (N, S): y of each row
    n = boxes.shape[0]
    return torch.stack((gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)), -1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` out of float ``images`` (N, C, H, W), resize to S x S (bicubic), flip, clamp to [0, 1]."""
    grid = crop_grid(boxes.to(images.device, torch.float32), flips.to(images.device), size)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)  # bicubic overshoots


def _per_image(v, x: torch.Tensor) -> torch.Tensor:
    """Per-image factors as a tensor broadcastable against ``x`` (N, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape[0], *([1] * (x.dim() - 1)))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, ...) of RGB ``x`` (N, 3, ...), computed in torchvision's order (bit-identical)."""
    r, g, b = x.unbind(1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def _gray_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean of the luma (N,), from per-channel means (the luma is linear)."""
    means = x.flatten(2).mean(-1)  # (N, 3)
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
    return means @ w


def _affine(x: torch.Tensor, alpha, beta=None, gamma=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(alpha * x + beta * gray(x) + gamma, 0, 1)`` with per-image coefficients.

    Brightness f: (f, 0, 0); contrast f: (f, 0, (1-f) * mean gray); saturation f: (f, 1-f, 0);
    the identity (1, 0, 0) is exact, so images with no op at a stage pass through unchanged.
    """
    alpha = _per_image(alpha, x)
    ref = None
    if beta is not None:
        ref = _gray(x).mul_(_per_image(beta, x))
    if gamma is not None:
        gamma = _per_image(gamma, x)
        ref = gamma if ref is None else ref.add_(gamma)
    if ref is None:
        y = torch.mul(x, alpha, out=out)
    else:
        y = torch.addcmul(ref, x, alpha, out=out)
    return y.clamp_(0, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of RGB ``x`` (N, 3, H, W), replicated to 3 channels (as torchvision)."""
    return _gray(x).expand_as(x).contiguous()


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image brightness: ``clamp(f * x)`` (torchvision ``adjust_brightness``)."""
    return _affine(x, factor)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image contrast: blend with the image's mean luma (torchvision ``adjust_contrast``)."""
    f = _per_image(factor, x).flatten()
    return _affine(x, f, gamma=(1 - f) * _gray_mean(x))


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image saturation: blend with the luma image (torchvision ``adjust_saturation``)."""
    f = _per_image(factor, x).flatten()
    return _affine(x, f, beta=1 - f)


def adjust_hue(x: torch.Tensor, factor) -> torch.Tensor:
    """Per-image hue shift by ``factor`` in [-0.5, 0.5] turns (torchvision ``adjust_hue``).

    RGB -> (H, chroma, V) as torchvision's ``_rgb_to_hsv`` (same branches), shift H, then the
    closed-form HSV -> RGB ``c_n = V - chroma * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6H) mod 6``,
    ``n = 5, 3, 1`` for R, G, B: ~10 elementwise passes instead of torchvision's lookup gather.
    """
    shape = x.shape
    x = x.reshape(shape[0], 3, -1)
    r, g, b = x.unbind(1)
    maxc, minc = torch.aminmax(x, dim=1)
    chroma = maxc - minc
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    sector = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    # chroma == 0 means r == g == b: num is 0 and the hue does not matter.
    h6 = num.div_(torch.where(chroma == 0, 1.0, chroma)).add_(sector)
    h6 = h6.add_(_per_image(factor, h6).mul(6.0))
    k = h6.unsqueeze(1) + torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1)
    # V - chroma * clamp(min(k, 4-k), 0, 1) == min + chroma * clamp(|k - 2| - 1, 0, 1) for k in [0, 6)
    k = k.remainder_(6.0).sub_(2.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return torch.addcmul(minc.unsqueeze(1), chroma.unsqueeze(1), k).reshape(shape)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 apply: torch.Tensor | None = None) -> torch.Tensor:
    """Batched torchvision ``ColorJitter`` with per-image factors and per-image order.

    ``factors`` (N, 4) = (brightness, contrast, saturation, hue); ``order`` (N, 4) a permutation of
    0..3 per image (0 brightness, 1 contrast, 2 saturation, 3 hue); ``apply`` (N,) bool, images
    with False are returned unchanged. Returns a new tensor. Parameters may live on the CPU.
    """
    n = x.shape[0]
    apply = torch.ones(n, dtype=torch.bool) if apply is None else apply.cpu()
    plan = _jitter_plan(factors.cpu().float(), order.cpu(), apply)
    return _run_jitter(x.reshape(n, 3, -1).clone(), _to_device(plan, x.device)).reshape(x.shape)


def gaussian_blur(x: torch.Tensor, sigma, radius: int | None = None) -> torch.Tensor:
    """Per-image Gaussian blur of ``x`` (N, C, H, W) with ``sigma`` (N,) in pixels.

    Separable kernels ``exp(-t^2 / 2 sigma^2)``, ``t = -radius..radius`` (radius defaults to
    ``ceil(3 * max sigma)``), applied by two grouped convolutions (one per axis) with reflect
    padding: the same as torchvision ``gaussian_blur(kernel_size=2 * radius + 1, sigma)``.
    """
    n, c, h, w = x.shape
    sigma = _per_image(sigma, x).flatten()
    if radius is None:
        radius = math.ceil(3 * float(sigma.max()))
    radius = min(int(radius), h - 1, w - 1)  # reflect padding needs pad < size
    if radius <= 0 or n == 0:
        return x.clone()
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kern = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, 2r+1)
    # One image per channel group so each image gets its own kernel. Padding one axis at a time:
    # reflect padding of a single axis is ~10x faster on CPU than of both.
    y = F.pad(x.reshape(1, n * c, h, w), (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, -1, 1), groups=n * c)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, -1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert pixels ``>= threshold`` (``x -> 1 - x``), as torchvision/PIL ``solarize``."""
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
    for k, v in plan.items():  # nested plans (lists of stage dicts)
        if isinstance(v, list):
            out[k] = [_to_device(s, device) for s in v]
    return out


def _idx(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


def _jitter_plan(factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> dict:
    """Per-stage coefficients: stage k applies each jittered image's ``order[:, k]`` op."""
    stages = []
    for k in range(4):
        op = torch.where(apply, order[:, k], -1)
        is_b, is_c, is_s, is_h = (op == i for i in range(4))
        alpha = torch.ones(len(op))
        for m, i in ((is_b, _BRIGHTNESS), (is_c, _CONTRAST), (is_s, _SATURATION)):
            alpha = torch.where(m, factors[:, i], alpha)
        c_idx, h_idx = _idx(is_c), _idx(is_h)
        stage = {"alpha": alpha, "c_idx": c_idx, "c_w": 1 - factors[c_idx, _CONTRAST],
                 "h_idx": h_idx, "h_shift": factors[h_idx, _HUE]}
        stage["any_affine"] = bool((is_b | is_c | is_s).any())
        if is_s.any():
            stage["beta"] = torch.where(is_s, 1 - factors[:, _SATURATION], 0.0)
        stages.append(stage)
    return {"stages": stages}


def _run_jitter(x: torch.Tensor, plan: dict) -> torch.Tensor:
    """Apply a jitter plan to ``x`` (M, 3, P), reusing a second buffer (ping-pong)."""
    spare = torch.empty_like(x)
    for st in plan["stages"]:
        if st["any_affine"]:
            gamma = None
            if st["c_idx"].numel():
                mean = _gray_mean(x.index_select(0, st["c_idx"]))
                gamma = x.new_zeros(x.shape[0]).index_copy_(0, st["c_idx"], st["c_w"] * mean)
            y = _affine(x, st["alpha"], st.get("beta"), gamma, out=spare)
            x, spare = y, x
        if st["h_idx"].numel():
            sub = x.index_select(0, st["h_idx"])
            x.index_copy_(0, st["h_idx"], adjust_hue(sub, st["h_shift"]))
    return x


# --------------------------------------------------------------------------------------------
# The multi-crop transform
# --------------------------------------------------------------------------------------------


class MultiCrop:
    """Batched DINO multi-crop: ``MultiCrop(cfg)(uint8 images, seed) -> [g1, g2, l1..lN]``."""

    N_TRIES = 10  # torchvision RandomResizedCrop's attempts before the center-crop fallback

    def __init__(self, cfg: MultiCropConfig | None = None):
        self.cfg = cfg or MultiCropConfig()

    @property
    def n_crops(self) -> int:
        return 2 + self.cfg.n_local

    def _groups(self) -> list[tuple[int, list[int]]]:
        """(output size, crop columns) per size: globals, then locals (if any)."""
        groups = [(self.cfg.global_size, [0, 1])]
        if self.cfg.n_local:
            groups.append((self.cfg.local_size, list(range(2, self.n_crops))))
        return groups

    # ---------------------------------------------------------------- randomness
    def sample_params(self, batch_size: int, seed: int, image_size: tuple[int, int] | None = None) -> dict:
        """All random decisions for a batch, per image and crop, from a CPU generator seeded with ``seed``.

        Crops are in output order (global1, global2, local1..localN); every tensor has leading
        dims ``(batch_size, n_crops)``:

        * ``box`` (.., 4) float: (top, left, height, width) as fractions of the image height/width.
          Sampled as torchvision's ``RandomResizedCrop``: area fraction ~ U(scale), aspect ratio
          (width/height in pixels) log-uniform in ``ratio``, first of 10 tries that fits, else the
          center crop of the closest allowed ratio; position uniform. Boxes are continuous (no
          rounding to pixels); only the aspect ratio ``image_size`` = (H, W) matters (default square).
        * ``flip`` bool; ``jitter`` bool (apply colour jitter); ``jitter_factors`` (.., 4) float
          (brightness, contrast, saturation, hue); ``jitter_order`` (.., 4) long, a permutation of
          0..3 per image (torchvision ColorJitter's random order); ``grayscale`` bool;
          ``blur`` bool; ``blur_sigma`` float; ``solarize`` bool.
        """
        cfg = self.cfg
        gen = torch.Generator().manual_seed(int(seed))
        b, n, t = int(batch_size), self.n_crops, self.N_TRIES
        if b < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        height, width = image_size or (1, 1)
        aspect = width / height

        def rand(*shape):
            return torch.rand(*shape, generator=gen, dtype=torch.float64)

        def per_crop(g1, g2, local):
            return torch.tensor([g1, g2] + [local] * cfg.n_local, dtype=torch.float64)

        # --- random resized crop, the 10 tries vectorised over a trailing dim
        lo = per_crop(cfg.global_scale[0], cfg.global_scale[0], cfg.local_scale[0])[:, None]
        hi = per_crop(cfg.global_scale[1], cfg.global_scale[1], cfg.local_scale[1])[:, None]
        area = lo + (hi - lo) * rand(b, n, t)
        log_r = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        ratio = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * rand(b, n, t))
        w = torch.sqrt(area * ratio / aspect)  # fraction of the width
        h = torch.sqrt(area / ratio * aspect)  # fraction of the height
        fits = (w <= 1) & (h <= 1)
        first = fits.to(torch.uint8).argmax(-1, keepdim=True)  # first try that fits
        w, h = w.gather(-1, first)[..., 0], h.gather(-1, first)[..., 0]
        found = fits.any(-1)
        # fallback as torchvision: whole image, cut to the nearest allowed aspect ratio, centred
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
        order = rand(b, n, 4).argsort(-1)
        gray = rand(b, n) < cfg.grayscale_p
        blur = rand(b, n) < per_crop(*cfg.blur_p)
        s_lo, s_hi = cfg.blur_sigma
        sigma = (s_lo + (s_hi - s_lo) * rand(b, n)).float()
        sol = rand(b, n) < per_crop(*cfg.solarize_p)
        return {"box": box, "flip": flip, "jitter": jitter, "jitter_factors": factors,
                "jitter_order": order, "grayscale": gray, "blur": blur, "blur_sigma": sigma,
                "solarize": sol}

    # ---------------------------------------------------------------- execution
    def __call__(self, images: torch.Tensor, seed: int) -> list[torch.Tensor]:
        """uint8 (B, C, H, W) on any device -> [global1, global2, local1..localN], each float32
        (B, 3, S, S) normalised with mean/std, on the same device. Same seed -> identical output."""
        self._check(images)
        params = self.sample_params(images.shape[0], seed, image_size=tuple(images.shape[-2:]))
        return self.apply(images, params)

    @staticmethod
    def _check(images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, C, H, W) with C in (1, 3), got {shape}")
        if images.shape[0] < 1:
            raise ValueError("expected a batch of at least one image")

    def apply(self, images: torch.Tensor, params: dict) -> list[torch.Tensor]:
        """Run the augmentation with given ``params`` (from :meth:`sample_params`).

        ``images``: uint8 (B, C, H, W), or float in [0, 1]; C in (1, 3), 1 is made RGB.
        """
        self._check(images)
        cfg, dev = self.cfg, images.device
        b, c = images.shape[:2]
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()

        # --- every crop of every image with one grid_sample: grids laid end to end per image
        groups = self._groups()
        sizes = [len(cols) * s * s for s, cols in groups]
        grid = torch.empty(b, sum(sizes), 2, device=dev)
        box = params["box"].to(dev, torch.float32, non_blocking=True)
        flip = params["flip"].to(dev, non_blocking=True)
        for (s, cols), part in zip(groups, grid.split(sizes, 1)):
            g = crop_grid(box[:, cols].reshape(-1, 4), flip[:, cols].reshape(-1), s)
            part.view(b, len(cols), s, s, 2).copy_(g.view(b, len(cols), s, s, 2))
        sampled = F.grid_sample(x, grid.unsqueeze(1), mode="bicubic", padding_mode="border",
                                align_corners=False)[:, :, 0]  # (B, C, P)
        del grid, x

        mean = torch.tensor(cfg.mean, device=dev).view(3, 1, 1)
        std = torch.tensor(cfg.std, device=dev).view(3, 1, 1)
        outs: list[torch.Tensor] = []
        for (s, cols), part in zip(groups, sampled.split(sizes, 2)):
            n = len(cols)
            # (B, C, n, S*S) -> contiguous (B*n, 3, S*S): the clamp of the bicubic overshoot writes
            # the new layout and turns a grayscale input into RGB in the same pass.
            view = part.view(b, c, n, s * s).transpose(1, 2).expand(b, n, 3, s * s)
            crops = torch.empty(b * n, 3, s * s, device=dev)
            torch.clamp(view, 0, 1, out=crops.view(b, n, 3, s * s))
            plan = _to_device(self._plan(params, cols), dev)
            crops = self._color_and_blur(crops, plan, s)
            # normalise straight into the (n, B, 3, S, S) output: one contiguous tensor per crop
            out = torch.empty(n, b, 3, s, s, device=dev)
            torch.addcmul(-mean / std, crops.view(b, n, 3, s, s).transpose(0, 1), 1 / std, out=out)
            outs.extend(out.unbind(0))
        return outs

    def _plan(self, params: dict, cols: list[int]) -> dict:
        """CPU-side plan for one size group: flattened (image-major) per-crop decisions -> indices."""
        def flat(key):
            v = params[key][:, cols]
            return v.reshape(-1, *v.shape[2:])

        plan = _jitter_plan(flat("jitter_factors").float(), flat("jitter_order"), flat("jitter"))
        blur = flat("blur")
        plan["gray_idx"] = _idx(flat("grayscale"))
        plan["blur_idx"] = _idx(blur)
        sigma = flat("blur_sigma")[blur].float()
        plan["blur_sigma"] = sigma
        plan["blur_radius"] = math.ceil(3 * float(sigma.max())) if sigma.numel() else 0
        plan["sol_idx"] = _idx(flat("solarize"))
        return plan

    @staticmethod
    def _color_and_blur(x: torch.Tensor, plan: dict, s: int) -> torch.Tensor:
        """Jitter -> grayscale -> blur -> solarize on (M, 3, S*S), each on its own subset."""
        x = _run_jitter(x, plan)
        if plan["gray_idx"].numel():
            sub = x.index_select(0, plan["gray_idx"])
            x.index_copy_(0, plan["gray_idx"], _gray(sub).expand_as(sub))
        if plan["blur_idx"].numel() and plan["blur_radius"] > 0:
            sub = x.index_select(0, plan["blur_idx"]).view(-1, 3, s, s)
            blurred = gaussian_blur(sub, plan["blur_sigma"], plan["blur_radius"])
            x.index_copy_(0, plan["blur_idx"], blurred.view(-1, 3, s * s))
        if plan["sol_idx"].numel():
            sub = x.index_select(0, plan["sol_idx"])
            x.index_copy_(0, plan["sol_idx"], solarize(sub))
        return x

    def __repr__(self) -> str:
        return f"MultiCrop({self.cfg})"
