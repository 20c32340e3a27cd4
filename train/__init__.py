"""Lingli's training module: the checkpoints the runtime runs, tokenizer included.

    tokenizer.py   train a sentencepiece model; extend one with another's pieces
                   and resize a checkpoint to match; prune a vocabulary to a
                   corpus and slice the checkpoint to match
    data.py        text corpora, packed pretraining sequences, instruction JSONL
                   (Alpaca, Firefly, conversations) rendered with the runtime's
                   chat templates, loss on the responses only
    model.py       a LLaMA (transformers' LlamaForCausalLM) of a given size
    loop.py        AdamW, warmup + cosine, accumulation, clipping, bf16 autocast,
                   eval loss, exact resume; DeepSpeed (ZeRO) with --deepspeed
    export.py      Hugging Face format (safetensors, config.json,
                   tokenizer.model, chat template) that transformers and Lingli load

`python -m train --help` lists the commands. torch (and deepspeed for
--deepspeed) are needed here only; the runtime never imports train/.
"""
