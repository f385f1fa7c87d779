"""Denoisers that predict a Gaussian mixture over the flow velocity ``u = eps - x0`` (docs/layout.md).

Both networks return the u-GM dict of the public GMFlow code base::

    {"means": (B, K, C, H, W), "logstds": (B, 1, 1, 1, 1), "logweights": (B, K, 1, H, W)}

with ``logweights`` log-softmax normalised over K and one isotropic log-std per batch element,
predicted by a small MLP from the conditioning embedding (or fixed, ``fixed_logstd``: with K = 1
that is the plain flow-matching baseline of the same network, its NLL loss being an L2 loss).

* :class:`GMDiT`: a DiT (patch embedding, adaLN-Zero transformer blocks, attention through
  ``scaled_dot_product_attention``) with timestep and class embeddings; class ``num_classes``
  is the null class used for classifier-free / probabilistic guidance.
* :class:`GMMLP2D`: an MLP for 2-D points, ``x (B, 2, 1, 1)`` (points are H = W = 1, docs/layout.md).
* :class:`GMDiTOfficial`: the public checkpoint's GM-DiT (``gmkernels.models``, the network of
  ``gmkernels.pipelines.GMDiTPipeline``), used by the ImageNet presets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``x (*S)`` -> ``(*S, dim)`` cos/sin features at geometric frequencies ``1 .. 1/max_period``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """Timesteps ``t (B,)`` in (0, 1000] -> ``(B, dim)``: sinusoidal features then a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class GMHeadStd(nn.Module):
    """Shared log-std per batch element from the conditioning embedding ``c (B, dim)`` ->
    ``(B, 1, 1, 1, 1)``; a constant when ``fixed_logstd`` is given (the flow-matching baseline)."""

    def __init__(self, dim: int, hidden: int, fixed_logstd: float | None):
        super().__init__()
        self.fixed_logstd = fixed_logstd
        if fixed_logstd is None:
            self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.fixed_logstd is not None:
            return c.new_full((c.shape[0], 1, 1, 1, 1), float(self.fixed_logstd))
        return self.mlp(c).view(-1, 1, 1, 1, 1)


def _spread_means_init(linear: nn.Linear, K: int, C: int, groups: int = 1) -> None:
    """Small weights and a per-component bias spread ``N(0, 1)`` so the K components start apart
    (with equal initial means every component would get the same gradient forever)."""
    nn.init.normal_(linear.weight, std=0.02)
    with torch.no_grad():
        spread = torch.randn(K, C)
        linear.bias.copy_(spread.reshape(1, K * C).expand(groups, K * C).reshape(-1))


# ----------------------------------------------------------------------------------------- 2-D MLP


@dataclass
class MLP2DConfig:
    """Sizes of :class:`GMMLP2D`."""

    K: int = 64
    dim: int = 2
    hidden: int = 256
    depth: int = 4
    pos_freqs: int = 16
    fixed_logstd: float | None = None
    mean_init: float = 1.0


