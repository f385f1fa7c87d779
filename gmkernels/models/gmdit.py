"""The GM-DiT transformer and the spectrum MLP of the public GMFlow ImageNet checkpoint, as diffusers
models (``ModelMixin`` + ``ConfigMixin``) with the official config keys and parameter names, so a
checkpoint directory's ``transformer/`` and ``spectrum_net/`` load with ``from_pretrained`` and
``load_state_dict(strict=True)`` without the official code base.

:class:`GMDiTTransformer2DModel` is a class-conditional DiT (``diffusers`` ``PatchEmbed``,
``AdaLayerNormZero``, ``Attention``, ``FeedForward``) whose output head predicts, per pixel, a
Gaussian mixture over the flow velocity ``u = eps - x0``::

    model(x (B, C, H, W), timestep (B,) in (0, 1000], class_labels (B,) int64) ->
        {"means": (B, K, C, H, W), "logstds": (B, 1, 1, 1, 1), "logweights": (B, K, 1, H, W)}

(the u-GM dict every ``gmkernels`` op takes; ``logweights`` log-softmax normalised over K).
Class ``num_embeds_ada_norm`` (1000 for ImageNet) is the null class of guidance.

:class:`SpectrumMLP` maps the moment-matched Gaussian of a predicted x0-GM to a log power
spectrum ``(B, C, H, W)`` used to draw spatially correlated GM samples (GM-SDE, ``"sample"`` mode).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.normalization import AdaLayerNormZero
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gmkernels.models needs diffusers: pip install -e '.[diffusers]' from a checkout, or pip install diffusers"
    ) from e


class _ClassTable(nn.Module):
    """``num_classes + 1`` learned class embeddings (the last one is the null class)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class _TimestepLabelEmbedding(nn.Module):
    """``t (B,)``, ``y (B,)`` -> ``(B, dim)``: the original DiT's sinusoidal features (cos first,
    frequencies ``10000^(-i/128)``, i.e. no frequency shift) through a 2-layer MLP, plus a class
    embedding."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        self.class_embedder = _ClassTable(num_classes, dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        return t_emb + self.class_embedder(class_labels)


class _DiTBlock(nn.Module):
    """adaLN-Zero block with the conditioning embedding shared by all blocks (the original DiT):
    ``norm1`` (modulated LayerNorm + gates), self-attention ``attn1``, LayerNorm ``norm3``,
    GELU-tanh MLP ``ff``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        attention_bias: bool,
        upcast_attention: bool,
        activation_fn: str,
        norm_elementwise_affine: bool,
        norm_eps: float,
        dropout: float,
    ):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, None)
        self.attn1 = Attention(
            query_dim=dim,
            heads=heads,
            dim_head=head_dim,
            dropout=dropout,
            bias=attention_bias,
            upcast_attention=upcast_attention,
            out_bias=True,
        )
        self.norm3 = nn.LayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(h, emb=emb)
        h = h + gate_msa.unsqueeze(1) * self.attn1(x)
        x = self.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return h + gate_mlp.unsqueeze(1) * self.ff(x)


