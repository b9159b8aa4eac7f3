"""The `mm-llama` command.

    mm-llama ask --checkpoint DIR "question"          # chat-formatted, answer streamed to stdout
    mm-llama ask --checkpoint DIR --audio Q.wav [--image F]   # a spoken question
    mm-llama transcribe [--checkpoint DIR] [--language L] F    # speech to text (long audio in chunks)
    mm-llama convert --input DIR --output DIR [--to meta|hf|ours] [--shards N]
    mm-llama export --checkpoint DIR --out DIR [--trunk DIR]   # self-contained copy of an adapter checkpoint
    mm-llama train STAGE --config FILE [--resume] [--section.key=value ...]
    mm-llama data synth --kind text|image|video|speech --out DIR --n N [--seed S] [--split train|heldout] [--size PX]
                        [--questions Q] [--type-weights TYPE=W,...] [--time-share F]
    mm-llama data pack --kind text|image|video|speech --input LIST.jsonl --out DIR
    mm-llama eval [--checkpoint DIR] --suite shapes [--n-per-type N] [--seed S] [--task NAME ...] [--json FILE]
                                                      # held-out accuracy per task and question type
    mm-llama recipe demo --out DIR [--size full|tiny]        # train the embedded demo model, every stage in turn
    mm-llama demo [--checkpoint DIR] [--port N] [--host H]     # a chat in the browser (pip install "mm-llama[demo]")

Errors a user can cause are `MMLlamaError`s: printed as one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_llama.errors import InputError, MMLlamaError


def _device_and_dtype(args: argparse.Namespace):
    """--device and --dtype as a torch device and dtype (auto: the GPU if there is one; bf16 there, fp32 on the CPU)."""
    from mm_llama.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device, "--device")
    return device, resolve_dtype(args.dtype, device, "--dtype")


def cmd_ask(args: argparse.Namespace) -> None:
    from mm_llama.api import Assistant

    if args.question is None and args.audio is None:  # said before the model loads
        raise InputError("give a question, --audio FILE with a spoken question, or both")
    device, dtype = _device_and_dtype(args)
    # One path for every checkpoint kind (Meta, HF or mm-llama; a trunk or a model with parts).
    assistant = Assistant.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, hf_compat=args.hf_compat,
                                          dtype=dtype, device=device, compile=args.compile)
    for piece in assistant.ask_stream(args.question, images=args.image or None, video=args.video, audio=args.audio,
                                      system=args.system, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_transcribe(args: argparse.Namespace) -> None:
    from mm_llama.api import Assistant

    device, dtype = _device_and_dtype(args)
    assistant = Assistant.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, dtype=dtype, device=device)
    text = assistant.transcribe(args.audio, language=args.language, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size)
    print(text)
    if not text:  # an empty line alone would look like a failure
        print(f"mm-llama: no speech heard in {args.audio}: the transcript is empty", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> None:
    from mm_llama.checkpoints import convert_checkpoint

    written = convert_checkpoint(args.input, args.output, to=args.to, n_shards=args.shards)
    print(f"wrote {written} checkpoint to {args.output}")


def cmd_export(args: argparse.Namespace) -> None:
    from mm_llama.checkpoints import export_checkpoint

    trunk = export_checkpoint(args.checkpoint, args.out, trunk=args.trunk)
    print(f"wrote a self-contained mm-llama checkpoint to {args.out}" + (f" (trunk from {trunk})" if trunk else ""))


def cmd_train(args: argparse.Namespace) -> int:
    from mm_llama.train import run_stage

    result = run_stage(args.stage, args.config, args.overrides, args.resume)
    # Stopped by SIGTERM/SIGINT after a checkpoint: the shell's status for that signal, so `train && next` stops.
    return 128 + result.stop_signal if result.stop_signal else 0


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "synth":
        common = {"seed": args.seed, "split": args.split, "shard_size": args.shard_size, "workers": args.workers}
        if args.time_share is not None and args.kind != "video":
            raise InputError(f"--time-share {args.time_share} applies to --kind video (only clips have an order)")
        if args.kind == "text":
            from mm_llama.data.synth_text import synth_text

            if args.size is not None:
                raise InputError(f"--size {args.size} applies to --kind image or video (text has no pixels)")
            if args.type_weights is not None:
                raise InputError("--type-weights applies to --kind image or video")
            if args.questions is not None:
                raise InputError(f"--questions {args.questions} applies to --kind image or video (a text "
                                 "sample's questions follow its own kind)")
            shards = synth_text(Path(args.out), args.n, **common)
        elif args.kind == "speech":
            from mm_llama.data.synth_speech import synth_speech

            for flag, value in (("--size", args.size), ("--questions", args.questions),
                                ("--type-weights", args.type_weights)):
                if value is not None:
                    raise InputError(f"{flag} {value} applies to --kind image or video (speech samples are one "
                                     "spoken sentence each)")
            shards = synth_speech(Path(args.out), args.n, **common)
        elif args.kind == "video":
            from mm_llama.data.synth_video import QUESTIONS_PER_CLIP, TIME_SHARE, synth_video
            from mm_llama.data.world_draw import DEFAULT_SIZE

            size = DEFAULT_SIZE if args.size is None else args.size
            questions = QUESTIONS_PER_CLIP if args.questions is None else args.questions
            time_share = TIME_SHARE if args.time_share is None else args.time_share
            shards = synth_video(Path(args.out), args.n, size=size, questions=questions,
                                 type_weights=_type_weights(args.type_weights), time_share=time_share, **common)
        else:  # "image": the parser accepts only the kinds that exist
            from mm_llama.data.synth_image import QUESTIONS_PER_IMAGE, synth_image
            from mm_llama.data.world_draw import DEFAULT_SIZE

            size = DEFAULT_SIZE if args.size is None else args.size
            questions = QUESTIONS_PER_IMAGE if args.questions is None else args.questions
            shards = synth_image(Path(args.out), args.n, size=size, questions=questions,
                                 type_weights=_type_weights(args.type_weights), **common)
    else:
        from mm_llama.data.pack import pack

        shards = pack(args.kind, Path(args.input), Path(args.out), shard_size=args.shard_size)
    print(f"wrote {len(shards)} shard(s) to {args.out}")


def _type_weights(text: str | None) -> dict[str, float] | None:
    """"shape=2,colour=2" -> {"shape": 2.0, "colour": 2.0}; None stays None."""
    if text is None:
        return None
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)  # an item with no "=" has the value "", which is no number either
        except ValueError:
            raise InputError(f"--type-weights {text!r}: each item must be TYPE=NUMBER, e.g. 'shape=2,relative "
                             f"position=2'; got {item!r}") from None
    return weights


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from mm_llama.api import Assistant
    from mm_llama.evaluation.runner import evaluate
    from mm_llama.evaluation.tasks import suite_tasks

    suite_tasks(args.suite, args.task)  # an unknown suite or task is said before the model loads
    if args.json and not Path(args.json).resolve().parent.is_dir():  # not after the whole run
        raise InputError(f"--json {args.json}: its folder does not exist; create it or pass another file")
    device, dtype = _device_and_dtype(args)
    assistant = Assistant.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    report = evaluate(assistant, args.suite, n_per_type=args.n_per_type, seed=args.seed, tasks=args.task,
                      checkpoint=str(args.checkpoint))
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
        print(f"wrote {args.json}")


def cmd_recipe(args: argparse.Namespace) -> int:
    from mm_llama.recipe import run_recipe

    return run_recipe(args.recipe, args.out, size=args.size, skip_eval=args.no_eval, image_model=args.image_model,
                      video_model=args.video_model)


def cmd_demo(args: argparse.Namespace) -> None:
    from mm_llama.demo import launch

    device, dtype = _device_and_dtype(args)
    launch(args.checkpoint, host=args.host, port=args.port, device=device, dtype=dtype,
           max_upload_mb=args.max_upload_mb)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where there is nothing to show (None, off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _use_formatter(child)


def build_parser() -> argparse.ArgumentParser:
    from mm_llama import __version__

    parser = argparse.ArgumentParser(prog="mm-llama", description="Llama 3 with eyes, ears and a voice.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question with a checkpoint (streamed to stdout)")
    ask.add_argument("question", nargs="?", help="the question (quote it); may be left out with --audio")
    ask.add_argument("--checkpoint", default="demo", help="checkpoint directory: Meta, Hugging Face or mm-llama; a "
                     "Llama 3 trunk, Llama 3.2 Vision or a model trained by mm-llama's stages; 'demo' is the small "
                     "shapes-world model inside the package (a local folder named demo: ./demo)")
    ask.add_argument("--tokenizer", help="tokenizer.model (default: the one in the checkpoint directory)")
    ask.add_argument("--system", help="system prompt")
    ask.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer in tokens (it also ends at a "
                     "stop token and where the context ends)")
    ask.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    ask.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    ask.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens with "
                     "this probability mass")
    ask.add_argument("--seed", type=int, help="seed of the sampler (reproducible answers at temperature > 0)")
    ask.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N or mps")
    ask.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                     help="weights' precision; auto: bf16 on a GPU, fp32 on the CPU")
    ask.add_argument("--compile", action="store_true", help="compile the decode step and encoders (CUDA only)")
    ask.add_argument("--image", action="append", help="an image to ask about (repeat for several)")
    ask.add_argument("--video", help="a video file to ask about (a model with a video adapter): frames sampled "
                     "uniformly over the whole clip")
    ask.add_argument("--audio", help="an audio file with a spoken question or message (a model with a speech "
                     "adapter): WAV, FLAC, OGG, MP3, ...; longer than the model's limit (60 s at the paper's "
                     "settings), it is split into chunks, never cut")
    ask.add_argument("--hf-compat", action="store_true",
                     help="Llama 3.2 Vision: reproduce transformers' semantics instead of Meta's")
    ask.set_defaults(func=cmd_ask)

    transcribe = sub.add_parser("transcribe", help="write down what is said in an audio file (a model with a speech "
                                "adapter)")
    transcribe.add_argument("audio", help="the audio file: WAV, FLAC, OGG, MP3, ... (any length: long audio is "
                            "transcribed in chunks cut at pauses, read one at a time)")
    transcribe.add_argument("--checkpoint", default="demo", help="checkpoint directory, as for ask (default: the "
                            "embedded demo model)")
    transcribe.add_argument("--tokenizer", help="tokenizer.model (default: the one in the checkpoint directory)")
    transcribe.add_argument("--language", default="English", help="the language to write in (the recognition "
                            "prompt 'Repeat after me in LANGUAGE:')")
    transcribe.add_argument("--max-new-tokens", type=int, default=256, help="the longest transcript of one chunk, "
                            "in tokens")
    transcribe.add_argument("--batch-size", type=int, default=8, help="chunks transcribed together")
    transcribe.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N or "
                            "mps")
    transcribe.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                            help="weights' precision; auto: bf16 on a GPU, fp32 on the CPU")
    transcribe.set_defaults(func=cmd_transcribe)

    convert = sub.add_parser("convert", help="convert a trunk or Llama 3.2 Vision checkpoint between the Meta, "
                             "Hugging Face and mm-llama formats")
    convert.add_argument("--input", required=True, help="checkpoint directory to read")
    convert.add_argument("--output", required=True, help="directory to write (must not exist)")
    convert.add_argument("--to", choices=["meta", "hf", "ours"],
                         help="output format (default: hf for a Meta input, meta otherwise)")
    convert.add_argument("--shards", type=int, default=1, help="model-parallel shards for Meta output")
    convert.set_defaults(func=cmd_convert)

    export = sub.add_parser("export", help="write a self-contained copy of an mm-llama checkpoint (the trunk it refers "
                            "to stored in it) that can be moved, copied and shared alone")
    export.add_argument("--checkpoint", required=True, help="mm-llama checkpoint directory, e.g. an adapter stage's")
    export.add_argument("--out", required=True, help="new directory to write")
    export.add_argument("--trunk", help="trunk checkpoint directory to take when the one the checkpoint refers to was "
                        "moved or deleted (its weights are checked against the recorded fingerprint)")
    export.set_defaults(func=cmd_export)

    train = sub.add_parser("train", help="train a stage (torchrun-launchable)",
                           description="Any further --section.key=value overrides the YAML config.")
    train.add_argument("stage", help="lm, vision-pretrain, image-adapter, video-adapter, speech-pretrain or "
                       "speech-adapter")
    train.add_argument("--config", help="stage YAML (configs/...)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of train.out_dir")
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="write webdataset shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate shapes-world shards")
    synth.add_argument("--kind", required=True, choices=["text", "image", "video", "speech"],
                       help="what to generate (speech: espeak-ng reading the world's questions and captions)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--n", type=int, required=True, help="number of samples")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same shards")
    synth.add_argument("--split", default="train", choices=["train", "heldout"], help="which scenes and sentences: "
                       "the two splits share none (evaluate on heldout)")
    synth.add_argument("--size", type=int, help="image or video side in pixels, >= 30, even for video (image and "
                       "video only; default 84: cells of 28 px)")
    synth.add_argument("--questions", type=int, help="questions per picture or clip, >= 1 (image and video only; "
                       "default 4: the first and 3 follow-ups, trained as one chat)")
    synth.add_argument("--type-weights", help="image and video only: relative weights of question types, e.g. "
                       "'shape=2,relative position=2' (unnamed types weigh 1; for video the event types 'motion', "
                       "'colour change', 'appearance', 'disappearance' weigh 1.75 unless named)")
    synth.add_argument("--time-share", type=float, help="video only: the chance, 0-1, that a question is drawn "
                       "among those that need time (that a shuffled clip cannot answer), where the clip has one "
                       "(default 0.7)")
    synth.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    synth.add_argument("--workers", type=int, default=None,
                       help="processes drawing samples (default: the usable cores, at most 16); the data do not "
                            "depend on it")
    pack = data_sub.add_parser("pack", help="pack a JSONL list of texts and files into shards")
    pack.add_argument("--kind", required=True, choices=["text", "image", "video", "speech"], help="sample layout")
    pack.add_argument("--input", required=True, help="JSONL, one sample per line")
    pack.add_argument("--out", required=True, help="output directory")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    data.set_defaults(func=cmd_data)

    evaluation = sub.add_parser("eval", help="accuracy on a held-out suite, per task and question type")
    evaluation.add_argument("--checkpoint", default="demo", help="checkpoint directory, as for ask (default: the "
                            "embedded demo model)")
    # No argparse choices: an unknown suite is an InputError of one line that names the known ones.
    evaluation.add_argument("--suite", required=True, help="shapes: the shapes world's held-out "
                            "split (text-qa: a caption and a question; image-qa: the picture and a question)")
    evaluation.add_argument("--task", action="append", help="run only this task (repeat for several)")
    evaluation.add_argument("--n-per-type", type=int, default=50, help="questions per question type of each task")
    evaluation.add_argument("--seed", type=int, default=0, help="which held-out questions (the same seed, the same)")
    evaluation.add_argument("--json", help="also write the report as JSON to this file")
    evaluation.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N or mps")
    evaluation.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                            help="weights' precision; auto: bf16 on a GPU, fp32 on the CPU")
    evaluation.set_defaults(func=cmd_eval)

    recipe = sub.add_parser("recipe", help="train a model from nothing, every stage in turn (resumable: run the "
                            "same command again after an interruption)")
    recipe.add_argument("recipe", choices=["demo"],
                        help="demo: the embedded shapes-world model (lm -> image-adapter -> video-adapter -> "
                        "speech-pretrain -> speech-adapter)")
    recipe.add_argument("--out", required=True, help="run folder: data, each stage's checkpoints, model/, eval.json")
    recipe.add_argument("--size", default="full", choices=["full", "tiny"], help="full: the shipped model (about 25 "
                        "minutes on one H200); tiny: every step with a handful of training steps (a CPU minute)")
    recipe.add_argument("--no-eval", action="store_true", help="skip the final mm-llama eval --suite shapes")
    recipe.add_argument("--image-model", help="build on this trained image model (a checkpoint directory with an image "
                        "adapter, or 'demo') instead of training one: only the video and speech steps, the model and "
                        "the eval run")
    recipe.add_argument("--video-model", help="build on this trained video model (a checkpoint directory with a video "
                        "adapter, or 'demo'): only the speech steps, the model and the eval run")
    recipe.set_defaults(func=cmd_recipe)

    demo = sub.add_parser("demo", help="chat with a checkpoint in the browser: image upload, streamed answers "
                          '(needs pip install "mm-llama[demo]")')
    demo.add_argument("--checkpoint", help="checkpoint directory, as for ask (default: the embedded demo model)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens the demo to the "
                      "network (anyone who reaches it can use the model and upload files)")
    demo.add_argument("--port", type=int, default=7860, help="TCP port")
    demo.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N or mps")
    demo.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                      help="weights' precision; auto: bf16 on a GPU, fp32 on the CPU")
    demo.add_argument("--max-upload-mb", type=float, default=10, help="the largest file a user may upload, in MB")
    demo.set_defaults(func=cmd_demo)
    _use_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = rest  # --section.key=value pairs, checked against the stage's config
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args) or 0
    except MMLlamaError as e:
        print(f"mm-llama: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
