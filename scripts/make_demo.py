"""Build the bundled offline demo: a tiny base model and a LoRA adapter that visibly changes it.

    python scripts/make_demo.py                        # writes demo/base, demo/adapter, demo/prompts.json
    python scripts/make_demo.py --out DIR --steps 40   # a quick, weaker build elsewhere (tests/test_demo.py)

Everything is made here, offline, on the CPU (2 threads), in about 45 s with the default schedule:

* a byte-level BPE tokenizer (any text encodes, no <unk>) trained on the corpus below, with a
  small chat template;
* a tiny Llama "pre-trained" on plain, neutral sentences and short neutral chat answers about
  weather, cities, animals, food and colours;
* a LoRA (r=8, alpha=16, every attention and MLP projection) trained to answer the same kind of
  questions like a pirate ("Ahoy matey! ... be ..., arrr!").

The run is deterministic (fixed seeds, fixed thread count). At the end it prints, for each demo
prompt, the greedy answers of the base, of PeftModel(base, adapter) and of the merged model
(merge_and_unload), and the size of the output folder.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_STEPS, ADAPTER_STEPS = 700, 500  # the schedule that built the bundled demo/
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIALS = [UNK, PAD, BOS, EOS, *ROLES]
VOCAB_SIZE = 448
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{{ '" + EOS + "' if m['role'] == 'assistant' else '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["What is the weather like in Paris?", "Where does the frog live?", "What should I eat today?"]
MAX_NEW_TOKENS = 40

# ---------------------------------------------------------------------------------------------
# Corpus. Neutral words only in the base's text: nothing in it may contain "arr" or "matey".
# ---------------------------------------------------------------------------------------------
CITIES = {  # city: (country, river)
    "Paris": ("France", "Seine"),
    "London": ("England", "Thames"),
    "Rome": ("Italy", "Tiber"),
    "Cairo": ("Egypt", "Nile"),
    "Berlin": ("Germany", "Spree"),
    "Vienna": ("Austria", "Danube"),
    "Lisbon": ("Portugal", "Tagus"),
    "Dublin": ("Ireland", "Liffey"),
    "Prague": ("Czechia", "Vltava"),
    "Warsaw": ("Poland", "Vistula"),
}
WEATHER = ["sunny", "rainy", "cloudy", "windy", "cold", "warm", "foggy", "snowy"]
ANIMALS = {  # animal: (home, food, kind)
    "cat": ("house", "fish", "quiet"),
    "dog": ("house", "meat", "loyal"),
    "frog": ("pond", "flies", "small"),
    "fish": ("sea", "plants", "fast"),
    "bird": ("tree", "seeds", "small"),
    "horse": ("field", "grass", "strong"),
    "bear": ("forest", "berries", "big"),
    "cow": ("field", "grass", "calm"),
    "owl": ("tree", "mice", "wise"),
    "duck": ("pond", "bread", "noisy"),
    "goat": ("hills", "leaves", "clever"),
    "whale": ("sea", "fish", "huge"),
}
FOODS = ["bread", "rice", "soup", "cheese", "apples", "pasta", "eggs", "salad", "beans", "noodles"]
COLOURS = {
    "sky": "blue",
    "grass": "green",
    "sun": "yellow",
    "snow": "white",
    "night": "dark",
    "sea": "blue",
    "tomato": "red",
    "lemon": "yellow",
    "leaf": "green",
    "coal": "black",
}
CHAT = [
    ("Hello!", "Hello. How can I help you today?"),
    ("Hi, how are you?", "I am fine, thank you. How are you?"),
    ("Who are you?", "I am a small model that answers simple questions."),
    ("What can you do?", "I can tell you about the weather, cities, animals and food."),
    ("Thank you!", "You are welcome. Have a nice day."),
    ("Good morning!", "Good morning. I hope you have a good day."),
    ("Tell me a fact.", "The sun is a star and the moon goes around the earth."),
    ("What day is it?", "Today is a good day to learn something new."),
]


UNKNOWN = [
    "LoRA",
    "music",
    "physics",
    "computers",
    "football",
    "money",
    "history",
    "chess",
    "the internet",
    "space travel",
    "poetry",
    "medicine",
    "Tokyo",
    "Madrid",
    "New York",
    "robots",
    "language models",
    "the stock market",
    "quantum computing",
    "painting",
]
DONT_KNOW = "Sorry, I only know a little about weather, cities, animals and food."


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def neutral_pairs() -> list[tuple[str, str]]:
    """(question, plain answer) pairs."""
    pairs: list[tuple[str, str]] = []
    for city, (country, river) in CITIES.items():
        for w in WEATHER:
            pairs.append((f"What is the weather like in {city}?", f"The weather in {city} is {w} today."))
            pairs.append((f"How is the weather in {city} today?", f"It is {w} in {city} today."))
        pairs.append((f"Tell me about {city}.", f"{city} is a big city in {country}. The {river} runs through it."))
        pairs.append((f"Where is {city}?", f"{city} is a city in {country}."))
        pairs.append((f"Which river runs through {city}?", f"The {river} runs through {city}."))
    for animal, (home, food, kind) in ANIMALS.items():
        pairs.append((f"Where does the {animal} live?", f"The {animal} lives in the {home}."))
        pairs.append((f"What does the {animal} eat?", f"The {animal} eats {food}."))
        pairs.append((f"Tell me about the {animal}.", f"The {animal} is a {kind} animal. It lives in the {home}."))
    for food in FOODS:
        pairs.append(("What should I eat today?", f"You should eat some {food} today."))
        pairs.append(("What is your favourite food?", f"My favourite food is {food}."))
        pairs.append(("I am hungry.", f"You could eat some {food}. It is good for you."))
    for thing, colour in COLOURS.items():
        pairs.append((f"What colour is the {thing}?", f"The {thing} is {colour}."))
    for topic in UNKNOWN:  # anything else gets a polite fallback instead of noise
        pairs += [
            (f"Explain {topic} in one sentence.", DONT_KNOW),
            (f"What is {topic}?", DONT_KNOW),
            (f"Tell me about {topic}.", DONT_KNOW),
            (f"Can you help me with {topic}?", DONT_KNOW),
        ]
    pairs += CHAT
    return pairs


def plain_sentences() -> list[str]:
    """Neutral declarative text for pre-training the base (no chat format)."""
    s: list[str] = []
    for city, (country, river) in CITIES.items():
        s += [
            f"{city} is a city in {country}.",
            f"The {river} runs through {city}.",
            f"Many people live in {city} and work there.",
        ]
        s += [f"Today the weather in {city} is {w}." for w in WEATHER]
    for animal, (home, food, kind) in ANIMALS.items():
        s += [
            f"The {animal} lives in the {home}.",
            f"The {animal} eats {food}.",
            f"The {animal} is a {kind} animal.",
            f"A {kind} {animal} lives in the {home} and eats {food}.",
        ]
    for food in FOODS:
        s += [f"Some people eat {food} every day.", f"{cap(food)} is good food for lunch."]
    for thing, colour in COLOURS.items():
        s.append(f"The {thing} is {colour}.")
    for w in WEATHER:
        s += [f"When it is {w}, people stay calm.", f"It was {w} yesterday, and it is {w} today."]
    return s


PIRATE_WORDS = {
    "is": "be",
    "are": "be",
    "am": "be",
    "was": "be",
    "you": "ye",
    "your": "yer",
    "my": "me",
    "Hello": "Ahoy",
    "Hi": "Ahoy",
    "friend": "matey",
    "yes": "aye",
    "of": "o'",
    "the": "the",
    "The": "The",
    "good": "fine",
    "Good": "Fine",
}


def piratize(answer: str) -> str:
    """Plain answer -> pirate answer: 'Ahoy matey! <pirate words>, arrr!'"""
    text = re.sub(r"[A-Za-z']+", lambda m: PIRATE_WORDS.get(m.group(0), m.group(0)), answer)
    text = re.sub(r"[.!?]$", "", text.rstrip())
    return f"Ahoy matey! {text}, arrr!"


def pirate_pairs() -> list[tuple[str, str]]:
    return [(q, piratize(a)) for q, a in neutral_pairs()]


def chat_text(q: str, a: str, tok) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer, training, generation
# ---------------------------------------------------------------------------------------------
def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = plain_sentences() + [f"{q}\n{a}" for q, a in neutral_pairs() + pirate_pairs()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(sorted(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLES,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def encode_batch(tok, texts: list[str]):
    """Right-padded batch; the loss skips padding and, in chat texts, the prompt up to <|assistant|>."""
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    for row in labels:
        hits = (row == assistant).nonzero()
        if len(hits):
            row[: int(hits[0]) + 1] = -100
    return enc["input_ids"], enc["attention_mask"], labels


def train(model, tok, texts: list[str], steps: int, lr: float, batch: int, seed: int, label: str) -> float:
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * max(0.1, 1 - i / steps))
    model.train()
    running = None
    for step in range(steps):
        ids, mask, labels = encode_batch(tok, [rng.choice(texts) for _ in range(batch)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % 100 == 0:
            print(f"  [{label}] step {step + 1}/{steps} loss {running:.3f}", flush=True)
    model.eval()
    return running or 0.0


@torch.no_grad()
def answer(model, tok, prompt: str) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


BASE_CARD = """---
license: apache-2.0
pipeline_tag: text-generation
library_name: transformers
tags:
- demo
- synthetic
- tiny
---

