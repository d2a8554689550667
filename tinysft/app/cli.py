"""The ``tinysft`` command: finetune (the main job), ensemble, distill, eval, predict, embed, verify,
generate, chat, sft, serve.

Errors a user can act on (a missing model, a bad config, a corrupt checkpoint,
a dataset with an unknown label, ...) print one line and exit with status 2;
``--debug`` shows the traceback instead.
"""
import argparse
import sys

from .. import __version__
from ..backend import keep_freed_memory
from .config import CHAT, FINETUNE, GENERATE, SFT
from .distill import DISTILL
from .serve import SERVE


def _parser():
    parser = argparse.ArgumentParser(prog="tinysft", description="Supervised fine-tuning with a from-scratch autograd engine.")
    parser.add_argument("--version", action="version", version=f"tinysft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    common = argparse.ArgumentParser(add_help=False)  # lets --debug follow the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help):
        return commands.add_parser(name, help=help, parents=[common])

    finetune = command("finetune", "fine-tune a pretrained encoder on a classification task "
                                                    "(default: MiniLM-L6 on WordNet supersenses)")
    finetune.add_argument("--config", help="TOML file with settings (flags override it)")
    folder = finetune.add_mutually_exclusive_group()  # what to do when --out already holds a run
    folder.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (a fresh start if it has none)")
    folder.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh")
    FINETUNE.add_flags(finetune)
    finetune.add_argument("--seeds", metavar="S,S,...",
                          help="train one run per seed in OUT/seed<S> (train_seed S, the split of --seed), "
                               "then evaluate their ensemble")

    ensemble = command("ensemble", "evaluate runs and their ensembles (mean of probabilities, majority vote) "
                                   "on the runs' common test split")
    ensemble.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")

    distill = command("distill", "train a shallower student on a finished run's soft targets: a finetune run "
                                 "(3 of MiniLM's 6 layers) or an sft run (15 of SmolLM2's 30), every other layer")
    distill.add_argument("teacher_run")
    distill.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh")
    DISTILL.add_flags(distill)

    evaluate = command("eval", "evaluate a run's best checkpoint on its test split")
    evaluate.add_argument("run_dir")

    predict = command("predict", "classify texts with a run's best checkpoint")
    predict.add_argument("run_dir")
    predict.add_argument("texts", nargs="+")

    embed = command("embed", "print L2-normalised sentence embeddings (mean pooling)")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--model", default="auto", help="model folder or 'auto' (MiniLM-L6)")
    embed.add_argument("--json", action="store_true", help="print JSON lists instead of a summary")

    verify = command("verify", "check every fine-tuning formula numerically")
    verify.add_argument("--only", action="append", help="run only this check (repeatable)")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument("--explain", metavar="NAME", help="print the derivation of one check")
    verify.add_argument("--list", action="store_true", help="list the checks")

    generate = command("generate", "reply to one prompt with a causal decoder (default: SmolLM2-135M-Instruct), "
                                   "streamed, then the rate on stderr")
    generate.add_argument("prompt")
    GENERATE.add_flags(generate)

    chat = command("chat", "talk to a decoder, the conversation kept (Ctrl-D quits, /reset forgets it)")
    chat.add_argument("run_dir", nargs="?", help="a tinysft sft run folder: talk to its tuned model "
                                                 "(default: the decoder of --model)")
    CHAT.add_flags(chat)

    sft = command("sft", "instruction-tune a causal decoder, test it before and after, export it (default: LoRA "
                         "on SmolLM2-135M-Instruct with WordNet questions, about ten minutes)")
    sft.add_argument("--config", help="TOML file with settings (flags override it)")
    sft.add_argument("--show-mask", action="store_true",
                     help="print a few training examples with their trained and ignored tokens, and exit")
    sft.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    SFT.add_flags(sft)
    sft.add_argument("--full", dest="strategy", action="store_const", const="full",
                     help="full fine-tuning of every weight: --strategy full")

    serve = command("serve", "serve a run over HTTP: POST /v1/classify for a classifier run, the OpenAI-style "
                             "POST /v1/chat/completions for a decoder")
    serve.add_argument("run_dir", nargs="?", help="a finetune run, or a folder holding a decoder "
                                                  "(default: the decoder of --model)")
    SERVE.add_flags(serve)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    keep_freed_memory()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("tinysft: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, LookupError, ImportError) as error:
        if args.debug:
            raise
        print(f"tinysft: error: {error}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    """Each command's body is its own module of tinysft.app, imported only when that command runs."""
    if args.command == "finetune" and args.seeds is not None:
        from .config import ConfigError
        from .ensemble import finetune_seeds, parse_seeds
        if args.train_seed is not None:
            raise ConfigError("--seeds sets each member's train_seed: give one of --seeds and --train-seed")
        return finetune_seeds(FINETUNE.build(args.config, FINETUNE.overrides(args)), parse_seeds(args.seeds),
                              resume=args.resume, overwrite=args.overwrite)
    if args.command == "distill":
        from .distill import distill_command
        return distill_command(args.teacher_run, DISTILL.overrides(args), overwrite=args.overwrite)
    if args.command == "ensemble":
        from .ensemble import ensemble
        return ensemble(args.run_dirs)
    if args.command == "finetune":
        from .finetune import finetune
        return finetune(FINETUNE.build(args.config, FINETUNE.overrides(args)), resume=args.resume,
                        overwrite=args.overwrite)
    if args.command == "eval":
        from .evaluate import evaluate
        return evaluate(args.run_dir)
    if args.command == "predict":
        from .predict import predict
        return predict(args.run_dir, args.texts)
    if args.command == "embed":
        from .embed import embed
        return embed(args.texts, args.model, as_json=args.json)
    if args.command == "verify":
        from ..verify import main as verify_main
        return verify_main(only=args.only, seed=args.seed, dtype=args.dtype, as_json=args.json,
                           explain=args.explain, list_checks=args.list)
    if args.command == "generate":
        from .generate import generate_command
        return generate_command(args.prompt, GENERATE.build(None, GENERATE.overrides(args)))
    if args.command == "chat":
        from .chat import chat
        return chat(CHAT.build(None, CHAT.overrides(args)), args.run_dir)
    if args.command == "sft":
        from .sft import sft
        return sft(SFT.build(args.config, SFT.overrides(args)), show_mask=args.show_mask, overwrite=args.overwrite)
    if args.command == "serve":
        from .serve import serve
        return serve(args.run_dir, SERVE.build(None, SERVE.overrides(args)))
    raise AssertionError(args.command)
