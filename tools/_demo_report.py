"""The demo's summary and its PNG, drawn with Pillow (a project dependency; no matplotlib).

Top row: held-out simulated tau against step, and training / held-out loss against step (from the
run's metrics.jsonl). Bottom row: the accepted-length histograms of the trained draft, the
untrained draft and n-gram prompt lookup on the held-out prompts (tools.spec_decode's per-proposer
`accept_hist`: how many decoding steps accepted 1..B tokens), each as a fraction of its steps, on
one shared y scale so the three are comparable at a glance.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

W, H = 1500, 900
MARGIN = dict(left=70, right=20, top=40, bottom=50)
# Not greys: anti-aliased black text makes greys, and the tests count a proposer's pixels by colour.
BLUE, ORANGE, PURPLE, GREEN = (31, 119, 180), (255, 127, 14), (148, 103, 189), (44, 160, 44)
PROPOSERS = (("trained", BLUE), ("untrained", PURPLE), ("ngram", GREEN))


def read_metrics(path: Path) -> tuple[list, list]:
    """(training rows, held-out rows) of metrics.jsonl, in step order."""
    train, held = [], []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append(row)
        if row.get("eval_sim_tau") is not None:
            held.append(row)
    return train, held


def summary(report: dict, metrics: Path, seconds: float) -> dict:
    """The demo's result in one dict (its last printed line)."""
    _, held = read_metrics(metrics)
    drafts = report["drafts"]
    ngram = report.get("ngram_tau")
    return {"tau_trained": report["tau"], "tau_untrained": drafts["untrained"]["tau"],
            "ngram_tau": ngram, "trained_over_ngram": round(report["tau"] / ngram, 3) if ngram else None,
            "sim_tau_trained": report.get("sim_tau"), "sim_matches": report.get("sim_matches"),
            "lossless": report["all_lossless"], "block_size": report["block_size"],
            "prompts": report["prompts"],
            "heldout_sim_tau": [[r["step"], round(r["eval_sim_tau"], 3)] for r in held],
            "seconds": round(seconds, 1),
            # the machine's load beside the wall time: shared CI boxes stretch it severalfold
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def format_summary(s: dict) -> str:
    traj = " -> ".join(f"{t:.2f}@{k}" for k, t in s["heldout_sim_tau"])
    ratio = "-" if s["trained_over_ngram"] is None else f"{s['trained_over_ngram']:.2f}x"
    return (f"held-out prompts ({s['prompts']}, block {s['block_size']}): tau trained "
            f"{s['tau_trained']:.3f} | untrained {s['tau_untrained']:.3f} | n-gram "
            f"{s['ngram_tau']:.3f} (trained/n-gram {ratio}); lossless {s['lossless']}\n"
            f"held-out simulated tau during training: {traj}\n"
            f"demo wall time {s['seconds']:.0f} s (load average {' '.join(map(str, s['load_average']))})")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


class _Panel:
    """A plot area at `box` (x0, y0, x1, y1) mapping data ranges onto pixels."""

    def __init__(self, draw, box, xr, yr, title, xlabel, ylabel, xticks=None):
        self.d, self.xr, self.yr = draw, xr, yr
        x0, y0, x1, y1 = box
        self.px = (x0 + MARGIN["left"], x1 - MARGIN["right"])
        self.py = (y1 - MARGIN["bottom"], y0 + MARGIN["top"])  # y grows downwards
        f, small = _font(16), _font(12)
        draw.text(((x0 + x1) / 2, y0 + 8), title, fill="black", font=f, anchor="ma")
        draw.text(((self.px[0] + self.px[1]) / 2, y1 - 8), xlabel, fill="black", font=small, anchor="md")
        draw.text((x0 + 6, (y0 + y1) / 2), ylabel, fill="black", font=small, anchor="lm")
        for i in range(5):
            fy = yr[0] + (yr[1] - yr[0]) * i / 4
            _, Y = self.xy(xr[0], fy)
            draw.line((self.px[0], Y, self.px[1], Y), fill=(225, 225, 225))
            draw.text((self.px[0] - 4, Y), f"{fy:.3g}", fill="black", font=small, anchor="rm")
        for fx in xticks if xticks is not None else [xr[0] + (xr[1] - xr[0]) * i / 4 for i in range(5)]:
            X, _ = self.xy(fx, yr[0])
            draw.text((X, self.py[0] + 4), f"{fx:.4g}", fill="black", font=small, anchor="ma")
        draw.rectangle((self.px[0], self.py[1], self.px[1], self.py[0]), outline="black")

    def xy(self, x, y):
        fx = (x - self.xr[0]) / ((self.xr[1] - self.xr[0]) or 1)
        fy = (y - self.yr[0]) / ((self.yr[1] - self.yr[0]) or 1)
        return (self.px[0] + fx * (self.px[1] - self.px[0]), self.py[0] + fy * (self.py[1] - self.py[0]))

    def line(self, xs, ys, color, label, slot, dots=False, legend_low=False):
        pts = [self.xy(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(pts) > 1:
            self.d.line(pts, fill=color, width=2)
        if dots or len(pts) == 1:
            for X, Y in pts:
                self.d.ellipse((X - 3, Y - 3, X + 3, Y + 3), fill=color)
        lx = self.px[1] - 170
        ly = (self.py[0] - 26 - 18 * slot) if legend_low else (self.py[1] + 8 + 18 * slot)
        self.d.line((lx, ly + 7, lx + 20, ly + 7), fill=color, width=3)
        self.d.text((lx + 26, ly), label, fill="black", font=_font(12))


def _span(values, pad=0.05):
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def plot(report: dict, metrics: Path, out: Path) -> Path:
    from PIL import Image, ImageDraw

    train, held = read_metrics(metrics)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    top, bottom = (0, 0, W, H // 2), H // 2
    steps = [r["step"] for r in train + held] or [0, 1]
    xr = (0, max(steps))

    taus = [r["eval_sim_tau"] for r in held] or [1.0]
    p = _Panel(d, (0, 0, W // 2, top[3]), xr, _span([1.0] + taus), "held-out simulated tau",
               "step", "tau")
    p.line([r["step"] for r in held], taus if held else [], BLUE, "held-out sim tau", 0, dots=True,
           legend_low=True)  # tau rises: the lower right is free

    losses = [r["loss"] for r in train] + [r["eval_loss"] for r in held if r.get("eval_loss") is not None]
    p = _Panel(d, (W // 2, 0, W, top[3]), xr, _span(losses or [0.0]), "loss", "step", "loss")
    p.line([r["step"] for r in train], [r["loss"] for r in train], ORANGE, "train loss", 0)
    p.line([r["step"] for r in held], [r.get("eval_loss") for r in held], BLUE, "held-out loss", 1,
           dots=True)

    drafts = report["drafts"]
    block = report["block_size"]
    fracs = {}
    for name, _ in PROPOSERS:
        hist = drafts.get(name, {}).get("accept_hist") or [0] * block
        fracs[name] = [h / (sum(hist) or 1) for h in hist]
    ymax = max(max(v) for v in fracs.values()) * 1.1 or 1.0
    third = W // 3
    for i, (name, color) in enumerate(PROPOSERS):
        tau = drafts.get(name, {}).get("tau")
        p = _Panel(d, (i * third, bottom, (i + 1) * third, H), (0.5, block + 0.5), (0.0, ymax),
                   f"{name}: tau {tau:.2f}" if tau is not None else name, "accepted tokens per step",
                   "frac", xticks=range(1, block + 1))
        for k, f in enumerate(fracs[name], start=1):
            if not f:
                continue  # a zero-height rectangle would still draw a 1-pixel line
            x0, y0 = p.xy(k - 0.4, f)
            x1, y1 = p.xy(k + 0.4, 0.0)
            d.rectangle((x0, y0, x1, y1), fill=color)
    out = Path(out)
    img.save(out)
    return out