class _GMOutput2D(nn.Module):
    """Splits the unpatchified head output ``(B, K*(C+1), H, W)`` into K means per channel and K
    log-weights; the shared log-std comes from an MLP on the conditioning embedding."""

    def __init__(
        self,
        num_gaussians: int,
        out_channels: int,
        embed_dim: int,
        constant_logstd: float | None,
        logstd_inner_dim: int,
        num_logstd_layers: int,
    ):
        super().__init__()
        self.num_gaussians = num_gaussians
        self.out_channels = out_channels
        self.constant_logstd = constant_logstd
        if constant_logstd is None:
            if num_logstd_layers < 1:
                raise ValueError(f"gm_num_logstd_layers must be >= 1, got {num_logstd_layers}")
            layers, d = [], embed_dim
            for _ in range(num_logstd_layers - 1):
                layers += [nn.SiLU(), nn.Linear(d, logstd_inner_dim)]
                d = logstd_inner_dim
            self.logstd_layers = nn.Sequential(*layers, nn.SiLU(), nn.Linear(d, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> dict:
        B, _, H, W = x.shape
        K, C = self.num_gaussians, self.out_channels
        means, logweights = x.split([K * C, K], dim=1)
        if self.constant_logstd is None:
            logstds = self.logstd_layers(emb).view(B, 1, 1, 1, 1)
        else:
            logstds = x.new_full((B, 1, 1, 1, 1), float(self.constant_logstd))
        return {
            "means": means.reshape(B, K, C, H, W),
            "logstds": logstds,
            "logweights": logweights.reshape(B, K, 1, H, W).log_softmax(dim=1),
        }


class GMDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """Class-conditional GM-DiT (the official ``_GMDiTTransformer2DModel``: same config keys,
    parameter names and forward).

    Config (defaults: DiT-XL/2 on 32x32x4 latents, 16 heads of 72): ``num_gaussians`` (K),
    ``constant_logstd`` (a fixed log-std instead of the MLP), ``logstd_inner_dim``,
    ``gm_num_logstd_layers``, ``class_dropout_prob`` (training only), ``num_attention_heads``,
    ``attention_head_dim``, ``in_channels``, ``out_channels`` (default ``in_channels``),
    ``num_layers``, ``dropout``, ``attention_bias``, ``sample_size``, ``patch_size``,
    ``activation_fn``, ``num_embeds_ada_norm`` (number of classes; that index is the null class),
    ``upcast_attention``, ``norm_elementwise_affine``, ``norm_eps``. ``norm_num_groups`` and
    ``norm_type`` (must be ``"ada_norm_zero"``) are kept for config compatibility.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        num_gaussians: int = 16,
        constant_logstd: float | None = None,
        logstd_inner_dim: int = 1024,
        gm_num_logstd_layers: int = 2,
        class_dropout_prob: float = 0.0,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if norm_type != "ada_norm_zero":
            raise ValueError(f"GMDiTTransformer2DModel: norm_type must be 'ada_norm_zero', got {norm_type!r}")
        if num_embeds_ada_norm is None:
            raise ValueError("GMDiTTransformer2DModel: num_embeds_ada_norm (the number of classes) must be set")
        if sample_size % patch_size:
            raise ValueError(
                f"GMDiTTransformer2DModel: sample_size {sample_size} must divide by patch_size {patch_size}"
            )
        D = num_attention_heads * attention_head_dim
        if D % 4:
            raise ValueError(
                f"GMDiTTransformer2DModel: num_attention_heads * attention_head_dim must be a multiple of 4 "
                f"(2-D sin-cos position embedding), got {num_attention_heads} * {attention_head_dim}"
            )
        self.inner_dim = D
        self.out_channels = in_channels if out_channels is None else out_channels
        self.gm_channels = num_gaussians * (self.out_channels + 1)
        self.patch_size = patch_size
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels, embed_dim=D
        )
        self.emb = _TimestepLabelEmbedding(num_embeds_ada_norm, D)
        self.transformer_blocks = nn.ModuleList(
            _DiTBlock(
                D,
                num_attention_heads,
                attention_head_dim,
                attention_bias,
                upcast_attention,
                activation_fn,
                norm_elementwise_affine,
                norm_eps,
                dropout,
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(D, 2 * D)
        self.proj_out_2 = nn.Linear(D, patch_size * patch_size * self.gm_channels)
        self.gm_out = _GMOutput2D(
            num_gaussians, self.out_channels, D, constant_logstd, logstd_inner_dim, gm_num_logstd_layers
        )

    def init_weights(self) -> None:
        """The DiT initialisation for training from scratch: Xavier-uniform linear layers (the patch
        embedding as one) with zero biases, class embeddings ``N(0, 0.02^2)``, and zeros for the
        adaLN modulations, the output modulation and the log-std head's last layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        zero = [blk.norm1.linear for blk in self.transformer_blocks] + [self.proj_out_1]
        if self.config.constant_logstd is None:
            zero.append(self.gm_out.logstd_layers[-1])
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        """The class label of the unconditional branch of guidance."""
        return self.config.num_embeds_ada_norm

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> dict:
        """``hidden_states (B, C, H, W)`` (H, W multiples of ``patch_size``), ``timestep (B,)`` or a
        scalar in (0, 1000], ``class_labels (B,)`` int64 in ``[0, num_embeds_ada_norm]`` -> u-GM
        ``{means (B, K, C, H, W), logstds (B, 1, 1, 1, 1), logweights (B, K, 1, H, W)}``.

        In training mode with ``class_dropout_prob > 0`` each sample's label is replaced by the null
        class with that probability (one draw per sample and forward)."""
        cfg = self.config
        if hidden_states.dim() != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"GMDiTTransformer2DModel: hidden_states must be (B, {cfg.in_channels}, H, W), "
                f"got {tuple(hidden_states.shape)}"
            )
        B, _, H, W = hidden_states.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"GMDiTTransformer2DModel: H, W must be multiples of patch_size {p}, got {(H, W)}")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        timestep = timestep.expand(B) if timestep.dim() == 0 else timestep
        if timestep.shape != (B,):
            raise ValueError(
                f"GMDiTTransformer2DModel: timestep must be a scalar or ({B},), got {tuple(timestep.shape)}"
            )
        if class_labels.shape != (B,) or class_labels.is_floating_point():
            raise ValueError(
                f"GMDiTTransformer2DModel: class_labels must be integer of shape ({B},), "
                f"got {class_labels.dtype} {tuple(class_labels.shape)}"
            )
        if self.training and cfg.class_dropout_prob > 0:
            drop = torch.rand(B, device=class_labels.device) < cfg.class_dropout_prob
            class_labels = torch.where(drop, torch.full_like(class_labels, self.null_class), class_labels)
        h = self.pos_embed(hidden_states)  # (B, N, D)
        emb = self.emb(timestep, class_labels, h.dtype)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, emb, use_reentrant=False)
            else:
                h = block(h, emb)
        shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        gh, gw = H // p, W // p
        out = self.proj_out_2(h).reshape(B, gh, gw, p, p, self.gm_channels)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(B, self.gm_channels, H, W)
        return self.gm_out(out, emb.detach())


