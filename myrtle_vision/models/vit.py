"""Vision Transformer (Dosovitskiy et al., 2020), pre-norm, as deployed on the accelerator.

Module names follow timm (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv``,
``norm``, ``head``). The accelerator's checkpoint layout uses the earlier release's names; the
translation between the two lives in :mod:`myrtle_vision.weights.deploy` and nowhere else.

With ``distilled=True`` the model is a DeiT student (Touvron et al., 2020): a distillation token
(``dist_token``) is appended after the patch tokens and read out by its own head (``head_dist``).
The accelerator runs the plain ViT, without that token. So that the class head it runs is exactly
the one trained, the distillation token attends to every token but no token attends to it: the
class path never sees it, ``forward`` (class head only) needs no distillation token at all, and
``forward_heads`` returns both heads from one pass.

With a ``q_format`` other than FP32 the forward pass simulates that number format (see
:mod:`myrtle_vision.quantization`): the Linear and LayerNorm layers are rounding subclasses with the
same parameters, so the state dict and the deploy layout do not change, and under FP16_16 the
``round*`` modules round the activations too (they are identities otherwise). Each place a tensor is
rounded has a ``round*`` module of its own: under PyTorchINT8 (:mod:`myrtle_vision.int8`) each is a
quantization point with its own observer, and so is the output of every Linear and LayerNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchvision.ops import StochasticDepth

from ..quantization import Arithmetic, arithmetic


@dataclass
class ViTArgs:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_dim: int = 768
    qkv_bias: bool = (
        False  # biases on q, k, v (timm's and DeiT's pretrained ViTs have them; the deploy layout gains to_qkv.bias)
    )
    layer_norm_eps: float = 1e-5  # nn.LayerNorm's default, as the earlier release; timm and torchvision use 1e-6
    dropout: float = 0.0  # after the attention projection, the MLP's GELU and the MLP's output
    emb_dropout: float = 0.0  # after the position embedding is added
    drop_path: float = 0.0  # stochastic depth in training: block i's residual branches are dropped per image
    #                         with probability drop_path * i / (depth - 1), as in timm and DeiT
    distilled: bool = False  # DeiT: add a distillation token and head
    q_format: str = "FP32"  # number format simulated in the forward pass (see myrtle_vision.quantization)
    q_rounding: str = "nearest_even"
    int8_weights: str = "per_tensor"  # PyTorchINT8 only: one weight scale per tensor, or per output row ("per_channel")

    @classmethod
    def from_config(
        cls,
        vit_config,
        num_classes: int,
        distilled: bool = False,
        q_format: str | None = None,
        q_rounding: str | None = None,
        int8_weights: str = "per_tensor",
    ) -> ViTArgs:
        return cls(
            image_size=vit_config.image_size,
            patch_size=vit_config.patch_size,
            num_classes=num_classes,
            embed_dim=vit_config.embed_dim,
            depth=vit_config.depth,
            heads=vit_config.heads,
            mlp_dim=vit_config.mlp_dim,
            qkv_bias=vit_config.qkv_bias,
            layer_norm_eps=vit_config.layer_norm_eps,
            dropout=vit_config.dropout,
            emb_dropout=vit_config.emb_dropout,
            drop_path=vit_config.drop_path,
            distilled=distilled,
            q_format=q_format or vit_config.trained_q_format,
            q_rounding=q_rounding or vit_config.q_rounding,
            int8_weights=int8_weights,
        )


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches, flatten each as (row, column, channel), project.

    A Linear over flattened patches rather than a strided convolution: it is the layout the
    accelerator runs (and the same function, with the weight permuted).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, ar: Arithmetic):
        super().__init__()
        self.patch_size = patch_size
        self.round_in = ar.activation()  # FP16_16 rounds the patches (as proj's operand rounding does); INT8 quantizes
        self.proj = ar.linear(patch_size * patch_size * in_chans, embed_dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        return self.proj(self.round_in(patches))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, ar: Arithmetic, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = ar.linear(dim, dim * 3, bias=qkv_bias)
        self.proj = ar.linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        # FP16_16: the scores and the softmax, each a rounding point of its own
        self.round_scores = ar.activation() if ar.rounds_attention else None
        self.round_softmax = ar.activation() if ar.rounds_attention else None
        self.round_out = ar.activation()  # FP16_16 rounds the attention output, INT8 quantizes it (proj's input)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
        if self.round_scores is None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # softmax(q k^T / sqrt(head_dim)) v
        else:  # the same, step by step, each result rounded
            scores = self.round_scores(q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1])))
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            x = self.round_softmax(scores.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(self.round_out(rearrange(x, "b h n d -> b n (h d)"))))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, ar: Arithmetic):
        super().__init__()
        self.fc1 = ar.linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as deployed
        self.round_act = ar.activation()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = ar.linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.round_act(self.act(self.fc1(x))))))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float,
        ar: Arithmetic,
        qkv_bias: bool = False,
        eps: float = 1e-5,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = ar.layer_norm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout, ar, qkv_bias)
        self.norm2 = ar.layer_norm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout, ar)
        # stochastic depth: in training, a whole residual branch dropped per image (the rest scaled up);
        # the identity in evaluation, and no parameters, so the deployed graph and layout are unchanged
        self.drop_path1 = StochasticDepth(drop_path, "row")
        self.drop_path2 = StochasticDepth(drop_path, "row")
        self.round_add1 = ar.activation()  # the residual adds
        self.round_add2 = ar.activation()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.round_add1(x + self.drop_path1(self.attn(self.norm1(x), attn_mask)))
        return self.round_add2(x + self.drop_path2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        self.args = args
        ar = arithmetic(args.q_format, args.q_rounding, args.int8_weights)
        num_patches = (args.image_size // args.patch_size) ** 2
        self.patch_embed = PatchEmbed(args.patch_size, args.in_chans, args.embed_dim, ar)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, args.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, args.embed_dim))
        # FP16_16 rounds (INT8 quantizes) the tokens, the position embedding and its add; INT8 also
        # requantizes the concatenated tokens
        self.round_cls, self.round_cat = ar.activation(), ar.requantize()
        self.round_pos, self.round_pos_add = ar.activation(), ar.activation()
        self.pos_drop = nn.Dropout(args.emb_dropout)
        self.blocks = nn.ModuleList(
            Block(
                args.embed_dim,
                args.heads,
                args.mlp_dim,
                args.dropout,
                ar,
                qkv_bias=args.qkv_bias,
                eps=args.layer_norm_eps,
                drop_path=rate,
            )
            for rate in torch.linspace(0, args.drop_path, args.depth).tolist()
        )
        self.norm = ar.final_layer_norm(args.embed_dim, eps=args.layer_norm_eps)
        self.round_head = ar.head_input()  # INT8: the class token the head reads (the final LayerNorm's output)
        self.head = ar.linear(args.embed_dim, args.num_classes)
        if args.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, args.embed_dim))
            self.round_dist = ar.activation()
            self.round_head_dist = ar.head_input()
            self.head_dist = ar.linear(args.embed_dim, args.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) weights, zero biases, unit norms."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.args.distilled:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that are not matrices and take no weight decay (besides biases and norms)."""
        return {"cls_token", "pos_embed", "dist_token"}

    def layer_of(self, name: str) -> int:
        """The layer of parameter ``name``, for layer-wise learning-rate decay (as BEiT and DeiT III count):
        the embeddings and tokens are layer 0, block i is layer i + 1, the final norm and the heads
        are layer ``depth + 1``."""
        if name.startswith(("cls_token", "pos_embed", "dist_token", "patch_embed.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def forward_features(self, img: torch.Tensor, dist_token: bool = False) -> torch.Tensor:
        """Normed tokens: class token, patch tokens and, with ``dist_token``, the distillation token last."""
        x = self.patch_embed(img)
        x = self.round_cat(torch.cat([self.round_cls(self.cls_token).expand(x.shape[0], -1, -1), x], dim=1))
        x = self.round_pos_add(x + self.round_pos(self.pos_embed))
        mask = None
        if dist_token:
            # The distillation token has no position, so no position embedding: the token is all there is.
            x = torch.cat([x, self.round_dist(self.dist_token).expand(x.shape[0], -1, -1)], dim=1)
            n = x.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device)
            mask[:-1, -1] = False  # queries other than the distillation token do not see it
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Class-head logits: the plain ViT, as the accelerator runs it."""
        return self.head(self.round_head(self.forward_features(img)[:, 0]))

    def forward_heads(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-head logits, distillation-head logits) of a distilled model, from one pass."""
        if not self.args.distilled:
            raise RuntimeError("forward_heads needs a model built with distilled=True")
        x = self.forward_features(img, dist_token=True)
        return self.head(self.round_head(x[:, 0])), self.head_dist(self.round_head_dist(x[:, -1]))
