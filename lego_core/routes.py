"""Decision routes: which input channels of every located layer each class
uses, drawn as an SVG (one row per layer, one cell per channel; a cell in a
class's colour is used by that class only, dark cells are shared by several of
the chosen classes, pale cells by none)."""

from __future__ import annotations

from html import escape

import torch

from lego_core.locate import Components
from lego_core.model import SourceModel

PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
SHARED, UNUSED = "#222222", "#eeeeee"
MAX_CELLS = 128  # wider layers are drawn in bins; a bin is used if any channel in it is


def route_table(model: SourceModel, components: Components, classes) -> list[dict]:
    """Per layer: channels used by each class, and how many are shared."""
    idx = model.class_indices(classes)
    rows = []
    for layer in components.layers:
        masks = torch.stack([components.masks[c][layer] for c in idx])
        users = masks.sum(0)
        rows.append(
            {
                "layer": layer,
                "channels": int(masks.shape[1]),
                "per_class": {
                    model.class_names[c]: int(m.sum()) for c, m in zip(idx, masks, strict=True)
                },
                "shared": int((users > 1).sum()),
                "unused": int((users == 0).sum()),
            }
        )
    return rows


def render_routes(model: SourceModel, components: Components, classes) -> str:
    idx = model.class_indices(classes)
    missing = [model.class_names[c] for c in idx if c not in components.masks]
    if missing:
        from lego_core.errors import UnknownClassError

        raise UnknownClassError(f"no located component for class(es) {missing}")
    cell, gap, label_w, top = 6, 1, 170, 40
    width = label_w + MAX_CELLS * (cell + gap) + 70
    height = top + len(components.layers) * (cell * 2 + 6) + 30 + 18 * len(idx)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="8" y="18" font-size="13">Decision routes of {escape(model.name or model.arch)}: '
        f"{escape(', '.join(model.class_names[c] for c in idx))}</text>",
    ]
    y = top
    for layer in components.layers:
        masks = torch.stack([components.masks[c][layer] for c in idx])  # [K, P]
        p = masks.shape[1]
        bins = min(p, MAX_CELLS)
        edges = torch.linspace(0, p, bins + 1).long()
        out.append(f'<text x="8" y="{y + cell + 4}">{escape(layer)} ({p})</text>')
        for b in range(bins):
            used = masks[:, edges[b] : max(edges[b + 1], edges[b] + 1)].any(1)
            n = int(used.sum())
            color = (
                UNUSED
                if n == 0
                else SHARED
                if n > 1
                else PALETTE[int(used.nonzero()[0]) % len(PALETTE)]
            )
            x = label_w + b * (cell + gap)
            out.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell * 2}" fill="{color}"/>')
        kept = int(masks.any(0).sum())
        out.append(
            f'<text x="{label_w + bins * (cell + gap) + 6}" y="{y + cell + 4}">{kept}/{p}</text>'
        )
        y += cell * 2 + 6
    y += 14
    for k, c in enumerate(idx):
        color = PALETTE[k % len(PALETTE)]
        out.append(f'<rect x="8" y="{y - 9}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="24" y="{y}">{escape(model.class_names[c])} only</text>')
        y += 18
    out.append(
        f'<rect x="160" y="{y - 27}" width="10" height="10" fill="{SHARED}"/>'
        f'<text x="176" y="{y - 18}">shared</text>'
    )
    out.append("</svg>")
    return "\n".join(out)
