"""`tailserve fetch | serve | gateway | generate | chat | bench | plan`."""

from __future__ import annotations

import argparse
import sys

from tailserve.bench.cli import add_parser as add_bench_parser
from tailserve.bench.plan_cli import add_parser as add_plan_parser
from tailserve.config import DEFAULT_MODEL, EngineConfig, add_dataclass_args, dataclass_from_args
from tailserve.gateway.cli import add_parser as add_gateway_parser
from tailserve.server.cli import add_parser as add_serve_parser


def _fetch(args: argparse.Namespace) -> int:
    from tailserve.models.loader import resolve_model

    if not args.prepare:
        print(resolve_model(args.model))
        return 0
    import threading

    from tailserve.layers import kernels
    from tailserve.models.meta_cache import cached_config, cached_tokenizer

    # The kernels compile (compiler processes, their translation units in parallel) while the model
    # downloads (network) and then its config and tokenizer caches fill: a fresh machine waits for the
    # longest of these, not their sum.
    build = threading.Thread(target=kernels.ops, name="tailserve-kernels", daemon=True)
    build.start()
    path = resolve_model(args.model)
    print(path)
    cached_config(path)
    cached_tokenizer(path)
    build.join()
    from tailserve.engine.load import load_engine

    load_engine(EngineConfig(model=args.model))  # fills the packed-weight cache
    return 0


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", dest="request_seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[])


def _generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tailserve.llm import LLM
    from tailserve.sampling import SamplingParams

    config = dataclass_from_args(EngineConfig, args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.request_seed,
        stop=args.stop,
    )
    llm = LLM(**asdict(config))
    prompt = args.prompt
    if args.command == "chat":
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
        if out.finished:
            sys.stdout.write("\n")
            if out.error:
                print(f"error: {out.error}", file=sys.stderr)
                return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download a named model into the cache (offline once cached)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--prepare",
        action="store_true",
        help="also build this CPU's kernels (during the download) and the model's caches: a fast first start",
    )
    p.set_defaults(func=_fetch)
    add_bench_parser(sub)
    add_plan_parser(sub)
    add_serve_parser(sub)
    add_gateway_parser(sub)
    for name, text in (("generate", "complete a prompt"), ("chat", "answer one chat message")):
        p = sub.add_parser(name, help=f"{text}, streaming the text to the terminal")
        p.add_argument("prompt")
        add_dataclass_args(p, EngineConfig, skip=("seed",))
        _sampling_args(p)
        p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
