"""Image + prompt -> the model's chat format, with labels only on the answer.

One :class:`Template` instance is shared by every dataset of a fusion (docs/design.md §3):
prompts resolve by priority default < domain < dataset-specific, and the
template's system prompt is restored after every encode, so no sample's system
prompt leaks into the next.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

# Re-exported: the answer text (and its character roles) lives in hsm.data.answer.
from hsm.data.answer import ROLE_COORD, ROLE_LABEL, ROLE_OTHER, answer_char_roles, format_answer
from hsm.config import FusionConfig, PromptConfig

__all__ = [
    "IGNORE_INDEX",
    "ROLE_OTHER",
    "ROLE_COORD",
    "ROLE_LABEL",
    "Prompts",
    "resolve_prompts",
    "format_answer",
    "answer_char_roles",
    "token_roles_from_offsets",
    "Template",
    "grounding_char_roles",
    "answer_roles_in_ids",
    "supervised_positions",
]

IGNORE_INDEX = -100
_FALLBACK = PromptConfig(system="You are a helpful assistant.", user="Detect all objects in the image.")


@dataclass(frozen=True)
class Prompts:
    system: str
    user: str


def resolve_prompts(fusion: FusionConfig, dataset_name: str) -> Prompts:
    """Priority per field: dataset-specific > domain > default (> built-in fallback)."""
    datasets = {fusion.target.name: fusion.target, **{s.name: s for s in fusion.sources}}
    dataset = datasets[dataset_name]
    levels = [dataset.prompts, fusion.domain_prompts.get(dataset.domain, PromptConfig()), fusion.default_prompts, _FALLBACK]
    system = next(level.system for level in levels if level.system is not None)
    user = next(level.user for level in levels if level.user is not None)
    return Prompts(system, user)


def token_roles_from_offsets(offsets: np.ndarray, char_roles: np.ndarray) -> np.ndarray:
    """Role of each token from its character span ``[start, end)`` (``offsets``: ``[n_tokens, 2]``).

    A token holding any coordinate character is a coordinate token, else one
    holding any label character is a label token, else :data:`ROLE_OTHER`
    (tokenizers may glue a space or a quote to a number or a word).
    Naive equivalent: ``[ROLE_COORD if ROLE_COORD in r else ROLE_LABEL if ROLE_LABEL in r else 0
    for r in (char_roles[s:e] for s, e in offsets)]``.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    is_coord = np.concatenate([[0], np.cumsum(char_roles == ROLE_COORD)])
    is_label = np.concatenate([[0], np.cumsum(char_roles == ROLE_LABEL)])
    start = np.clip(offsets[:, 0], 0, len(char_roles))
    end = np.clip(offsets[:, 1], start, len(char_roles))
    out = np.zeros(len(offsets), dtype=np.int8)
    out[is_label[end] > is_label[start]] = ROLE_LABEL
    out[is_coord[end] > is_coord[start]] = ROLE_COORD
    return out


class Template:
    """The single shared encoder: chat template + processor + label masking."""

    def __init__(self, processor, default_system: str = _FALLBACK.system):
        self.processor = processor
        self.system = default_system
        tokenizer = processor.tokenizer
        self._im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self._assistant_header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    @contextmanager
    def system_prompt(self, system: str):
        """Use ``system`` for one encode; the previous system prompt is always restored."""
        previous = self.system
        self.system = system
        try:
            yield
        finally:
            self.system = previous

    def prompt(self, user: str, system: str | None = None) -> str:
        """The chat text up to the assistant's answer (what generation continues from)."""
        with self.system_prompt(system if system is not None else self.system):
            messages = [
                {"role": "system", "content": self.system},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
            ]
            return self.processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, image, user: str, answer: str, system: str | None = None) -> dict:
        """Tokenise one sample; ``labels`` are -100 everywhere except the answer and its ``<|im_end|>``."""
        prompt = self.prompt(user, system)
        text = prompt + answer + "<|im_end|>\n"
        batch = self.processor(images=[image], text=[text], return_tensors="np")
        input_ids = batch["input_ids"][0]
        starts = np.flatnonzero(input_ids == self._im_start)
        answer_start = int(starts[-1]) + 1 + len(self._assistant_header)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[answer_start:-1] = input_ids[answer_start:-1]  # the trailing "\n" after <|im_end|> is not trained
        token_roles = self.answer_token_roles(input_ids, answer)
        token_roles[labels == IGNORE_INDEX] = ROLE_OTHER
        return {
            "input_ids": input_ids,
            "attention_mask": batch["attention_mask"][0],
            "mm_token_type_ids": batch["mm_token_type_ids"][0],
            "labels": labels,
            "pixel_values": batch["pixel_values"],
            "image_grid_thw": batch["image_grid_thw"],
            "token_roles": token_roles,
        }

    def answer_token_roles(self, input_ids: np.ndarray, answer: str) -> np.ndarray:
        """Role of every token of ``input_ids`` (:data:`ROLE_OTHER` outside the answer).

        The answer's tail (``<|im_start|>assistant\\n`` + answer + ``<|im_end|>\\n``)
        is tokenised again with offsets; special tokens split the text, so its
        ids equal the last ids of ``input_ids``, which is checked.
        """
        tokenizer = self.processor.tokenizer
        if not tokenizer.is_fast:
            raise ValueError(f"{type(tokenizer).__name__}: token roles need a fast tokenizer (offset mapping)")
        header = "<|im_start|>assistant\n"
        tail = tokenizer(header + answer + "<|im_end|>\n", add_special_tokens=False, return_offsets_mapping=True)
        tail_ids = np.asarray(tail["input_ids"])
        if len(tail_ids) > len(input_ids) or not np.array_equal(tail_ids, input_ids[len(input_ids) - len(tail_ids):]):
            raise ValueError(f"{type(tokenizer).__name__}: the answer tokenises differently alone than in the prompt; "
                             "token roles cannot be aligned")
        char_roles = np.concatenate([np.zeros(len(header), np.int8), answer_char_roles(answer),
                                     np.zeros(len("<|im_end|>\n"), np.int8)])
        roles = np.zeros(len(input_ids), dtype=np.int8)
        roles[len(input_ids) - len(tail_ids):] = token_roles_from_offsets(np.asarray(tail["offset_mapping"]), char_roles)
        return roles


