"""Classification metrics: top-k accuracy, confusion matrix, per-class precision/recall/F1."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Accumulator:
    """Sums over batches; every image counts once. Accuracies are reported in percent."""

    num_classes: int
    count: int = 0
    loss_sum: float = 0.0
    top5_correct: int = 0
    confusion: torch.Tensor = field(default=None)  # rows: true class, columns: predicted class

    def __post_init__(self):
        if self.confusion is None:
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @property
    def k(self) -> int:
        return min(5, self.num_classes)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.float(), targets.to(logits.device)
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        topk = logits.topk(self.k, dim=1).indices
        self.top5_correct += (topk == targets[:, None]).any(dim=1).sum().item()
        pairs = (targets * self.num_classes + topk[:, 0]).cpu()
        self.confusion += torch.bincount(pairs, minlength=self.num_classes**2).view(self.num_classes, -1)
        self.count += targets.numel()

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def top1(self) -> float:
        return 100.0 * self.confusion.diag().sum().item() / max(1, self.count)

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_correct / max(1, self.count)

    def per_class(self, names: list[str]) -> dict[str, dict[str, float]]:
        """Precision, recall and F1 (percent) and support for each class, by name."""
        cm = self.confusion.double()
        tp, predicted, actual = cm.diag(), cm.sum(0), cm.sum(1)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(
            precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp)
        )
        return {
            name: {
                "precision": 100 * precision[i].item(),
                "recall": 100 * recall[i].item(),
                "f1": 100 * f1[i].item(),
                "support": int(actual[i].item()),
            }
            for i, name in enumerate(names)
        }


def format_report(acc: Accumulator, names: list[str]) -> str:
    """A plain-text table: one row per class, then the overall accuracies."""
    width = max(12, max(len(n) for n in names))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name, m in acc.per_class(names).items():
        lines.append(f"{name:<{width}}  {m['precision']:9.2f}  {m['recall']:6.2f}  {m['f1']:5.2f}  {m['support']:7d}")
    lines.append(f"top-1 {acc.top1:.2f}%   top-{acc.k} {acc.top5:.2f}%   images {acc.count}")
    return "\n".join(lines)


def format_side_by_side(accs: list[Accumulator], labels: list[str], names: list[str]) -> str:
    """Several models' per-class recall, precision and F1 over the same images, a column group per model
    (headed by its label), then their overall accuracies."""
    width = max(12, max(len(n) for n in names))
    group = max(20, *(len(label) for label in labels))

    def row(first: str, cells: list[str], last: str = "") -> str:
        return f"{first:<{width}}" + "".join(f"  {c:>{group}}" for c in cells) + (f"  {last:>7}" if last else "")

    tables = [acc.per_class(names) for acc in accs]
    lines = [
        row("", [f"{label:^{group}}" for label in labels]),
        row("class", [f"{'recall':>6} {'prec':>6} {'f1':>6}"] * len(accs), "support"),
    ]
    for name in names:
        lines.append(
            row(
                name,
                [f"{t[name]['recall']:6.2f} {t[name]['precision']:6.2f} {t[name]['f1']:6.2f}" for t in tables],
                str(tables[0][name]["support"]),
            )
        )
    lines.append(row("top-1", [f"{a.top1:.2f}%" for a in accs]))
    lines.append(row(f"top-{accs[0].k}", [f"{a.top5:.2f}%" for a in accs]))
    return "\n".join(lines)


def confusion_image(confusion: torch.Tensor, names: list[str], cell: int = 0):
    """Render a row-normalised confusion matrix as a PIL image (white = 0, dark blue = 1)."""
    from PIL import Image, ImageDraw

    n = len(names)
    cell = cell or max(12, min(40, 900 // n))
    label_w = 7 * max(len(s) for s in names) + 10
    size = (label_w + n * cell + 10, label_w + n * cell + 10)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    rows = confusion.double()
    rows = rows / rows.sum(1, keepdim=True).clamp(min=1)
    for i in range(n):
        draw.text((4, label_w + i * cell + cell // 2 - 5), names[i], fill="black")
        for j in range(n):
            v = rows[i, j].item()
            colour = (int(255 * (1 - v)), int(255 * (1 - 0.7 * v)), 255) if v > 0 else (255, 255, 255)
            x, y = label_w + j * cell, label_w + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(220, 220, 220))
            if cell >= 24 and confusion[i, j] > 0:
                draw.text((x + 2, y + cell // 2 - 5), str(int(confusion[i, j])), fill="black" if v < 0.5 else "white")
    for j in range(n):  # column labels, written vertically
        label = Image.new("RGB", (label_w - 6, 12), "white")
        ImageDraw.Draw(label).text((2, 0), names[j], fill="black")
        img.paste(label.rotate(90, expand=True), (label_w + j * cell + cell // 2 - 6, 4))
    draw.text((4, 4), "true \\ predicted", fill="black")
    return img
