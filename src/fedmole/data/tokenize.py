"""Prompts and answer-only training labels, padding, and resumable training batches.

Length caps always cut the instruction first (NI instructions are long and
repetitive; the input and the answer carry the example), never the answer.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmole.data.types import Example

IGNORE_INDEX = -100
PLAIN_ANSWER_CUE = "\n\nAnswer: "
# Private-use characters that mark where the instruction and the input go inside
# a rendered chat template (no tokenizer or dataset uses them as text).
_INSTR_MARK = "\ue000"
_INPUT_MARK = "\ue001"


def prompt_messages(ex: Example) -> list[dict]:
    """One user message: instruction, a blank line, input (omitted when empty)."""
    content = ex.instruction + ("\n\n" + ex.input if ex.input else "")
    return [{"role": "user", "content": content}]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _uses_template(tokenizer, use_chat_template: bool) -> bool:
    return use_chat_template and getattr(tokenizer, "chat_template", None) is not None


def _render(tokenizer, instruction: str, text_input: str, chat: bool) -> str:
    ex = Example(instruction, text_input, ("",))
    if chat:
        return tokenizer.apply_chat_template(prompt_messages(ex), tokenize=False, add_generation_prompt=True)
    return (instruction + ("\n\n" + text_input if text_input else "")) + PLAIN_ANSWER_CUE


def encode_prompt(tokenizer, ex: Example, *, max_prompt_tokens: int, use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt for `ex`, at most `max_prompt_tokens` long.

    With a chat template (and `use_chat_template`): the user message rendered with
    add_generation_prompt=True; else "{instruction}\\n\\n{input}\\n\\nAnswer: ".
    When the whole prompt is too long, the instruction is tokenized on its own and
    its end cut; if the prompt is still too long with no instruction left, the
    input's end is cut as well.
    """
    chat = _uses_template(tokenizer, use_chat_template)
    # Plain prompts get whatever the tokenizer adds itself (e.g. a BOS); templates
    # already spell out their special tokens.
    lead = [] if chat else tokenizer("", add_special_tokens=True)["input_ids"]
    full = lead + _ids(tokenizer, _render(tokenizer, ex.instruction, ex.input, chat))
    if len(full) <= max_prompt_tokens:
        return full

    rendered = _render(tokenizer, _INSTR_MARK, _INPUT_MARK if ex.input else "", chat)
    head, rest = rendered.split(_INSTR_MARK)
    middle, tail = rest.split(_INPUT_MARK) if ex.input else (rest, "")
    head_ids, middle_ids, tail_ids = lead + _ids(tokenizer, head), _ids(tokenizer, middle), _ids(tokenizer, tail)
    instr_ids, input_ids = _ids(tokenizer, ex.instruction), _ids(tokenizer, ex.input)
    fixed = len(head_ids) + len(middle_ids) + len(input_ids) + len(tail_ids)
    if fixed <= max_prompt_tokens:
        instr_ids = instr_ids[: max_prompt_tokens - fixed]
    else:
        instr_ids = []
        keep = max_prompt_tokens - (fixed - len(input_ids))
        if keep < 1:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} is too small: the prompt format alone takes "
                f"{fixed - len(input_ids)} tokens"
            )
        input_ids = input_ids[:keep]
    return head_ids + instr_ids + middle_ids + input_ids + tail_ids


def answer_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of an answer as it is trained (and scored as an option): its tokens, at most
    `max_tokens` of them, then EOS."""
    ids = _ids(tokenizer, text)[:max_tokens]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_train(
    tokenizer,
    ex: Example,
    *,
    max_len: int,
    max_answer_tokens: int = 64,
    use_chat_template: bool = True,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one training example: prompt + first reference + EOS.

    The answer keeps at most `max_answer_tokens` tokens (EOS not counted); the prompt
    gets what is left of `max_len`. labels are IGNORE_INDEX on the prompt.
    """
    answer = answer_ids(tokenizer, ex.outputs[0], max_tokens=max_answer_tokens)
    budget = max_len - len(answer)
    if budget < 1:
        raise ValueError(f"max_len={max_len} leaves no room for a prompt next to a {len(answer)}-token answer")
    prompt = encode_prompt(tokenizer, ex, max_prompt_tokens=budget, use_chat_template=use_chat_template)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate_train(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation: input_ids, attention_mask, each (B, T)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


class TrainBatches:
    """Endless shuffled batches over encoded training items, resumable.

    Each epoch visits every item once in a fresh order drawn from the instance's own
    generator; the last batch of an epoch may be smaller. `state_dict()` holds
    (epoch, position, generator state at the epoch's start), enough to rebuild the
    current order and continue exactly where a run stopped.
    """

    def __init__(self, items: list[tuple[list[int], list[int]]], batch_size: int, seed: int, pad_id: int):
        if not items:
            raise ValueError("TrainBatches needs at least one item")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items = items
        self.batch_size = batch_size
        self.pad_id = pad_id
        self._rng = np.random.default_rng(seed)
        self.epoch = 0
        self.position = 0
        self._new_order()

    def _new_order(self) -> None:
        self._epoch_state = self._rng.bit_generator.state
        self._order = self._rng.permutation(len(self.items))

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch (see collate_train); starts a new epoch when one ends."""
        if self.position >= len(self.items):
            self.epoch += 1
            self.position = 0
            self._new_order()
        chosen = self._order[self.position : self.position + self.batch_size]
        self.position += len(chosen)
        return collate_train([self.items[i] for i in chosen], self.pad_id)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": len(self.items),
            "rng_state": self._epoch_state,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != len(self.items):
            raise ValueError(f"state is for {state['num_items']} items, these batches hold {len(self.items)}")
        self._rng.bit_generator.state = state["rng_state"]
        self._new_order()
        self.epoch = state["epoch"]
        self.position = state["position"]
