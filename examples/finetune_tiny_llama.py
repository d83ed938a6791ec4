# SPDX-License-Identifier: Apache-2.0
"""Fine-tune a small random Llama with PEFT LoRA, as PEFT runs it and patched by lora_kernels.

    python examples/finetune_tiny_llama.py                       # CPU defaults: a few minutes
    python examples/finetune_tiny_llama.py --steps 100 --hidden 1024 --seq-len 512   # e.g. on a GPU

No downloads: the model is built from a `LlamaConfig` with random weights and trained on synthetic
token ids (a fixed random Markov chain, so the loss has something to learn). PEFT LoRA (r=16 by
default) on all seven projections (q, k, v, o, gate, up, down). Both runs start from the same
weights and see the same batches in the same order under `transformers.Trainer`; the patched run
only adds `LoRAKernelsCallback`. Measured:

* saved activations of one training forward (autograd's saved tensors, unique storages,
  parameters and buffers excluded; `lora_kernels.memory.SavedActivationMeter`) for PEFT and
  patched at p = 0 and at --dropout, plus the peak over the Trainer's steps;
* time per optimizer step (median, p20, p80, warm-up steps dropped) inside each Trainer run, and
  an interleaved comparison (PEFT and patched forward+backward alternating on one batch), which
  is fairer on a shared machine;
* the loss curves and final losses.

Writes <out>/finetune_tiny_llama.json and <out>/finetune_tiny_llama.png (--out, default examples/out/;
the committed run is in examples/results/, redrawn with --replot examples/results/finetune_tiny_llama.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import lora_kernels  # noqa: E402
from bench.harness import device_name, versions  # noqa: E402
from lora_kernels.backends import resolve  # noqa: E402
from lora_kernels.memory import SavedActivationMeter  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (0: measure memory only)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout p")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="model and adapter dtype (default fp32 on cpu, bf16 on cuda)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default: ~2.7 x hidden, multiple of 16)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--backend", default="auto", help="lora_kernels backend for the patched run")
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps of each run left out of the time per step")
    ap.add_argument("--repeats", type=int, default=2,
                    help="Trainer runs per variant, alternating PEFT / patched (timings pooled; losses from the first)")
    ap.add_argument("--interleaved-reps", type=int, default=10, help="alternating fwd+bwd timings per model")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "examples", "out"),
                    help="output directory (default examples/out/, not committed; the committed run is examples/results/)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only redraw the PNG of an earlier run's JSON (written next to it) and exit")
    return ap.parse_args(argv)


# --- model and data ----------------------------------------------------------------------------------


def build_peft_template(args, dropout: float, dtype, device):
    """Base Llama (random, seed) + PEFT LoRA; the same seed gives the same weights at any dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = args.intermediate or 16 * round(2.6875 * args.hidden / 16)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(dtype=dtype, device=device)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=PROJECTIONS)
    torch.manual_seed(args.seed + 1)
    # adapters in the model dtype: PEFT would otherwise keep fp32 adapters on a half base, which
    # the patch leaves on PEFT's forward unless patch(..., cast_adapters=True)
    return get_peft_model(model, lora, autocast_adapter_dtype=False)


class MarkovTokens(torch.utils.data.Dataset):
    """Sequences from a fixed random sparse Markov chain over the vocabulary (learnable)."""

    def __init__(self, n, seq_len, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, vocab, (vocab, 4), generator=g)  # 4 possible next tokens each
        ids = torch.empty(n, seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (n,), generator=g)
        for t in range(1, seq_len):
            choice = torch.randint(0, 4, (n,), generator=g)
            ids[:, t] = successors[ids[:, t - 1], choice]
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def first_batch(dataset, batch, device):
    ids = torch.stack([dataset[i]["input_ids"] for i in range(batch)]).to(device)
    return {"input_ids": ids, "labels": ids}


def model_tensors(model):
    return list(model.parameters()) + list(model.buffers())


def saved_mib(model, batch) -> float:
    """Saved activations of one training forward (MiB); the backward then frees them."""
    model.train()
    with SavedActivationMeter(exclude=model_tensors(model)) as meter:
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.bytes / MIB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the Trainer runs --------------------------------------------------------------------------------


