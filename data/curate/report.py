"""`report.md` for a curation run: per-stage counts, drop reasons, extra counters, tokens per domain,
and a few dropped documents per reason so a filter's decisions can be inspected.

Library module; `data.curate.runner` writes it from `stats.json`. Re-render an existing run with
`python -m data.curate.report <out>`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ⏎ ").replace("`", "'")


def render(stats: dict) -> str:
  st = stats["stages"]
  order = ["read"] + [n for n in stats["pipeline"] if n in st]
  lines = ["# Curation report", ""]
  sec = stats.get("seconds", {})
  lines += [f"Runner `{stats['runner']}`; pipeline: " + " → ".join(f"`{n}`" for n in order) + ".",
            f"{st.get('read', {}).get('in', 0):,} records read from "
            f"{sum(stats['inputs'].values())} files; {stats['docs_out']:,} documents kept. "
            f"Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in sec.items()) + ".", ""]
  lines += ["## Stages", "",
            "Counts reconcile for every stage: in = kept + dropped. docs/s is per worker process "
            "(stage time only).", "",
            "| stage | in | kept | dropped | kept % | docs/s | top drop reasons |",
            "|---|---:|---:|---:|---:|---:|---|"]
  for n in order:
    s = st[n]
    dropped = sum(s["dropped"].values())
    top = ", ".join(f"{r} {c:,}" for r, c in sorted(s["dropped"].items(), key=lambda x: -x[1])[:4])
    rate = f"{s['in'] / s['time_s']:,.0f}" if s["time_s"] > 0 else "-"
    pct = f"{100 * s['kept'] / s['in']:.1f}" if s["in"] else "-"
    lines.append(f"| `{n}` | {s['in']:,} | {s['kept']:,} | {dropped:,} | {pct} | {rate} | {top} |")
  counted = [n for n in order if st[n]["counts"]]
  if counted:
    lines += ["", "## Counters", "", "| stage | counter | value |", "|---|---|---:|"]
    for n in counted:
      for k, v in sorted(st[n]["counts"].items()):
        lines.append(f"| `{n}` | {_cell(k)} | {v:,} |")
  lines += ["", "## Domains", "", "| domain | input files | curated docs | epochs | train docs | "
            "train tokens | val tokens |", "|---|---:|---:|---:|---:|---:|---:|"]
  mix = stats.get("mix", {}).get("domains", {})
  for d, info in stats["domains"].items():
    m = mix.get(d)
    tail = (f"{m['epochs']:g} | {m['train_docs']:,} | {m['train_tokens']:,} | {m['val_tokens']:,}"
            if m else "- | - | - | -")
    lines.append(f"| {d} | {info['files']} | {info['docs']:,} | {tail} |")
  if stats.get("mix"):
    lines += ["", f"Shards: `{stats['mix']['manifest']}` (tokenizer `{stats['mix']['tokenizer']}`, "
              f"vocab {stats['mix']['vocab_size']:,})."
              + (f" Default weights: {stats['mix']['weights']}." if stats['mix']['weights'] else "")]
  if stats.get("samples"):
    lines += ["", "## Dropped samples", ""]
    for key in sorted(stats["samples"]):
      items = stats["samples"][key]
      if not items:
        continue
      lines += [f"### `{key}`", ""]
      for it in items:
        where = it["url"] or it["source"] or it["id"]
        text = _cell(it["text"][:400]) if it["text"] else "(no text: record unreadable)"
        lines.append(f"- `{_cell(it['id'] or '-')}` {_cell(where)}: {text}")
      lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def write(path: Path, stats: dict) -> None:
  Path(path).write_text(render(stats))


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m data.curate.report <curation out dir>")
  out = Path(sys.argv[1])
  write(out / "report.md", json.loads((out / "stats.json").read_text()))
  print(out / "report.md")
