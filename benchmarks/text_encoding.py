"""Cold text encoding: tokens spent and prompts/s, the harness's encoder against the earlier one and the
77-token loop of the OVSS repositories, on the registered SCLIP name sets with the 80 OpenAI templates.

Three ways to encode the same prompts (random-init CLIP ViT-B/16 text tower: cost does not depend on weights):
  * 77-token:   every prompt at the full context, as SCLIP / ClearCLIP / NACLIP do (``clip.tokenize``);
  * previous:   the harness before length sorting: batches of 512 in rendering order, each cut at its own
                longest prompt (the tower is causal and EOT-pooled);
  * harness:    distinct prompts only, sorted by length, batches cut at their longest prompt, and a prompt
                already encoded for another dataset is not encoded again (the per-tower prompt store).
Token counts are exact (tokenizer only); ``--time`` also runs the tower for the previous and the harness way.

    python benchmarks/text_encoding.py --time
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from typing import Dict, List, Sequence

import torch

from harness.models import build_dense_model
from harness.runtime import device_description, select_device
from harness.text.encoder import CONTEXT_LENGTH, PromptStore, TextStats, encode_prompts
from harness.text.names import load_name_set
from harness.text.templates import render

TEMPLATES = "openai_imagenet_80"
#: the eight OVSS name files in the order a PH-Reg Table 1 suite visits them
KEYS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
BATCH = 512  # harness.text.encoder.encode_names default


def prompts_of(key: str) -> List[str]:
    return [p for aliases in load_name_set("sclip", key) for n in aliases for p in render(TEMPLATES, n)]


def previous_tokens(lengths: torch.Tensor, batch: int = BATCH) -> int:
    return sum(len(lengths[i:i + batch]) * int(lengths[i:i + batch].max()) for i in range(0, len(lengths), batch))


def previous_encode(bb, prompts: Sequence[str], device: torch.device) -> float:
    """The earlier harness encoder: rendering order, every prompt (duplicates too), batches of 512."""
    t0 = time.perf_counter()
    tokens = bb.tokenize(list(prompts))
    with torch.inference_mode():
        for i in range(0, len(prompts), BATCH):
            bb.encode_text(tokens[i:i + BATCH].to(device))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", action="store_true", help="also run the tower (minutes on a CPU)")
    ap.add_argument("--keys", nargs="+", default=list(KEYS), choices=KEYS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "text_encoding.md"))
    a = ap.parse_args()
    device = select_device(a.device)
    model = build_dense_model("clip-b16-openai", "clip", random_init=True).to(device)
    bb = model.backbone
    store = PromptStore(None)  # one store across the datasets, as the on-disk one is across runs
    rows: List[Dict[str, str]] = []
    tot = {"prev": 0, "ours": 0, "t77": 0, "prev_s": 0.0, "ours_s": 0.0, "n": 0, "enc": 0}
    for key in a.keys:
        prompts = prompts_of(key)
        lengths = bb.tokenize(prompts).argmax(-1) + 1
        prev = previous_tokens(lengths)
        stats = TextStats()
        if a.time:
            prev_s = previous_encode(bb, prompts, device)
            encode_prompts(bb, prompts, device, BATCH, store, stats)
        else:  # count what the harness would encode without running the tower
            todo = [p for p in dict.fromkeys(prompts) if p not in store.entries]
            srt = (bb.tokenize(todo).argmax(-1) + 1).sort().values if todo else torch.zeros(0, dtype=torch.long)
            stats.tokens = previous_tokens(srt) if todo else 0
            stats.encoded, stats.tokens_77 = len(todo), len(todo) * CONTEXT_LENGTH
            store.entries.update({p: torch.zeros(1) for p in todo})
            prev_s = 0.0
        t77 = len(prompts) * CONTEXT_LENGTH
        tot.update(prev=tot["prev"] + prev, ours=tot["ours"] + stats.tokens, t77=tot["t77"] + t77,
                   prev_s=tot["prev_s"] + prev_s, ours_s=tot["ours_s"] + stats.seconds, n=tot["n"] + len(prompts),
                   enc=tot["enc"] + stats.encoded)
        row = {"name set": f"sclip/{key}", "prompts": str(len(prompts)), "encoded": str(stats.encoded),
               "tokens 77": str(t77), "tokens previous": str(prev), "tokens harness": str(stats.tokens),
               "previous / harness": f"{prev / stats.tokens:.2f}x" if stats.tokens else "all shared",
               "cold alone: previous / sorted": f"{prev / previous_tokens(lengths.sort().values):.2f}x"}
        if a.time:
            row["s previous"] = f"{prev_s:.1f}"
            row["s harness"] = f"{stats.seconds:.1f}"
            row["prompts/s harness"] = f"{stats.prompts_per_s:.0f}" if stats.encoded else "-"
        rows.append(row)
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    total = {"name set": "**all, one store**", "prompts": str(tot["n"]), "encoded": str(tot["enc"]),
             "tokens 77": str(tot["t77"]), "tokens previous": str(tot["prev"]), "tokens harness": str(tot["ours"]),
             "previous / harness": f"{tot['prev'] / max(tot['ours'], 1):.2f}x",
             "cold alone: previous / sorted": "-"}
    if a.time:
        total.update({"s previous": f"{tot['prev_s']:.1f}", "s harness": f"{tot['ours_s']:.1f}",
                      "prompts/s harness": f"{tot['enc'] / max(tot['ours_s'], 1e-9):.0f}"})
    rows.append(total)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = list(rows[0])
    md = [f"### Cold text encoding ({time.strftime('%Y-%m-%d')})", "",
          f"Generated by `python benchmarks/text_encoding.py{' --time' if a.time else ''}`. Machine: "
          f"{platform.machine()}, {device_description(device)}, torch {torch.__version__}; 1-min load average at the "
          f"end {load:.1f}. Random-init CLIP ViT-B/16 text tower, {TEMPLATES} templates, SCLIP name files in the "
          f"order a Table 1 suite runs them; 'tokens' = sum over batches of batch size x the batch's longest "
          f"prompt. 'cold alone' is the sorting gain for one name set with an empty store.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(a.out) or ".", delete=False) as fh:
        fh.write("\n".join(md) + "\n")
    os.replace(fh.name, a.out)
    print("\n".join(md))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
