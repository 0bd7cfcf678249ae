"""Base-model loading: the embedded SmolLM2, any local or hub checkpoint,
and tiny random-initialised models for tests and smoke runs."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY_CORPUS = [
    "Definition: In this task you are given a question and you must write the answer.",
    "Input: What is the capital of France? Output: Paris. The quick brown fox jumps over the lazy dog.",
    "Generate a question about the passage. Classify the sentence as positive or negative.",
    "0 1 2 3 4 5 6 7 8 9 yes no true false answer question passage sentence word",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained in-process (deterministic, no files).

    Byte-level pre-tokenisation means any text encodes; the vocabulary is ~300.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    out.chat_template = _TINY_CHAT_TEMPLATE
    return out


# Init std of the `tiny-llama` runs load. At transformers' default (0.02) the tied embeddings
# are so small that after the final RMSNorm no logit can exceed about 1.3: the answer loss
# cannot fall below ~4.6 nats, an adapter learns nothing but the answer prior, and every
# method scores the same. At 0.3 a few dozen adapter steps learn the format and simple tasks.
TINY_INIT_STD = 0.3


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2,
               init_std: float = 0.02) -> LlamaForCausalLM:
    """A random-initialised Llama with SmolLM2's layout at toy size (weights ~ N(0, init_std))."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(gen_state)
    return model


def load_base(spec: str, seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load a frozen base model and its tokenizer.

    `spec` is "tiny-llama" or a tiny MoE ("tiny-olmoe", "tiny-qwen2-moe",
    "tiny-qwen3-moe", "tiny-mixtral"), the embedded "smollm2-135m-instruct", a local
    Hugging Face model directory, or a hub name.
    """
    from fedmole.adapters.moe_models import TINY_MOE_MODELS, tiny_moe

    if spec == "tiny-llama":
        tokenizer = tiny_tokenizer()
        model = tiny_llama(len(tokenizer), seed=seed, init_std=TINY_INIT_STD)
    elif spec in TINY_MOE_MODELS:
        tokenizer = tiny_tokenizer()
        model = tiny_moe(TINY_MOE_MODELS[spec], len(tokenizer), seed=seed)
    else:
        from fedmole.assets import resolve_model

        path = resolve_model(spec)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
