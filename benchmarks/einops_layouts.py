"""What the ViT's einops patterns cost: the model as it is against the same model with its three
rearranges written as reshape/permute (the earlier code), in one process, alternating.

    python benchmarks/einops_layouts.py [--device cuda] [--batch-size 32] [--repeats 7]

Writes the table for the device type to RESULTS.md. Both variants compute the same tensors (checked
before timing), so the ratio is the cost of the patterns alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from _common import machine, timed, write_section

from myrtle_vision.models.vit import Attention, PatchEmbed, VisionTransformer, ViTArgs

TINY = dict(image_size=224, patch_size=16, num_classes=45, embed_dim=192, depth=12, heads=3, mlp_dim=768)


def _patches_by_reshape(self, img):
    B, C, H, W = img.shape
    p = self.patch_size
    patches = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
    return self.proj(self.round_in(patches))


def _attention_by_reshape(self, x, attn_mask=None):
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return self.proj_drop(self.proj(self.round_out(x.transpose(1, 2).reshape(B, N, C))))


class _ByReshape:
    """Within it, the ViT's modules run the reshape/permute versions."""

    def __enter__(self):
        self.saved = PatchEmbed.forward, Attention.forward
        PatchEmbed.forward, Attention.forward = _patches_by_reshape, _attention_by_reshape

    def __exit__(self, *exc):
        PatchEmbed.forward, Attention.forward = self.saved


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--no-write", action="store_true", help="print the table; leave RESULTS.md alone")
    return p


def main() -> int:
    args = build_parser().parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = VisionTransformer(ViTArgs(**dict(TINY, image_size=args.image_size))).to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        a = model.eval()(images)
        with _ByReshape():
            b = model(images)
    assert torch.equal(a, b), "the two variants differ"
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(images).sum().backward()

    def infer():
        with torch.no_grad():
            model(images)

    rows = []
    for what, fn in (("training step", step), ("inference", infer)):
        fn()
        with _ByReshape():
            fn()  # warm-up, both
        times = {"einops": [], "reshape": []}
        for _ in range(args.repeats):
            times["einops"].append(timed(fn, device))
            with _ByReshape():
                times["reshape"].append(timed(fn, device))
        ours, ref = (statistics.median(times[k]) for k in ("einops", "reshape"))
        rows.append(
            f"| ViT-Tiny | {what} | {args.batch_size / ours:.1f} | {args.batch_size / ref:.1f} | "
            f"**{ref / ours:.3f}x** |"
        )
        print(rows[-1], flush=True)
    table = (
        f"`python benchmarks/einops_layouts.py --device {device.type}` on {machine(device)}: batch "
        f"{args.batch_size}, {args.image_size}x{args.image_size}, fp32 eager; median of {args.repeats} "
        "alternating timings.\n\n"
        "| model | measurement | einops images/s | reshape/permute images/s | einops speed / reshape speed |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    if args.no_write:
        return 0
    write_section(
        "## The ViT's einops patterns against reshape/permute (einops_layouts.py)",
        "The patch flattening and the attention's q/k/v split and head merge are einops patterns; "
        "the same model with them written as reshape/permute, in the same process.",
        f"einops_layouts {device.type}",
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
