"""Cost of a Diffusion-DPO step against a plain supervised step on the same two images.

    python -m dfusion_core.training.bench --data PAIRS [--model ...] [--steps 10]

Any trainable family: a UNet pipeline or an SD3-family (MMDiT) folder for --model, with pairs built on it.

Time: median seconds per optimizer step, the two kinds of step taking turns. Memory: on CUDA the peak
allocated bytes of each kind of step; on CPU each kind runs in its own subprocess and the peak resident
memory above the loaded model is compared (a LoRA reference costs no model copy, so the ratio stays near 1).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from ..engine.loading import load_model
from .data import load_training_pairs
from .trainer import TrainConfig, Trainer, _step_generator


def _one_step(tr: Trainer, kind: str, k: int) -> float:
    t0 = time.perf_counter()
    loss, _ = (tr._loss_sft(_step_generator(tr.cfg.seed, k), both=True) if kind == "sft"
               else tr._loss_dpo(_step_generator(tr.cfg.seed, k)))
    tr.acc.backward(loss)
    tr.opt.step()
    tr.opt.zero_grad(set_to_none=True)
    if tr.model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_steps(model, pairs, steps: int, batch_size: int, lora_rank: int) -> dict:
    tr = Trainer(model, pairs, TrainConfig(algo="dpo", batch_size=batch_size, lora_rank=lora_rank), "/tmp/dfusion-bench")
    times = {"sft": [], "dpo": []}
    peak = {"sft": 0.0, "dpo": 0.0}
    try:
        for kind in times:
            _one_step(tr, kind, 0)  # warm-up
        for k in range(steps):
            for kind in times:
                if model.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times[kind].append(_one_step(tr, kind, k + 1))
                if model.device.type == "cuda":
                    peak[kind] = max(peak[kind], torch.cuda.max_memory_allocated() / 2 ** 20)
    finally:
        tr.unload()
    sft, dpo = statistics.median(times["sft"]), statistics.median(times["dpo"])
    out = {"sft_step_s": round(sft, 4), "dpo_step_s": round(dpo, 4), "dpo_over_sft_time": round(dpo / sft, 3),
           "images_per_step": 2 * batch_size, "lora_rank": lora_rank, "device": str(model.device)}
    if model.device.type == "cuda":
        out.update(sft_peak_mib=round(peak["sft"]), dpo_peak_mib=round(peak["dpo"]),
                   dpo_over_sft_memory=round(peak["dpo"] / peak["sft"], 3))
    return out


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_child(model_path, data, kind, steps, batch_size, lora_rank) -> None:
    model = load_model(model_path, device="cpu")
    pairs = load_training_pairs(data)
    tr = Trainer(model, pairs, TrainConfig(algo="dpo", batch_size=batch_size, lora_rank=lora_rank), "/tmp/dfusion-bench")
    base = _rss_mib()
    for k in range(steps):
        _one_step(tr, kind, k)
    print(json.dumps({"base_mib": base, "peak_mib": _rss_mib()}))


def cpu_memory(model_path, data, steps, batch_size, lora_rank) -> dict:
    res = {}
    for kind in ("sft", "dpo"):
        p = subprocess.run([sys.executable, "-m", "dfusion_core.training.bench", "--child", kind, "--data", str(data),
                            "--steps", str(steps), "--batch-size", str(batch_size), "--lora-rank", str(lora_rank)]
                           + (["--model", str(model_path)] if model_path else []), capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        res[kind] = json.loads(p.stdout.strip().splitlines()[-1])
    grow = {k: v["peak_mib"] - v["base_mib"] for k, v in res.items()}
    return {"sft_peak_rss_mib": round(res["sft"]["peak_mib"]), "dpo_peak_rss_mib": round(res["dpo"]["peak_mib"]),
            "sft_training_growth_mib": round(grow["sft"], 1), "dpo_training_growth_mib": round(grow["dpo"], 1),
            "dpo_over_sft_memory": round(res["dpo"]["peak_mib"] / res["sft"]["peak_mib"], 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1, help="pairs per step (1 pair = the same two images)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--child", choices=["sft", "dpo"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _memory_child(a.model, a.data, a.child, a.steps, a.batch_size, a.lora_rank)
        return
    model = load_model(a.model, device=a.device)
    out = time_steps(model, load_training_pairs(a.data), a.steps, a.batch_size, a.lora_rank)
    if model.device.type == "cpu":
        out.update(cpu_memory(a.model, a.data, a.steps, a.batch_size, a.lora_rank))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
