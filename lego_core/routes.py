"""Decision routes: which input channels of every located layer each class uses, drawn
as an SVG after the paper's decision-route figures.

One block per layer, one cell per input channel (no binning: a layer with more
channels than fit on a line wraps onto further lines). A cell in a class's colour is
used by that class only; dark cells are shared by every chosen class, grey cells by
several but not all of them; pale outlined cells by none (they are removed when these
classes are assembled). The legend names every colour with its channel count."""

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
    "#bcbd22",
    "#17becf",
    "#7f7f7f",
]
SHARED_ALL, SHARED_SOME, UNUSED = "#222222", "#8c8c8c", "#f2f2f2"
ROW_CELLS = 100  # cells on one line of a layer; wider layers wrap (never binned)


def route_table(model: SourceModel, components: Components, classes) -> list[dict]:
    """Per layer: channels used by each class, how many are shared by several of the
    chosen classes, by all of them, and used by none."""
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
                "only": {
                    model.class_names[c]: int((m & (users == 1)).sum())
                    for c, m in zip(idx, masks.bool(), strict=True)
                },
                "shared": int((users > 1).sum()),
                "shared_all": int((users == len(idx)).sum()) if len(idx) > 1 else 0,
                "unused": int((users == 0).sum()),
            }
        )
    return rows


def cell_colors(masks: torch.Tensor) -> list[str]:
    """The colour of each channel of one layer, from its [K, P] boolean masks."""
    k = masks.shape[0]
    users = masks.sum(0).tolist()
    owner = masks.float().argmax(0).tolist()
    out = []
    for n, o in zip(users, owner, strict=True):
        if n == 0:
            out.append(UNUSED)
        elif n == 1:
            out.append(PALETTE[o % len(PALETTE)])
        else:
            out.append(SHARED_ALL if n == k else SHARED_SOME)
    return out


def render_routes(
    model: SourceModel, components: Components, classes, name: str | None = None
) -> str:
    """The routes of `classes` through `model` as a standalone SVG document; `name`
    (default: the model's own name, else its architecture) goes in the title."""
    idx = model.class_indices(classes)
    missing = [model.class_names[c] for c in idx if c not in components.masks]
    if missing:
        from lego_core.errors import UnknownClassError

        raise UnknownClassError(f"no located component for class(es) {missing}")
    title_name = name or model.name or model.arch
    class_list = ", ".join(model.class_names[c] for c in idx)
    table = {r["layer"]: r for r in route_table(model, components, idx)}
    cell, gap, label_w, top, line_h = 7, 1, 190, 62, 12
    grid_w = ROW_CELLS * (cell + gap)
    width = label_w + grid_w + 230
    body: list[str] = []
    y = top
    for layer in components.layers:
        masks = torch.stack([components.masks[c][layer] for c in idx]).bool()  # [K, P]
        p = masks.shape[1]
        colors = cell_colors(masks)
        lines = (p + ROW_CELLS - 1) // ROW_CELLS
        r = table[layer]
        body.append(f"<g><title>{escape(layer)}: {p} input channels</title>")
        body.append(f'<text x="8" y="{y + 9}" font-weight="bold">{escape(layer)}</text>')
        body.append(f'<text x="8" y="{y + 22}" fill="#555">{p} input channels</text>')
        for i, color in enumerate(colors):
            x = label_w + (i % ROW_CELLS) * (cell + gap)
            cy = y + (i // ROW_CELLS) * line_h
            stroke = ' stroke="#c8c8c8" stroke-width="0.6"' if color == UNUSED else ""
            body.append(
                f'<rect x="{x}" y="{cy}" width="{cell}" height="{line_h - 2}" '
                f'fill="{color}"{stroke}/>'
            )
        kept = p - r["unused"]
        stats = f"kept {kept}/{p}"
        if len(idx) > 1:
            stats += f", shared {r['shared']}"
        body.append(f'<text x="{label_w + grid_w + 10}" y="{y + 9}">{stats}</text>')
        body.append(
            f'<text x="{label_w + grid_w + 10}" y="{y + 22}" fill="#555">'
            f"unused {r['unused']}</text></g>"
        )
        y += max(lines * line_h, 26) + 10

    # Legend: every colour that can appear, with its channel count over all layers.
    def total(key: str, sub: str | None = None) -> int:
        return sum((row[key][sub] if sub else row[key]) for row in table.values())

    entries = [
        (
            PALETTE[k % len(PALETTE)],
            f"{model.class_names[c]} only",
            total("only", model.class_names[c]),
        )
        for k, c in enumerate(idx)
    ]
    if len(idx) > 1:
        entries.append((SHARED_ALL, f"shared by all {len(idx)} classes", total("shared_all")))
    if len(idx) > 2:
        entries.append(
            (SHARED_SOME, "shared by some of them", total("shared") - total("shared_all"))
        )
    entries.append((UNUSED, "unused by these classes (removed)", total("unused")))
    y += 8
    legend = [f'<text x="8" y="{y}" font-weight="bold">Legend (channels in all layers)</text>']
    y += 10
    col_w = 300
    per_row = max(1, (width - 16) // col_w)
    for n, (color, label, count) in enumerate(entries):
        x = 8 + (n % per_row) * col_w
        ly = y + (n // per_row) * 20
        stroke = ' stroke="#c8c8c8"' if color == UNUSED else ""
        legend.append(
            f'<rect x="{x}" y="{ly}" width="12" height="12" fill="{color}"{stroke}/>'
            f'<text x="{x + 18}" y="{ly + 10}">{escape(label)}: {count}</text>'
        )
    y += ((len(entries) + per_row - 1) // per_row) * 20 + 6
    height = y
    title = f"Decision routes of {title_name}: {class_list}"
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="routes-title" '
        f'font-family="sans-serif" font-size="11">',
        f'<title id="routes-title">{escape(title)}</title>',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="8" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="8" y="40" fill="#555">Each cell is one input channel of a located layer '
        f"({escape(model.arch)}, {len(components.layers)} layers); "
        "a class's route is the channels its component keeps.</text>",
    ]
    return "\n".join([*head, *body, *legend, "</svg>"])