# Qwen-VL's grounding tags: ms-swift's default (``QWENVL_BBOX_FORMAT=legacy``) rendering of ``objects`` rows.
_QWEN_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_QWEN_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def grounding_char_roles(text: str) -> np.ndarray:
    """:func:`answer_char_roles` of ``text``, plus Qwen-VL's grounding tags.

    Inside ``<|object_ref_start|>...<|object_ref_end|>`` every character is a label; inside
    ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` the numbers are coordinates. JSON answers
    (``bbox_2d`` / ``label`` keys) are scanned as by :func:`answer_char_roles`.

    Args:
        text: an assistant answer as the model sees it.
    """
    roles = answer_char_roles(text)
    for match in _QWEN_REF.finditer(text):
        roles[match.start(1):match.end(1)] = ROLE_LABEL
    for match in _QWEN_BOX.finditer(text):
        for number in _NUMBER.finditer(match.group(1)):
            roles[match.start(1) + number.start():match.start(1) + number.end()] = ROLE_COORD
    return roles


def _find_run(ids: np.ndarray, run: np.ndarray, start: int) -> int:
    """First index ``>= start`` where ``run`` occurs in ``ids`` as a contiguous run, else -1."""
    if len(run) == 0 or len(run) > len(ids) - start:
        return -1
    windows = np.lib.stride_tricks.sliding_window_view(ids[start:], len(run))
    hits = np.flatnonzero((windows == run).all(axis=1))
    return start + int(hits[0]) if len(hits) else -1


def answer_roles_in_ids(tokenizer, input_ids, answers) -> tuple[np.ndarray, int]:
    """Token roles of an already encoded sequence, from its answer texts located in it by their tokens.

    Each answer is tokenised alone with offsets; its ids are looked up as a contiguous run of
    ``input_ids`` (after the previous answer's run, so several assistant turns map in order), and the
    run gets the roles of its characters (:func:`grounding_char_roles`) by offsets
    (:func:`token_roles_from_offsets`). Every other token is :data:`ROLE_OTHER`.

    Args:
        tokenizer: a fast tokenizer (offset mapping), the one that encoded ``input_ids``.
        input_ids: one row's ids (padding included).
        answers: the row's assistant texts, in order.

    Returns:
        ``(roles, missing)``: ``int8`` roles aligned with ``input_ids``, and how many answers were not
        found (tokenised differently in context); their tokens stay :data:`ROLE_OTHER`.
    """
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__}: token roles need a fast tokenizer (offset mapping)")
    ids = np.asarray(input_ids, dtype=np.int64)
    roles = np.zeros(len(ids), dtype=np.int8)
    cursor, missing = 0, 0
    for answer in answers:
        encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        run = np.asarray(encoded["input_ids"], dtype=np.int64)
        at = _find_run(ids, run, cursor)
        if at < 0:
            missing += 1
            continue
        roles[at:at + len(run)] = token_roles_from_offsets(np.asarray(encoded["offset_mapping"]),
                                                           grounding_char_roles(answer))
        cursor = at + len(run)
    return roles, missing


def supervised_positions(labels):
    """``[n_supervised]`` int64: the flat positions ``row * seq + t`` of ``[batch, seq]`` logits that predict a
    supervised label (``labels[row, t + 1] != -100``), in row-major order.

    Built by the collator on the host, where the labels already are (torch tensors in and out), so that the loss
    runs its token-accuracy argmax over these positions only with no device-to-host sync: the index's length is
    known without reading the device.

    Naive equivalent: ``[r * seq + t for r in range(batch) for t in range(seq - 1) if labels[r, t + 1] != -100]``.

    Args:
        labels: ``[batch, seq]`` unshifted labels, -100 where not supervised.
    """
    import torch

    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return torch.nonzero((shifted != IGNORE_INDEX).flatten()).flatten()
