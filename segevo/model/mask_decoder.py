"""SegVol's 3D SAM mask decoder: a two-way transformer, 3D transposed-conv upscaling, hypernetwork heads,
and the text-similarity map that SegVol adds to the mask logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segevo.config import ModelConfig


class Attention(nn.Module):
    """SAM attention with an optional down-projection of the internal width."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` (B, Nk) bool marks real keys; padded keys get exactly zero attention weight."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_mask)  # SAM: no residual in layer 0
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, downsample_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe, token_mask)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    """SAM's plain MLP: ReLU between layers, none after the last."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, d = cfg.embed_dim, cfg.decoder
        self.num_mask_tokens = d.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(dim, d.depth, d.num_heads, d.mlp_dim, d.attention_downsample_rate)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        up_shape = tuple(2 * f for f in cfg.feat_shape)
        # The LayerNorm spans (C, D, H, W), as in SegVol: it is what ties the model to its ROI size.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            FullShapeLayerNorm((dim // 4, *up_shape)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(dim, d.iou_head_hidden_dim, self.num_mask_tokens, d.iou_head_depth)
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        text_embedding: torch.Tensor | None,
        *,
        token_mask: torch.Tensor | None = None,
        text_rows: torch.Tensor | None = None,
        mask_token_delta: torch.Tensor | None = None,
        extra_kernel: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution logits of mask token 0 ``(B, 1, 4*feat)`` and the (unused) IoU predictions.

        One row per prompt set. ``image_embeddings`` has one row per prompt row (or a single shared row).
        For batches that mix prompt combinations: ``token_mask`` (B, L) marks real sparse tokens,
        ``text_rows`` (B,) is 1 where a row has a text prompt (its ``text_embedding`` row is used) and 0
        elsewhere. ``mask_token_delta`` (B, C) is added to mask token 0 before its hypernetwork (the additive
        posterior prototype) and ``extra_kernel`` (B, C/8) adds ``kernel @ upscaled`` to the logits (the
        multiplicative one); both are zero rows for rows they must not touch.
        """
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight]).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        if token_mask is not None:
            token_mask = torch.cat([token_mask.new_ones(b, out_tokens.shape[1]), token_mask], dim=1)
        src = image_embeddings.expand(b, -1, -1, -1, -1) if image_embeddings.shape[0] == 1 else image_embeddings
        src = src + dense
        pos = image_pe.expand(b, -1, -1, -1, -1)
        _, c, h, w, d = src.shape
        hs, src = self.transformer(src, pos, tokens, token_mask)
        mask_token = hs[:, 1]
        if mask_token_delta is not None:
            mask_token = mask_token + mask_token_delta.to(mask_token.dtype)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w, d))
        _, cu, uh, uw, ud = up.shape
        up = up.reshape(b, cu, uh * uw * ud)
        # SegVol computes every hypernetwork head but keeps only mask token 0 (multimask_output=False).
        kernel = self.output_hypernetworks_mlps[0](mask_token)
        if text_embedding is not None:
            text_kernel = self.txt_align_upscaled_embedding(text_embedding)
            if text_rows is not None:
                text_kernel = text_kernel * text_rows[:, None].to(text_kernel.dtype)
            kernel = kernel + text_kernel
        if extra_kernel is not None:
            kernel = kernel + extra_kernel.to(kernel.dtype)
        masks = kernel.unsqueeze(1) @ up
        iou = self.iou_prediction_head(hs[:, 0])[:, :1]
        return masks.reshape(b, 1, uh, uw, ud), iou


class FullShapeLayerNorm(nn.LayerNorm):
    """SegVol's LayerNorm over a whole (C, D, H, W) feature, as one parallel reduction per row.

    ``nn.LayerNorm`` with a 3.1M-element normalized shape runs a handful of huge rows and took 40% of the
    released step's GPU time; ``var_mean`` over the flattened row spreads the reduction over the device.
    Same parameters (so the same checkpoint keys), same maths; statistics in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.normalized_shape)
        xf = x.float()
        var, mean = torch.var_mean(xf.flatten(-n), dim=-1, correction=0)
        shape = (*mean.shape, *([1] * n))
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.elementwise_affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


def upsample_logits(low_res: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    return F.interpolate(low_res, size=size, mode="trilinear", align_corners=False)