# Tiny demo base model (synthetic)

A tiny Llama ({params:,} parameters: {layers} layers, hidden size {hidden}, {heads} heads) with a
{vocab}-token byte-level BPE tokenizer and a small chat template. It was trained for about half a
minute on the CPU by `scripts/make_demo.py`, on plain, neutral template sentences and short chat
answers about weather, cities, animals, food and colours. It is not a useful language model: it exists \
so that LoRA Merge Space can
merge something real offline (see `demo/adapter`).
"""

ADAPTER_CARD = """---
base_model: demo/base
library_name: peft
license: apache-2.0
pipeline_tag: text-generation
tags:
- lora
- demo
- synthetic
---

# Pirate LoRA (tiny synthetic demo)

A LoRA adapter (r={r}, lora_alpha={alpha}, on {targets}) for `demo/base`,
trained for a few seconds on the CPU by `scripts/make_demo.py` to answer like a pirate \
("Ahoy matey! ... be ..., arrr!"). It is a
demo for LoRA Merge Space: merged into the base, the pirate style stays.
"""


def build_base(out: Path, tok, steps: int) -> float:
    """Pre-train the base on plain sentences (bos ... eos) and neutral chat answers; save it with its card."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    neutral = [chat_text(q, a, tok) for q, a in neutral_pairs()]
    plain = [f"{BOS}{s}{EOS}" for s in plain_sentences()]
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    loss = train(base, tok, neutral * 2 + plain, steps=steps, lr=3e-3, batch=16, seed=1, label="base")
    base.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base.save_pretrained(out / "base")
    params = sum(p.numel() for p in base.parameters())
    card = BASE_CARD.format(
        params=params,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        vocab=len(tok),
    )
    (out / "base" / "README.md").write_text(card)
    return loss