class GMMLP2D(nn.Module):
    """MLP denoiser for points: ``forward(x (B, C, 1, 1), t (B,)) -> u-GM`` with K components.

    Features: ``x`` itself, sin/cos of ``x`` at ``pos_freqs`` octaves, a sinusoidal timestep
    embedding; ``depth`` SiLU layers of width ``hidden``; heads for K means per channel, K
    log-weights, and the shared log-std (an MLP on the timestep embedding).
    """

    def __init__(self, cfg: MLP2DConfig):
        super().__init__()
        self.cfg = cfg
        K, C, h = cfg.K, cfg.dim, cfg.hidden
        self.register_buffer(
            "freqs", 2.0 ** torch.arange(cfg.pos_freqs, dtype=torch.float32) * (math.pi / 8), persistent=False
        )
        self.t_embed = TimestepEmbedder(h, freq_dim=128)
        layers: list[nn.Module] = [nn.Linear(C + 2 * C * cfg.pos_freqs + h, h), nn.SiLU()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(h, h), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.out_means = nn.Linear(h, K * C)
        self.out_logweights = nn.Linear(h, K)
        self.logstd = GMHeadStd(h, h, cfg.fixed_logstd)
        _spread_means_init(self.out_means, K, C)
        self.out_means.bias.data.mul_(cfg.mean_init)
        nn.init.zeros_(self.out_logweights.weight)
        nn.init.zeros_(self.out_logweights.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict:
        """``x (B, C, 1, 1)``, ``t (B,)`` in (0, 1000] -> u-GM with ``means (B, K, C, 1, 1)``."""
        B, C = x.shape[0], self.cfg.dim
        if x.shape[1:] != (C, 1, 1):
            raise ValueError(f"GMMLP2D: x must have shape (B, {C}, 1, 1), got {tuple(x.shape)}")
        p = x.reshape(B, C)
        ang = p.unsqueeze(-1) * self.freqs  # (B, C, F)
        temb = self.t_embed(t.expand(B) if t.dim() == 0 else t)
        h = self.trunk(torch.cat([p, ang.sin().flatten(1), ang.cos().flatten(1), temb], dim=-1))
        K = self.cfg.K
        return {
            "means": self.out_means(h).view(B, K, C, 1, 1),
            "logstds": self.logstd(temb),
            "logweights": self.out_logweights(h).view(B, K, 1, 1, 1).log_softmax(dim=1),
        }


# --------------------------------------------------------------------------------------------- DiT


@dataclass
class DiTConfig:
    """Sizes of :class:`GMDiT` (the digits preset; the ImageNet presets train :class:`GMDiTOfficial`)."""

    K: int = 8
    in_channels: int = 1
    image_size: int = 8
    patch_size: int = 2
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout: float = 0.1
    logstd_hidden: int = 256
    fixed_logstd: float | None = None
    grad_checkpointing: bool = False


def _sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin/cos position embedding ``(grid * grid, dim)``, half the features per axis."""
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    return torch.cat(
        [
            sinusoidal_embedding(ys.flatten(), dim // 2, 10000.0),
            sinusoidal_embedding(xs.flatten(), dim - dim // 2, 10000.0),
        ],
        dim=-1,
    )


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation by ``c (B, D)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        q, k, v = (
            self.qkv(_modulate(self.norm1(x), sh1, sc1))
            .view(B, N, 3, self.heads, D // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + g1.unsqueeze(1) * self.proj(a)
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class GMDiT(nn.Module):
    """Class-conditional DiT with a GM output head (the u-GM of docs/layout.md).

    ``forward(x (B, C, H, W), t (B,), y (B,) int64) -> u-GM`` with ``means (B, K, C, H, W)``,
    ``logweights (B, K, 1, H, W)`` (log-softmax over K per pixel) and ``logstds (B, 1, 1, 1, 1)``
    from an MLP on the conditioning embedding ``t_emb + y_emb``. Label ``num_classes`` is the null
    class; in training mode labels are replaced by it with probability ``class_dropout`` (drawn from
    the ``generator`` passed to ``forward``, so training stays seeded).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C, K = cfg.hidden, cfg.patch_size, cfg.in_channels, cfg.K
        if cfg.image_size % p or D % cfg.heads:
            raise ValueError(
                f"GMDiT: image_size {cfg.image_size} must divide by patch_size {p} and hidden {D} by heads {cfg.heads}"
            )
        self.grid = cfg.image_size // p
        self.patch = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.register_buffer("pos", _sincos_pos_embed(D, self.grid).unsqueeze(0), persistent=False)
        self.t_embed = TimestepEmbedder(D)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        nn.init.zeros_(self.ada_out[-1].weight)
        nn.init.zeros_(self.ada_out[-1].bias)
        self.out_means = nn.Linear(D, p * p * K * C)
        self.out_logweights = nn.Linear(D, p * p * K)
        nn.init.zeros_(self.out_logweights.weight)
        nn.init.zeros_(self.out_logweights.bias)
        # bias laid out (p, p, K, C): every pixel of a patch gets the same initial component spread
        _spread_means_init(self.out_means, K, C, groups=p * p)
        self.logstd = GMHeadStd(D, cfg.logstd_hidden, cfg.fixed_logstd)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict:
        cfg = self.cfg
        B, C, H, W = x.shape
        if (C, H, W) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"GMDiT: x must have shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        if y.shape != (B,) or y.dtype != torch.long:
            raise ValueError(f"GMDiT: y must be int64 of shape ({B},), got {y.dtype} {tuple(y.shape)}")
        if self.training and cfg.class_dropout > 0:
            drop = (torch.rand(B, generator=generator) < cfg.class_dropout).to(y.device)  # CPU generator
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, N, D)
        c = self.t_embed(t.expand(B) if t.dim() == 0 else t) + self.y_embed(y)
        for blk in self.blocks:
            h = checkpoint(blk, h, c, use_reentrant=False) if cfg.grad_checkpointing and self.training else blk(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        h = _modulate(self.norm_out(h), shift, scale)
        return {
            "means": self._unpatchify(self.out_means(h), cfg.K * C).view(B, cfg.K, C, H, W),
            "logstds": self.logstd(c).float(),
            "logweights": self._unpatchify(self.out_logweights(h), cfg.K).view(B, cfg.K, 1, H, W).log_softmax(dim=1),
        }

    def _unpatchify(self, z: torch.Tensor, ch: int) -> torch.Tensor:
        """``(B, N, p*p*ch)`` laid out ``(p, p, ch)`` -> ``(B, ch, H, W)``."""
        B, p, g = z.shape[0], self.cfg.patch_size, self.grid
        return z.view(B, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(B, ch, g * p, g * p)


# ------------------------------------------------------------------- GM-DiT of the public checkpoint


class GMDiTOfficial(nn.Module):
    """The GM-DiT of the public GMFlow checkpoint — ``gmkernels.models.GMDiTTransformer2DModel``
    (needs the ``diffusers`` extra), the class ``gmkernels.pipelines.GMDiTPipeline`` runs — with
    this package's calling convention ``forward(x, t, y, generator=None) -> u-GM``.

    ``cfg``: the transformer's config keys (``num_gaussians``, ``num_attention_heads``, ...) plus
    ``class_dropout`` (training: labels replaced by the null class with that probability, drawn
    from ``generator`` so training stays seeded) and ``grad_checkpointing``. The weights are
    ``self.transformer``'s, under the official parameter names: ``net.transformer.save_pretrained(
    dir + "/transformer")`` writes the ``transformer/`` folder of a pipeline checkpoint.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        from gmkernels.models import GMDiTTransformer2DModel

        cfg = dict(cfg)
        self.class_dropout = float(cfg.pop("class_dropout", 0.0))
        checkpointing = bool(cfg.pop("grad_checkpointing", False))
        self.transformer = GMDiTTransformer2DModel(**cfg)
        self.transformer.init_weights()
        if checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.cfg = SimpleNamespace(num_classes=self.transformer.config.num_embeds_ada_norm)  # what model.train reads

    @property
    def null_class(self) -> int:
        return self.transformer.null_class

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict:
        B = x.shape[0]
        if self.training and self.class_dropout > 0:
            drop = (torch.rand(B, generator=generator) < self.class_dropout).to(y.device)  # CPU generator
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        out = self.transformer(x, timestep=t.expand(B) if t.dim() == 0 else t, class_labels=y)
        return {**out, "logstds": out["logstds"].float()}


def config_dict(cfg) -> dict:
    """A network config as a plain dict (stored in checkpoints)."""
    return asdict(cfg)


def build_network(kind: str, cfg: dict) -> nn.Module:
    """``kind`` ``"mlp2d"`` or ``"dit"`` and a config dict -> the network."""
    if kind == "mlp2d":
        return GMMLP2D(MLP2DConfig(**cfg))
    if kind == "dit":
        return GMDiT(DiTConfig(**cfg))
    if kind == "gmdit":
        return GMDiTOfficial(cfg)
    raise ValueError(f"unknown network kind {kind!r}; expected 'mlp2d', 'dit' or 'gmdit'")
