"""Test-only ms-swift plugin: ``--padding_free true`` on CPU, where no flash-attention kernel exists.

ms-swift refuses ``--padding_free`` without a flash-attention implementation: its varlen kernels keep each sample of
the flattened row attending only inside its own sequence (``cu_seq_lens_q``, which ms-swift's Qwen-VL collator
emits). This plugin lifts ms-swift's argument check and gives transformers' ``sdpa`` attention the same semantics: a
causal attention with ``cu_seq_lens_q`` of several sequences gets the block-diagonal causal mask a varlen kernel
computes. ms-swift's collator, template and trainer run unchanged. With ``HSM_TEST_PACKED_LOG`` set, each such
call appends its number of sequences to that file, so a test can tell that its batches really were flattened.
"""

import os

import torch
from swift.arguments.sft_args import SftArguments
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def sdpa_within_sequences(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    if (cu_seq_lens_q is not None and cu_seq_lens_q.numel() > 2 and attention_mask is None
            and getattr(module, "is_causal", False)):
        length = query.shape[2]
        positions = torch.arange(length, device=query.device)
        sequence = torch.searchsorted(cu_seq_lens_q[1:].to(query.device), positions, right=True)
        causal = positions[:, None] >= positions[None, :]
        attention_mask = ((sequence[:, None] == sequence[None, :]) & causal)[None, None]
        log = os.environ.get("HSM_TEST_PACKED_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{cu_seq_lens_q.numel() - 1}\n")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("sdpa", sdpa_within_sequences)
SftArguments._check_padding_free = lambda self: None
