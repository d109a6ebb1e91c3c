"""The fused ranking head: the small model that devices train (federated) and run (exported).

Inputs per slate (B slates of S candidates; every tensor shape is written beside its step):

    query        [B, Dt]        query text embedding (MiniLM, L2-normalised)
    item_text    [B, S, Dt]     candidate title/description embeddings
    item_image   [B, S, Di]     candidate image embeddings (EfficientNet-Lite0 pooled)
    item_video   [B, S, Di]     candidate video embeddings (frames through the image encoder, mean-pooled)
    item_mask    [B, S, 3]      1.0 where the text / image / video modality is present, else 0.0
    dense        [B, S, Dd]     dense features (price, rating, first-stage rank and score, ...)
    user_text    [B, Dt]        mean text embedding of the shopper's recently clicked items (on device only)
    user_image   [B, Di]        mean image embedding of the same items
    user_mask    [B, 1]         1.0 if the shopper has any history, else 0.0

Output: ``scores [B, S]`` -- one score per candidate; candidates are scored independently of each other, so
padding a slate never changes the real candidates' scores.

A missing modality contributes exactly nothing: its projected token is multiplied by its mask bit (and, in
``attention`` mode, also removed from the attention by an additive mask), so whatever values sit in a masked
input, the scores are the same.

Fusion modes:
    concat     per-modality projections, their products with the query and the user vector, concatenated
    gated      as concat, but each modality block is scaled by a query-conditioned gate (softmax over the
               modalities present), so the head can learn "colour words -> trust the image"
    attention  a one-layer transformer over the tokens [query, user, text, image, video]; the query token's
               output is the item representation

The image and video share one projection: both live in the image encoder's feature space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.config import ModelConfig
from shared_model.head_features import NUM_MODALITIES, image_gain

PERSONAL_PREFIX = "out."  # parameters kept on the device when model.personal-layers is on (FedPer)


class FusedRankingHead(nn.Module):
    enabled: Tensor  # buffer registered in __init__ (which modalities this configuration may use)
    image_weight: Tensor  # buffer: head_features.image_gain

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.proj_dim
        self.query_proj = nn.Linear(cfg.text_dim, d)
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.image_proj = nn.Linear(cfg.image_dim, d)  # shared by image, video and the user's image history
        # the colour descriptor's weight (head_features.image_gain): a constant, not a parameter
        self.register_buffer("image_weight", torch.from_numpy(image_gain(cfg.image_dim)), persistent=False)
        self.modality_embed = nn.Parameter(torch.zeros(NUM_MODALITIES, d))
        self.norm = nn.LayerNorm(d)
        if cfg.fusion == "attention":
            self.attn = _TinyAttention(d)
            feat = 2 * d + cfg.dense_dim + NUM_MODALITIES + 1
        else:
            feat = 3 * NUM_MODALITIES * d + cfg.dense_dim + NUM_MODALITIES + 1
            if cfg.fusion == "gated":
                self.gate = nn.Linear(2 * d, NUM_MODALITIES)
        self.body = nn.Sequential(nn.Linear(feat, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout))
        self.out = nn.Linear(cfg.hidden, 1)
        # which modalities this configuration may use at all (text is always on)
        enabled = torch.tensor([1.0, float(cfg.use_image), float(cfg.use_video)])
        self.register_buffer("enabled", enabled, persistent=False)

    def _image(self, x: Tensor) -> Tensor:
        """The image projection of image (or video) embeddings ``[..., Di]``, the colour descriptor weighed."""
        return self.image_proj(x * self.image_weight)

    def forward(
        self,
        query: Tensor,
        item_text: Tensor,
        item_image: Tensor,
        item_video: Tensor,
        item_mask: Tensor,
        dense: Tensor,
        user_text: Tensor,
        user_image: Tensor,
        user_mask: Tensor,
    ) -> Tensor:
        B, S = item_text.shape[0], item_text.shape[1]
        m = item_mask * self.enabled  # [B, S, 3]
        # per-modality tokens, masked to exactly zero where absent
        t = self.text_proj(item_text)  # [B, S, d]
        i = self._image(item_image)  # [B, S, d]
        v = self._image(item_video)  # [B, S, d]
        tokens = torch.stack([t, i, v], dim=2) + self.modality_embed  # [B, S, 3, d]
        tokens = self.norm(tokens) * m.unsqueeze(-1)  # [B, S, 3, d]
        q = self.norm(self.query_proj(query))  # [B, d]
        u = self.text_proj(user_text) + self._image(user_image)  # [B, d]
        u = self.norm(u) * user_mask * float(self.cfg.use_user)  # [B, d]
        qe = q[:, None, None, :].expand(B, S, NUM_MODALITIES, -1)  # [B, S, 3, d]
        ue = u[:, None, None, :].expand(B, S, NUM_MODALITIES, -1)  # [B, S, 3, d]

        if self.cfg.fusion == "attention":
            rep = self.attn(q, u, tokens, m, user_mask * float(self.cfg.use_user))  # [B, S, d]
            feats = [rep, rep * q[:, None, :]]
        else:
            blocks = torch.cat([tokens, tokens * qe, tokens * ue], dim=-1)  # [B, S, 3, 3d]
            if self.cfg.fusion == "gated":
                logits = self.gate(torch.cat([q, u], dim=-1))  # [B, 3]
                logits = logits[:, None, :] + (m - 1.0) * 1e4  # [B, S, 3], absent modalities -> ~-inf
                g = torch.softmax(logits, dim=-1) * m * NUM_MODALITIES  # [B, S, 3], mean 1 over present
                blocks = blocks * g.unsqueeze(-1)
            feats = [blocks.reshape(B, S, -1)]  # [B, S, 9d]
        # the query-title cosine (both inputs are L2-normalised MiniLM embeddings): the first-stage signal every
        # ranker starts from, given to the head directly so it never has to rediscover it through projections
        qt_cos = (query[:, None, :] * item_text).sum(-1, keepdim=True) * m[..., :1]  # [B, S, 1]
        x = torch.cat([*feats, dense, m, qt_cos], dim=-1)  # [B, S, F]
        return self.out(self.body(x)).squeeze(-1)  # [B, S]

    def align_loss(self, query: Tensor, item_image: Tensor, item_mask: Tensor, clicks: Tensor, valid: Tensor,
                   temperature: float = 0.1) -> Tensor:
        """Contrastive query-image alignment on a batch of logged slates (InfoNCE with many negatives).

        Each slate's query, projected as in :meth:`forward`, is scored against the projected image of *every*
        candidate in the batch (``[B, B*S]`` cosines / ``temperature``); the slate's own positive candidates
        (``clicks > 0``: training passes purchases or clicks, ``training.align_positives``) that have an image are
        the positives (their log-probabilities averaged), everything else is a negative: the
        other candidates of the same slate (same type, other colours: the hard ones) and all other slates'.
        Slates without a clicked image contribute nothing; with none in the batch the loss is ``0`` (and still
        connected to the parameters). Inputs as :meth:`forward` (``item_mask[..., 1]`` = has an image), plus
        ``clicks [B, S]`` and ``valid [B, S]``. Only training calls this; export and inference never do.
        """
        B, S = item_image.shape[0], item_image.shape[1]
        has = (item_mask[..., 1] > 0) & valid.bool()  # [B, S]
        img = self.norm(self._image(item_image) + self.modality_embed[1])  # [B, S, d] as forward's token
        q = F.normalize(self.norm(self.query_proj(query)), dim=-1)  # [B, d]
        img = F.normalize(img.reshape(B * S, -1), dim=-1)  # [B*S, d]
        logits = (q @ img.T) / temperature  # [B, B*S]
        logits = logits.masked_fill(~has.reshape(1, B * S), -1e4)
        own = torch.block_diag(*[torch.ones(1, S, dtype=torch.bool, device=query.device)] * B)  # [B, B*S]
        pos = own & ((clicks > 0) & has).reshape(1, B * S)  # [B, B*S]
        rows = pos.any(dim=1)
        if not bool(rows.any()):
            return logits.sum() * 0.0
        lse = torch.logsumexp(logits[rows], dim=1)  # [R]
        mean_pos = (logits[rows] * pos[rows]).sum(dim=1) / pos[rows].sum(dim=1)  # [R]
        return (lse - mean_pos).mean()

    def shared_state_keys(self) -> list[str]:
        """State-dict keys that travel to the server (all, minus personal layers when enabled)."""
        keys = list(self.state_dict().keys())
        if self.cfg.personal_layers:
            keys = [k for k in keys if not k.startswith(PERSONAL_PREFIX)]
        return keys


class _TinyAttention(nn.Module):
    """One pre-norm transformer layer over [query, user, text, image, video] tokens, per candidate."""

    def __init__(self, d: int, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln = nn.LayerNorm(d)

    def forward(self, q: Tensor, u: Tensor, tokens: Tensor, m: Tensor, user_mask: Tensor) -> Tensor:
        B, S, M, d = tokens.shape
        x = torch.cat(
            [q[:, None, None, :].expand(B, S, 1, d), u[:, None, None, :].expand(B, S, 1, d), tokens], dim=2
        )  # [B, S, 5, d]
        keep = torch.cat([torch.ones_like(m[..., :1]), user_mask[:, None, :].expand(B, S, 1), m], dim=-1)  # [B,S,5]
        bias = (keep - 1.0) * 1e4  # additive key mask: absent tokens get ~-inf
        h = self.ln(x)
        qkv = self.qkv(h).reshape(B, S, M + 2, 3, self.heads, self.dh)
        qh, kh, vh = qkv.unbind(dim=3)  # each [B, S, 5, H, dh]
        att = torch.einsum("bsqhd,bskhd->bshqk", qh, kh) / math.sqrt(self.dh)  # [B, S, H, 5, 5]
        att = torch.softmax(att + bias[:, :, None, None, :], dim=-1)
        out = torch.einsum("bshqk,bskhd->bsqhd", att, vh).reshape(B, S, M + 2, d)
        x = x + self.proj(out)
        x = x + self.ff(x)
        return x[:, :, 0, :]  # [B, S, d] the query token's view of the candidate


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_head(cfg: ModelConfig, seed: int | None = None) -> FusedRankingHead:
    if seed is not None:
        torch.manual_seed(seed)
    return FusedRankingHead(cfg)


__all__ = ["FusedRankingHead", "build_head", "count_parameters", "PERSONAL_PREFIX", "F"]
