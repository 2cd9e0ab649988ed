"""Per-sample statistics' cost in each stack's step, plain vs hsm, at Qwen3-VL-2B text shapes.

    python bench/stats_memory.py loss  [--hidden 2048] [--seq 2048] [--batch 2] [--rounds 10] [--shares 1,0.25,0.05]
                                       [--accumulation 1,2] [--layouts padded,padding_free] [--memory fresh|none]
    python bench/stats_memory.py whole [--hidden 2048] [--seq 2048] [--batch 2] [--rounds 10] [--layers 28]
    python bench/stats_memory.py ops   [--hidden 2048] [--seq 2048] [--batch 2] [--rounds 10] [--shares 0.25]

A Qwen3 language model shaped like Qwen3-VL-2B's text stack (vocabulary 151,936; ``--hidden`` 2048, MLP 3x hidden,
head dim 128, KV heads half the heads, tied embeddings), random tokens, the last ``share`` of each sample
supervised (the answer after a VLM prompt). ``padding_free`` concatenates the batch into one row with positions
restarting per sample, as TRL's and ms-swift's padding-free collators do. Per stack, the step the plain trainer
runs and the same step with hsm's statistics, as each integration runs them:

- ``hsm train``: plain = the model's own loss (``labels=``); hsm = :func:`hsm.train.stats.causal_lm_loss` (the same
  loss op for op, per-token values gathered from its ``log_softmax``, the argmax over supervised rows only) and
  one scatter-add (:func:`per_sample_stats` / :func:`packed_sample_stats`).
- TRL: plain = SFTTrainer's fused LM head (``fused_lm_head=True``, the loss from ``log_probs``); hsm = the same
  plus the scatter-add over its per-token outputs.
- ms-swift: plain = the model's own loss plus the argmax of ms-swift's token accuracy (``_compute_acc``); hsm =
  ``--loss_type hsm``: :func:`causal_lm_loss` reusing that argmax, plus the scatter-add.

Gradient accumulation ``g`` runs ``g`` micro-batches per step, the loss summed over the step's token count (as the
Trainer's ``num_items_in_batch``). Every step ends with one non-blocking device-to-host copy of the statistics.

``loss``: the loss step, one decoder layer (the LM head and the loss dominate); all variants of a configuration
alternate in one process (the machine's load hits them alike); time = median of ``--rounds`` steps after a warm-up
(CUDA events on a GPU); peak memory per variant in a fresh process (``--memory fresh``): on a GPU
``max_memory_allocated``, on CPU the peak RSS (``VmHWM``) above the RSS before its steps.

``whole``: the share of a whole ``--layers``-layer step that hsm costs. Measured: ``T1`` and ``T2``, the plain
``hsm train`` step with one and two decoder layers, and each stack's ``delta = T_hsm - T_plain`` at one layer (the
statistics do not depend on the depth). Extrapolated: ``layer = T2 - T1``, ``step(L) = T1 + (L - 1) * layer``,
share = ``delta / step(L)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

VOCAB = 151_936
STACKS = {"hsm train": ("train_plain", "train_hsm"), "TRL": ("trl_plain", "trl_hsm"),
          "ms-swift": ("swift_plain", "swift_hsm")}
VARIANTS = [v for pair in STACKS.values() for v in pair]


def device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build(hidden: int, layers: int, seq: int, batch: int, share: float, padding_free: bool, vocab: int = VOCAB):
    """``(model, micro_batch)``: the model and one micro-batch's tensors (input_ids, labels, positions, owners,
    supervised index, roles, n_samples)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hsm.data.encoding import supervised_positions
    from hsm.train.stats import token_samples

    torch.manual_seed(0)
    head_dim = min(128, hidden // 2)
    heads = max(1, hidden // head_dim)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                         max_position_embeddings=batch * seq, tie_word_embeddings=True)
    on = device()
    dtype = torch.bfloat16 if on.type == "cuda" else torch.float32
    model = Qwen3ForCausalLM(config).to(on, dtype)
    input_ids = torch.randint(0, vocab, (batch, seq))
    labels = input_ids.clone()
    labels[:, : seq - max(1, int(round(share * seq)))] = -100
    positions = torch.arange(seq).expand(batch, seq)
    owners = None
    if padding_free:
        input_ids, labels, positions = input_ids.reshape(1, -1), labels.reshape(1, -1), positions.reshape(1, -1)
        owners = token_samples(positions, batch)
    roles = torch.randint(0, 3, labels.shape, dtype=torch.int8)
    supervised = supervised_positions(labels)
    pin = on.type == "cuda"
    tensors = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "roles": roles,
               "supervised": supervised.pin_memory() if pin else supervised}
    if owners is not None:
        tensors["owners"] = owners
    batch_on = {k: (v.to(on) if k not in ("supervised",) else v) for k, v in tensors.items()}
    batch_on["n_samples"] = batch
    return model, batch_on


def step_fn(variant: str, model, micro: dict, accumulation: int):
    """One optimizer step's forward, loss and backward of ``variant`` over ``accumulation`` micro-batches."""
    import torch

    from hsm.data.meta import HsmMeta, SampleMeta
    from hsm.train.stats import batch_stats as sample_stats
    from hsm.train.stats import causal_lm_loss

    if variant.startswith("trl") and not getattr(model, "_fused_lm_head_added", False):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        model._fused_lm_head_added = True
    labels = micro["labels"]
    count = (labels[:, 1:] != -100).sum()
    num_items = count * accumulation if accumulation > 1 else None
    inputs = {"input_ids": micro["input_ids"], "position_ids": micro["position_ids"]}

    def meta():
        samples = [SampleMeta(sample_id=str(i), dataset="d", base_idx=i, epoch=0) for i in range(micro["n_samples"])]
        return HsmMeta.stack(samples, token_roles=micro["roles"], token_sample=micro.get("owners"))

    def run():
        model.zero_grad(set_to_none=True)
        stats = []
        for _ in range(accumulation):
            extra = {"num_items_in_batch": num_items} if num_items is not None else {}
            if variant == "train_plain":
                loss = model(**inputs, labels=labels, **extra).loss
            elif variant == "train_hsm":
                logits = model(**inputs).logits
                loss, losses, mask, correct = causal_lm_loss(logits, labels, num_items, micro["supervised"])
                stats.append(sample_stats(losses, mask, correct, meta()))
            elif variant.startswith("trl"):
                out = model(**inputs, labels=labels, fused_lm_head=True)
                loss = -out.log_probs.sum() / (num_items if num_items is not None else out.label_mask.sum().clamp(min=1))
                if variant == "trl_hsm":
                    mask = out.label_mask.bool()
                    stats.append(sample_stats(-out.log_probs, mask, out.is_top1.bool() & mask, meta()))
            elif variant == "swift_plain":
                out = model(**inputs, labels=labels)
                loss = out.loss if num_items is None else out.loss * (count / num_items)
                with torch.no_grad():
                    out.logits.argmax(dim=-1)  # ms-swift's _compute_acc
            else:  # swift_hsm: --loss_type hsm, the argmax shared with _compute_acc
                logits = model(**inputs).logits
                with torch.no_grad():
                    preds = logits.argmax(dim=-1)
                loss, losses, mask, correct = causal_lm_loss(logits, labels, predictions=preds)
                if num_items is not None:
                    loss = loss * (count / num_items)
                stats.append(sample_stats(losses, mask, correct, meta()))
            (loss / accumulation if num_items is None else loss).backward()
            del loss
        if stats:  # the drain: one non-blocking copy per step
            torch.cat(stats, dim=1).to("cpu", non_blocking=True)

    return run


def timed(run) -> float:
    import torch

    if device().type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def peak_mb(run) -> float:
    """Peak memory of two steps of ``run`` above what was held before them."""
    import torch

    run()  # warm-up: lazy initialisations and the gradients' own memory are not the step's peak
    gc.collect()
    if device().type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_mb("VmRSS")
    for _ in range(2):
        run()
    return _status_mb("VmHWM") - before


def median_times(runs: dict, rounds: int) -> dict[str, float]:
    for run in runs.values():
        run()  # warm-up
    times = {v: [] for v in runs}
    for _ in range(rounds):
        for v, run in runs.items():
            times[v].append(timed(run))
    return {v: statistics.median(t) for v, t in times.items()}


def fresh_peak(args, variant: str, share: float, layout: str, accumulation: int) -> float:
    command = [sys.executable, __file__, "peak", "--vocab", str(args.vocab), "--hidden", str(args.hidden),
               "--seq", str(args.seq), "--batch", str(args.batch), "--variant", variant, "--share", str(share),
               "--layout", layout, "--accumulation", str(accumulation)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def where() -> str:
    import torch

    if device().type == "cuda":
        return f"{torch.cuda.get_device_name()}, bf16"
    return f"CPU ({torch.get_num_threads()} threads), float32"


def loss_table(args) -> None:
    shares = [float(x) for x in args.shares.split(",")]
    accumulations = [int(x) for x in args.accumulation.split(",")]
    layouts = args.layouts.split(",")
    print(f"\nloss step: vocabulary {args.vocab:,}, hidden {args.hidden}, 1 decoder layer, sequence {args.seq}, batch "
          f"{args.batch}, {where()}; time = median of {args.rounds} steps; memory = peak per variant"
          f"{' in a fresh process' if args.memory == 'fresh' else ' (not measured)'}\n")
    print("| supervised | layout | grad acc | stack | plain s | hsm s | time vs plain | plain MB | hsm MB | memory vs plain |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for share in shares:
        for layout in layouts:
            for accumulation in accumulations:
                model, micro = build(args.hidden, 1, args.seq, args.batch, share, layout == "padding_free", args.vocab)
                runs = {v: step_fn(v, model, micro, accumulation) for v in VARIANTS}
                median = median_times(runs, args.rounds)
                del model, micro, runs
                gc.collect()
                memory = {v: fresh_peak(args, v, share, layout, accumulation) if args.memory == "fresh" else float("nan")
                          for v in VARIANTS}
                for stack, (plain, hsm) in STACKS.items():
                    t0, t1, m0, m1 = median[plain], median[hsm], memory[plain], memory[hsm]
                    memory_cells = (f"{m0:.0f} | {m1:.0f} | {100 * (m1 / m0 - 1):+.1f}%" if args.memory == "fresh"
                                    else "- | - | -")
                    print(f"| {share:.0%} | {layout} | {accumulation} | {stack} | {t0:.3f} | {t1:.3f} | "
                          f"{100 * (t1 / t0 - 1):+.1f}% | {memory_cells} |", flush=True)


def whole_table(args) -> None:
    share = 0.25
    one, micro = build(args.hidden, 1, args.seq, args.batch, share, False, args.vocab)
    runs = {v: step_fn(v, one, micro, 1) for v in VARIANTS}
    median = median_times(runs, args.rounds)
    del one, runs
    gc.collect()
    two, micro = build(args.hidden, 2, args.seq, args.batch, share, False, args.vocab)
    t2 = median_times({"plain": step_fn("train_plain", two, micro, 1)}, args.rounds)["plain"]
    t1 = median["train_plain"]
    layer = t2 - t1
    step = t1 + (args.layers - 1) * layer
    print(f"\nwhole step: hidden {args.hidden}, sequence {args.seq}, batch {args.batch}, 25% supervised, {where()}; "
          f"T1 = {t1:.3f} s, T2 = {t2:.3f} s, layer = T2 - T1 = {layer:.3f} s, step({args.layers}) = T1 + "
          f"{args.layers - 1} x layer = {step:.3f} s\n")
    print(f"| stack | plain s (1 layer) | hsm s (1 layer) | delta s | share of a {args.layers}-layer step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for stack, (plain, hsm) in STACKS.items():
        delta = median[hsm] - median[plain]
        print(f"| {stack} | {median[plain]:.3f} | {median[hsm]:.3f} | {delta:+.3f} | {100 * delta / step:+.2f}% |")


def ops_table(args) -> None:
    """What hsm adds to the loss alone: from the logits, the plain loss and its backward (transformers'
    ``ForCausalLMLoss``, what the model runs for ``labels=``) against hsm's ``causal_lm_loss`` + backward + the
    per-sample statistics, the model's forward kept off the clock; median of ``--rounds``, alternating."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from hsm.data.meta import HsmMeta, SampleMeta
    from hsm.train.stats import batch_stats, causal_lm_loss

    share = float(args.shares.split(",")[0])
    print(f"\nloss alone: vocabulary {args.vocab:,}, hidden {args.hidden}, sequence {args.seq}, batch {args.batch}, "
          f"{share:.0%} supervised, {where()}; median of {args.rounds}\n")
    print("| layout | plain loss + backward s | hsm loss + backward + statistics s | hsm adds s |")
    print("| --- | ---: | ---: | ---: |")
    for layout in args.layouts.split(","):
        model, micro = build(args.hidden, 1, args.seq, args.batch, share, layout == "padding_free", args.vocab)
        with torch.no_grad():
            logits = model(input_ids=micro["input_ids"], position_ids=micro["position_ids"]).logits
        del model
        logits.requires_grad_()
        labels = micro["labels"]
        meta = HsmMeta.stack([SampleMeta(sample_id=str(i), dataset="d", base_idx=i, epoch=0)
                              for i in range(micro["n_samples"])], token_roles=micro["roles"],
                             token_sample=micro.get("owners"))

        def plain():
            logits.grad = None
            ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1]).backward()

        def hsm():
            logits.grad = None
            loss, losses, mask, correct = causal_lm_loss(logits, labels, None, micro["supervised"])
            loss.backward()
            batch_stats(losses, mask, correct, meta).to("cpu", non_blocking=True)

        median = median_times({"plain": plain, "hsm": hsm}, args.rounds)
        print(f"| {layout} | {median['plain']:.3f} | {median['hsm']:.3f} | {median['hsm'] - median['plain']:+.3f} |",
              flush=True)
        del logits
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["loss", "whole", "peak", "ops"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--shares", default="1,0.25,0.05")
    parser.add_argument("--accumulation", default="1,2")
    parser.add_argument("--layouts", default="padded,padding_free")
    parser.add_argument("--memory", choices=["fresh", "none"], default="fresh")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=VOCAB, help="smaller only to smoke-test the script")
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--share", type=float)
    parser.add_argument("--layout", choices=["padded", "padding_free"])
    args = parser.parse_args()
    if args.mode == "peak":  # one variant's peak, in this fresh process
        model, micro = build(args.hidden, 1, args.seq, args.batch, args.share, args.layout == "padding_free", args.vocab)
        print(json.dumps({"peak_mb": peak_mb(step_fn(args.variant, model, micro, int(args.accumulation)))}))
    elif args.mode == "loss":
        loss_table(args)
    elif args.mode == "ops":
        ops_table(args)
    else:
        whole_table(args)


if __name__ == "__main__":
    main()
