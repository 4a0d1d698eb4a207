"""Draw the aggregation tree the code builds, for the Concepts page.

    python docs/_scripts/draw_tree.py            # writes docs/_static/tree.png
    python docs/_scripts/draw_tree.py --target-size 12 --out /tmp/tree.png

The tree comes from :func:`lightning_secagg.planner.plan`, i.e. from
``lightning_secagg.tree.build_tree`` with a seeded ``random.Random`` (the
scheduler itself uses a CSPRNG). Needs matplotlib (the ``examples`` or ``docs``
extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

from lightning_secagg.planner import plan

OUT = Path(__file__).resolve().parents[1] / "_static" / "tree.png"


def draw(target_size: int, group_size: int, num_actors: int, seed: int, out: Path) -> Path:
    """Draw one tree: a row per level, a box per group, actors filled; arrows to the next level."""
    p = plan(target_size, group_size, num_actors, seed=seed, params=1)
    tree = p.tree
    names = {pid: f"p{int(pid.split('-')[1], 16)}" for pid in tree.members}
    widest = max(sum(len(g.participants) for g in level) + len(level) for level in tree.levels)
    fig, ax = plt.subplots(figsize=(max(8.0, widest * 0.42), 1.6 * tree.depth + 0.8))
    pos: dict[tuple[int, str], tuple[float, float]] = {}
    for li, level in enumerate(tree.levels):
        y = -li * 1.6
        n = sum(len(g.participants) for g in level) + len(level) - 1
        x = (widest - n) / 2
        for g in level:
            x0 = x
            for pid in g.participants:
                actor = pid in g.actors
                ax.add_patch(
                    plt.Circle(
                        (x + 0.5, y),
                        0.36,
                        facecolor="#d9534f" if actor else "white",
                        edgecolor="#333333",
                        linewidth=1.2,
                        zorder=3,
                    )
                )
                ax.text(
                    x + 0.5,
                    y,
                    names[pid],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if actor else "black",
                    zorder=4,
                )
                pos[(li, pid)] = (x + 0.5, y)
                x += 1
            root = li == tree.depth - 1
            ax.add_patch(
                FancyBboxPatch(
                    (x0 + 0.05, y - 0.5),
                    x - x0 - 0.1,
                    1.0,
                    boxstyle="round,pad=0.02,rounding_size=0.2",
                    facecolor="#fff4d6" if root else "#eef3fb",
                    edgecolor="#8a6d3b" if root else "#7f9cc6",
                    zorder=1,
                )
            )
            x += 1
        label = f"level {li}" + (" (root)" if li == tree.depth - 1 else "")
        ax.text(-0.4, y, label, ha="right", va="center", fontsize=9)
    for li in range(tree.depth - 1):
        for g in tree.levels[li]:
            for pid in g.actors:
                (x1, y1), (x2, y2) = pos[(li, pid)], pos[(li + 1, pid)]
                ax.annotate(
                    "",
                    xy=(x2, y2 + 0.38),
                    xytext=(x1, y1 - 0.38),
                    arrowprops={"arrowstyle": "->", "color": "#999999", "lw": 0.8},
                    zorder=2,
                )
    ax.set_xlim(-3.2, widest + 0.5)
    ax.set_ylim(-1.6 * (tree.depth - 1) - 0.9, 0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(
        f"build_tree: {target_size} peers, group_size={group_size}, num_actors={num_actors} "
        f"(seed {seed}): depth {tree.depth}; filled = actor, arrows = an actor "
        "taking its sum up a level",
        fontsize=9,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-size", type=int, default=12)
    parser.add_argument("--group-size", type=int, default=3)
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    path = draw(args.target_size, args.group_size, args.num_actors, args.seed, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