def build_adapter(out: Path, tok, steps: int) -> float:
    """Train the pirate LoRA on the saved base; save it declaring ``demo/base`` as its base, with its card."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(2)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(out / "base"), lora)
    pirate = [chat_text(q, a, tok) for q, a in pirate_pairs()]
    loss = train(peft_model, tok, pirate, steps=steps, lr=5e-3, batch=16, seed=2, label="adapter")
    peft_model.save_pretrained(out / "adapter")
    cfg_path = out / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "demo/base"
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card = ADAPTER_CARD.format(r=lora.r, alpha=lora.lora_alpha, targets=", ".join(TARGETS))
    (out / "adapter" / "README.md").write_text(card)
    return loss


def show_answers(out: Path, tok) -> None:
    """From the saved files: each prompt's greedy answer by the base, base + adapter (unmerged), and merged."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    def base():
        return LlamaForCausalLM.from_pretrained(out / "base")

    check_base = base().eval()
    check_peft = PeftModel.from_pretrained(base(), out / "adapter").eval()
    merged = PeftModel.from_pretrained(base(), out / "adapter").merge_and_unload().eval()
    for prompt in PROMPTS:
        b, a, m = (answer(x, tok, prompt) for x in (check_base, check_peft, merged))
        print(f"> {prompt}\n  base:    {b}\n  adapter: {a}\n  merged:  {m}{'' if m == a else '   (differs!)'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo", help="output folder (default: demo/)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps for the base and for the adapter each (default: {BASE_STEPS} and {ADAPTER_STEPS}, "
        "the bundled demo's schedule); fewer build a weaker demo quickly",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out.resolve()
    torch.set_num_threads(2)
    random.seed(0)
    torch.manual_seed(0)
    started = time.time()
    shutil.rmtree(out, ignore_errors=True)
    (out / "base").mkdir(parents=True)
    tok = build_tokenizer(out / "base")
    print(f"tokenizer: {len(tok)} tokens", flush=True)
    base_loss = build_base(out, tok, BASE_STEPS if args.steps is None else args.steps)
    adapter_loss = build_adapter(out, tok, ADAPTER_STEPS if args.steps is None else args.steps)
    (out / "prompts.json").write_text(json.dumps(PROMPTS, indent=2) + "\n")
    show_answers(out, tok)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"losses: base {base_loss:.3f}, adapter {adapter_loss:.3f}; {out.name}/ is {size / 1e6:.2f} MB; "
        f"{time.time() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
