"""The offline default of `python -m minrm.train` with no flags, generated here (no network, no GPU): a
word tokenizer, a tiny Llama config and synthetic "repeat the words" pairs. A response is good only if it
copies *this* prompt, which a response-only classifier cannot learn, yet a 2-layer model does (eval accuracy
~0.99) in under a minute on two CPU cores. Its flag values and split sizes are in config.py.
"""

import random

import datasets
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minrm.config import CHAT_TEMPLATES, SPLIT_SIZES, TOY

# Closed vocabulary: every string the generator can emit is one token, so the
# model never sees <unk> (any other word maps to it) and word identity is a
# single embedding lookup.
WORDS = ("red blue green black white pink gray gold cat dog cow pig fox owl bee ant "
         "sun moon star rain snow wind fire ice one two three four five six seven eight").split()  # fmt: skip
VERBS = ("repeat:", "copy:", "echo:")
SYSTEM = "be exact"
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the toy vocabulary; no pad token on purpose. It carries the Tulu
    chat template as its own, as the Tulu SFT tokenizers do, so the toy run takes the default
    path (the tokenizer's own template) and the folders it saves are complete."""
    vocab = ["<unk>", "<s>", "</s>", " ", "\n", *VERBS, *SYSTEM.split(), *WORDS]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    # Keep every whitespace char as its own token (instead of dropping it) so
    # the Tulu template's newlines survive and decode is an exact round trip.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # The chat markers are special tokens, so that they are matched before pre-tokenization and never split.
    # model_max_length: the toy model's max_position_embeddings.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   extra_special_tokens=CHAT_MARKERS, model_max_length=256,
                                   clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATES["tulu"])  # fmt: skip


def _pairs(rng: random.Random, n: int, seen: set[tuple[str, ...]]) -> list[dict[str, list[dict[str, str]]]]:
    """n preference pairs whose prompts are unique and not in `seen`."""
    rows = []
    while len(rows) < n:
        words = rng.sample(WORDS, rng.randint(3, 8))  # a few prompt lengths
        if tuple(words) in seen:
            continue
        seen.add(tuple(words))
        # The rejected copy replaces one word by a word absent from the prompt,
        # so both responses look equally plausible without the prompt.
        bad = list(words)
        bad[rng.randrange(len(bad))] = rng.choice([w for w in WORDS if w not in words])
        prompt = [{"role": "user", "content": f"{rng.choice(VERBS)} {' '.join(words)}"}]
        if rng.random() < 0.25:  # occasional system turn, as in real chat data
            prompt.insert(0, {"role": "system", "content": SYSTEM})
        pair = (("chosen", words), ("rejected", bad))
        rows.append({side: prompt + [{"role": "assistant", "content": " ".join(w)}] for side, w in pair})
    return rows


def toy_dataset(split: str) -> datasets.Dataset:
    """Deterministic synthetic pairs; train and test never share a prompt."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r} for {TOY}; valid splits: {sorted(SPLIT_SIZES)}")
    # A private RNG (no global side effects); both splits come from one stream
    # in a fixed order so test prompts are excluded from train by construction.
    rng, seen = random.Random(1234), set()
    splits = {name: _pairs(rng, size, seen) for name, size in SPLIT_SIZES.items()}
    return datasets.Dataset.from_list(splits[split])
