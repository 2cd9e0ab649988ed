"""Peak memory and time of the loss step, plain trainer vs hsm, at Qwen-VL's vocabulary (151,936 tokens).

    python bench/stats_memory.py [--seq 2048] [--batch 2] [--rounds 5]

One small Qwen3 language model (hidden 64, 1 layer; the LM head and the loss dominate, as they do at a real
vocabulary), random tokens, the second half of each row supervised. Per stack, the loss step (forward, loss,
backward) the way the plain trainer runs it, and with hsm's per-sample statistics added the way its integration
adds them:

- ``hsm train``: plain = the model's own loss (``labels=``); hsm = ``HsmTrainerMixin``'s ``compute_loss_func``
  (:func:`hsm.train.stats.token_losses` + :func:`per_sample_stats`, the loss from the same pass).
- TRL: plain = ``SFTTrainer``'s fused LM head (``fused_lm_head=True``, TRL's loss from ``log_probs``); hsm = the
  same plus :func:`per_sample_stats` of its outputs (what ``HsmSFTTrainer.compute_loss`` adds).
- ms-swift: plain = the model's own loss (ms-swift's default path); hsm = the same plus
  :func:`chunked_token_stats` of the logits (what ``HsmSwiftTrainer.compute_loss`` adds); ``swift, before`` is
  the previous full float32 recomputation (``token_losses`` under ``no_grad``) for reference.

Memory: the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` before each variant) minus the RSS just
before the variant's 2 steps: the loss step's own peak (tensors this large are ``mmap``ed and go back to the system
when freed, so one variant does not hide another's). Time: all variants alternate in one process (the machine's
load hits them alike); median of ``--rounds`` steps after one warm-up each.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

VOCAB = 151_936
STACKS = {"hsm train": ("train_plain", "train_hsm"), "TRL": ("trl_plain", "trl_hsm"),
          "ms-swift": ("swift_plain", "swift_hsm")}


def build(seq: int, batch: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=seq)
    model = Qwen3ForCausalLM(config)
    input_ids = torch.randint(0, VOCAB, (batch, seq))
    labels = input_ids.clone()
    labels[:, : seq // 2] = -100
    roles = torch.randint(0, 3, (batch, seq), dtype=torch.int8)
    return model, input_ids, labels, roles


def step_fn(variant: str, model, input_ids, labels, roles):
    """One loss step (forward, loss, backward) of ``variant``; returns a callable."""
    from hsm.train.stats import chunked_token_stats, per_sample_stats, token_losses

    if variant.startswith("trl") and not getattr(model, "_fused_lm_head_added", False):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        model._fused_lm_head_added = True

    def run():
        model.zero_grad(set_to_none=True)
        if variant == "train_hsm":
            losses, mask, correct = token_losses(model(input_ids=input_ids).logits, labels)
            loss = losses.sum() / mask.sum().clamp(min=1)
            per_sample_stats(losses, mask, correct, roles)
        elif variant.startswith("trl"):
            out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
            loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
            if variant == "trl_hsm":
                mask = out.label_mask.bool()
                per_sample_stats(-out.log_probs, mask, out.is_top1.bool() & mask, roles)
        else:  # train_plain, swift_*: the model's own loss
            out = model(input_ids=input_ids, labels=labels)
            loss = out.loss
            if variant == "swift_hsm":
                per_sample_stats(*chunked_token_stats(out.logits, labels), roles)
            elif variant == "swift_before":
                import torch

                with torch.no_grad():
                    per_sample_stats(*token_losses(out.logits.detach(), labels), roles)
        loss.backward()
        del loss

    return run


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def step_peak_mb(run) -> float:
    """Peak RSS above the pre-step RSS over two steps of ``run``."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_mb("VmRSS")
    for _ in range(2):
        run()
    return _status_mb("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model, input_ids, labels, roles = build(args.seq, args.batch)
    variants = [v for pair in STACKS.values() for v in pair] + ["swift_before"]
    runs = {v: step_fn(v, model, input_ids, labels, roles) for v in variants}
    for run in runs.values():  # warm-up: lazy initialisations do not count against the first variant
        run()
    memory = {v: step_peak_mb(runs[v]) for v in variants}
    print("memory", memory, file=sys.stderr, flush=True)
    times = {v: [] for v in variants}
    for r in range(args.rounds + 1):
        for v in variants:
            started = time.perf_counter()
            runs[v]()
            if r:  # round 0 warms up
                times[v].append(time.perf_counter() - started)
    median = {v: statistics.median(t) for v, t in times.items()}
    print(f"\nvocabulary {VOCAB:,}, sequence {args.seq}, batch {args.batch}, CPU; loss step = forward + loss + "
          f"backward; memory = peak RSS above the pre-step RSS; time = median of {args.rounds}\n")
    print("| stack | plain step MB | hsm step MB | memory vs plain | plain s | hsm s | time vs plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [(stack, plain, hsm) for stack, (plain, hsm) in STACKS.items()]
    rows.append(("ms-swift, before (full float32 copy)", "swift_plain", "swift_before"))
    for name, plain, variant in rows:
        m0, m1, t0, t1 = memory[plain], memory[variant], median[plain], median[variant]
        print(f"| {name} | {m0:.0f} | {m1:.0f} | {100 * (m1 / m0 - 1):+.1f}% | {t0:.2f} | {t1:.2f} | "
              f"{100 * (t1 / t0 - 1):+.1f}% |")


if __name__ == "__main__":
    main()
