"""One incremental step per trainable-scope policy (head, lora, full) on CUDA with bf16 autocast.

For each policy: build the learner on the ML-100K catalog, take one untimed step (allocations,
kernel selection), then time `--steps` micro-batches of `--batch` events through
`OnlineLearner.learn` — the whole step as the trainer runs it, including, for lora and full,
re-encoding the catalog with the updated encoder. Reports steps/s, events/s and peak GPU memory
as a table and as JSON (``--out``).

Without CUDA it says so, runs the same steps once per policy on the CPU as a sanity check (the
numbers are then CPU timings, with no memory figure) and exits 0.

    python -m bench.gpu_check [--steps 20] [--batch 256] [--out bench/out/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

POLICIES = ("head", "lora", "full")


def run_policy(policy: str, device: str, steps: int, batch: int, encoder_path: str,
               n_items: int | None) -> dict[str, Any]:
    """Time `steps` learn() calls of one policy on `device`; peak memory on CUDA."""
    import torch

    from freshrec.data import load_movielens, ml100k_dir
    from model.config import ModelConfig
    from model.learner import OnlineLearner

    data = load_movielens(ml100k_dir())
    items = data.items[:n_items] if n_items else data.items
    known = {it.item_id for it in items}
    events = [e for e in data.interactions if e.item_id in known]
    cfg = ModelConfig(encoder_path=encoder_path, policy=policy)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    learner = OnlineLearner(cfg, device=device)  # bf16 autocast on CUDA (see learner._step)
    learner.add_items(items)
    setup_s = time.perf_counter() - t0
    batches = [events[i * batch:(i + 1) * batch] for i in range(steps + 1)]
    learner.learn(batches[0])  # untimed: first-call allocations and kernel choice
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = 0.0
    for b in batches[1:]:
        loss = learner.learn(b).loss
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    trainable = sum(p.numel() for p in learner._dense) + learner.net.id_emb.numel()
    return {
        "policy": policy,
        "device": device,
        "steps": steps,
        "batch_events": batch,
        "items": len(items),
        "steps_per_s": steps / elapsed,
        "events_per_s": steps * batch / elapsed,
        "seconds_per_step": elapsed / steps,
        "setup_s": setup_s,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "trainable_params": trainable,
        "last_loss": loss,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of the per-policy figures."""
    head = f"{'policy':<8}{'device':<8}{'steps/s':>10}{'events/s':>11}{'s/step':>9}" \
           f"{'peak MiB':>10}{'trainable':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:,.0f}"
        lines.append(f"{r['policy']:<8}{r['device']:<8}{r['steps_per_s']:>10.2f}"
                     f"{r['events_per_s']:>11,.0f}{r['seconds_per_step']:>9.3f}{mem:>10}"
                     f"{r['trainable_params']:>12,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every policy; print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per policy on CUDA")
    parser.add_argument("--batch", type=int, default=256, help="events per micro-batch")
    parser.add_argument("--encoder", default="", help="HF AutoModel folder (default MiniLM)")
    parser.add_argument("--items", type=int, default=None, help="catalog prefix (default all)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--out", default="bench/out/gpu_check.json")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    device, steps = ("cuda", args.steps) if cuda else ("cpu", 1)
    if not cuda:
        print("gpu_check needs a CUDA GPU; none found. Running one step per policy on the CPU "
              "as a sanity check (CPU timings, no memory figures).", flush=True)
    rows = []
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        rows.append(run_policy(policy, device, steps, args.batch, args.encoder, args.items))
        print(f"{policy}: {rows[-1]['seconds_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    result = {
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "autocast": "bf16" if cuda else None,
        "policies": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
