"""One SFT step and one DPO step of the real TRL on magpie's raw JSONL.

Run as a script (``python tests/support/trl_one_step.py SFT_FILE [DPO_FILE] WORKDIR``) so
that the caller sets ``PYTHONHASHSEED``: TRL's ``is_conversational`` pops one of
the reserved keys of an example from a set, whose order depends on it.  The
model and its tokenizer are built here, tiny and randomly initialised (nothing
is downloaded).  Prints one JSON line: the key TRL looked at and the losses.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL = ["<unk>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def tiny_model_and_tokenizer(texts: list[str]):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def popped_key(example: dict) -> str:  # type: ignore[type-arg]
    """The key ``trl.data_utils.is_conversational`` takes from this example."""
    supported = ["prompt", "chosen", "rejected", "completion", "messages"]
    return {k for k in example if k in supported}.pop()


def main(sft_file: str, dpo_file: str | None, workdir: str) -> None:
    import torch
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.manual_seed(0)
    out = Path(workdir)
    sft = load_dataset("json", data_files=sft_file, split="train")
    texts = [m["content"] for row in sft["messages"] for m in row]
    dpo = load_dataset("json", data_files=dpo_file, split="train") if dpo_file else None
    if dpo is not None:
        texts += [m["content"] for row in dpo["rejected"] for m in row]
    model, tokenizer = tiny_model_and_tokenizer(texts)
    ref_model = copy.deepcopy(model)  # DPO's reference (it would load one by its hub id)
    common = {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": [], "use_cpu": True}
    common |= {"save_strategy": "no", "logging_steps": 1, "disable_tqdm": True}
    result: dict[str, object] = {"sft_key": popped_key(sft[0])}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(out / "sft"), **common),
        train_dataset=sft,
        processing_class=tokenizer,
    )
    result["sft_loss"] = trainer.train().training_loss
    if dpo is not None:
        result["dpo_key"] = popped_key(dpo[0])
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=DPOConfig(output_dir=str(out / "dpo"), **common),
            train_dataset=dpo,
            processing_class=tokenizer,
        )
        result["dpo_loss"] = trainer.train().training_loss
    print(json.dumps(result))


if __name__ == "__main__":
    *files, workdir = sys.argv[1:]
    main(files[0], files[1] if len(files) > 1 else None, workdir)