class SpectrumMLP(ModelMixin, ConfigMixin):
    """Log power spectrum for spectrally correlated GM sampling (the official ``_SpectrumMLP``).

    ``forward({"mean": (*B, C, H, W), "var": (*B, 1, H, W) or (*B, 1, 1, 1)})`` -> ``(*B, C, H, W)``:
    an MLP (``layers`` hidden widths, SiLU) maps the two statistics ``mean_(C,H,W)(var)`` and
    ``mean_C(var_(H,W)(mean))`` to ``C * h * w`` logits at ``base_size = (C, h, w)``; smaller
    latents keep the low frequencies (the corners of the FFT layout); the result is a
    log-softmax over the frequencies plus ``log(H * W)`` (the spectrum averages to 1).
    """

    @register_to_config
    def __init__(self, base_size=(4, 32, 32), layers=(64, 8)):
        super().__init__()
        if len(base_size) != 3:
            raise ValueError(f"SpectrumMLP: base_size must be (C, H, W), got {base_size}")
        mods, d = [], 2
        for width in layers:
            mods += [nn.Linear(d, width), nn.SiLU()]
            d = width
        mods.append(nn.Linear(d, base_size[0] * base_size[1] * base_size[2]))
        self.mlp = nn.Sequential(*mods)

    def forward(self, gaussian: dict) -> torch.Tensor:
        mean, var = gaussian["mean"], gaussian["var"]
        c, bh, bw = self.config.base_size
        H, W = mean.shape[-2:]
        if mean.shape[-3] != c or H > bh or W > bw:
            raise ValueError(f"SpectrumMLP: mean must be (*B, {c}, H<={bh}, W<={bw}), got {tuple(mean.shape)}")
        batch = mean.shape[:-3]
        stats = torch.stack([var.mean(dim=(-3, -2, -1)), mean.var(dim=(-2, -1)).mean(dim=-1)], dim=-1)
        n = batch.numel()
        spectrum = self.mlp(stats.reshape(n, 2).to(self.dtype)).reshape(n, c, bh, bw)
        if (H, W) != (bh, bw):
            h1, w1 = (H + 1) // 2, (W + 1) // 2
            rows = torch.cat([spectrum[..., :h1, :], spectrum[..., bh - (H - h1) :, :]], dim=-2)
            spectrum = torch.cat([rows[..., :w1], rows[..., bw - (W - w1) :]], dim=-1)
        log_var = spectrum.flatten(-2).log_softmax(dim=-1) + math.log(H * W)
        return log_var.reshape(*batch, c, H, W).to(mean.dtype)
