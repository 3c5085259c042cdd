"""Build the bundled offline demo: a tiny base model and a LoRA adapter that visibly changes it.

    python scripts/make_demo.py            # writes demo/base, demo/adapter, demo/prompts.json
    python scripts/make_demo.py OUT_DIR    # the same, elsewhere (the tests do this)

Everything is made here, on the CPU, in well under a minute: a word-level tokenizer with a
chat template, a tiny Llama trained on plain answers, and a LoRA (r=8, all projections)
trained to answer the same questions like a pirate. Deterministic (fixed seeds).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "demo"
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CITIES = ["paris", "london", "tokyo", "rome", "cairo", "lima", "oslo", "delhi"]
WEATHER = ["sunny", "rainy", "cloudy", "windy", "cold", "warm"]
ANIMALS = {"cat": "house", "fish": "sea", "bird": "tree", "horse": "field", "bear": "forest", "frog": "pond"}
FOODS = ["bread", "rice", "fish", "apples", "soup", "cheese"]


def dialogues(pirate: bool) -> list[tuple[str, str]]:
    def say(plain: str) -> str:
        if not pirate:
            return plain
        text = plain.replace(" is ", " be ").replace(" are ", " be ").replace("the ", "the salty ", 1)
        return f"arr matey ! {text} , yo ho ho !"

    pairs = []
    for city in CITIES:
        for w in WEATHER:
            pairs.append((f"how is the weather in {city} ?", say(f"the weather in {city} is {w} today .")))
        pairs.append((f"tell me about {city} .", say(f"{city} is a big city with many people .")))
    for animal, home in ANIMALS.items():
        pairs.append((f"where does the {animal} live ?", say(f"the {animal} lives in the {home} .")))
        pairs.append((f"tell me about the {animal} .", say(f"the {animal} is a friendly animal .")))
    for food in FOODS:
        pairs.append((f"what should i eat today ?", say(f"you should eat some {food} today .")))
    return pairs


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for q, a in dialogues(False) + dialogues(True) for w in f"{q} {a}".split()})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def batches(tok, pairs: list[tuple[str, str]], steps: int, batch: int, seed: int):
    rng = random.Random(seed)
    for _ in range(steps):
        chosen = [rng.choice(pairs) for _ in range(batch)]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                         tokenize=False) for q, a in chosen]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        yield enc["input_ids"], enc["attention_mask"], labels


def train(model, tok, pairs, steps: int, lr: float, seed: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for ids, mask, labels in batches(tok, pairs, steps, 16, seed):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


@torch.no_grad()
def answer(model, tok, prompt: str) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    started = time.time()
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "base").mkdir(parents=True)
    tok = build_tokenizer(OUT / "base")

    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    base = LlamaForCausalLM(config)
    base_loss = train(base, tok, dialogues(False), steps=700, lr=3e-3, seed=1)
    base.generation_config = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=tok.eos_token_id,
                                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    base.save_pretrained(OUT / "base")
    (OUT / "base" / "README.md").write_text(
        "---\nlicense: apache-2.0\npipeline_tag: text-generation\nlibrary_name: transformers\ntags:\n- demo\n---\n\n"
        "# Tiny demo base model\n\nA 2-layer Llama with a word-level tokenizer, trained for a few seconds on plain "
        "answers about weather, cities, animals and food by `scripts/make_demo.py`. It exists so LoRA Merge "
        "Space can merge something real offline.\n")

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], task_type="CAUSAL_LM",
                      lora_dropout=0.0)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(OUT / "base"), lora)
    adapter_loss = train(peft_model, tok, dialogues(True), steps=400, lr=5e-3, seed=2)
    peft_model.save_pretrained(OUT / "adapter")
    cfg_path = OUT / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "demo/base"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (OUT / "adapter" / "README.md").write_text(
        "---\nbase_model: demo/base\nlibrary_name: peft\ntags:\n- lora\n- demo\n---\n\n# Pirate LoRA (demo)\n\n"
        "A rank-8 LoRA on every projection of `demo/base`, trained by `scripts/make_demo.py` to answer like a "
        "pirate.\n")

    prompts = ["how is the weather in paris ?", "where does the frog live ?", "what should i eat today ?"]
    (OUT / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")

    from peft import PeftModel

    check_base = LlamaForCausalLM.from_pretrained(OUT / "base").eval()
    check_peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(OUT / "base"), OUT / "adapter").eval()
    for prompt in prompts:
        print(f"> {prompt}\n  base:    {answer(check_base, tok, prompt)}\n  adapter: {answer(check_peft, tok, prompt)}")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"losses: base {base_loss:.3f}, adapter {adapter_loss:.3f}; demo/ is {size / 1e6:.2f} MB; "
          f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