def train(args, model, dataset, device, dtype, patched: bool, dropout_seed: int) -> dict:
    """One Trainer run; `dropout_seed` seeds the RNG (dropout masks), the data order is args.seed's."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lora_kernels.integrations.transformers import LoRAKernelsCallback

    record = {"loss": [], "step_s": [], "saved_mib": []}
    out_dir = tempfile.mkdtemp(prefix="lora_kernels_trainer_")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            sync(device)
            record["step_s"].append(time.perf_counter() - self.t0)

    exclude = model_tensors(model)

    class MeteredTrainer(Trainer):
        """Records each step's loss (full precision) and the saved activations of its forward."""

        def compute_loss(self, model, inputs, *a, **kw):
            with SavedActivationMeter(exclude=exclude) as meter:
                loss = super().compute_loss(model, inputs, *a, **kw)
            record["saved_mib"].append(meter.bytes / MIB)
            record["loss"].append(float(loss.detach().float()))
            return loss

    targs = TrainingArguments(
        output_dir=out_dir,  # a temporary directory: nothing is saved (save_strategy="no")
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=0,
        logging_steps=max(1, args.steps),
        report_to=[],
        save_strategy="no",
        seed=dropout_seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=args.gradient_checkpointing,
        disable_tqdm=True,
    )
    callbacks = [StepTimer()]
    patch_callback = None
    if patched:
        patch_callback = LoRAKernelsCallback(backend=args.backend, strict=True)
        callbacks.append(patch_callback)
    trainer = MeteredTrainer(model=model, args=targs, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    if patch_callback is not None:
        record["patch_report"] = str(patch_callback.report)
    record["peak_saved_mib"] = max(record["saved_mib"]) if record["saved_mib"] else None
    return record


def step_stats(step_seconds: List[float]) -> dict:
    """ms per step: median, p20, p80 and min (the least disturbed step on a shared machine)."""
    xs = [s * 1e3 for s in step_seconds]
    q = statistics.quantiles(xs, n=5) if len(xs) >= 2 else [xs[0]] * 4
    return {"median": statistics.median(xs), "p20": q[0], "p80": q[3], "min": min(xs), "n": len(xs)}


def diff_stats(losses: List[float], reference: List[float]) -> dict:
    d = [a - b for a, b in zip(losses, reference)][len(reference) // 2:]
    return {"mean": statistics.mean(d), "sd": statistics.stdev(d) if len(d) > 1 else 0.0, "n": len(d)}


def interleaved_step_ms(models: Dict[str, torch.nn.Module], batch, device, reps) -> Dict[str, dict]:
    """Forward+backward of each model on one batch, alternating, so machine load hits both alike."""
    samples: Dict[str, List[float]] = {name: [] for name in models}
    for rep in range(reps + 1):
        for name, model in models.items():
            model.train()
            sync(device)
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            sync(device)
            if rep:  # the first round warms up
                samples[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return {name: step_stats(v) for name, v in samples.items()}


# --- report --------------------------------------------------------------------------------------------


def describe(device) -> str:
    return device_name(device) + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")


def _time_panel(ax, result) -> None:
    """Medians (whiskers p20-p80) of the time per optimizer step under the Trainer and of the
    interleaved forward+backward, PEFT next to patched, each pair labelled with patched ÷ PEFT."""
    groups = []
    if all(name in result["runs"] for name in ("peft", "patched")):
        groups.append(("Trainer step", {n: result["runs"][n]["time_per_step_ms"] for n in ("peft", "patched")}))
    if result.get("interleaved_step_ms"):
        groups.append(("fwd+bwd, interleaved", result["interleaved_step_ms"]))
    for i, (_, stats) in enumerate(groups):
        for j, (name, color) in enumerate((("peft", "tab:blue"), ("patched", "tab:orange"))):
            t = stats[name]
            lo, hi = t.get("p20", t["median"]), t.get("p80", t["median"])
            bar = ax.bar(i + (j - 0.5) * 0.38, t["median"], 0.36, color=color, label=name if i == 0 else None,
                         yerr=[[t["median"] - lo], [hi - t["median"]]], capsize=3)
            ax.bar_label(bar, fmt="%.1f", padding=2, fontsize=8)
        ratio = stats["patched"]["median"] / stats["peft"]["median"]
        ax.text(i, max(stats[n].get("p80", stats[n]["median"]) for n in ("peft", "patched")) * 1.1,
                f"patched ÷ PEFT = {ratio:.2f}×", ha="center", fontsize=9, fontweight="bold")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set(title="time, median (whiskers p20-p80)", ylabel="ms")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.legend(loc="lower right")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    runs = result["runs"]
    p = result["config"]["dropout"]
    if "peft_other_masks" in runs:
        loss = runs["peft_other_masks"]["loss"]
        axes[0].plot(range(1, len(loss) + 1), loss, ":", color="grey", label="peft, other dropout masks")
    for name, style in (("peft", "-"), ("patched", "--")):
        if name in runs:
            axes[0].plot(range(1, len(runs[name]["loss"]) + 1), runs[name]["loss"], style, label=name)
    axes[0].set(title=f"training loss (p={p})", xlabel="step", ylabel="loss")
    axes[0].legend()
    _time_panel(axes[1], result)
    mem = result["saved_activations_mib"]
    labels = ["PEFT p=0", f"PEFT p={p}", "patched p=0", f"patched p={p}"]
    values = [mem["peft_p0"], mem["peft_p"], mem["patched_p0"], mem["patched_p"]]
    bars = axes[2].bar(labels, values, color=["tab:blue", "tab:blue", "tab:orange", "tab:orange"])
    axes[2].bar_label(bars, fmt="%.1f")
    axes[2].set(title="saved activations, one forward", ylabel="MiB")
    axes[2].tick_params(axis="x", labelrotation=15)
    fig.suptitle(
        f"{result['config']['model']} | {result['config']['dtype']} | {result['device']} | backend {result['backend']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            png_path = os.path.splitext(args.replot)[0] + ".png"
            plot(json.load(f), png_path)
        print(f"wrote {png_path}")
        return None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    os.makedirs(args.out, exist_ok=True)
    backend = resolve(args.backend, device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device {describe(device)}; dtype {dtype}; lora_kernels backend {backend}", flush=True)

    dataset = MarkovTokens(max(args.steps, 1) * args.batch, args.seq_len, args.vocab, args.seed)
    batch = first_batch(dataset, args.batch, device)

    # saved activations of one forward, PEFT and patched, p = 0 and p = --dropout
    mem = {}
    templates = {}
    for key, p in (("p0", 0.0), ("p", args.dropout)):
        templates[key] = build_peft_template(args, p, dtype, device)
        peft_model = templates[key]
        patched_model = copy.deepcopy(peft_model)
        lora_kernels.patch(patched_model, strict=True, backend=args.backend)
        if args.gradient_checkpointing:
            for m in (peft_model, patched_model):
                m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mem[f"peft_{key}"] = saved_mib(peft_model, batch)
        mem[f"patched_{key}"] = saved_mib(patched_model, batch)
        if key == "p":
            pair = {"peft": peft_model, "patched": patched_model}
            interleaved = interleaved_step_ms(pair, batch, device, args.interleaved_reps)
        del patched_model
    print(
        "saved activations (MiB, one forward): "
        f"PEFT p=0 {mem['peft_p0']:.1f} | PEFT p={args.dropout} {mem['peft_p']:.1f} | "
        f"patched p=0 {mem['patched_p0']:.1f} | patched p={args.dropout} {mem['patched_p']:.1f}",
        flush=True,
    )
    print(
        f"interleaved fwd+bwd ms (median / min of {args.interleaved_reps}): "
        f"PEFT {interleaved['peft']['median']:.1f} / {interleaved['peft']['min']:.1f} | "
        f"patched {interleaved['patched']['median']:.1f} / {interleaved['patched']['min']:.1f}",
        flush=True,
    )

    runs, step_times = {}, {"peft": [], "patched": []}
    if args.steps > 0:
        template = templates["p"]
        for rep in range(args.repeats):
            order = ("peft", "patched") if rep % 2 == 0 else ("patched", "peft")
            for name in order:
                model = copy.deepcopy(template)
                record = train(args, model, dataset, device, dtype, name == "patched", args.seed)
                step_times[name] += record["step_s"][args.warmup_steps:] or record["step_s"]
                runs.setdefault(name, record)  # losses and curves from the first run of each
                del model
        if args.dropout > 0:  # the loss noise from dropout alone: PEFT again with other masks
            model = copy.deepcopy(template)
            runs["peft_other_masks"] = train(args, model, dataset, device, dtype, False, args.seed + 1)
            del model
        for name in ("peft", "patched"):
            runs[name]["time_per_step_ms"] = t = step_stats(step_times[name])
            print(
                f"{name:8s} time/step median {t['median']:.1f} ms (p20 {t['p20']:.1f}, p80 {t['p80']:.1f}, "
                f"min {t['min']:.1f}; {t['n']} steps) | peak saved {runs[name]['peak_saved_mib']:.1f} MiB | "
                f"loss {runs[name]['loss'][0]:.4f} -> {runs[name]['loss'][-1]:.4f}",
                flush=True,
            )

    config = dict(vars(args))
    config.update(
        model=f"Llama h{args.hidden} L{args.layers} heads{args.heads} vocab{args.vocab}, "
        f"LoRA r{args.rank} on 7 projections",
        dtype=str(dtype).replace("torch.", ""),
    )
    result = {
        "example": "finetune_tiny_llama",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe(device),
        "backend": backend,
        "loadavg_1_5_15min": {"start": load_before, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": versions("peft", "transformers"),
        "config": config,
        "saved_activations_mib": mem,
        "saved_activation_ratios": {
            "patched_p_over_peft_p0": mem["patched_p"] / mem["peft_p0"],
            "patched_p_over_peft_p": mem["patched_p"] / mem["peft_p"],
        },
        "interleaved_step_ms": interleaved,
        "runs": runs,
    }
    if runs:
        tail = max(1, min(5, args.steps // 4))
        step_ms = {name: runs[name]["time_per_step_ms"] for name in ("peft", "patched")}
        result["summary"] = {
            "time_per_step_ratio_median": step_ms["patched"]["median"] / step_ms["peft"]["median"],
            "time_per_step_ratio_min": step_ms["patched"]["min"] / step_ms["peft"]["min"],
            "interleaved_ratio_median": interleaved["patched"]["median"] / interleaved["peft"]["median"],
            "interleaved_ratio_min": interleaved["patched"]["min"] / interleaved["peft"]["min"],
            "final_loss": {n: r["loss"][-1] for n, r in runs.items()},
            f"mean_loss_last_{tail}": {n: statistics.mean(r["loss"][-tail:]) for n, r in runs.items()},
            "final_loss_diff_patched_vs_peft": abs(runs["patched"]["loss"][-1] - runs["peft"]["loss"][-1]),
            "final_loss_diff_dropout_noise": (
                abs(runs["peft_other_masks"]["loss"][-1] - runs["peft"]["loss"][-1])
                if "peft_other_masks" in runs else None
            ),
            # per-step loss differences (same batch each step) over the second half: mean, sd
            "loss_diff_second_half": {
                name: diff_stats(runs[name]["loss"], runs["peft"]["loss"])
                for name in ("patched", "peft_other_masks") if name in runs
            },
            "peak_saved_mib_in_training": {n: r["peak_saved_mib"] for n, r in runs.items()},
        }
    if runs:
        summary = result["summary"]
        noise = summary["final_loss_diff_dropout_noise"]
        print(
            f"final loss: PEFT {summary['final_loss']['peft']:.4f} | patched {summary['final_loss']['patched']:.4f} "
            f"(|diff| {summary['final_loss_diff_patched_vs_peft']:.4f}"
            + (f"; PEFT with other dropout masks differs by {noise:.4f})" if noise is not None else ")"),
            flush=True,
        )
        for name, d in summary["loss_diff_second_half"].items():
            print(f"per-step loss - PEFT's, 2nd half: {name} {d['mean']:+.4f} ± {d['sd']:.4f} (n={d['n']})", flush=True)
    json_path = os.path.join(args.out, "finetune_tiny_llama.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = os.path.join(args.out, "finetune_tiny_llama.png")
        plot(result, png_path)
        print(f"wrote {png_path}")
    return result


if __name__ == "__main__":
    main()
